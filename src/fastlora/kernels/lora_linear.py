"""LoRA linear, forward and backward: ``torch.ops.fastlora.lora_linear``.

Math (peft's ``lora.Linear``; x is [M, K] rows, W [N, K] frozen, A [r, K], B [N, r], s the
scaling, m a dropout keep-mask with keep probability 1 - p):

    xa  = ((x * m) @ A^T) / (1 - p)                       [M, r], kept in float32
    y   = cast_out( cast_base(x @ W^T + bias) + s * xa @ B^T )
    da  = s * g @ B                                        [M, r]  (g = dy, rank-first)
    dB  = s * g^T @ xa                                     [N, r]
    dA  = da^T @ (x * m) / (1 - p)                         [r, K]
    dx  = g @ W  +  ((da @ A) * m) / (1 - p)

W is never differentiated unless it requires grad (it does not in LoRA). ``base`` may be given
instead of W (the base output computed elsewhere, e.g. by bitsandbytes), then y = base + s*...

Numerics: the base GEMMs (x @ W^T, g @ W) are cuBLAS calls in the model's dtype, exactly as
unfused. The adapter path keeps float32 adapter weights at float32 accuracy on tensor cores:
16-bit activations are exact in float32, and fp32 operands go through Triton's ``tf32x3`` dot
(three TF32 products, ~22 mantissa bits); no float32 copy of the activations is ever made (peft
makes one per adapter and runs the adapter GEMMs on CUDA cores). Rounding happens where the
unfused graph rounds: once for the base output, once for y.

Dropout: the mask is never stored. It is a pure function of a seed (an int64 tensor drawn from
torch's default generator by the graph, one per call) and the element's position: Philox4x32-10
keyed by the seed, counter (col // 4, row, slot, 0), word col % 4; kept when its top 24 bits are
>= round(p * 2^24). Forward and backward regenerate it; the CPU reference computes the same bits.

Memory saved for backward: x, the [M, r] float32 xa and a one-element seed (plus the weights,
which are parameters). The unfused peft graph keeps a float32 copy of x, the dropped x, the
[M, r] product and the cast/scaled [M, N] intermediates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _buffers
from ._common import check_float, check_same_device, require, rows2d, use_triton
from ._launch import fused_op
from ._lora_blocks import (lora_down_reference, lora_down_triton, lora_grad_b,
                           lora_grad_down_reference, lora_grad_down_triton,
                           lora_grad_x_reference, lora_grad_x_triton, lora_up_reference,
                           lora_up_triton)


# ---------------------------------------------------------------- one adapter, both directions


def lora_forward(x2, weight, bias, base2, a, b, seed, scale, p, out_dtype):
    """Rows x2 [M, K] -> (out [M, N] in out_dtype, xa [M, r] float32). The base is
    ``linear(x2, weight, bias)`` (cuBLAS) or the given ``base2``. A weight in another dtype
    than x (QLoRA after peft's prepare_model_for_kbit_training: float32 activations, a
    bfloat16 compute dtype) is the model's ``linear(x.to(w.dtype), w, bias).to(x.dtype)``."""
    if base2 is not None:
        y = base2
    elif weight.dtype == x2.dtype:
        y = F.linear(x2, weight, bias)
    else:
        y = F.linear(x2.to(weight.dtype), weight, bias).to(x2.dtype)
    if use_triton(x2):
        xa = lora_down_triton(x2, a, seed, p)
        owned = base2 is None and y.dtype == out_dtype  # our own buffer: write y over it
        out = y if owned else _buffers.empty(y.shape, out_dtype, y.device)
        return lora_up_triton(y, xa, b, scale, out), xa
    xa = lora_down_reference(x2, a, seed, p)
    return lora_up_reference(y, xa, b, scale, out_dtype), xa


def lora_backward(g2, x2, weight, a, b, xa, seed, scale, p, needs_dx, needs_dw, needs_dbias,
                  db=None):
    """Returns (dx, dA, dB, dW, dbias), None where not needed. g2 [M, N] is d out. ``db``: dB
    already computed by the caller (``_lora_blocks.lora_grad_b``), returned as it is."""
    M, K = x2.shape
    gw = _in_weight_dtype(g2, weight)
    dx = None
    if needs_dx:
        dx = (gw @ weight if weight is not None
              else _buffers.zeros((M, K), x2.dtype, x2.device))
        dx = dx if dx.dtype == x2.dtype else dx.to(x2.dtype)  # the backward of x.to(w.dtype)
    db_ = db if db is not None else lora_grad_b(g2, xa, scale, b.dtype)
    da = grad_down(g2, x2, a, b, scale)
    dx, da_ = _grad_x(x2)(x2, da, a, seed, p, dx=dx, accumulate=True)  # one pass: dx += .., dA
    dw = gw.T @ x2 if needs_dw else None
    dbias = gw.sum(0) if needs_dbias else None
    return dx, da_.to(a.dtype), db_, dw, dbias


def _in_weight_dtype(g2, weight):
    """g in the base weight's dtype (its GEMMs and the bias run in it); as it is without one."""
    return g2 if weight is None or g2.dtype == weight.dtype else g2.to(weight.dtype)


def _grad_x(t):
    """The kernel (Triton or its PyTorch reference) of dx += dropout-backward(da @ A), dA."""
    return lora_grad_x_triton if use_triton(t) else lora_grad_x_reference


def grad_down(g2, x2, a, b, scale):
    """da [M, r] float32 = s * g @ B: the gradient at xa = dropout(x) @ A^T."""
    if use_triton(x2):
        return lora_grad_down_triton(g2, b, scale, _buffers.empty((x2.shape[0], a.shape[0]),
                                                                  torch.float32, x2.device))
    return lora_grad_down_reference(g2, b, scale)


def grad_bias(g2, weight):
    """d bias = column sums of g, in the base weight's dtype (the bias is added in it)."""
    return _in_weight_dtype(g2, weight).sum(0)


def lora_grad_a(g2, x2, a, b, seed, scale, p):
    """The half of :func:`lora_backward` that reads x: (da [M, r] float32 = s * g @ B, dA).
    With :func:`lora_grad_input` after it, x can be freed before dx exists (lora_mlp_block's
    backward: its h is dead before dh is made)."""
    da = grad_down(g2, x2, a, b, scale)
    return da, _grad_x(x2)(x2, da, a, seed, p)[1].to(a.dtype)


def lora_grad_input(g2, da, weight, a, seed, p, dtype):
    """The other half: dx = g @ W + dropout-backward(da @ A) in ``dtype`` (x's), the same
    values as :func:`lora_backward`'s dx. The kernel reads x only for dA (not asked here); dx
    stands in for it (its shape and dtype)."""
    dx = _in_weight_dtype(g2, weight) @ weight
    dx = dx if dx.dtype == dtype else dx.to(dtype)
    return _grad_x(dx)(dx, da, a, seed, p, dx=dx, accumulate=True, need_da=False)[0]


# ---------------------------------------------------------------- the custom ops


def validate(x, weight, bias, base, a, b, seed, dropout_p, out_dtype):
    check_float("x", x)
    check_float("lora_A", a)
    check_float("lora_B", b)
    require(out_dtype in (torch.float32, torch.bfloat16, torch.float16),
            f"fastlora.lora_linear: out_dtype must be a float dtype, got {out_dtype}", TypeError)
    require((weight is None) != (base is None),
            "fastlora.lora_linear: give exactly one of weight (the base linear) and base "
            "(its precomputed output)")
    K = x.shape[-1]
    require(a.dim() == 2 and a.shape[1] == K,
            f"fastlora.lora_linear: lora_A must have shape (r, {K}), got {tuple(a.shape)}")
    require(b.dim() == 2 and b.shape[1] == a.shape[0],
            f"fastlora.lora_linear: lora_B must have shape (N, {a.shape[0]}), got "
            f"{tuple(b.shape)}")
    N = b.shape[0]
    if weight is not None:
        check_float("weight", weight)
        require(weight.shape == (N, K), f"fastlora.lora_linear: weight must have shape "
                                        f"({N}, {K}), got {tuple(weight.shape)}")
        require(weight.dtype == x.dtype, f"fastlora.lora_linear: weight ({weight.dtype}) and x "
                                         f"({x.dtype}) must have one dtype")
        require(bias is None or bias.shape == (N,),
                f"fastlora.lora_linear: bias must have shape ({N},)")
        check_same_device(x=x, weight=weight, lora_A=a, lora_B=b)
    else:
        check_float("base", base)
        require(tuple(base.shape) == (*x.shape[:-1], N),
                f"fastlora.lora_linear: base must have shape {(*x.shape[:-1], N)}, got "
                f"{tuple(base.shape)}")
        check_same_device(x=x, base=base, lora_A=a, lora_B=b)
    require(a.dtype == b.dtype, f"fastlora.lora_linear: lora_A ({a.dtype}) and lora_B "
                                f"({b.dtype}) must have one dtype")
    require(0.0 <= dropout_p < 1.0, f"fastlora.lora_linear: dropout_p must be in [0, 1), got "
                                    f"{dropout_p}")
    require(dropout_p == 0.0 or (seed is not None and seed.numel() == 1
                                 and seed.dtype == torch.int64),
            "fastlora.lora_linear: dropout needs a one-element int64 seed tensor")


@fused_op("fastlora::lora_linear")
def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                base: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, seed: Optional[Tensor],
                scale: float, dropout_p: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y, xa): y = cast(base(x) + scale * dropout(x) @ A^T @ B^T); xa is what backward needs."""
    validate(x, weight, bias, base, lora_A, lora_B, seed, dropout_p, out_dtype)
    x2 = rows2d(x)
    base2 = None if base is None else rows2d(base)
    out, xa = lora_forward(x2, weight, bias, base2, lora_A, lora_B, seed, scale, dropout_p,
                           out_dtype)
    return out.view(*x.shape[:-1], out.shape[-1]), xa.view(*x.shape[:-1], xa.shape[-1])


@lora_linear.register_fake
def _(x, weight, bias, base, lora_A, lora_B, seed, scale, dropout_p, out_dtype):
    validate(x, weight, bias, base, lora_A, lora_B, seed, dropout_p, out_dtype)
    lead = x.shape[:-1]
    return (x.new_empty((*lead, lora_B.shape[0]), dtype=out_dtype),
            x.new_empty((*lead, lora_A.shape[0]), dtype=torch.float32))


@fused_op("fastlora::lora_linear_backward")
def lora_linear_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor,
                         lora_B: Tensor, xa: Tensor, seed: Optional[Tensor], scale: float,
                         dropout_p: float, needs_dx: bool, needs_dw: bool,
                         needs_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dW, dbias); those not needed are empty."""
    x2, g2 = rows2d(x), rows2d(grad)
    dx, da, db, dw, dbias = lora_backward(g2, x2, weight, lora_A, lora_B, rows2d(xa), seed, scale,
                                          dropout_p, needs_dx, needs_dw, needs_dbias)
    return (dx.view(x.shape) if dx is not None else x.new_empty(0), da, db,
            dw if dw is not None else x.new_empty(0),
            dbias if dbias is not None else x.new_empty(0))


@lora_linear_backward.register_fake
def _(grad, x, weight, lora_A, lora_B, xa, seed, scale, dropout_p, needs_dx, needs_dw,
      needs_dbias):
    return (torch.empty_like(x) if needs_dx else x.new_empty(0), torch.empty_like(lora_A),
            torch.empty_like(lora_B), torch.empty_like(weight) if needs_dw else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if needs_dbias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, base, a, b, seed, scale, p, _out_dtype = inputs
    ctx.save_for_backward(x, weight, a, b, output[1], seed)
    ctx.scale, ctx.p = scale, p
    ctx.base_dtype = base.dtype if base is not None else None


def _backward(ctx, grad, _dxa):
    x, weight, a, b, xa, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, weight, bias, base, A, B, ...
    dx, da, db, dw, dbias = torch.ops.fastlora.lora_linear_backward(
        grad, x, weight, a, b, xa, seed, ctx.scale, ctx.p, needs[0], needs[1], needs[2])
    dbase = grad.to(ctx.base_dtype) if needs[3] else None
    return (dx if needs[0] else None, dw if needs[1] else None, dbias if needs[2] else None,
            dbase, da if needs[4] else None, db if needs[5] else None, None, None, None, None)


lora_linear.register_autograd(_backward, setup_context=_setup_context)
