"""Sweep the SwiGLU / GeGLU tile (elements per program, widest tile, warps) on the GPU.

    python benchmarks/tune_glu.py            # results feed kernels/_glu_tiles.py:block_config
    python benchmarks/tune_glu.py --layout   # tiles vs the flat stream (each op's FLAT) vs inductor

The launchers are timed directly with triton.testing.do_bench_cudagraph (pure GPU time, no
Python dispatch) at the Llama-8B MLP width (8192 x 14336) and Gemma's (8192 x 9216 for GeGLU),
bf16, against inductor's code for the same eager function timed the same way. Each
configuration's output is checked against the default configuration's first. Writes
$OUT/tune_glu.json.
"""
import argparse
import itertools
import json
import os
import pathlib

import torch
import torch.nn.functional as F
import triton
import triton.testing

from fastlora.kernels import geglu, swiglu, tuning

COPY_GBPS = 4220.0


def _time(fn) -> float:
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # capture can fail on some builds
        return triton.testing.do_bench(fn, rep=50, return_mode="median")


def cases():
    out = []
    for name, (M, N) in (("swiglu", (8192, 14336)), ("geglu_tanh", (8192, 9216))):
        g, u, dy = (torch.randn(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if name == "swiglu":
            fwd = lambda g=g, u=u: swiglu.swiglu_forward_triton(g, u)
            bwd = lambda g=g, u=u, dy=dy: swiglu.swiglu_backward_triton(dy, g, u)
            eager_fwd = lambda g, u: F.silu(g) * u
        else:
            fwd = lambda g=g, u=u: geglu.geglu_forward_triton(g, u, "tanh")
            bwd = lambda g=g, u=u, dy=dy: geglu.geglu_backward_triton(dy, g, u, "tanh")
            eager_fwd = lambda g, u: F.gelu(g, approximate="tanh") * u

        def eager_bwd(g, u, dy, f=eager_fwd):
            g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
            return torch.autograd.grad(f(g, u), (g, u), dy)

        ind_fwd, ind_bwd = torch.compile(eager_fwd), torch.compile(eager_bwd)
        nbytes = M * N * 2
        out.append((f"{name} fwd {M}x{N}", fwd, lambda g=g, u=u, f=ind_fwd: f(g, u),
                    3 * nbytes))
        out.append((f"{name} bwd {M}x{N}", bwd, lambda g=g, u=u, dy=dy, f=ind_bwd: f(g, u, dy),
                    5 * nbytes))
    return out


FLAT_SWEEP = [(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]


def layout(out: pathlib.Path):
    """Each case with the [tokens, ffn] tiles, as a flat stream at each FLAT_SWEEP config
    (elements per program, warps; the op's FLAT is the default), and inductor's code. Outputs
    are compared with the tiles' (elementwise math: a config that compiles the arithmetic
    differently may differ in the last bit; the JSON records it)."""
    rows = []
    for label, fn, inductor, nbytes in cases():
        op = swiglu if label.startswith("swiglu") else geglu
        tuning.set("glu", flat=False)
        first = fn()
        ref = [t.clone() for t in (first if isinstance(first, tuple) else (first,))]
        timings = {"tiles": (_time(fn), True), "inductor": (_time(inductor), True)}
        for cfg in FLAT_SWEEP:
            tuning.set("glu", flat=cfg)
            got = fn()
            got = got if isinstance(got, tuple) else (got,)
            same = all(torch.equal(a, b) for a, b in zip(got, ref))
            name = f"flat {cfg[0]}/{cfg[1]}w" + (" (default)" if cfg == op.FLAT else "")
            timings[name] = (_time(fn), same)
        tuning.reset("glu")
        for name, (ms, same) in timings.items():
            gbps = nbytes / ms / 1e6
            rows.append({"case": label, "variant": name, "ms": ms, "gbps": gbps,
                         "same_bits_as_tiles": same})
            print(f"{label:<28} {name:<22} {gbps:6.0f} GB/s ({100 * gbps / COPY_GBPS:.0f}%)"
                  + ("" if same else "  (last-bit differences from the tiles)"), flush=True)
    (out / "tune_glu_layout.json").write_text(json.dumps(rows, indent=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", action="store_true", help=layout.__doc__)
    args = parser.parse_args()
    out = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    if args.layout:
        return layout(out)
    rows = []
    tuning.set("glu", flat=False)  # the sweep is of the tiles (strided inputs use them)
    configs = [(e, w, warps) for e, w, warps in itertools.product((2048, 4096, 8192),
                                                                  (512, 1024, 2048), (4, 8, 16))
               if e >= w]
    for label, fn, inductor, nbytes in cases():
        tuning.set("glu", tile=None)
        first = fn()
        ref = [t.clone() for t in (first if isinstance(first, tuple) else (first,))]
        default = _time(fn)
        ind = _time(inductor)
        best = (default, None)
        for cfg in configs:
            tuning.set("glu", tile=cfg)
            got = fn()
            got = got if isinstance(got, tuple) else (got,)
            if not all(torch.equal(a, b) for a, b in zip(got, ref)):
                rows.append({"case": label, "config": cfg, "error": "output differs"})
                continue
            ms = _time(fn)
            rows.append({"case": label, "config": cfg, "ms": ms, "gbps": nbytes / ms / 1e6})
            best = min(best, (ms, cfg), key=lambda b: b[0])
        tuning.set("glu", tile=None)
        rows.append({"case": label, "config": "default", "ms": default,
                     "gbps": nbytes / default / 1e6, "inductor_ms": ind})
        print(f"{label:<28} default {nbytes / default / 1e6:6.0f} GB/s "
              f"({100 * nbytes / default / 1e6 / COPY_GBPS:.0f}%), best "
              f"{nbytes / best[0] / 1e6:6.0f} GB/s at {best[1]}, inductor "
              f"{nbytes / ind / 1e6:6.0f} GB/s", flush=True)
    (out / "tune_glu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
