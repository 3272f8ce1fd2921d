"""q, k and v LoRA projections sharing one input: ``torch.ops.fastlora.lora_qkv``.

The math, the stacked A_cat and the dropout slots are those of kernels/_lora_grouped.py (whose
``grouped_down`` / ``grouped_dx`` this op shares with lora_mlp): one pass over x computes every
branch's rank-r product, and dx is one buffer that cuBLAS accumulates the three base products
into.
Memory saved for backward: x, the float32 [M, r_q + r_k + r_v] xa and the seed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _buffers
from ._common import check_float, require, rows2d, use_triton
from ._launch import fused_op
from ._lora_blocks import (lora_grad_b_reference, lora_grad_b_triton, lora_grad_down_reference,
                           lora_grad_down_triton, lora_up_reference, lora_up_triton)
from ._lora_grouped import grouped_down, grouped_dx, split_ranks


def _validate_qkv(x, weights, lora_As, lora_Bs, dropout_p, seed):
    check_float("x", x)
    K = x.shape[-1]
    for name, w, a, b in zip("qkv", weights, lora_As, lora_Bs):
        require(w.dim() == 2 and w.shape[1] == K and w.dtype == x.dtype,
                f"fastlora.lora_qkv: {name}_weight must be [N, {K}] in {x.dtype}")
        require(a.dim() == 2 and a.shape[1] == K and b.dim() == 2
                and b.shape == (w.shape[0], a.shape[0]) and a.dtype == b.dtype == lora_As[0].dtype,
                f"fastlora.lora_qkv: {name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                f"not fit {tuple(w.shape)} (or adapter dtypes differ)")
    require(0.0 <= dropout_p < 1.0 and (dropout_p == 0 or seed is not None),
            "fastlora.lora_qkv: dropout_p must be in [0, 1) and needs a seed when > 0")


@fused_op("fastlora::lora_qkv")
def lora_qkv(x: Tensor, q_weight: Tensor, q_bias: Optional[Tensor], q_A: Tensor, q_B: Tensor,
             k_weight: Tensor, k_bias: Optional[Tensor], k_A: Tensor, k_B: Tensor,
             v_weight: Tensor, v_bias: Optional[Tensor], v_A: Tensor, v_B: Tensor,
             seed: Optional[Tensor], q_scale: float, k_scale: float, v_scale: float,
             dropout_p: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, xa): three LoRA linears of one x; xa is what the backward needs."""
    weights, biases = (q_weight, k_weight, v_weight), (q_bias, k_bias, v_bias)
    a_list, b_list = [q_A, k_A, v_A], (q_B, k_B, v_B)
    _validate_qkv(x, weights, a_list, b_list, dropout_p, seed)
    x2 = rows2d(x)
    xa, _, ranks = grouped_down(x2, a_list, seed, dropout_p)
    outs, lo = [], 0
    for w, bias, b, s, r in zip(weights, biases, b_list, (q_scale, k_scale, v_scale), ranks):
        y = F.linear(x2, w, bias)
        if use_triton(x2):
            out = y if y.dtype == out_dtype else _buffers.empty(y.shape, out_dtype,
                                                               y.device)
            outs.append(lora_up_triton(y, xa[:, lo:lo + r].contiguous(), b, s, out))
        else:
            outs.append(lora_up_reference(y, xa[:, lo:lo + r], b, s, out_dtype))
        lo += r
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs) + (xa.view(*lead, xa.shape[-1]),)


@lora_qkv.register_fake
def _(x, q_weight, q_bias, q_A, q_B, k_weight, k_bias, k_A, k_B, v_weight, v_bias, v_A, v_B,
      seed, q_scale, k_scale, v_scale, dropout_p, out_dtype):
    _validate_qkv(x, (q_weight, k_weight, v_weight), (q_A, k_A, v_A), (q_B, k_B, v_B),
                  dropout_p, seed)
    lead = x.shape[:-1]
    r = q_A.shape[0] + k_A.shape[0] + v_A.shape[0]
    return tuple(x.new_empty((*lead, w.shape[0]), dtype=out_dtype)
                 for w in (q_weight, k_weight, v_weight)) + (
        x.new_empty((*lead, r), dtype=torch.float32),)


@fused_op("fastlora::lora_qkv_backward")
def lora_qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, q_weight: Tensor, q_A: Tensor,
                      q_B: Tensor, k_weight: Tensor, k_A: Tensor, k_B: Tensor, v_weight: Tensor,
                      v_A: Tensor, v_B: Tensor, xa: Tensor, seed: Optional[Tensor],
                      q_scale: float, k_scale: float, v_scale: float, dropout_p: float,
                      needs_dx: bool, needs_dbias: bool) -> list[Tensor]:
    """[dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v, dbias_q, dbias_k, dbias_v]; empty if unneeded."""
    x2, xa2 = rows2d(x), rows2d(xa)
    grads = [rows2d(g) for g in (dq, dk, dv)]
    weights, a_list, b_list = (q_weight, k_weight, v_weight), (q_A, k_A, v_A), (q_B, k_B, v_B)
    ranks = [a.shape[0] for a in a_list]
    triton_path = use_triton(x2)
    # Column slices of da and xa go to the kernels as compact copies ([M, r] float32, small):
    # a kernel argument must be dense for inductor to launch it (kernels/_launch.py).
    da_parts, out_b, lo = [], [], 0
    for g, b, s, r in zip(grads, b_list, (q_scale, k_scale, v_scale), ranks):
        xa_j = xa2[:, lo:lo + r].contiguous()
        if triton_path:
            da_parts.append(lora_grad_down_triton(g, b, s, _buffers.empty(
                (x2.shape[0], r), torch.float32, x2.device)))
            out_b.append(lora_grad_b_triton(g, xa_j, s, b.dtype))
        else:
            da_parts.append(lora_grad_down_reference(g, b, s))
            out_b.append(lora_grad_b_reference(g, xa_j, s, b.dtype))
        lo += r
    da = torch.cat(da_parts, 1)
    wd = q_weight.dtype
    dx, da_cat = grouped_dx([g.to(wd) for g in grads], x2, list(weights), da,
                            torch.cat(a_list, 0), ranks, seed, dropout_p, needs_dx)
    out = [dx.view(x.shape) if dx is not None else x.new_empty(0)]
    for d_a, d_b, a in zip(split_ranks(da_cat, ranks, 0), out_b, a_list):
        out += [d_a.to(a.dtype, copy=True), d_b]
    out += [g.to(wd).sum(0) if needs_dbias else x.new_empty(0) for g in grads]
    return out


@lora_qkv_backward.register_fake
def _(dq, dk, dv, x, q_weight, q_A, q_B, k_weight, k_A, k_B, v_weight, v_A, v_B, xa, seed,
      q_scale, k_scale, v_scale, dropout_p, needs_dx, needs_dbias):
    out = [torch.empty_like(x) if needs_dx else x.new_empty(0)]
    for a, b in ((q_A, q_B), (k_A, k_B), (v_A, v_B)):
        out += [torch.empty_like(a), torch.empty_like(b)]
    out += [x.new_empty(w.shape[0]) if needs_dbias else x.new_empty(0)
            for w in (q_weight, k_weight, v_weight)]
    return out


def _qkv_setup_context(ctx, inputs, output):
    x = inputs[0]
    branches = [inputs[1:5], inputs[5:9], inputs[9:13]]  # (weight, bias, A, B) each
    ctx.save_for_backward(x, *[t for w, _b, a, b in branches for t in (w, a, b)], output[3],
                          inputs[13])
    ctx.args = tuple(inputs[14:18])  # q/k/v scale, dropout_p
    ctx.outputs = [(o.shape, o.dtype) for o in output[:3]]
    ctx.bias_dtypes = [br[1].dtype if br[1] is not None else None for br in branches]


def _qkv_backward(ctx, dq, dk, dv, _dxa):
    x, qw, qa, qb, kw, ka, kb, vw, va, vb, xa, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    require(not (n[1] or n[5] or n[9]), "fastlora.lora_qkv: the base weights must be frozen",
            RuntimeError)
    needs_dbias = bool(n[2] or n[6] or n[10])
    dq, dk, dv = (g if g is not None else _buffers.zeros(shape, dtype, xa.device)
                  for g, (shape, dtype) in zip((dq, dk, dv), ctx.outputs))
    res = torch.ops.fastlora.lora_qkv_backward(dq, dk, dv, x, qw, qa, qb, kw, ka, kb, vw, va, vb,
                                               xa, seed, *ctx.args, n[0], needs_dbias)
    dx, dqa, dqb, dka, dkb, dva, dvb, dbq, dbk, dbv = res
    bd = ctx.bias_dtypes
    return (dx if n[0] else None,
            None, dbq.to(bd[0]) if n[2] else None, dqa if n[3] else None, dqb if n[4] else None,
            None, dbk.to(bd[1]) if n[6] else None, dka if n[7] else None, dkb if n[8] else None,
            None, dbv.to(bd[2]) if n[10] else None, dva if n[11] else None,
            dvb if n[12] else None) + (None,) * 6


lora_qkv.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)
