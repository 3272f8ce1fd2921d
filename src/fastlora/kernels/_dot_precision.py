"""Dot precision of the LoRA kernels: ``dot(a, b, acc, MODE)`` and how MODE is chosen.

The LoRA products mix 16-bit activations with float32 operands (peft keeps adapters in float32;
the rank-r intermediates xa and da are float32). The modes:

- MODE 0: two 16-bit operands: one native tensor-core dot (exact products, float32 accumulation).
- MODE 1: a float32 operand, float16/float32 activations: Triton's ``tf32x3`` (three TF32
  products, ~22 mantissa bits: float32-level accuracy on tensor cores).
- MODE 2: exact float32 (the interpreter, and tuning entry ``lora_dot``: ``precision="ieee"``).
- MODE 3: bfloat16 activations (``lora_dot``'s ``split_bf16``, the default): float32 operands split
  into
  bfloat16 parts, products on bfloat16 tensor cores (twice TF32's rate). bfloat16 x float32 uses
  three parts of the float32 side (the adapter-gradient products); float32 x float32 (only the
  rank-r up-products, whose results are rounded to bfloat16) two parts of each side. The parts
  are cut by bit masks (exact in float32, no round trip a compiler could fold) and their
  products summed in a fresh accumulator added to the running sum in float32 arithmetic.

Accuracy measured on the H200 (lora_linear, 8192 tokens, r 16/64, bfloat16 x, float32 adapters,
vs float64): tf32x3 4e-7 relative on xa, dA, dB; the first MODE 3 version (round-trip split,
parts accumulated straight into the running sum) 1e-5 to 5e-5, growing with K; the present
version (bit-mask parts, fresh accumulator) 1.5e-7 to 2.8e-7 on dA and dB, under tf32x3's
3e-7 to 4.6e-7; forward + backward 0.88x to 1.43x the speed of tf32x3, faster on 5 of 6
shapes (benchmarks/precision_lora.py, H200).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import tuning
from ._common import HAVE_TRITON

# precision: the dot of float32 operands on the GPU ("tf32x3", or "ieee" to compare);
# split_bf16: bfloat16 activations take MODE 3 (False: tf32x3, MODE 1). Measured above.
tuning.register("lora_dot", precision="tf32x3", split_bf16=True)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_head(x):
        """x (float32) with its low 16 bits cleared: exactly a bfloat16 value, and x - head is
        exact in float32. Bit arithmetic, so no compiler may fold the round trip away."""
        return (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_parts(x):
        """x (float32) = hi + lo + O(2^-16 |x|), hi and lo exact in bfloat16."""
        x = x.to(tl.float32)
        hi = _bf16_head(x)
        return hi.to(tl.bfloat16), (x - hi).to(tl.bfloat16)

    @triton.jit
    def _bf16_parts3(x):
        """x (float32) = p0 + p1 + p2 + O(2^-24 |x|), each part exact in bfloat16."""
        x = x.to(tl.float32)
        p0 = _bf16_head(x)
        r = x - p0
        p1 = _bf16_head(r)
        return p0.to(tl.bfloat16), p1.to(tl.bfloat16), (r - p1).to(tl.bfloat16)

    @triton.jit
    def dot(a, b, acc, MODE: tl.constexpr):
        """acc + a @ b. MODE 0: native 16-bit tensor-core dot; 1: float32 operands through tf32x3
        (~fp32 accuracy on tensor cores); 2: exact float32 (the interpreter); 3: bfloat16
        activations on bfloat16 tensor cores: a bfloat16 x float32 product splits the float32
        side in three bfloat16 parts (these products make the adapter gradients); a float32 x
        float32 product (the rank-r up-products, whose results are rounded to bfloat16) splits
        both in two and sums hi*hi + hi*lo + lo*hi. The parts' products go to a fresh
        accumulator that is then added to acc with float32 arithmetic: tensor cores align and
        truncate the addends of their own accumulation, so small parts added straight into a
        large running sum would be cut off (the error would grow with K)."""
        if MODE == 0:
            return tl.dot(a, b, acc)
        elif MODE == 1:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        elif MODE == 2:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            if a.dtype == tl.bfloat16:
                if b.dtype == tl.bfloat16:
                    return tl.dot(a, b, acc)
                b0, b1, b2 = _bf16_parts3(b)
                return acc + tl.dot(a, b0, tl.dot(a, b1, tl.dot(a, b2)))
            if b.dtype == tl.bfloat16:
                a0, a1, a2 = _bf16_parts3(a)
                return acc + tl.dot(a0, b, tl.dot(a1, b, tl.dot(a2, b)))
            a_hi, a_lo = _bf16_parts(a)
            b_hi, b_lo = _bf16_parts(b)
            return acc + tl.dot(a_hi, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi)))

    @triton.jit
    def rne(x, FIX: tl.constexpr):
        """float32 -> bfloat16 rounding to nearest even where the conversion truncates (the
        Triton interpreter does; FIX is False on the GPU, whose cvt.rn already rounds)."""
        if FIX:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x


def dot_mode(device: torch.device, act_dtype: torch.dtype,
             other_dtype: torch.dtype = torch.float32) -> int:
    """The ``dot`` MODE for products of an activation-dtype operand with an ``other_dtype``
    one (float32 adapters or the float32 rank-r intermediates)."""
    if device.type != "cuda":
        return 2
    if act_dtype == other_dtype and act_dtype in (torch.bfloat16, torch.float16):
        return 0
    cfg = tuning.get("lora_dot")
    if act_dtype == torch.bfloat16 and cfg["split_bf16"]:
        return 3
    return 1 if cfg["precision"] == "tf32x3" else 2


def fix_bf16(out: Tensor) -> bool:
    """Round bfloat16 stores by hand under the interpreter (it truncates; the GPU rounds)."""
    return out.dtype == torch.bfloat16 and not out.is_cuda
