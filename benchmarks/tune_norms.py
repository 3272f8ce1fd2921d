"""Sweep the RMSNorm tile shape (rows per program, warps) on the GPU; prints the best per shape.

    python benchmarks/tune_norms.py            # results feed kernels/rms_norm.py:tile_config
"""
import itertools
import json
import os
import pathlib

import torch
import triton.testing

from fastlora.kernels import rms_norm as K
from fastlora.kernels import tuning


def main():
    rows = []
    for M, N in ((8192, 2048), (8192, 4096), (8192, 8192), (16384, 4096)):
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        w = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * M * N * 2
        tuning.reset("rms_norm")
        default = K.tile_config(N, 2, "fwd")
        for bm, warps in itertools.product((1, 2, 4, 8, 16), (2, 4, 8, 16)):
            if bm * triton.next_power_of_2(N) * 4 // (warps * 32) > 256:
                continue  # more than 256 fp32 registers per thread: spills
            tuning.set("rms_norm", tile=(bm, warps))
            y, rstd = K.rms_norm_forward_triton(x, w, 1e-6, 0.0, True)
            f = triton.testing.do_bench(lambda: K.rms_norm_forward_triton(x, w, 1e-6, 0.0, True),
                                        return_mode="median")
            b = triton.testing.do_bench(
                lambda: K.rms_norm_backward_triton(dy, x, w, rstd, 0.0, True, False),
                return_mode="median")
            bw = triton.testing.do_bench(
                lambda: K.rms_norm_backward_triton(dy, x, w, rstd, 0.0, True, True),
                return_mode="median")
            rows.append({"M": M, "N": N, "block_m": bm, "warps": warps,
                         "fwd_gbps": nbytes / f / 1e6, "bwd_gbps": 1.5 * nbytes / b / 1e6,
                         "bwd_dw_gbps": 1.5 * nbytes / bw / 1e6,
                         "default": (bm, warps) == (default[0], default[2])})
        tuning.reset("rms_norm")
    out = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_norms.json").write_text(json.dumps(rows, indent=1))
    for (M, N), group in itertools.groupby(rows, key=lambda r: (r["M"], r["N"])):
        group = list(group)
        for key in ("fwd_gbps", "bwd_gbps", "bwd_dw_gbps"):
            best = max(group, key=lambda r: r[key])
            d = next(r for r in group if r["default"])
            print(f"{M}x{N} {key:<12} best {best[key]:6.0f} GB/s at block_m={best['block_m']} "
                  f"warps={best['warps']}; default {d[key]:6.0f}")


if __name__ == "__main__":
    main()
