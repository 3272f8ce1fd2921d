"""The whole LoRA'd gated MLP as one op: ``torch.ops.fastlora.lora_mlp_block``.

It is ``lora_mlp`` (kernels/lora_mlp.py) followed by ``lora_linear`` (kernels/lora_linear.py)
on its output, with one difference: the [M, F] hidden state h is not kept for backward.

Math (x [M, K] rows; gate/up/down are peft LoRA linears, see the two op files):

    xa      = dropout_{seed, slots 0 and 1}(x) @ [A_gate; A_up]^T / (1 - p)     [M, r_g + r_u]
    h       = act(cast(x @ W_gate^T + b_gate + s_g xa_g @ B_gate^T))
              * cast(x @ W_up^T + b_up + s_u xa_u @ B_up^T)                      [M, F]
    xa_down = dropout_{down_seed, slot 0}(h) @ A_down^T / (1 - p_down)           [M, r_d]
    y       = cast(h @ W_down^T + b_down + s_d xa_down @ B_down^T)               [M, N]

Backward: dB_down first (it reads only dy and the saved xa_down, see below); then dA_down =
da_down^T @ h: h is recomputed by the GLU forward kernel itself (the same inputs through the
same deterministic kernel: bit-identical to the forward's h) and read by lora_linear's dA; or,
with the tuning entry ``lora_glu_grad_a`` on (off until measured on a GPU) and no dropout on h,
one kernel makes h tile by tile in registers by the forward kernel's arithmetic and never
stores it (kernels/_glu_grad_a.py). Then dh = dy @ W_down + adapter part (h and dh are never alive
together); then lora_mlp's backward runs on dh, writing d up over dh itself. The
gradients are those of the two unfused ops: the same functions on the same values (bit for bit
in the CPU tests). Dropout draws from two seeds, exactly as the two ops would.

Memory saved for backward per layer (M tokens, F = ffn width, e = bytes of the model dtype):
2 M F e (base_gate, base_up) + 4 M (r_g + r_u + r_d) (the float32 xa's) + x (kept anyway: it is
the MLP's input). The two unfused ops keep M F e more (h, for dA_down = da^T @ h). The price is
one GLU forward kernel in backward (reads 2 x [M, F], writes h) and a read of h for dA_down; the
one-kernel dA_down only reads base gate and base up. At the backward's
highest point 4 [M, F] buffers are alive (base_gate, base_up, dh, d gate), where the two ops'
backwards have 5. Compiled by inductor in a checkpointed layer, 3: base gate is recomputed for
this backward and dead after the GLU backward kernel, which may write d gate over it
(``_launch.may_write_over``; fastlora/reuse_dead_inputs.py gives it that buffer where the
graph proves base gate dead). Llama-3-8B at 8192 tokens: 224 MiB per buffer. In a checkpointed
layer the forward is recomputed in backward, and AOTAutograd's partitioner runs each recomputed
value just before its first use: xa_down, made from the forward's own h, is first read by
dB_down, which is therefore computed before this op's h and dh exist (after them, the forward's
h made a fifth [M, F] buffer: the 8B row's peak, 2026-12-06; tests/test_block_buffers.py
follows the buffers in the graph).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _buffers
from ._common import require, rows2d, use_triton
from ._launch import fused_op
from ._lora_blocks import lora_grad_b
from ._lora_grouped import grouped_down
from .lora_mlp import glu_forward_reference, glu_forward_triton, mlp_backward, validate_mlp
from ._glu_grad_a import fusable, glu_grad_a_triton
from .lora_linear import (grad_bias, grad_down, lora_forward, lora_grad_a, lora_grad_input,
                          validate as validate_linear)


def _validate(x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, seed, dropout_p,
              activation, hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed,
              down_dropout_p, out_dtype):
    validate_mlp(x, (gate_weight, up_weight), (gate_A, up_A), (gate_B, up_B), activation,
                  dropout_p, seed)
    n_ffn = gate_weight.shape[0]
    require(down_weight is not None and down_weight.dim() == 2
            and down_weight.shape[1] == n_ffn,
            f"fastlora.lora_mlp_block: down_weight must be [N, {n_ffn}]")
    # lora_linear's own checks, on an empty stand-in for h (same width, dtype and device)
    stand_in = _buffers.empty((0, n_ffn), hidden_dtype, x.device)
    validate_linear(stand_in, down_weight, down_bias, None, down_A, down_B, down_seed,
                    down_dropout_p, out_dtype)


def _glu(x2):
    return glu_forward_triton if use_triton(x2) else glu_forward_reference


@fused_op("fastlora::lora_mlp_block")
def lora_mlp_block(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], gate_A: Tensor,
                   gate_B: Tensor, up_weight: Tensor, up_bias: Optional[Tensor], up_A: Tensor,
                   up_B: Tensor, seed: Optional[Tensor], gate_scale: float, up_scale: float,
                   dropout_p: float, activation: str, hidden_dtype: torch.dtype,
                   down_weight: Tensor, down_bias: Optional[Tensor], down_A: Tensor,
                   down_B: Tensor, down_seed: Optional[Tensor], down_scale: float,
                   down_dropout_p: float, out_dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, base_gate, base_up, xa, xa_down): y = down(act(gate(x)) * up(x)), all three LoRA
    linears; the rest is what the backward needs (h is not among it)."""
    _validate(x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, seed, dropout_p, activation,
              hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed, down_dropout_p,
              out_dtype)
    x2 = rows2d(x)
    # lora_mlp's forward
    xa, _, _ = grouped_down(x2, [gate_A, up_A], seed, dropout_p)
    base_g, base_u = F.linear(x2, gate_weight, gate_bias), F.linear(x2, up_weight, up_bias)
    h = _glu(x2)(base_g, base_u, xa, gate_B, up_B, gate_scale, up_scale, activation,
                 hidden_dtype)
    # lora_linear's forward on h; h dies when this returns
    y, xa_d = lora_forward(h, down_weight, down_bias, None, down_A, down_B, down_seed,
                           down_scale, down_dropout_p, out_dtype)
    lead = x.shape[:-1]
    return (y.view(*lead, y.shape[-1]), base_g.view(*lead, -1), base_u.view(*lead, -1),
            xa.view(*lead, xa.shape[-1]), xa_d.view(*lead, xa_d.shape[-1]))


@lora_mlp_block.register_fake
def _(x, gate_weight, gate_bias, gate_A, gate_B, up_weight, up_bias, up_A, up_B, seed,
      gate_scale, up_scale, dropout_p, activation, hidden_dtype, down_weight, down_bias, down_A,
      down_B, down_seed, down_scale, down_dropout_p, out_dtype):
    _validate(x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, seed, dropout_p, activation,
              hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed, down_dropout_p,
              out_dtype)
    lead, n_ffn = x.shape[:-1], gate_weight.shape[0]
    f32 = torch.float32
    return (x.new_empty((*lead, down_weight.shape[0]), dtype=out_dtype),
            x.new_empty((*lead, n_ffn)), x.new_empty((*lead, n_ffn)),
            x.new_empty((*lead, gate_A.shape[0] + up_A.shape[0]), dtype=f32),
            x.new_empty((*lead, down_A.shape[0]), dtype=f32))


@fused_op("fastlora::lora_mlp_block_backward")
def lora_mlp_block_backward(
        dy: Tensor, x: Tensor, gate_weight: Tensor, gate_A: Tensor, gate_B: Tensor,
        up_weight: Tensor, up_A: Tensor, up_B: Tensor, base_gate: Tensor, base_up: Tensor,
        xa: Tensor, seed: Optional[Tensor], gate_scale: float, up_scale: float, dropout_p: float,
        activation: str, hidden_dtype: torch.dtype, down_weight: Tensor, down_A: Tensor,
        down_B: Tensor, xa_down: Tensor, down_seed: Optional[Tensor], down_scale: float,
        down_dropout_p: float, needs_dx: bool, needs_dbias: bool, needs_down_dbias: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d gate_A, d gate_B, d up_A, d up_B, d gate_bias, d up_bias, d down_A, d down_B,
    d down_bias); empty where unneeded."""
    bg, bu, xa2, dy2, xa_d2 = (rows2d(t) for t in (base_gate, base_up, xa, dy, xa_down))
    # 0. dB_down first: it reads only dy and xa_down. In a checkpointed layer xa_down is
    # recomputed from the forward's own h, and AOTAutograd's partitioner runs that recompute
    # just before the first use of xa_down; first, the forward's h is made and freed before this
    # op's h and dh exist (after them: 5 [M, F] buffers at once, base gate, base up, both h's
    # and dh; tests/test_block_buffers.py)
    d_down_B = lora_grad_b(dy2, xa_d2, down_scale, down_B.dtype)
    if use_triton(bg) and fusable(bg, hidden_dtype, down_dropout_p):
        # 1-2. dA_down = da_down^T @ h with h made tile by tile in registers, by the forward's
        # arithmetic (kernels/_glu_grad_a.py): h is never stored
        da_down = grad_down(dy2, bg, down_A, down_B, down_scale)
        d_down_A = glu_grad_a_triton(bg, bu, xa2, gate_B, up_B, gate_scale, up_scale,
                                     activation, da_down).to(down_A.dtype)
    else:
        # 1. h again: the forward's kernel on the forward's inputs (bit-identical)
        h = _glu(bg)(bg, bu, xa2, gate_B, up_B, gate_scale, up_scale, activation,
                     hidden_dtype)
        # 2. down's backward (lora_linear's) in two halves: dA_down reads h for the last time,
        # then dh = dy @ W_down + adapter part is made: h and dh are never alive together
        da_down, d_down_A = lora_grad_a(dy2, h, down_A, down_B, down_seed, down_scale,
                                        down_dropout_p)
        del h
    dh = lora_grad_input(dy2, da_down, down_weight, down_A, down_seed, down_dropout_p,
                         hidden_dtype)
    d_down_bias = grad_bias(dy2, down_weight) if needs_down_dbias else None
    # 3. gate/up's backward (lora_mlp) on dh: d up over dh itself (each tile read before it is
    # written), d gate into a new buffer. Compiled by inductor, reuse_dead_inputs.py points
    # d gate at base gate's buffer where base gate has no later reader (recomputed in a
    # checkpointed layer): [M, F] buffers alive at most 3 (base gate, base up, dh), else 4
    dx, dga, dgb, dua, dub, dgbias, dubias = mlp_backward(
        dh, x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, bg, bu, xa2, seed,
        gate_scale, up_scale, dropout_p, activation, needs_dx, needs_dbias,
        du=dh if dh.is_contiguous() else None)
    del dh
    return (dx, dga, dgb, dua, dub, dgbias, dubias, d_down_A, d_down_B,
            d_down_bias if d_down_bias is not None else x.new_empty(0))


@lora_mlp_block_backward.register_fake
def _(dy, x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up, xa, seed,
      gate_scale, up_scale, dropout_p, activation, hidden_dtype, down_weight, down_A, down_B,
      xa_down, down_seed, down_scale, down_dropout_p, needs_dx, needs_dbias, needs_down_dbias):
    n_ffn, e = gate_weight.shape[0], x.new_empty(0)
    return (torch.empty_like(x) if needs_dx else e, torch.empty_like(gate_A),
            torch.empty_like(gate_B), torch.empty_like(up_A), torch.empty_like(up_B),
            x.new_empty(n_ffn, dtype=hidden_dtype) if needs_dbias else e,
            x.new_empty(n_ffn, dtype=hidden_dtype) if needs_dbias else e,
            torch.empty_like(down_A), torch.empty_like(down_B),
            down_weight.new_empty(down_weight.shape[0]) if needs_down_dbias else e)


def _setup_context(ctx, inputs, output):
    (x, gw, gb, ga, gB, uw, ub, ua, uB, seed, gs, us, p, activation, hidden_dtype, dw, db, da,
     dB, dseed, ds, dp, _out) = inputs
    _y, bg, bu, xa, xa_d = output
    ctx.save_for_backward(x, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, dw, da, dB, xa_d, dseed)
    ctx.mlp_args = (gs, us, p, activation, hidden_dtype)
    ctx.down_args = (ds, dp)
    ctx.bias_dtypes = (gb.dtype if gb is not None else None, ub.dtype if ub is not None else None)


def _backward(ctx, dy, _dbg, _dbu, _dxa, _dxa_d):
    x, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, dw, da, dB, xa_d, dseed = ctx.saved_tensors
    n = ctx.needs_input_grad
    require(not (n[1] or n[5] or n[15]), "fastlora.lora_mlp_block: the base weights must be "
                                         "frozen", RuntimeError)
    needs_dbias = bool(n[2] or n[6])
    (dx, dga, dgb, dua, dub, dgbias, dubias, dda, ddb,
     ddbias) = torch.ops.fastlora.lora_mlp_block_backward(
        dy, x, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, *ctx.mlp_args, dw, da, dB, xa_d, dseed,
        *ctx.down_args, n[0], needs_dbias, n[16])
    return (dx if n[0] else None, None, dgbias.to(ctx.bias_dtypes[0]) if n[2] else None,
            dga if n[3] else None, dgb if n[4] else None, None,
            dubias.to(ctx.bias_dtypes[1]) if n[6] else None, dua if n[7] else None,
            dub if n[8] else None) + (None,) * 6 + (
        None, ddbias if n[16] else None, dda if n[17] else None, ddb if n[18] else None) \
        + (None,) * 4


lora_mlp_block.register_autograd(_backward, setup_context=_setup_context)
