"""RMSNorm, forward and backward: ``torch.ops.fastlora.rms_norm``.

Math, for one row x of N features (computed in float32 whatever the storage dtype):

    rstd = 1 / sqrt(mean(x^2) + eps)          n = x * rstd
    Llama:  y = (w + offset) * cast(n, x.dtype)      (cast_before_weight=True,  offset 0)
    Gemma:  y = cast(n * (1 + w), x.dtype)           (cast_before_weight=False, offset 1)

    dn = dy * (w + offset)
    dx = rstd * (dn - n * mean(dn * n))
    dw = sum over rows of dy * n   (n rounded like the forward when cast_before_weight)

Memory: the forward keeps one float32 per row (rstd) besides x, where the unfused graph keeps
the float32 copy of x, its square, the normalised row and its cast (about 3-4 full-size
tensors per norm for backward). dw is computed only when the weight requires grad (in LoRA it
usually does not); when it does, each program sums its rows into one partial row and a final
``sum(0)`` adds the partials, so there are no atomics and the result is deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import (HAVE_TRITON, cdiv, check_float, check_same_device, persistent_programs,
                      require, row_tile, rows2d, use_triton)
from ._launch import fused_op, launch

# (BLOCK_M, num_warps) of every launch; None: the table of tile_config (benchmarks/tune_norms.py
# sweeps it on the H200).
tuning.register("rms_norm", tile=None)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    # Each program normalises a tile of BLOCK_M rows x BLOCK_N features (BLOCK_N >= N), so
    # several rows' loads are in flight at once: one row per program leaves the memory system
    # idle while each row's reduction finishes (measured on the H200: 850 GB/s at 8192x4096).

    @triton.jit(do_not_specialize=["M"])
    def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, M, N, eps, offset,
                      CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        n = x * rstd[:, None]
        if CAST_BEFORE_WEIGHT:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], (n * w[None, :]).to(
            Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit(do_not_specialize=["M", "tiles_per_program"])
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N,
                      offset, tiles_per_program,
                      CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(0, tiles_per_program):
            rows = (tl.cast(pid, tl.int64) * tiles_per_program + t) * BLOCK_M \
                + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            n = x * rstd[:, None]
            dn = dy * w[None, :]
            dx = (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:
                    n = n.to(X.dtype.element_ty).to(tl.float32)
                dw += tl.sum(dy * n, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


def tile_config(n: int, element_size: int, kind: str = "fwd") -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` features; ``kind`` is "fwd", "bwd" or
    "bwd_dw". From the sweep of benchmarks/tune_norms.py on the H200 (bf16, 8192-16384 rows):
    the best (rows per program, warps) by row size in bytes, e.g. 2048 features fwd (2, 8) at
    3130 GB/s where one row with 16 warps gave 1231."""
    return row_tile(n, element_size, {  # row bytes up to: (BLOCK_M, num_warps)
        "fwd": ((8192, (2, 8)), (None, (1, 16))),
        "bwd": ((4096, (1, 2)), (8192, (2, 8)), (16384, (1, 8)), (None, (1, 16))),
        "bwd_dw": ((8192, (4, 8)), (None, (2, 16))),
    }[kind], tuning.get("rms_norm")["tile"])


def _output_dtype(x: Tensor, weight: Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def _validate(x: Tensor, weight: Tensor) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_same_device(x=x, weight=weight)
    require(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
            f"fastlora.rms_norm: weight must have shape ({x.shape[-1]},) to match the last "
            f"dimension of x, got {tuple(weight.shape)}")


# ---------------------------------------------------------------- launchers


def rms_norm_forward_triton(x, weight, eps, offset, cast_before_weight, y=None, rstd=None):
    """Launch the forward; ``y``/``rstd`` may be given (tests pass poisoned buffers)."""
    x2 = rows2d(x, dense=True)
    M, N = x2.shape
    if y is None:
        y = _buffers.empty((M, N), _output_dtype(x, weight, cast_before_weight), x.device)
    if rstd is None:
        rstd = _buffers.empty((M,), torch.float32, x.device)
    block_m, block_n, warps = tile_config(N, x.element_size(), "fwd")
    launch(_rms_norm_fwd)[(cdiv(M, block_m),)](
        x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), M, N, eps, offset,
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_backward_triton(dy, x, weight, rstd, offset, cast_before_weight, compute_dw,
                             dx=None):
    x2, dy2 = rows2d(x, dense=True), rows2d(dy, dense=True)
    M, N = x2.shape
    if dx is None:  # allocated in x's shape: a layer's gradient (_buffers._storage_length)
        dx = _buffers.empty(x.shape, x2.dtype, x.device).view(M, N)
    kind = "bwd_dw" if compute_dw else "bwd"
    block_m, block_n, warps = tile_config(N, x.element_size(), kind)
    tiles = cdiv(M, block_m)
    # Without dw every program takes one tile; with dw a persistent grid keeps the partial sums
    # few (one float32 row per program).
    programs = persistent_programs(x2, tiles, per_sm=4) if compute_dw else tiles
    partial = _buffers.empty((programs, N) if compute_dw else (1, 1), torch.float32,
                              x.device)
    launch(_rms_norm_bwd)[(programs,)](
        dy2, x2, weight.contiguous(), rstd.contiguous(), dx, partial, dy2.stride(0),
        x2.stride(0), dx.stride(0), M, N, offset, cdiv(tiles, programs),
        CAST_BEFORE_WEIGHT=cast_before_weight, COMPUTE_DW=compute_dw, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps)
    dw = partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx.view(x.shape), dw


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def rms_norm_forward_reference(x, weight, eps, offset, cast_before_weight):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    n = xf * rstd.unsqueeze(-1)
    if cast_before_weight:
        n = n.to(x.dtype).float()
    y = n * (weight.float() + offset)
    # contiguous, like the Triton path and the fake kernel (a transposed x would otherwise
    # give transposed outputs here, and strides that differ from what the graph was traced with)
    return y.to(_output_dtype(x, weight, cast_before_weight)).contiguous(), rstd.contiguous()


def rms_norm_backward_reference(dy, x, weight, rstd, offset, cast_before_weight, compute_dw):
    xf, dyf = x.float(), dy.float()
    n = xf * rstd.unsqueeze(-1)
    dn = dyf * (weight.float() + offset)
    dx = (dn - n * (dn * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    dw = weight.new_empty(0)
    if compute_dw:
        nw = n.to(x.dtype).float() if cast_before_weight else n
        dw = (dyf * nw).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype).contiguous(), dw


# ---------------------------------------------------------------- the custom ops


@fused_op("fastlora::rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float,
             cast_before_weight: bool) -> tuple[Tensor, Tensor]:
    """Returns (y, rstd); rstd (float32, one per row) is what the backward needs besides x."""
    _validate(x, weight)
    if use_triton(x):
        return rms_norm_forward_triton(x, weight, eps, offset, cast_before_weight)
    return rms_norm_forward_reference(x, weight, eps, offset, cast_before_weight)


@rms_norm.register_fake
def _(x, weight, eps, offset, cast_before_weight):
    _validate(x, weight)
    y = x.new_empty(x.shape, dtype=_output_dtype(x, weight, cast_before_weight))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@fused_op("fastlora::rms_norm_backward")
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float,
                      cast_before_weight: bool, compute_dw: bool) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return rms_norm_backward_triton(dy, x, weight, rstd, offset, cast_before_weight,
                                        compute_dw)
    return rms_norm_backward_reference(dy, x, weight, rstd, offset, cast_before_weight,
                                       compute_dw)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, offset, cast_before_weight, compute_dw):
    # contiguous, as both kernels return it (empty_like would keep a transposed x's strides)
    return x.new_empty(x.shape), (torch.empty_like(weight) if compute_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, _eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = torch.ops.fastlora.rms_norm_backward(dy, x, weight, rstd, ctx.offset,
                                                  ctx.cast_before_weight, compute_dw)
    return dx, (dw if compute_dw else None), None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- for the ops that recompute y
# (rms_norm_lora_qkv.py, rms_norm_lora_mlp_block.py: the norm's output is not kept for backward)


def norm_forward(x, weight, eps, offset, cast_before_weight):
    """(y, rstd) = rms_norm(x): the op the forward calls and the backward calls again (the
    same deterministic kernel: a bit-identical y, the same rstd)."""
    return torch.ops.fastlora.rms_norm(x, weight, eps, offset, cast_before_weight)


def norm_backward(dy, x, weight, rstd, offset, cast_before_weight, needs_dx, needs_dw):
    """rms_norm's backward, or two empty tensors when neither dx nor dw is needed."""
    if not (needs_dx or needs_dw):
        return x.new_empty(0), weight.new_empty(0)
    return torch.ops.fastlora.rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight,
                                                needs_dw)
