"""RMSNorm followed by the whole LoRA'd MLP that reads its output, as one op that does not keep
the norm's output for backward: ``torch.ops.fastlora.rms_norm_lora_mlp_block`` (Llama's
post_attention_layernorm, then gate/up, the activation and down).

Math (x [M, N] rows, the residual stream; see kernels/rms_norm.py and
kernels/lora_mlp_block.py):

    y, rstd = rms_norm(x, w, eps, offset, cast_before_weight)      y = (w + offset) * x * rstd
    out     = lora_mlp_block(y, ...)

Backward: y is recomputed by the same rms_norm forward on the same x and w (the same
deterministic kernel, so bit-identical to the forward's y, and its rstd is the forward's rstd);
lora_mlp_block's backward on it gives dy and the adapter gradients; y is freed; rms_norm's
backward gives dx (and dw, only when the norm weight requires grad). Every step is the existing
op, so the gradients are those of the unfused pair (bit for bit in the CPU tests).

Memory saved for backward: lora_mlp_block's own tensors less its input y (M N e bytes, e the
bytes of the model dtype), plus x and w, which the unfused rms_norm keeps anyway (x is the
residual). rstd (4 M bytes) is not kept either: the recompute gives it again. The unfused pair
keeps M N e more (with rms_norm_lora_qkv, 2 M N e per Llama layer: 1 GiB per step for Llama-1B
at 8192 tokens). The price is one rms_norm forward in backward (reads x, writes y).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import require
from ._launch import fused_op
from .rms_norm import norm_backward, norm_forward

_ops = torch.ops.fastlora


def _mlp_forward(x, norm_weight, eps, offset, cast_before_weight, gate_weight, gate_bias, gate_A,
                 gate_B, up_weight, up_bias, up_A, up_B, seed, gate_scale, up_scale, dropout_p,
                 activation, hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed,
                 down_scale, down_dropout_p, out_dtype):
    y, _rstd = norm_forward(x, norm_weight, eps, offset, cast_before_weight)
    out, bg, bu, xa, xa_d = _ops.lora_mlp_block(
        y, gate_weight, gate_bias, gate_A, gate_B, up_weight, up_bias, up_A, up_B, seed,
        gate_scale, up_scale, dropout_p, activation, hidden_dtype, down_weight, down_bias, down_A,
        down_B, down_seed, down_scale, down_dropout_p, out_dtype)
    return out, bg, bu, xa, xa_d  # y dies here


@fused_op("fastlora::rms_norm_lora_mlp_block")
def rms_norm_lora_mlp_block(
        x: Tensor, norm_weight: Tensor, eps: float, offset: float, cast_before_weight: bool,
        gate_weight: Tensor, gate_bias: Optional[Tensor], gate_A: Tensor, gate_B: Tensor,
        up_weight: Tensor, up_bias: Optional[Tensor], up_A: Tensor, up_B: Tensor,
        seed: Optional[Tensor], gate_scale: float, up_scale: float, dropout_p: float,
        activation: str, hidden_dtype: torch.dtype, down_weight: Tensor,
        down_bias: Optional[Tensor], down_A: Tensor, down_B: Tensor, down_seed: Optional[Tensor],
        down_scale: float, down_dropout_p: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, base_gate, base_up, xa, xa_down) = lora_mlp_block(rms_norm(x))."""
    return _mlp_forward(x, norm_weight, eps, offset, cast_before_weight, gate_weight, gate_bias,
                        gate_A, gate_B, up_weight, up_bias, up_A, up_B, seed, gate_scale,
                        up_scale, dropout_p, activation, hidden_dtype, down_weight, down_bias,
                        down_A, down_B, down_seed, down_scale, down_dropout_p, out_dtype)


rms_norm_lora_mlp_block.register_fake(_mlp_forward)


def _mlp_backward_impl(dout, x, norm_weight, eps, offset, cast_before_weight, gate_weight, gate_A,
                       gate_B, up_weight, up_A, up_B, base_gate, base_up, xa, seed, gate_scale,
                       up_scale, dropout_p, activation, hidden_dtype, down_weight, down_A, down_B,
                       xa_down, down_seed, down_scale, down_dropout_p, needs_dx, needs_dw,
                       needs_dbias, needs_down_dbias):
    y, rstd = norm_forward(x, norm_weight, eps, offset, cast_before_weight)  # 1. y again
    res = _ops.lora_mlp_block_backward(  # 2. the MLP's backward on y (h recomputed inside)
        dout, y, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up, xa,
        seed, gate_scale, up_scale, dropout_p, activation, hidden_dtype, down_weight, down_A,
        down_B, xa_down, down_seed, down_scale, down_dropout_p, needs_dx or needs_dw,
        needs_dbias, needs_down_dbias)
    del y
    dx, dw = norm_backward(res[0], x, norm_weight, rstd, offset, cast_before_weight, needs_dx,
                            needs_dw)  # 3. the norm's backward
    return [dx, dw] + list(res[1:])


@fused_op("fastlora::rms_norm_lora_mlp_block_backward")
def rms_norm_lora_mlp_block_backward(
        dout: Tensor, x: Tensor, norm_weight: Tensor, eps: float, offset: float,
        cast_before_weight: bool, gate_weight: Tensor, gate_A: Tensor, gate_B: Tensor,
        up_weight: Tensor, up_A: Tensor, up_B: Tensor, base_gate: Tensor, base_up: Tensor,
        xa: Tensor, seed: Optional[Tensor], gate_scale: float, up_scale: float, dropout_p: float,
        activation: str, hidden_dtype: torch.dtype, down_weight: Tensor, down_A: Tensor,
        down_B: Tensor, xa_down: Tensor, down_seed: Optional[Tensor], down_scale: float,
        down_dropout_p: float, needs_dx: bool, needs_dw: bool, needs_dbias: bool,
        needs_down_dbias: bool) -> list[Tensor]:
    """[dx, d norm_weight, d gate_A, d gate_B, d up_A, d up_B, d gate_bias, d up_bias,
    d down_A, d down_B, d down_bias]; empty where unneeded."""
    return _mlp_backward_impl(dout, x, norm_weight, eps, offset, cast_before_weight, gate_weight,
                              gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up, xa, seed,
                              gate_scale, up_scale, dropout_p, activation, hidden_dtype,
                              down_weight, down_A, down_B, xa_down, down_seed, down_scale,
                              down_dropout_p, needs_dx, needs_dw, needs_dbias, needs_down_dbias)


rms_norm_lora_mlp_block_backward.register_fake(_mlp_backward_impl)


def _mlp_setup_context(ctx, inputs, output):
    (x, nw, eps, offset, cbw, gw, gb, ga, gB, uw, ub, ua, uB, seed, gs, us, p, activation,
     hidden_dtype, dw, _db, da, dB, dseed, ds, dp, _out) = inputs
    _y, bg, bu, xa, xa_d = output
    ctx.save_for_backward(x, nw, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, dw, da, dB, xa_d,
                          dseed)
    ctx.norm_args = (eps, offset, cbw)
    ctx.mlp_args = (gs, us, p, activation, hidden_dtype)
    ctx.down_args = (ds, dp)
    ctx.bias_dtypes = (gb.dtype if gb is not None else None, ub.dtype if ub is not None else None)


def _mlp_backward(ctx, dout, _dbg, _dbu, _dxa, _dxa_d):
    x, nw, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, dw, da, dB, xa_d, dseed = ctx.saved_tensors
    n = ctx.needs_input_grad
    require(not (n[5] or n[9] or n[19]), "fastlora.rms_norm_lora_mlp_block: the base weights "
                                         "must be frozen", RuntimeError)
    (dx, dnw, dga, dgb, dua, dub, dgbias, dubias, dda, ddb,
     ddbias) = _ops.rms_norm_lora_mlp_block_backward(
        dout, x, nw, *ctx.norm_args, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, *ctx.mlp_args, dw,
        da, dB, xa_d, dseed, *ctx.down_args, n[0], n[1], bool(n[6] or n[10]), n[20])
    return (dx if n[0] else None, dnw if n[1] else None, None, None, None,
            None, dgbias.to(ctx.bias_dtypes[0]) if n[6] else None, dga if n[7] else None,
            dgb if n[8] else None, None, dubias.to(ctx.bias_dtypes[1]) if n[10] else None,
            dua if n[11] else None, dub if n[12] else None) + (None,) * 6 + (
        None, ddbias if n[20] else None, dda if n[21] else None, ddb if n[22] else None) \
        + (None,) * 4


rms_norm_lora_mlp_block.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
