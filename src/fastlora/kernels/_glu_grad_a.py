"""The down projection's dA straight from the GLU's inputs, for lora_mlp_block's backward.

Math (kernels/lora_mlp_block.py; h is the GLU's output, the down projection's input):

    h       = cast(act(cast(base_g + s_g xa_g @ B_g^T)) * cast(base_u + s_u xa_u @ B_u^T))
    dA_down = da_down^T @ h                da_down = s_d dy @ B_down^T   [M, r_d] float32

The block's backward made h again with the forward's GLU kernel (reading base gate and base up,
writing h) and then read h once more for dA_down (the grad_x kernel of kernels/_lora_blocks.py).
This kernel makes each h tile in registers by the forward's own arithmetic (kernels/lora_mlp.py's
``_branch`` and ``_act``: the same bits) and multiplies it into dA_down at once, so h is never
written: 2 M F e bytes less traffic per layer (h written and read back; Llama-3.2-1B at 8192
tokens: 256 MiB) and one [M, F] buffer fewer in the backward. Only without dropout on h (the
down adapter's dropout_p = 0, peft's default); with it the two kernels stay.

Grid: column blocks of F x splits of the rows (enough programs to fill the GPU); each program
loads its B tiles once, walks its rows, and writes a float32 [r_d, BLOCK_N] partial sum; the
splits' partial sums are added in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import HAVE_TRITON, cdiv
from ._dot_precision import dot_mode, fix_bf16
from ._launch import launch
from ._lora_blocks import block_r, split_extent
from .lora_mlp import ACTIVATIONS

# on: lora_mlp_block's backward takes this kernel where it can (``fusable``); off: the GLU
# forward kernel and the grad_x kernel. Off by default until measured on the GPU: compiled for
# sm_90 (Triton 3.9, no GPU) and tested under the interpreter only (2026-12-07, no device time)
tuning.register("lora_glu_grad_a", on=False, block_m=64, block_n=64, warps=4, per_sm=4)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._dot_precision import dot, rne
    from .lora_mlp import _act, _b_tile, _branch, _xa_tile

    @triton.jit(do_not_specialize=["M"])
    def _glu_grad_a_kernel(BG, BU, XA, WBG, WBU, DA, PART, M, N, RG, RU, RD, stride_bg,
                           stride_bu, stride_xa, stride_wbg, stride_wbu, stride_da,
                           rows_per_split, sg, su, ACT: tl.constexpr, MODE: tl.constexpr,
                           FIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr,
                           BLOCK_RD: tl.constexpr):
        """PART[split, :, cols] = da[rows of split]^T @ h[rows of split, cols]."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        col_ok = cols < N
        rd = tl.arange(0, BLOCK_RD)
        ty = BG.dtype.element_ty
        bt_g = _b_tile(WBG, cols, col_ok, stride_wbg, RG, BLOCK_RG)
        bt_u = _b_tile(WBU, cols, col_ok, stride_wbu, RU, BLOCK_RU)
        acc = tl.zeros([BLOCK_RD, BLOCK_N], dtype=tl.float32)
        start = tl.cast(split, tl.int64) * rows_per_split
        for m0 in range(0, rows_per_split, BLOCK_M):
            rows = start + m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            gate = _branch(BG, _xa_tile(XA, rows, row_ok, stride_xa, RG, BLOCK_RG), bt_g, rows,
                           cols, row_ok, col_ok, stride_bg, sg, MODE, FIX, ty, BLOCK_M, BLOCK_N)
            up = _branch(BU, _xa_tile(XA + RG, rows, row_ok, stride_xa, RU, BLOCK_RU), bt_u,
                         rows, cols, row_ok, col_ok, stride_bu, su, MODE, FIX, ty, BLOCK_M,
                         BLOCK_N)
            a, _ = _act(gate, ACT)
            h = rne(a * up, FIX).to(ty)  # rows past M: base, xa 0 -> gate 0 -> h 0
            da = tl.load(DA + rows[:, None] * stride_da + rd[None, :],
                         mask=row_ok[:, None] & (rd < RD)[None, :], other=0.0)
            acc = dot(tl.trans(da), h, acc, MODE)
        part = PART + (split * RD + rd[:, None]) * N + cols[None, :]
        tl.store(part, acc, mask=(rd < RD)[:, None] & col_ok[None, :])


def fusable(base_g: Tensor, hidden_dtype: torch.dtype, down_dropout_p: float) -> bool:
    """Whether :func:`glu_grad_a_triton` serves this backward: no dropout on h, and h in base
    gate's dtype (the kernel rounds h to it, as the forward rounds to hidden_dtype); and the
    tuning entry's ``on``."""
    return (down_dropout_p == 0 and base_g.dtype == hidden_dtype
            and tuning.get("lora_glu_grad_a")["on"])


def glu_grad_a_triton(base_g, base_u, xa, b_g, b_u, sg, su, activation, da_down) -> Tensor:
    """dA_down [r_d, F] float32 = da_down^T @ h, h made in registers (never stored)."""
    M, N = base_g.shape
    rg, ru, rd = b_g.shape[1], b_u.shape[1], da_down.shape[1]
    dev = base_g.device
    cfg = tuning.get("lora_glu_grad_a")
    bm, bn = cfg["block_m"], cfg["block_n"]
    if M == 0:
        return _buffers.zeros((rd, N), torch.float32, dev)
    out = _buffers.empty((rd, N), torch.float32, dev)
    splits, per = split_extent(M, bm, cdiv(N, bn), cfg["per_sm"], base_g)
    part = _buffers.empty((splits, rd, N), torch.float32, dev)
    launch(_glu_grad_a_kernel)[(cdiv(N, bn), splits)](
        base_g, base_u, xa, b_g, b_u, da_down, part, M, N, rg, ru, rd, base_g.stride(0),
        base_u.stride(0), xa.stride(0), b_g.stride(0), b_u.stride(0), da_down.stride(0), per,
        sg, su, ACT=ACTIVATIONS[activation], MODE=dot_mode(dev, base_g.dtype),
        FIX=fix_bf16(base_g), BLOCK_M=bm, BLOCK_N=bn, BLOCK_RG=block_r(rg),
        BLOCK_RU=block_r(ru), BLOCK_RD=block_r(rd), num_warps=cfg["warps"])
    torch.sum(part, 0, out=out)
    return out
