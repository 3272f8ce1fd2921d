"""The NF4 dequantization of the QLoRA op against bitsandbytes' own kernel, on the GPU.

    python benchmarks/dequant_4bit.py [--configs flat:1024x4,rows:2048x8,...]

``lora_linear_4bit`` dequantizes each 4-bit weight into a bfloat16 buffer three times a
checkpointed step (forward, recompute, backward's dx): 672 dequantizations a step on
Llama-3-8B. For each linear of that model (NF4, blocksize 64, double quantization, as
``BitsAndBytesConfig(bnb_4bit_use_double_quant=True)`` and Unsloth load it) this prints the time
of ``bitsandbytes.functional.dequantize_4bit`` and of fastlora's Triton kernel
(``fastlora.kernels.lora_linear_4bit.dequantize_4bit_triton``) under each launch configuration
(layout: packed bytes per program x warps, tuning entry ``dequant_4bit``: "flat" loads a scale
per byte, "rows" one per quantization block), the bandwidth each reaches
(0.5 byte read + 2 bytes written per weight, the statistics left out), and whether the result
is bitwise bitsandbytes'. Times: ``triton.testing.do_bench`` (median of its repeats, ms).
Writes $OUT/dequant_4bit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch
import triton.testing

import fastlora  # noqa: F401
from fastlora.kernels import tuning
from fastlora.kernels.lora_linear_4bit import dequantize_4bit_triton

# Llama-3-8B's linears, [out, in]
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
          "down": (4096, 14336)}


def configs(text: str) -> list[dict]:
    """"rows:2048x8,..." -> [{"layout": "rows", "block": 2048, "num_warps": 8}, ...]"""
    out = []
    for c in text.split(","):
        layout, size = c.split(":")
        block, warps = size.split("x")
        out.append({"layout": layout, "block": int(block), "num_warps": int(warps)})
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="flat:1024x4,flat:2048x8,flat:4096x8,rows:512x4,"
                        "rows:1024x4,rows:2048x4,rows:2048x8,rows:4096x8,rows:8192x8",
                        help="layout:packed bytes per program x warps, comma separated")
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    out_dir = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    default = tuning.defaults("dequant_4bit")
    print(f"default launch: {default['layout']}:{default['block']}x{default['num_warps']}")
    print(f"{'linear':8} {'variant':>22} {'ms':>8} {'GB/s':>7} {'bitwise':>8}")
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                      quant_type="nf4", quant_storage=torch.uint8)
        nested = state.state2
        moved = n * k * 2.5
        want = bnbf.dequantize_4bit(q, state)

        def ours():
            return dequantize_4bit_triton(q, state.absmax, nested.absmax, nested.code,
                                          state.offset, n, k, 64, "nf4", torch.bfloat16)

        variants = [("bitsandbytes", lambda: bnbf.dequantize_4bit(q, state), None)]
        for cfg in configs(args.configs):
            label = f"fastlora {cfg['layout']}:{cfg['block']}x{cfg['num_warps']}"
            variants.append((label, ours, cfg))
        for label, fn, cfg in variants:
            with tuning.override("dequant_4bit", **(cfg or {})):
                got = fn()
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            same = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
            rows.append({"linear": name, "shape": [n, k], "variant": label, "ms": ms,
                         "gb_s": moved / ms / 1e6, "bitwise": same})
            print(f"{name:8} {label:>22} {ms:8.4f} {moved / ms / 1e6:7.0f} {str(same):>8}")
    per_step = {}
    counts = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # per layer
    for r in rows:
        per_step.setdefault(r["variant"], 0.0)
        per_step[r["variant"]] += r["ms"] * counts[r["linear"]] * 32 * 3
    print("\nper checkpointed 8B step (32 layers x 7 linears x 3 dequantizations), ms:")
    for label, ms in per_step.items():
        print(f"  {label:>22} {ms:8.1f}")
    (out_dir / "dequant_4bit.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows, "per_step_ms": per_step},
        indent=1))


if __name__ == "__main__":
    main()
