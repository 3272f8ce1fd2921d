"""Sweep the launch configurations of the LoRA Triton kernels on the GPU (pure GPU time).

    python benchmarks/tune_lora.py [--kernels glu_bwd,down] [--quick]

Each kernel's launcher is called directly and timed with triton.testing.do_bench_cudagraph
(CUDA-graph replay: no Python dispatch in the figure) at the adapter shapes of a Llama-3.2-1B
and a Llama-3-8B LoRA step (8192 tokens, r = 16, bf16 activations, float32 adapters as peft
keeps them). For every candidate configuration the output is checked against the default
configuration's before it is timed. Prints, per kernel, the default's time, the best
configuration by total time over the shapes, and the best per shape; writes everything to
$OUT/tune_lora.json. The chosen defaults go into the tuning entries lora_<kernel> registered
in kernels/_lora_blocks.py and kernels/lora_mlp.py by hand.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib

import torch
import triton.testing

from fastlora.kernels import _glu_grad_a as GA
from fastlora.kernels import _lora_blocks as K
from fastlora.kernels import lora_mlp as G
from fastlora.kernels import tuning

M = 8192
# (name, K = input features, N = output features, F = MLP width) of the two Llama rows.
MODELS = {"1b": (2048, 2048, 8192), "8b": (4096, 4096, 14336)}


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def cases():
    """kernel -> list of (shape label, fn(): run the launcher, returns tensors to compare)."""
    out = {k: [] for k in ("glu_bwd", "glu_fwd", "glu_grad_a", "down", "grad_x", "grad_b",
                           "up")}
    for model, (hidden, _, ffn) in MODELS.items():
        r = 16
        bg, bu, dh = _t(M, ffn), _t(M, ffn), _t(M, ffn)
        xa2 = _t(M, 2 * r, dtype=torch.float32)
        b_g, b_u = _t(ffn, r, dtype=torch.float32), _t(ffn, r, dtype=torch.float32)
        out["glu_bwd"].append((f"{model} mlp {M}x{ffn}", lambda bg=bg, bu=bu, dh=dh, xa2=xa2,
                               b_g=b_g, b_u=b_u: G.glu_backward_triton(
                                   dh, bg, bu, xa2, b_g, b_u, 2.0, 2.0, "silu", torch.bfloat16)))
        out["glu_fwd"].append((f"{model} mlp {M}x{ffn}", lambda bg=bg, bu=bu, xa2=xa2, b_g=b_g,
                               b_u=b_u: G.glu_forward_triton(bg, bu, xa2, b_g, b_u, 2.0, 2.0,
                                                             "silu", torch.bfloat16)))
        da_down = _t(M, r, dtype=torch.float32)
        out["glu_grad_a"].append((f"{model} mlp {M}x{ffn}", lambda bg=bg, bu=bu, xa2=xa2,
                                  b_g=b_g, b_u=b_u, da_down=da_down: GA.glu_grad_a_triton(
                                      bg, bu, xa2, b_g, b_u, 2.0, 2.0, "silu", da_down)))
        for what, k_in, rank in (("qkv", hidden, 3 * r), ("mlp", hidden, 2 * r),
                                 ("down", ffn, r)):
            x, a = _t(M, k_in), _t(rank, k_in, dtype=torch.float32)
            da = _t(M, rank, dtype=torch.float32)
            dx = _t(M, k_in)
            label = f"{model} {what} {M}x{k_in} r{rank}"
            out["down"].append((label, lambda x=x, a=a: K.lora_down_triton(x, a, None, 0.0)))
            out["grad_x"].append((label, lambda x=x, a=a, da=da, dx=dx: K.lora_grad_x_triton(
                x, da, a, None, 0.0, dx=dx, accumulate=False)))
        for what, n_out in (("o", hidden), ("gate", ffn)):
            g, xa = _t(M, n_out), _t(M, r, dtype=torch.float32)
            b = _t(n_out, r, dtype=torch.float32)
            label = f"{model} {what} {M}x{n_out} r{r}"
            out["grad_b"].append((label, lambda g=g, xa=xa: K.lora_grad_b_triton(
                g, xa, 2.0, torch.float32)))
            out["up"].append((label, lambda g=g, xa=xa, b=b: K.lora_up_triton(
                g, xa, b, 2.0, torch.empty_like(g))))
    return out


def candidates(kernel: str, quick: bool):
    warps = (4, 8)
    if kernel == "glu_bwd":  # 8 warps measured twice as slow (results_h200/tune_lora_bf16x3.json)
        combos = itertools.product(((32, 128), (64, 64), (64, 128)), (4, 8), (False, True),
                                   (0, 2, 3))
        out = [{"block_m": t[0], "block_n": t[1], "warps": 4, "per_sm": s, "one_b": b,
                "stages": st} for t, s, b, st in combos]
    elif kernel == "glu_fwd":
        combos = itertools.product(((32, 64), (32, 128), (64, 64), (64, 128)), warps,
                                   (1, 4, 8))
        out = [{"block_m": t[0], "block_n": t[1], "warps": w, "row_blocks": rb}
               for t, w, rb in combos]
    elif kernel in ("grad_x", "grad_b", "down", "glu_grad_a"):
        tiles = ((32, 128), (64, 64), (64, 128))
        per_sm = (0, 2, 4) if kernel == "down" else (2, 4, 8)
        key = "block_k" if kernel in ("down", "grad_x") else "block_n"
        combos = itertools.product(tiles, warps, per_sm)
        out = [{"block_m": t[0], key: t[1], "warps": w, "per_sm": s} for t, w, s in combos]
    else:
        out = [{"block_m": bm, "block_n": bn, "warps": w}
               for bm, bn, w in itertools.product((32, 64, 128), (64, 128), warps)]
    return out[::3] if quick else out


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def _same(a, b) -> bool:
    return all(x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=2e-2, atol=2e-2)
               for x, y in zip(_flat(a), _flat(b)))


def _time(fn) -> float:
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # capture can fail on some builds: fall back to event timing
        return triton.testing.do_bench(fn, rep=50, return_mode="median")


def sweep(kernel: str, shapes, quick: bool) -> dict:
    tuning.reset(f"lora_{kernel}")
    reference = [[t.clone() for t in _flat(fn())] for _, fn in shapes]
    default = [_time(fn) for _, fn in shapes]
    rows = []
    for cfg in candidates(kernel, quick):
        tuning.reset(f"lora_{kernel}")
        tuning.set(f"lora_{kernel}", **cfg)
        times = []
        for (label, fn), ref in zip(shapes, reference):
            try:
                ok = _same(fn(), ref)
                times.append(_time(fn) if ok else None)
            except Exception as e:  # too much shared memory, too many registers ...
                times.append(None)
                cfg = {**cfg, "error": f"{type(e).__name__}"}
        rows.append({"config": cfg, "ms": times})
    tuning.reset(f"lora_{kernel}")
    full = [r for r in rows if all(t is not None for t in r["ms"])]
    best = min(full, key=lambda r: sum(r["ms"])) if full else None
    per_shape = []
    for i, (label, _) in enumerate(shapes):
        ok = [r for r in rows if r["ms"][i] is not None]
        b = min(ok, key=lambda r: r["ms"][i]) if ok else None
        per_shape.append({"shape": label, "default_ms": default[i],
                          "best_ms": b["ms"][i] if b else None,
                          "best_config": b["config"] if b else None,
                          "chosen_ms": best["ms"][i] if best else None})
    return {"kernel": kernel, "default_total_ms": sum(default),
            "best": best, "per_shape": per_shape, "all": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kernels", default="glu_bwd,glu_fwd,glu_grad_a,down,grad_x,grad_b,up")
    ap.add_argument("--quick", action="store_true", help="every third candidate only")
    ap.add_argument("--split-bf16", type=int, default=1, choices=[0, 1],
                    help="1: float32 operands as bfloat16 hi + lo (MODE 3); 0: tf32x3")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args(argv)
    tuning.set("lora_dot", split_bf16=bool(args.split_bf16))
    all_cases = cases()
    results = []
    out = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    for kernel in args.kernels.split(","):
        res = sweep(kernel, all_cases[kernel], args.quick)
        results.append(res)
        best = res["best"]
        print(f"\n== {kernel}: default {res['default_total_ms']:.3f} ms total; best "
              f"{sum(best['ms']):.3f} ms with {best['config']}" if best else
              f"\n== {kernel}: no candidate ran")
        for s in res["per_shape"]:
            print(f"   {s['shape']:<28} default {s['default_ms']:.4f}  chosen "
                  f"{s['chosen_ms'] or float('nan'):.4f}  best {s['best_ms'] or float('nan'):.4f}"
                  f"  {s['best_config']}", flush=True)
        (out / f"tune_lora{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
