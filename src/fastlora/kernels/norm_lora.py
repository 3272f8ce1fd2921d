"""RMSNorm followed by the grouped LoRA op that reads its output, as one op that does not keep
the norm's output for backward: ``torch.ops.fastlora.rms_norm_lora_qkv`` (input_layernorm, then
q/k/v) and ``torch.ops.fastlora.rms_norm_lora_mlp_block`` (post_attention_layernorm, then the
whole LoRA'd MLP).

Math (x [M, N] rows, the residual stream; see kernels/rms_norm.py and the two LoRA op files):

    y, rstd = rms_norm(x, w, eps, offset, cast_before_weight)      y = (w + offset) * x * rstd
    outs    = lora_qkv(y, ...)  or  lora_mlp_block(y, ...)

Backward: y is recomputed by the same rms_norm forward on the same x and w (the same
deterministic kernel, so bit-identical to the forward's y, and its rstd is the forward's rstd);
the LoRA op's backward on it gives dy and the adapter gradients; y is freed; rms_norm's backward
gives dx (and dw, only when the norm weight requires grad). Every step is the existing op, so the
gradients are those of the unfused pair (bit for bit in the CPU tests).

Memory saved for backward per op: the LoRA op's own tensors less its input y (M N e bytes, e the
bytes of the model dtype), plus x and w, which the unfused rms_norm keeps anyway (x is the
residual). rstd (4 M bytes) is not kept either: the recompute gives it again. The unfused pair
keeps M N e more per op, 2 M N e per Llama layer (1 GiB per step for Llama-1B at 8192 tokens).
The price is one rms_norm forward per op in backward (reads x, writes y).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import require

from ._launch import fused_op
_ops = torch.ops.fastlora


def _norm(x, norm_weight, eps, offset, cast_before_weight):
    """y = rms_norm(x): the forward's op, called again in backward (rstd is recomputed too)."""
    return _ops.rms_norm(x, norm_weight, eps, offset, cast_before_weight)


def _norm_backward(dy, x, norm_weight, rstd, offset, cast_before_weight, needs_dx, needs_dw):
    if not (needs_dx or needs_dw):
        return x.new_empty(0), norm_weight.new_empty(0)
    return _ops.rms_norm_backward(dy, x, norm_weight, rstd, offset, cast_before_weight, needs_dw)


# ---------------------------------------------------------------- input_layernorm + q/k/v


def _qkv_forward(x, norm_weight, eps, offset, cast_before_weight, q_weight, q_bias, q_A, q_B,
                 k_weight, k_bias, k_A, k_B, v_weight, v_bias, v_A, v_B, seed, q_scale, k_scale,
                 v_scale, dropout_p, out_dtype):
    y, _rstd = _norm(x, norm_weight, eps, offset, cast_before_weight)
    q, k, v, xa = _ops.lora_qkv(y, q_weight, q_bias, q_A, q_B, k_weight, k_bias, k_A, k_B,
                                v_weight, v_bias, v_A, v_B, seed, q_scale, k_scale, v_scale,
                                dropout_p, out_dtype)
    return q, k, v, xa  # y dies here


@fused_op("fastlora::rms_norm_lora_qkv")
def rms_norm_lora_qkv(x: Tensor, norm_weight: Tensor, eps: float, offset: float,
                      cast_before_weight: bool, q_weight: Tensor, q_bias: Optional[Tensor],
                      q_A: Tensor, q_B: Tensor, k_weight: Tensor, k_bias: Optional[Tensor],
                      k_A: Tensor, k_B: Tensor, v_weight: Tensor, v_bias: Optional[Tensor],
                      v_A: Tensor, v_B: Tensor, seed: Optional[Tensor], q_scale: float,
                      k_scale: float, v_scale: float, dropout_p: float, out_dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, xa) = lora_qkv(rms_norm(x)); xa is what the backward needs besides x."""
    return _qkv_forward(x, norm_weight, eps, offset, cast_before_weight, q_weight, q_bias, q_A,
                        q_B, k_weight, k_bias, k_A, k_B, v_weight, v_bias, v_A, v_B, seed,
                        q_scale, k_scale, v_scale, dropout_p, out_dtype)


# the fake kernel is the same composition: the two ops' fake kernels run under fake tensors
rms_norm_lora_qkv.register_fake(_qkv_forward)


def _qkv_backward_impl(dq, dk, dv, x, norm_weight, eps, offset, cast_before_weight, q_weight,
                       q_A, q_B, k_weight, k_A, k_B, v_weight, v_A, v_B, xa, seed, q_scale,
                       k_scale, v_scale, dropout_p, needs_dx, needs_dw, needs_dbias):
    # 1. y again (bit-identical to the forward's), with its rstd
    y, rstd = _norm(x, norm_weight, eps, offset, cast_before_weight)
    # 2. lora_qkv's backward on y: dy, the adapter (and bias) gradients
    res = _ops.lora_qkv_backward(dq, dk, dv, y, q_weight, q_A, q_B, k_weight, k_A, k_B,
                                 v_weight, v_A, v_B, xa, seed, q_scale, k_scale, v_scale,
                                 dropout_p, needs_dx or needs_dw, needs_dbias)
    del y  # the [M, N] recompute lives only for step 2
    # 3. rms_norm's backward on dy
    dx, dw = _norm_backward(res[0], x, norm_weight, rstd, offset, cast_before_weight, needs_dx,
                            needs_dw)
    return [dx, dw] + list(res[1:])


@fused_op("fastlora::rms_norm_lora_qkv_backward")
def rms_norm_lora_qkv_backward(
        dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, norm_weight: Tensor, eps: float,
        offset: float, cast_before_weight: bool, q_weight: Tensor, q_A: Tensor, q_B: Tensor,
        k_weight: Tensor, k_A: Tensor, k_B: Tensor, v_weight: Tensor, v_A: Tensor, v_B: Tensor,
        xa: Tensor, seed: Optional[Tensor], q_scale: float, k_scale: float, v_scale: float,
        dropout_p: float, needs_dx: bool, needs_dw: bool, needs_dbias: bool) -> list[Tensor]:
    """[dx, d norm_weight, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v, dbias_q, dbias_k, dbias_v];
    empty where unneeded."""
    return _qkv_backward_impl(dq, dk, dv, x, norm_weight, eps, offset, cast_before_weight,
                              q_weight, q_A, q_B, k_weight, k_A, k_B, v_weight, v_A, v_B, xa,
                              seed, q_scale, k_scale, v_scale, dropout_p, needs_dx, needs_dw,
                              needs_dbias)


rms_norm_lora_qkv_backward.register_fake(_qkv_backward_impl)


def _qkv_setup_context(ctx, inputs, output):
    x, nw, eps, offset, cbw = inputs[:5]
    branches = [inputs[5:9], inputs[9:13], inputs[13:17]]  # (weight, bias, A, B) each
    ctx.save_for_backward(x, nw, *[t for w, _b, a, b in branches for t in (w, a, b)],
                          output[3], inputs[17])
    ctx.norm_args = (eps, offset, cbw)
    ctx.args = tuple(inputs[18:22])  # q/k/v scale, dropout_p
    ctx.outputs = [(o.shape, o.dtype) for o in output[:3]]
    ctx.bias_dtypes = [br[1].dtype if br[1] is not None else None for br in branches]


def _qkv_backward(ctx, dq, dk, dv, _dxa):
    x, nw, qw, qa, qb, kw, ka, kb, vw, va, vb, xa, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    require(not (n[5] or n[9] or n[13]), "fastlora.rms_norm_lora_qkv: the base weights must be "
                                         "frozen", RuntimeError)
    dq, dk, dv = (g if g is not None else xa.new_zeros(shape, dtype=dtype)
                  for g, (shape, dtype) in zip((dq, dk, dv), ctx.outputs))
    dx, dw, dqa, dqb, dka, dkb, dva, dvb, dbq, dbk, dbv = _ops.rms_norm_lora_qkv_backward(
        dq, dk, dv, x, nw, *ctx.norm_args, qw, qa, qb, kw, ka, kb, vw, va, vb, xa, seed,
        *ctx.args, n[0], n[1], bool(n[6] or n[10] or n[14]))
    bd = ctx.bias_dtypes
    return (dx if n[0] else None, dw if n[1] else None, None, None, None,
            None, dbq.to(bd[0]) if n[6] else None, dqa if n[7] else None, dqb if n[8] else None,
            None, dbk.to(bd[1]) if n[10] else None, dka if n[11] else None,
            dkb if n[12] else None,
            None, dbv.to(bd[2]) if n[14] else None, dva if n[15] else None,
            dvb if n[16] else None) + (None,) * 6


rms_norm_lora_qkv.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ---------------------------------------------------------------- post_attention_layernorm + MLP


def _mlp_forward(x, norm_weight, eps, offset, cast_before_weight, gate_weight, gate_bias, gate_A,
                 gate_B, up_weight, up_bias, up_A, up_B, seed, gate_scale, up_scale, dropout_p,
                 activation, hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed,
                 down_scale, down_dropout_p, out_dtype):
    y, _rstd = _norm(x, norm_weight, eps, offset, cast_before_weight)
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
    y, rstd = _norm(x, norm_weight, eps, offset, cast_before_weight)  # 1. y again
    res = _ops.lora_mlp_block_backward(  # 2. the MLP's backward on y (h recomputed inside)
        dout, y, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up, xa,
        seed, gate_scale, up_scale, dropout_p, activation, hidden_dtype, down_weight, down_A,
        down_B, xa_down, down_seed, down_scale, down_dropout_p, needs_dx or needs_dw,
        needs_dbias, needs_down_dbias)
    del y
    dx, dw = _norm_backward(res[0], x, norm_weight, rstd, offset, cast_before_weight, needs_dx,
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
