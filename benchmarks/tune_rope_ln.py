"""Sweep the launch configurations of RoPE and LayerNorm on the GPU; compare with inductor.

    python benchmarks/tune_rope_ln.py                    # all cases, about 2-3 minutes on an H200
    python benchmarks/tune_rope_ln.py --ops rope --rep 20
    OUT=/some/dir python benchmarks/tune_rope_ln.py      # JSON to $OUT/tune_rope_ln.json
    python benchmarks/tune_rope_ln.py --smoke            # CPU check of the script (interpreter)

Knobs swept (tuning entries, kernels/tuning.py, that the launchers read):
  "rope"        tile = (rotated elements per program, most heads per program, num_warps);
                default rope.DEFAULT_TILE.
  "layer_norm"  tile = (BLOCK_M rows per program, num_warps[, programs per SM of the dW/dB
                grid]); default: layer_norm.tile_config's table by kind
                         ("fwd", "bwd" without dW/dB, "bwd_dw").

The launchers are timed directly (outputs preallocated) with triton.testing.do_bench_cudagraph:
GPU time of back-to-back replays, no Python dispatch (do_bench where capture fails; the JSON
says which). Every configuration's output is checked against the PyTorch reference first.
GB/s counts the fewest bytes the op must move (RoPE: read x, write y, read cos/sin once;
LayerNorm fwd: x, y, mean/rstd; bwd: dy, x, dx, mean/rstd), against the 4.22 TB/s copy rate.
Inductor compiles the same eager function (HF rotate_half RoPE and its transpose; F.layer_norm
and aten.native_layer_norm_backward) and is timed the same way, as is aten eager LayerNorm.
Note: no L2 flush between replays, so the smaller cases are partly L2-resident for every impl.
A --budget-s deadline skips the remaining non-default configurations, so the run stays short.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

COPY_GBPS = 4220.0
ROPE_TILES = [(8192, 32, 8), (2048, 32, 4), (4096, 32, 4), (4096, 32, 8), (8192, 32, 4),
              (8192, 32, 16), (16384, 32, 8), (16384, 32, 16), (4096, 8, 4), (8192, 8, 8),
              (1024, 32, 2), (1024, 32, 4), (2048, 32, 2), (2048, 16, 4), (2048, 8, 4)]
LN_TILES = [(1, 2), (1, 4), (1, 8), (1, 16), (1, 32), (2, 4), (2, 8), (2, 16), (2, 32), (4, 8),
            (4, 16), (4, 32), (8, 16)]
LN_MAX_CONFIGS = 8


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", default="rope,layer_norm", help="comma-separated: rope, layer_norm")
    ap.add_argument("--rep", type=int, default=10, help="ms of replays per timing (x10 retries)")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="seconds for the sweeps, shared out over the cases; past a case's share "
                         "only its default and baselines are timed")
    ap.add_argument("--no-inductor", action="store_true", help="skip the inductor baselines")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU through the Triton interpreter (checks the script)")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:  # must be set before the kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
from fastlora.kernels import layer_norm as LN  # noqa: E402
from fastlora.kernels import rope as R  # noqa: E402
from fastlora.kernels import tuning  # noqa: E402

DEV = "cpu" if ARGS.smoke else "cuda"
# RoPE: (name, B, T, q heads, k heads, head dim), q/k as HF passes them ([B, T, H, D] viewed as
# [B, H, T, D]); LayerNorm: (rows, features). --smoke: tiny ones.
ROPE_SHAPES = [("smoke", 2, 5, 4, 2, 16)] if ARGS.smoke else \
    [("8B", 4, 2048, 32, 8, 128), ("1B", 4, 2048, 32, 8, 64)]
LN_SHAPES = [(40, 256)] if ARGS.smoke else [(8192, 2048), (8192, 4096), (8192, 8192)]
DT = torch.bfloat16
START = time.time()
SUMMARY = []  # one entry per (op, shape, direction), from report()
SCHEDULE = {"keys": 1, "done": 0}  # the budget is shared out over (op, shape, direction)


def bench(fn):
    """(median ms, timer name)."""
    if ARGS.smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, "wall (smoke)"
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=ARGS.rep, return_mode="median"), \
            "cudagraph"
    except Exception as e:  # noqa: BLE001  (capture failed: time with dispatch instead)
        torch.cuda.synchronize()
        print(f"    graph capture failed ({type(e).__name__}: {str(e)[:80]}); using do_bench")
        return triton.testing.do_bench(fn, return_mode="median"), "do_bench"


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def sweep(rows, key, op, default, configs, run, check, nbytes):
    """Time ``run`` under every configuration (the default first) set as tuning entry ``op``'s
    tile."""
    SCHEDULE["done"] += 1
    deadline = START + ARGS.budget_s * SCHEDULE["done"] / SCHEDULE["keys"]
    for cfg in [default] + [c for c in configs if c != default]:
        if cfg != default and time.time() > deadline:
            rows.append({**key, "impl": "fastlora", "config": list(cfg), "skipped": "budget"})
            continue
        tuning.set(op, tile=cfg)
        try:
            run()
            err = check()
            ms, timer = bench(run)
        except Exception as e:  # noqa: BLE001  (e.g. out of resources: record and go on)
            rows.append({**key, "impl": "fastlora", "config": list(cfg), "error": repr(e)[:200]})
            continue
        finally:
            tuning.reset(op)
        rows.append({**key, "impl": "fastlora", "config": list(cfg), "default": cfg == default,
                     "ms": ms, "gbps": nbytes / ms / 1e6, "err": err, "ok": err < 1e-2,
                     "timer": timer})


def baseline(rows, key, impl, fn, nbytes):
    if impl == "inductor" and (ARGS.no_inductor or ARGS.smoke):
        return
    try:
        fn()  # compiles
        ms, timer = bench(fn)
        rows.append({**key, "impl": impl, "ms": ms, "gbps": nbytes / ms / 1e6, "timer": timer})
    except Exception as e:  # noqa: BLE001
        rows.append({**key, "impl": impl, "error": repr(e)[:200]})


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- RoPE


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rotate_half_t(g):  # the transpose of rotate_half: cat(g2, -g1)
    h = g.shape[-1] // 2
    return torch.cat((g[..., h:], -g[..., :h]), -1)


def rope_eager(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_eager_bwd(gq, gk, cos, sin):  # d/dx of x * cos + rotate_half(x) * sin
    return gq * cos + rotate_half_t(gq * sin), gk * cos + rotate_half_t(gk * sin)


def tune_rope(rows):
    fwd_c, bwd_c = compiled(rope_eager), compiled(rope_eager_bwd)
    for name, B, T, Hq, Hk, D in ROPE_SHAPES:
        heads = lambda h: torch.randn(B, T, h, D, device=DEV, dtype=DT).transpose(1, 2)
        q, k, gq, gk = heads(Hq), heads(Hk), heads(Hq), heads(Hk)
        pos = torch.arange(T, device=DEV).float()
        inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEV).float() / D)
        emb = torch.cat([pos[:, None] * inv] * 2, -1).expand(B, T, D)
        cos, sin = emb.cos().to(DT).unsqueeze(1), emb.sin().to(DT).unsqueeze(1)
        qo, ko, dq, dk = (torch.empty_like(t) for t in (q, k, gq, gk))
        want_f = R.rope_forward_reference(q, k, cos, sin, D)
        want_b = R.rope_backward_reference(gq, gk, cos, sin, D, False, DT, DT)
        nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * B * T * D * 2
        label = f"{name} q[{B},{Hq},{T},{D}] k[{B},{Hk},{T},{D}] bf16"
        for direction, run, got, want, inductor in (
                ("fwd", lambda: R.rope_forward_triton(q, k, cos, sin, D, False, qo, ko),
                 (qo, ko), want_f, lambda: fwd_c(q, k, cos, sin)),
                ("bwd", lambda: R.rope_backward_triton(gq, gk, cos, sin, D, False, DT, DT, dq, dk),
                 (dq, dk), want_b, lambda: bwd_c(gq, gk, cos, sin))):
            key = {"op": "rope", "shape": label, "direction": direction}
            check = lambda got=got, want=want: max(rel_err(g, w) for g, w in zip(got, want))
            sweep(rows, key, "rope", R.DEFAULT_TILE, ROPE_TILES, run, check, nbytes)
            baseline(rows, key, "inductor", inductor, nbytes)
            SUMMARY.append(report(rows, key))


# ---------------------------------------------------------------- LayerNorm


def ln_eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def ln_eager_bwd(dy, x, mean, rstd, w, b, dwdb: bool):
    return torch.ops.aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, b,
                                                     [True, dwdb, dwdb])


def ln_tiles(n, kind):
    """Up to LN_MAX_CONFIGS tiles with 8..64 float32 values of a row per thread (no spills)."""
    fits = [t for t in LN_TILES if 8 <= t[0] * triton.next_power_of_2(n) // (t[1] * 32) <= 64]
    tiles = fits[:LN_MAX_CONFIGS]
    if kind == "bwd_dw":  # the grid size only: no recompile
        bm, _, warps = LN.tile_config(n, 2, kind)
        per_sm = tuning.defaults("layer_norm")["dw_programs_per_sm"]
        tiles = [(*t, per_sm) for t in tiles]
        tiles += [(bm, warps, per_sm) for per_sm in (1, 2, 8)]
    return tiles


def tune_layer_norm(rows):
    fwd_c, bwd_c = compiled(ln_eager), compiled(ln_eager_bwd)
    for M, N in LN_SHAPES:
        x, dy = (torch.randn(M, N, device=DEV, dtype=DT) for _ in range(2))
        w, b = (torch.randn(N, device=DEV, dtype=DT) for _ in range(2))
        y, dx = torch.empty_like(x), torch.empty_like(x)
        mean, rstd = (torch.empty(M, device=DEV, dtype=torch.float32) for _ in range(2))
        want_y, want_mean, want_rstd = LN.layer_norm_forward_reference(x, w, b, 1e-5)
        _, m2, r2 = torch.ops.aten.native_layer_norm(x, [N], w, b, 1e-5)  # aten's mean / rstd
        LN.layer_norm_forward_triton(x, w, b, 1e-5, y, mean, rstd)  # mean / rstd for backward
        got = {}

        def bwd(dwdb):
            got["b"] = LN.layer_norm_backward_triton(dy, x, w, mean, rstd, dwdb, dwdb, dx)

        def check_bwd(dwdb):
            want = LN.layer_norm_backward_reference(dy, x, w, want_mean, want_rstd, dwdb, dwdb)
            return max(rel_err(g, v) for g, v in zip(got["b"], want) if v.numel())

        cases = (
            ("fwd", "fwd", 2 * M * N * 2 + 8 * M,
             lambda: LN.layer_norm_forward_triton(x, w, b, 1e-5, y, mean, rstd),
             lambda: max(rel_err(y, want_y), rel_err(rstd, want_rstd)),
             lambda: ln_eager(x, w, b), lambda: fwd_c(x, w, b)),
            ("bwd", "bwd", 3 * M * N * 2 + 8 * M, lambda: bwd(False), lambda: check_bwd(False),
             lambda: ln_eager_bwd(dy, x, m2, r2, w, b, False),
             lambda: bwd_c(dy, x, m2, r2, w, b, False)),
            ("bwd dw+db", "bwd_dw", 3 * M * N * 2 + 8 * M, lambda: bwd(True),
             lambda: check_bwd(True), lambda: ln_eager_bwd(dy, x, m2, r2, w, b, True),
             lambda: bwd_c(dy, x, m2, r2, w, b, True)))
        for direction, kind, nbytes, run, check, aten, inductor in cases:
            key = {"op": "layer_norm", "shape": f"{M}x{N} bf16 weight+bias", "direction": direction}
            default = LN.tile_config(N, 2, kind)
            per_sm = tuning.defaults("layer_norm")["dw_programs_per_sm"]
            default = (default[0], default[2]) + ((per_sm,) if kind == "bwd_dw" else ())
            sweep(rows, key, "layer_norm", default, ln_tiles(N, kind), run, check, nbytes)
            baseline(rows, key, "aten", aten, nbytes)
            baseline(rows, key, "inductor", inductor, nbytes)
            SUMMARY.append(report(rows, key))


# ---------------------------------------------------------------- summary


def report(rows, key):
    """Prints every configuration of one (op, shape, direction) and returns its summary."""
    mine = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
    timed = [r for r in mine if r["impl"] == "fastlora" and "ms" in r]
    for r in timed:
        flag = "" if r["ok"] else f"  WRONG (rel err {r['err']:.1e})"
        print(f"    {str(tuple(r['config'])):<18} {r['ms'] * 1e3:8.1f} us {r['gbps']:7.0f} GB/s"
              f"{' (default)' if r['default'] else ''}{flag}")
    for r in mine:
        if "error" in r or "skipped" in r:
            why = r.get("error") or "skipped: " + r["skipped"]
            print(f"    {r.get('config', r['impl'])}: {why}")
    ok = [r for r in timed if r["ok"]]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    default = next((r for r in timed if r["default"]), None)
    summary = {**key, "best_config": best and best["config"], "best_gbps": best and best["gbps"],
               "best_of_copy": best and best["gbps"] / COPY_GBPS,
               "default_config": default and default["config"],
               "default_gbps": default and default["gbps"]}
    line = f"{key['op']} {key['shape']} {key['direction']}:"
    if best:
        line += (f" best {best['gbps']:.0f} GB/s ({best['gbps'] / COPY_GBPS:.0%} of copy) at "
                 f"{tuple(best['config'])}")
        if default:
            line += f"; default {default['gbps']:.0f} GB/s"
        for r in mine:
            if r["impl"] in ("inductor", "aten") and "ms" in r:
                summary[f"{r['impl']}_gbps"] = r["gbps"]
                line += (f"; {r['impl']} {r['gbps']:.0f} GB/s (best is "
                         f"{r['ms'] / best['ms']:.2f}x as fast)")
    summary["line"] = line
    print(line + f"   [{time.time() - START:.0f} s]", flush=True)
    return summary


def main():
    torch.manual_seed(0)
    for name in ("recompile_limit", "cache_size_limit"):  # one function, several shapes
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    rows = []
    ops = set(filter(None, ARGS.ops.split(",")))
    SCHEDULE["keys"] = ("rope" in ops) * 2 * len(ROPE_SHAPES) \
        + ("layer_norm" in ops) * 3 * len(LN_SHAPES)
    if "rope" in ops:
        tune_rope(rows)
    if "layer_norm" in ops:
        tune_layer_norm(rows)
    device = "cpu (smoke)" if ARGS.smoke else torch.cuda.get_device_name()
    out = pathlib.Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "rep_ms": ARGS.rep, "elapsed_s": time.time() - START, "copy_gbps": COPY_GBPS}
    (out / "tune_rope_ln.json").write_text(json.dumps({"meta": meta, "summary": SUMMARY,
                                                       "rows": rows}, indent=1))
    print("\nsummary:")
    for entry in SUMMARY:
        print(" ", entry["line"])
    print(f"wrote {out / 'tune_rope_ln.json'} ({len(rows)} rows, {meta['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
