"""RMSNorm followed by the q/k/v LoRA projections that read its output, as one op that does not
keep the norm's output for backward: ``torch.ops.fastlora.rms_norm_lora_qkv`` (Llama's
input_layernorm, then q/k/v).

Math (x [M, N] rows, the residual stream; see kernels/rms_norm.py and kernels/lora_qkv.py):

    y, rstd    = rms_norm(x, w, eps, offset, cast_before_weight)      y = (w + offset) * x * rstd
    q, k, v, _ = lora_qkv(y, ...)

Backward: y is recomputed by the same rms_norm forward on the same x and w (the same
deterministic kernel, so bit-identical to the forward's y, and its rstd is the forward's rstd);
lora_qkv's backward on it gives dy and the adapter gradients; y is freed; rms_norm's backward
gives dx (and dw, only when the norm weight requires grad). Every step is the existing op, so the
gradients are those of the unfused pair (bit for bit in the CPU tests).

Memory saved for backward: lora_qkv's own tensors less its input y (M N e bytes, e the bytes of
the model dtype), plus x and w, which the unfused rms_norm keeps anyway (x is the residual). rstd
(4 M bytes) is not kept either: the recompute gives it again. The unfused pair keeps M N e more
(with rms_norm_lora_mlp_block, 2 M N e per Llama layer: 1 GiB per step for Llama-1B at 8192
tokens). The price is one rms_norm forward in backward (reads x, writes y).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _buffers
from ._common import require
from ._launch import fused_op
from .rms_norm import norm_backward, norm_forward

_ops = torch.ops.fastlora


def _qkv_forward(x, norm_weight, eps, offset, cast_before_weight, q_weight, q_bias, q_A, q_B,
                 k_weight, k_bias, k_A, k_B, v_weight, v_bias, v_A, v_B, seed, q_scale, k_scale,
                 v_scale, dropout_p, out_dtype):
    y, _rstd = norm_forward(x, norm_weight, eps, offset, cast_before_weight)
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
    y, rstd = norm_forward(x, norm_weight, eps, offset, cast_before_weight)
    # 2. lora_qkv's backward on y: dy, the adapter (and bias) gradients
    res = _ops.lora_qkv_backward(dq, dk, dv, y, q_weight, q_A, q_B, k_weight, k_A, k_B,
                                 v_weight, v_A, v_B, xa, seed, q_scale, k_scale, v_scale,
                                 dropout_p, needs_dx or needs_dw, needs_dbias)
    del y  # the [M, N] recompute lives only for step 2
    # 3. rms_norm's backward on dy
    dx, dw = norm_backward(res[0], x, norm_weight, rstd, offset, cast_before_weight, needs_dx,
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
    dq, dk, dv = (g if g is not None else _buffers.zeros(shape, dtype, xa.device)
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
