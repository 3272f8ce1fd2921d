"""QLoRA linear over a bitsandbytes 4-bit weight: ``torch.ops.fastlora.lora_linear_4bit``, and the
Triton NF4/FP4 dequantization it runs in forward and backward.

The bitsandbytes 4-bit format (0.4x-0.50, ``Linear4bit``/``Params4bit``), for a weight W [N, K]
flattened row-major into w[0..N*K):

    packed byte i holds w[2i] in its high nibble and w[2i+1] in its low nibble (4-bit codes)
    w[j] = CODE[q_j] * absmax[j // blocksize]                    (float32, then cast)
    double quantization (compress_statistics / bnb_4bit_use_double_quant):
        absmax[b] = CODE2[absmax_u8[b]] * absmax2[b // 256] + offset
    CODE is the 16-entry NF4 table (normal-float quantiles) or the FP4 table; CODE2 the 256-entry
    dynamic map of the nested blockwise quantization.

The fused op dequantizes W into a temporary [N, K] buffer of the compute dtype, runs the LoRA
linear of kernels/lora_linear.py on it (cuBLAS base GEMM + Triton adapter), and frees it: no
full-precision W outlives the call. The backward dequantizes again for dx = g @ W (never dW).
That is bitsandbytes' own training path (dequantize + GEMM for M > 1 rows) with the adapter
fused and the float32 adapter copies of x gone.

CODE is read from bitsandbytes itself when it is importable (its CPU and CUDA FP4 tables differ
in the 4th digit), so the dequantized W is bitwise what bitsandbytes computes; otherwise from
the tables below.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import HAVE_TRITON, cdiv, check_float, require, rows2d, use_triton
from ._launch import launch
from ._dot_precision import fix_bf16
from .lora_linear import lora_backward, lora_forward

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4 = [0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
       -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25]
NESTED_BLOCK = 256
_CODES: dict = {}
# The dequantization's launch: packed bytes per program (a power of two), warps, and the layout:
# "rows" (a row per quantization block, one scale load per block; a power-of-two blocksize,
# "flat" otherwise) or "flat" (one scale load per byte). benchmarks/dequant_4bit.py on an H100
# (2026-12-07), Llama-3-8B's linears, NF4 + double quantization: rows 2048 x 4 reaches
# 1.97-2.60 TB/s (22.1 ms of dequantization a checkpointed 8B step), flat 1024 x 4 0.99-2.00
# (30.9 ms), bitsandbytes' own kernel 0.65-1.85 (33.7 ms).
tuning.register("dequant_4bit", block=2048, num_warps=4, layout="rows")

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._dot_precision import rne

    @triton.jit
    def _dequant_4bit_kernel(Q, ABSMAX, ABSMAX2, CODE2, OFFSET, CODE, OUT, n_bytes, n_out,
                             blocksize, NESTED: tl.constexpr, FIX_BF16: tl.constexpr,
                             BLOCK: tl.constexpr):
        """BLOCK packed bytes -> 2 * BLOCK consecutive weights."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n_bytes
        q = tl.load(Q + i, mask=ok, other=0).to(tl.int32)
        block = (2 * i) // blocksize  # both nibbles of a byte share a block (blocksize is even)
        if NESTED:
            code = tl.load(ABSMAX + block, mask=ok, other=0).to(tl.int32)
            # a product, then a sum, each rounded, as bitsandbytes computes them (two kernels);
            # the launch turns off FMA contraction, which would round once and differ in the
            # last bit (enable_fp_fusion=False)
            scale = tl.load(CODE2 + code) * tl.load(ABSMAX2 + block // 256, mask=ok, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=ok, other=0.0)
        hi = tl.load(CODE + ((q >> 4) & 15)) * scale
        lo = tl.load(CODE + (q & 15)) * scale
        w = tl.reshape(tl.join(hi, lo), [2 * BLOCK])
        o = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(OUT + o, rne(w, FIX_BF16).to(OUT.dtype.element_ty), mask=o < n_out)

    @triton.jit
    def _dequant_4bit_rows_kernel(Q, ABSMAX, ABSMAX2, CODE2, OFFSET, CODE, OUT, n_bytes, n_out,
                                  n_blocks, NESTED: tl.constexpr, FIX_BF16: tl.constexpr,
                                  HALF: tl.constexpr, ROWS: tl.constexpr):
        """ROWS quantization blocks of HALF packed bytes (blocksize / 2) -> 2 * HALF * ROWS
        weights. The same values as _dequant_4bit_kernel; each block's scale is loaded (and
        double-dequantized) once and broadcast over its row, instead of once per byte."""
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        i = row[:, None] * HALF + tl.arange(0, HALF)[None, :]
        q = tl.load(Q + i, mask=i < n_bytes, other=0).to(tl.int32)
        row_ok = row < n_blocks
        if NESTED:
            code = tl.load(ABSMAX + row, mask=row_ok, other=0).to(tl.int32)
            scale = tl.load(CODE2 + code) * tl.load(ABSMAX2 + row // 256, mask=row_ok, other=0.0)
            scale = scale + tl.load(OFFSET)  # product and sum rounded apart, as above
        else:
            scale = tl.load(ABSMAX + row, mask=row_ok, other=0.0)
        hi = tl.load(CODE + ((q >> 4) & 15)) * scale[:, None]
        lo = tl.load(CODE + (q & 15)) * scale[:, None]
        w = tl.reshape(tl.join(hi, lo), [ROWS, 2 * HALF])
        o = row[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(OUT + o, rne(w, FIX_BF16).to(OUT.dtype.element_ty), mask=o < n_out)


def code_table(quant_type: str, device: torch.device) -> Tensor:
    """The 16 float32 values of the 4-bit code on ``device``, as bitsandbytes decodes them."""
    key = (quant_type, str(device))
    if key not in _CODES:
        require(quant_type in ("nf4", "fp4"), f"fastlora: unknown 4-bit quant_type {quant_type!r}")
        table = None
        try:  # decode bytes 0x01, 0x23, ... 0xEF with absmax 1 through bitsandbytes itself
            import bitsandbytes  # noqa: F401
            probe = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF],
                                 dtype=torch.uint8, device=device)
            table = torch.ops.bitsandbytes.dequantize_4bit.default(
                probe, torch.ones(1, device=device), 64, quant_type, [16], torch.float32)
            table = table.reshape(16).float()
        except Exception:  # bitsandbytes missing or without a kernel for this device
            table = None
        if table is None:
            table = torch.tensor(NF4 if quant_type == "nf4" else FP4, dtype=torch.float32,
                                 device=device)
        _CODES[key] = table
    return _CODES[key]


def _validate(qweight, absmax, absmax2, code2, offset, n, k, blocksize, quant_type):
    require(quant_type in ("nf4", "fp4"), f"fastlora: quant_type must be 'nf4' or 'fp4', got "
                                          f"{quant_type!r}")
    require(blocksize > 0 and blocksize % 2 == 0, f"fastlora: 4-bit blocksize must be a "
                                                  f"positive even number, got {blocksize}")
    require(qweight.element_size() * qweight.numel() == (n * k + 1) // 2,
            f"fastlora: a packed 4-bit [{n}, {k}] weight has {(n * k + 1) // 2} bytes, got "
            f"{qweight.element_size() * qweight.numel()}")
    blocks = -(-n * k // blocksize)
    require(absmax.numel() == blocks, f"fastlora: expected {blocks} absmax values, got "
                                      f"{absmax.numel()}")
    nested = absmax2 is not None
    require(nested == (code2 is not None) == (offset is not None),
            "fastlora: double quantization needs absmax2, code2 and offset together")
    require(absmax.dtype == (torch.uint8 if nested else torch.float32),
            f"fastlora: absmax must be {'uint8 (double quant)' if nested else 'float32'}, got "
            f"{absmax.dtype}")


def dequantize_4bit_triton(qweight, absmax, absmax2, code2, offset, n, k, blocksize, quant_type,
                           dtype, out=None):
    """W [n, k] in ``dtype``; ``out`` may be given (tests poison it)."""
    q = qweight.reshape(-1).view(torch.uint8)
    if out is None:
        out = _buffers.empty((n, k), dtype, q.device)
    nested = absmax2 is not None
    cfg = tuning.get("dequant_4bit")
    block = cfg["block"]
    n_out = n * k
    if not n_out:
        return out
    # without double quantization absmax stands in for the three statistics the kernel skips
    stats = (absmax, absmax2, code2, offset) if nested else (absmax,) * 4
    common = (q, *stats, code_table(quant_type, q.device), out, q.numel(), n_out)
    half, n_blocks = blocksize // 2, absmax.numel()
    if cfg["layout"] == "rows" and (half & (half - 1)) == 0:  # blocksize a power of two
        rows = max(1, block // half)
        launch(_dequant_4bit_rows_kernel)[(cdiv(n_blocks, rows),)](
            *common, n_blocks, NESTED=nested, FIX_BF16=fix_bf16(out), HALF=half,
            ROWS=rows, num_warps=cfg["num_warps"], enable_fp_fusion=False)
    else:
        launch(_dequant_4bit_kernel)[(cdiv(q.numel(), block),)](
            *common, blocksize, NESTED=nested, FIX_BF16=fix_bf16(out), BLOCK=block,
            num_warps=cfg["num_warps"], enable_fp_fusion=False)
    return out


def dequantize_4bit_reference(qweight, absmax, absmax2, code2, offset, n, k, blocksize,
                              quant_type, dtype):
    """The format spec above in plain PyTorch (the CPU kernel)."""
    q = qweight.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n * k]
    if absmax2 is not None:
        b = torch.arange(absmax.numel(), device=q.device)
        scale = code2[absmax.long()] * absmax2[b // NESTED_BLOCK] + offset
    else:
        scale = absmax
    idx = torch.arange(n * k, device=q.device) // blocksize
    w = code_table(quant_type, q.device)[codes] * scale[idx]
    return w.reshape(n, k).to(dtype)


def dequantize_4bit(qweight, absmax, absmax2, code2, offset, n, k, blocksize, quant_type, dtype):
    _validate(qweight, absmax, absmax2, code2, offset, n, k, blocksize, quant_type)
    fn = dequantize_4bit_triton if use_triton(qweight) else dequantize_4bit_reference
    return fn(qweight, absmax, absmax2, code2, offset, n, k, blocksize, quant_type, dtype)


# ---------------------------------------------------------------- the custom op


@torch.library.custom_op("fastlora::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(x: Tensor, qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                     code2: Optional[Tensor], offset: Optional[Tensor], bias: Optional[Tensor],
                     lora_A: Tensor, lora_B: Tensor, seed: Optional[Tensor], out_features: int,
                     in_features: int, blocksize: int, quant_type: str, scale: float,
                     dropout_p: float, out_dtype: torch.dtype,
                     compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y, xa): the LoRA linear with W = dequantize(qweight); W lives only inside the call.
    The base matmul runs in ``compute_dtype`` (bitsandbytes' ``compute_dtype``): for x in
    another dtype it is ``linear(x.to(compute_dtype), W, bias).to(x.dtype)``, as the model
    computes it after peft's prepare_model_for_kbit_training (float32 activations)."""
    check_float("x", x)
    require(x.shape[-1] == in_features, f"fastlora.lora_linear_4bit: x has {x.shape[-1]} "
                                        f"features, the weight {in_features}")
    require(compute_dtype in (torch.float32, torch.bfloat16, torch.float16),
            f"fastlora.lora_linear_4bit: compute_dtype must be a float dtype, got "
            f"{compute_dtype}", TypeError)
    w = dequantize_4bit(qweight, absmax, absmax2, code2, offset, out_features, in_features,
                        blocksize, quant_type, compute_dtype)
    out, xa = lora_forward(rows2d(x), w, bias, None, lora_A, lora_B, seed, scale, dropout_p,
                           out_dtype)
    return out.view(*x.shape[:-1], out_features), xa.view(*x.shape[:-1], xa.shape[-1])


@lora_linear_4bit.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, bias, lora_A, lora_B, seed, out_features,
      in_features, blocksize, quant_type, scale, dropout_p, out_dtype, compute_dtype):
    _validate(qweight, absmax, absmax2, code2, offset, out_features, in_features, blocksize,
              quant_type)
    lead = x.shape[:-1]
    return (x.new_empty((*lead, out_features), dtype=out_dtype),
            x.new_empty((*lead, lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward(grad: Tensor, x: Tensor, qweight: Tensor, absmax: Tensor,
                              absmax2: Optional[Tensor], code2: Optional[Tensor],
                              offset: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                              xa: Tensor, seed: Optional[Tensor], out_features: int,
                              in_features: int, blocksize: int, quant_type: str, scale: float,
                              dropout_p: float, compute_dtype: torch.dtype, needs_dx: bool,
                              needs_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias), empty where not needed; W is dequantized again only for dx."""
    w = (dequantize_4bit(qweight, absmax, absmax2, code2, offset, out_features, in_features,
                         blocksize, quant_type, compute_dtype) if needs_dx else None)
    g2 = rows2d(grad)
    if needs_dbias and w is None:
        g2 = g2.to(x.dtype)
    dx, da, db, _, dbias = lora_backward(g2, rows2d(x), w, lora_A, lora_B, rows2d(xa), seed,
                                         scale, dropout_p, needs_dx, False, needs_dbias)
    return (dx.view(x.shape) if dx is not None else x.new_empty(0), da, db,
            dbias if dbias is not None else x.new_empty(0))


@lora_linear_4bit_backward.register_fake
def _(grad, x, qweight, absmax, absmax2, code2, offset, lora_A, lora_B, xa, seed, out_features,
      in_features, blocksize, quant_type, scale, dropout_p, compute_dtype, needs_dx,
      needs_dbias):
    return (torch.empty_like(x) if needs_dx else x.new_empty(0), torch.empty_like(lora_A),
            torch.empty_like(lora_B),
            x.new_empty(out_features) if needs_dbias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, absmax2, code2, offset, bias, a, b, seed, n, k, blocksize, quant_type,
     scale, p, _out_dtype, compute_dtype) = inputs
    ctx.save_for_backward(x, qweight, absmax, absmax2, code2, offset, a, b, output[1], seed)
    ctx.args = (n, k, blocksize, quant_type, scale, p, compute_dtype)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad, _dxa):
    x, qweight, absmax, absmax2, code2, offset, a, b, xa, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, da, db, dbias = torch.ops.fastlora.lora_linear_4bit_backward(
        grad, x, qweight, absmax, absmax2, code2, offset, a, b, xa, seed, *ctx.args,
        needs[0], needs[6])
    return (dx if needs[0] else None, None, None, None, None, None,
            dbias.to(ctx.bias_dtype) if needs[6] else None, da if needs[7] else None,
            db if needs[8] else None) + (None,) * 9


lora_linear_4bit.register_autograd(_backward, setup_context=_setup_context)
