"""LayerNorm over the last dimension, with or without weight and bias: ``fastlora.layer_norm``.

Math, for one row x of N features (computed in float32 whatever the storage dtype):

    mean = sum(x) / N      rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)      n = (x - mean) rstd
    y = n * w + b          (w = 1 without a weight, b = 0 without a bias; rounded once to x.dtype)

The weight is one row of N, or one row per head, [H, N] for x of shape [..., H, N] (Cohere's
per-head q/k norms); the bias is one row of N.

    dn = dy * w
    dx = rstd * (dn - mean(dn) - n * mean(dn * n))
    dw = sum over rows of dy * n          db = sum over rows of dy

Memory: the forward keeps two float32 per row (mean, rstd) besides x; the unfused manual
spelling (Cohere) keeps the float32 copy, the centred row, its square and the normalised row.
dw and db are computed only when the weight / bias require grad (frozen in LoRA): then each
program of a persistent grid sums its rows into one float32 partial row, and a final ``sum(0)``
adds the partials (no atomics, deterministic); a per-head weight's dw (rarely trainable) is
summed by PyTorch from the same quantities. The variance is the mean of squared deviations
from the row's mean (two reductions over the tile in registers), not E[x^2] - mean^2, so it
does not lose precision for rows with a large mean.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import (HAVE_TRITON, cdiv, check_float, check_same_device, persistent_programs,
                      require, row_tile, rows2d, use_triton)
from ._launch import launch

# tile: (BLOCK_M, num_warps) or (BLOCK_M, num_warps, programs per SM of the dw/db grid) of every
# launch; None: the table of tile_config. dw_programs_per_sm: the dw/db grid's programs per SM
# (H200 sweep, benchmarks/tune_rope_ln.py: 1 beats 2, 4 and 8: fewer partials).
tuning.register("layer_norm", tile=None, dw_programs_per_sm=1)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, M, N, eps, w_rows,
                        HAS_W: tl.constexpr, PER_HEAD_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
        if PER_HEAD_W:  # weight row = head = row index modulo the number of heads
            y = y * tl.load(W + (rows % w_rows)[:, None] * N + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)
        elif HAS_W:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_tile(DY, X, W, w, MEAN, RSTD, DX, rows, cols, col_ok, stride_dy,
                             stride_x, stride_dx, M, N, w_rows, HAS_W: tl.constexpr,
                             PER_HEAD_W: tl.constexpr):
        """dx of one tile of rows; returns (dy, n) in float32 for the dw / db sums."""
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        n = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dn = dy
        if PER_HEAD_W:
            dn = dy * tl.load(W + (rows % w_rows)[:, None] * N + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
        elif HAS_W:
            dn = dy * w[None, :]
        dx = (dn - (tl.sum(dn, axis=1) / N)[:, None]
              - n * (tl.sum(dn * n, axis=1) / N)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        return dy, n

    @triton.jit(do_not_specialize=["M", "tiles_per_program"])
    def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x,
                        stride_dx, M, N, tiles_per_program, w_rows, HAS_W: tl.constexpr,
                        PER_HEAD_W: tl.constexpr, COMPUTE_DW: tl.constexpr,
                        COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Without dw / db (frozen weights: the LoRA case) every program takes one tile and there
        # is no loop; with them a persistent grid sums its tiles into one partial row each.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = cols  # unused unless HAS_W and not PER_HEAD_W
        if HAS_W and not PER_HEAD_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if COMPUTE_DW or COMPUTE_DB:
            dw = tl.zeros([BLOCK_N], dtype=tl.float32)
            db = tl.zeros([BLOCK_N], dtype=tl.float32)
            for t in range(0, tiles_per_program):
                rows = (tl.cast(pid, tl.int64) * tiles_per_program + t) * BLOCK_M \
                    + tl.arange(0, BLOCK_M)
                dy, n = _layer_norm_bwd_tile(DY, X, W, w, MEAN, RSTD, DX, rows, cols, col_ok,
                                             stride_dy, stride_x, stride_dx, M, N, w_rows, HAS_W,
                                             PER_HEAD_W)
                if COMPUTE_DW:
                    dw += tl.sum(dy * n, axis=0)
                if COMPUTE_DB:
                    db += tl.sum(dy, axis=0)
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
            if COMPUTE_DB:
                tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)
        else:
            rows = tl.cast(pid, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            _layer_norm_bwd_tile(DY, X, W, w, MEAN, RSTD, DX, rows, cols, col_ok, stride_dy,
                                 stride_x, stride_dx, M, N, w_rows, HAS_W, PER_HEAD_W)


def tile_config(n: int, element_size: int, kind: str = "fwd") -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` features; ``kind`` is "fwd", "bwd" (no dw
    / db) or "bwd_dw". A tile is BLOCK_M whole rows (BLOCK_N >= n), so several rows' loads are in
    flight; the table starts from RMSNorm's H200 sweep (the same memory pattern, one more
    reduction), by row size in bytes, refined by benchmarks/tune_rope_ln.py on the H200
    (results_h200/tune_rope_ln.json: 85-93% of the copy rate forward, 89-97% backward)."""
    return row_tile(n, element_size, {  # row bytes up to: (BLOCK_M, num_warps)
        "fwd": ((4096, (1, 4)), (8192, (2, 4)), (16384, (1, 8)), (None, (1, 16))),
        "bwd": ((16384, (1, 8)), (None, (1, 16))),
        "bwd_dw": ((8192, (4, 8)), (None, (2, 16))),
    }[kind], tuning.get("layer_norm")["tile"])


def _dw_programs_per_sm() -> int:
    cfg = tuning.get("layer_norm")
    tile = cfg["tile"]
    return tile[2] if tile is not None and len(tile) > 2 else cfg["dw_programs_per_sm"]


def _validate(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    check_float("x", x)
    require(x.dim() >= 1, "fastlora.layer_norm: x must have at least one dimension")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float(name, p)
        check_same_device(x=x, **{name: p})
        per_head = name == "weight" and p.dim() == 2 and x.dim() >= 2 \
            and tuple(p.shape) == tuple(x.shape[-2:])
        require((p.dim() == 1 and p.shape[0] == n) or per_head,
                f"fastlora.layer_norm: {name} must have shape ({n},) to match the last "
                f"dimension of x" + (f", or {tuple(x.shape[-2:])} (one row per head)"
                                     if name == "weight" and x.dim() >= 2 else "")
                + f", got {tuple(p.shape)}")


def _w_rows(weight: Tensor | None) -> int:
    return weight.shape[0] if weight is not None and weight.dim() == 2 else 1


# ---------------------------------------------------------------- launchers


def layer_norm_forward_triton(x, weight, bias, eps, y=None, mean=None, rstd=None):
    """Launch the forward; ``y``/``mean``/``rstd`` may be given (tests poison them)."""
    x2 = rows2d(x, dense=True)
    M, N = x2.shape
    if y is None:
        y = _buffers.empty((M, N), x.dtype, x.device)
    if mean is None:
        mean = _buffers.empty((M,), torch.float32, x.device)
    if rstd is None:
        rstd = _buffers.empty((M,), torch.float32, x.device)
    block_m, block_n, warps = tile_config(N, x.element_size(), "fwd")
    if M:
        launch(_layer_norm_fwd)[(cdiv(M, block_m),)](
            x2, weight.contiguous() if weight is not None else x2,
            bias.contiguous() if bias is not None else x2, y, mean, rstd,
            x2.stride(0), y.stride(0), M, N, eps, _w_rows(weight), HAS_W=weight is not None,
            PER_HEAD_W=_w_rows(weight) > 1, HAS_B=bias is not None, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def layer_norm_backward_triton(dy, x, weight, mean, rstd, compute_dw, compute_db, dx=None):
    x2, dy2 = rows2d(x, dense=True), rows2d(dy, dense=True)
    M, N = x2.shape
    if dx is None:
        dx = _buffers.empty_like(x2)
    compute_dw = compute_dw and weight is not None
    per_head = _w_rows(weight) > 1
    kernel_dw = compute_dw and not per_head  # a per-head dw is summed below
    reduce = kernel_dw or compute_db
    block_m, block_n, warps = tile_config(N, x.element_size(), "bwd_dw" if reduce else "bwd")
    tiles = cdiv(M, block_m)
    programs = persistent_programs(x2, tiles, _dw_programs_per_sm()) if reduce else max(tiles, 1)
    shape = (programs, N)
    dw_part = _buffers.empty(shape if kernel_dw else (1, 1), torch.float32, x.device)
    db_part = _buffers.empty(shape if compute_db else (1, 1), torch.float32, x.device)
    if M:
        launch(_layer_norm_bwd)[(programs,)](
            dy2, x2, weight.contiguous() if weight is not None else x2, mean.contiguous(),
            rstd.contiguous(), dx, dw_part, db_part, dy2.stride(0), x2.stride(0), dx.stride(0),
            M, N, cdiv(tiles, programs), _w_rows(weight), HAS_W=weight is not None,
            PER_HEAD_W=per_head, COMPUTE_DW=kernel_dw, COMPUTE_DB=compute_db, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=warps)
    else:
        dw_part.zero_()
        db_part.zero_()
    if per_head and compute_dw:
        dw = _per_head_dw(dy, x, weight, mean, rstd)
    else:
        dw = dw_part.sum(0).to(weight.dtype) if compute_dw else x.new_empty(0)
    db = db_part.sum(0).to(dy.dtype if weight is None else weight.dtype) if compute_db \
        else x.new_empty(0)
    return dx.view(x.shape), dw, db


def _per_head_dw(dy, x, weight, mean, rstd):
    """dw of an [H, N] weight: sum over all rows of one head of dy * n (float32)."""
    n = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    return (dy.float() * n).reshape(-1, *weight.shape).sum(0).to(weight.dtype)


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def layer_norm_forward_reference(x, weight, bias, eps):
    # contiguous outputs, as the Triton launcher and the fake kernel return them
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous(), mean.contiguous(), rstd.contiguous()


def layer_norm_backward_reference(dy, x, weight, mean, rstd, compute_dw, compute_db):
    xf, dyf = x.float(), dy.float()
    n = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dn = dyf * weight.float() if weight is not None else dyf
    dx = (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True)) \
        * rstd.unsqueeze(-1)
    rows = lambda t: t.reshape(-1, x.shape[-1])
    dw = x.new_empty(0)
    if compute_dw and weight is not None:
        dw = (dyf * n).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
    db = rows(dyf).sum(0).to(dy.dtype if weight is None else weight.dtype) if compute_db \
        else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw, db


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("fastlora::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd); mean and rstd (float32, one per row) are what backward needs."""
    _validate(x, weight, bias)
    if use_triton(x):
        return layer_norm_forward_triton(x, weight, bias, eps)
    return layer_norm_forward_reference(x, weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    _validate(x, weight, bias)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


@torch.library.custom_op("fastlora::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                        compute_dw: bool, compute_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(x):
        return layer_norm_backward_triton(dy, x, weight, mean, rstd, compute_dw, compute_db)
    return layer_norm_backward_reference(dy, x, weight, mean, rstd, compute_dw, compute_db)


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, compute_dw, compute_db):
    n = x.shape[-1]
    dw = x.new_empty(weight.shape, dtype=weight.dtype) if compute_dw and weight is not None \
        else x.new_empty(0)
    db = x.new_empty(n, dtype=dy.dtype if weight is None else weight.dtype) if compute_db \
        else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    compute_db = ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.fastlora.layer_norm_backward(dy, x, weight, mean, rstd, compute_dw,
                                                        compute_db)
    if compute_db and ctx.bias_dtype is not None:
        db = db.to(ctx.bias_dtype)
    return dx, (dw if compute_dw else None), (db if compute_db else None), None


layer_norm.register_autograd(_backward, setup_context=_setup_context)
# Under CUDA autocast, F.layer_norm runs in float32 (autocast's float32 op list); so does this.
torch.library.register_autocast("fastlora::layer_norm", "cuda", torch.float32)
