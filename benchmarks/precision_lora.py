"""Accuracy and time of the LoRA kernels' dot modes on the GPU, against float64.

    python benchmarks/precision_lora.py

bfloat16 activations with float32 adapters (as peft keeps them) can take their float32 products
two ways (kernels/_dot_precision.py, tuning entry lora_dot): tf32x3 (MODE 1) or bfloat16 parts on bfloat16 tensor
cores (MODE 3, the default). For the shapes of
tests/test_lora_linear.py::test_cuda_op_matches_float64 this prints, per mode, the relative
error of y, dx, dA, dB of torch.ops.fastlora.lora_linear against float64, and the forward +
backward time (triton.testing.do_bench, dispatch included); writes $OUT/precision_lora.json.
The test's bound on dA and dB is 1e-5.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch
import triton.testing

import fastlora  # noqa: F401  (registers torch.ops.fastlora)
from fastlora.kernels import tuning

SHAPES = [(8192, 2048, 2048, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 64)]
MODES = {"tf32x3": False, "split": True}


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def run(m, k, n, r, p):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    a = (torch.randn(r, k, device="cuda") / k ** 0.5).requires_grad_()
    b = torch.randn(n, r, device="cuda").requires_grad_()
    seed = torch.tensor([1234], device="cuda")
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = a.grad = b.grad = None
        y, _ = torch.ops.fastlora.lora_linear(x, w, None, None, a, b, seed, 2.0, p, x.dtype)
        y.backward(g)
        return y

    y = step()
    from fastlora.kernels import _lora_reference as R
    keep = (R.keep_mask_reference(1234, m, k, 0, p, device="cuda") if p
            else torch.ones(m, k, dtype=torch.bool, device="cuda"))
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    lora = 2.0 * ((x64 * keep / (1 - p)) @ a64.T) @ b64.T
    y64 = (x.detach() @ w.T).double() + lora.detach()
    dx64, da64, db64 = torch.autograd.grad(x64 @ w.double().T + lora, (x64, a64, b64),
                                           g.double())
    errs = {"y": rel_err(y, y64), "dx": rel_err(x.grad, dx64), "dA": rel_err(a.grad, da64),
            "dB": rel_err(b.grad, db64)}
    ms = triton.testing.do_bench(step, warmup=5, rep=50)
    return errs, ms


def main():
    rows = []
    for m, k, n, r in SHAPES:
        for p in (0.0, 0.1):
            for mode, split in MODES.items():
                tuning.set("lora_dot", split_bf16=split)
                try:
                    errs, ms = run(m, k, n, r, p)
                except Exception as e:  # a mode that fails to compile must not hide the others
                    print(f"{m}x{k}x{n} r{r} p{p} {mode}: {type(e).__name__}: {e}"[:400])
                    continue
                rows.append({"m": m, "k": k, "n": n, "r": r, "p": p, "mode": mode,
                             "ms": ms, **errs})
                print(f"{m}x{k}x{n} r{r:<3d} p{p:<4} {mode:15s} {ms:7.3f} ms  "
                      + "  ".join(f"{key} {errs[key]:.1e}" for key in ("y", "dx", "dA", "dB")),
                      flush=True)
    tuning.reset("lora_dot")
    out = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_lora.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
