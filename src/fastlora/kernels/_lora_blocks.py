"""Building blocks of the LoRA ops (lora_linear, lora_linear_4bit, lora_mlp): Triton kernels for
the rank-r products, their launchers, and the PyTorch reference of each (the CPU kernel).

Every block works on 2-D row-major views (rows = tokens). ``A_cat`` may stack the A matrices of
several adapters that share one input (ranks ``ranks``); adapter j then gets its own dropout
mask (slot j). The math of each block is in its docstring; the op files compose them.

Dot precision: ``dot`` and its MODEs are in kernels/_dot_precision.py.

Dropout mask spec (shared by the kernels and ``keep_mask_reference``): Philox4x32-10 keyed by the
low 32 bits of the seed, counter (col // 4, row, slot, 0), word col % 4; kept when the word's top
24 bits are >= round(p * 2^24), i.e. with probability 1 - p (to 2^-24). Kept values are scaled by
1 / (1 - p), applied to the float32 products.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import (HAVE_TRITON, cdiv, halve_until_it_fits, next_power_of_2, require, size_hint,
                      sm_count, use_triton)
from ._launch import launch
from ._dot_precision import dot_mode, fix_bf16
# the references are re-exported: the op files and tests take every block from this module
from ._lora_reference import (inv_keep_of, keep_mask_reference, lora_down_reference,  # noqa: F401
                              lora_grad_b_reference, lora_grad_down_reference,
                              lora_grad_x_reference, lora_up_reference, philox_reference,
                              threshold_of)

# Launch configurations (block sizes, warps, programs per SM; tuning entries lora_<kernel>): the
# defaults are the best total over the Llama-1B and -8B adapter shapes in
# benchmarks/tune_lora.py on the H200 (results in benchmarks/results_h200/tune_lora*.json).
# lora_grad_down's block_m None: 64 when there are rows for two programs of 64 per SM, else 32.
tuning.register("lora_down", block_m=64, block_k=64, warps=4, per_sm=2)
tuning.register("lora_up", block_m=32, block_n=128, warps=4)
tuning.register("lora_grad_down", block_m=None, block_n=128, warps=4)
tuning.register("lora_grad_b", block_m=64, block_n=128, warps=4, per_sm=2)
tuning.register("lora_grad_x", block_m=64, block_k=128, warps=4, per_sm=8)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._dot_precision import dot, rne

    @triton.jit
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 (Salmon et al., 2011) on uint32 tensors."""
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _keep(seed, rows, col0, slot, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dropout keep-mask of the [BLOCK_M, BLOCK_K] tile at (rows, col0..); col0 % 4 == 0."""
        q = col0 // 4 + tl.arange(0, BLOCK_K // 4)
        c0 = (q[None, :] + 0 * rows[:, None]).to(tl.uint32)
        c1 = (rows[:, None] + 0 * q[None, :]).to(tl.uint32)
        c2 = c0 * 0 + slot
        k1 = seed * 0
        o0, o1, o2, o3 = _philox(c0, c1, c2, c1 * 0, seed, k1)
        u = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [BLOCK_M, BLOCK_K])
        return (u >> 8).to(tl.int32, bitcast=True) >= threshold

    @triton.jit
    def _adapter_lanes(rr, j: tl.constexpr, B1, B2, R):
        """The rank lanes of adapter j (0, 1, 2) in A_cat: [0, B1), [B1, B2), [B2, R)."""
        if j == 0:
            return rr < B1
        elif j == 1:
            return (rr >= B1) & (rr < B2)
        else:
            return (rr >= B2) & (rr < R)

    @triton.jit(do_not_specialize=["M", "split_stride"])
    def _lora_down_kernel(X, A, XA, SEED, B1, B2, M, K, R, stride_x, stride_a, stride_xa,
                          split_stride, k_per_split, threshold, inv_keep, G: tl.constexpr,
                          DROPOUT: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """xa = (x * m_j) @ A^T / (1 - p) for one row block over one split of K (split s writes
        XA + s * split_stride; the launcher sums the splits); adapter j owns the rank lanes
        of _adapter_lanes."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        seed = 0
        if DROPOUT:
            seed = tl.load(SEED).to(tl.uint32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < k_end
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            at = tl.load(A + rr[None, :] * stride_a + cols[:, None],
                         mask=(rr < R)[None, :] & col_ok[:, None], other=0.0)
            if DROPOUT:
                for j in tl.static_range(G):
                    mine = _adapter_lanes(rr, j, B1, B2, R)
                    keep = _keep(seed, rows, k0, j, threshold, BLOCK_M, BLOCK_K)
                    acc = dot(tl.where(keep, x, tl.zeros_like(x)),
                               tl.where(mine[None, :], at, tl.zeros_like(at)), acc, MODE)
            else:
                acc = dot(x, at, acc, MODE)
        if DROPOUT:
            acc = acc * inv_keep
        tl.store(XA + split * split_stride + rows[:, None] * stride_xa + rr[None, :], acc,
                 mask=row_ok[:, None] & (rr < R)[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _lora_up_kernel(BASE, XA, B, OUT, M, N, R, stride_base, stride_xa, stride_b, stride_out,
                        scale, MODE: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """out = cast(base + s * xa @ B^T), one [BLOCK_M, BLOCK_N] tile (may write over base)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        row_ok, col_ok, r_ok = rows < M, cols < N, rr < R
        xa = tl.load(XA + rows[:, None] * stride_xa + rr[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(B + cols[None, :] * stride_b + rr[:, None],
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        lora = dot(xa, bt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), MODE)
        mask = row_ok[:, None] & col_ok[None, :]
        base = tl.load(BASE + rows[:, None] * stride_base + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :],
                 rne(base + scale * lora, FIX_BF16).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _lora_grad_down_kernel(G, B, DA, M, N, R, stride_g, stride_b, stride_da, scale,
                               MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_R: tl.constexpr):
        """da = s * g @ B for a row block (reads each row of g once)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok, r_ok = rows < M, rr < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(B + cols[:, None] * stride_b + rr[None, :],
                        mask=col_ok[:, None] & r_ok[None, :], other=0.0)
            acc = dot(g, b, acc, MODE)
        tl.store(DA + rows[:, None] * stride_da + rr[None, :], acc * scale,
                 mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit(do_not_specialize=["M", "rows_per_split"])
    def _lora_grad_b_kernel(G, XA, PART, M, N, R, stride_g, stride_xa, rows_per_split,
                            MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_R: tl.constexpr):
        """PART[split] = g^T @ xa over one split of the rows, one block of N (no atomics)."""
        split = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        col_ok, r_ok = cols < N, rr < R
        start = tl.cast(split, tl.int64) * rows_per_split
        acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        for m0 in range(0, rows_per_split, BLOCK_M):
            rows = start + m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            xa = tl.load(XA + rows[:, None] * stride_xa + rr[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            acc = dot(tl.trans(g), xa, acc, MODE)
        tl.store(PART + (split * N + cols[:, None]) * R + rr[None, :], acc,
                 mask=col_ok[:, None] & r_ok[None, :])

    @triton.jit(do_not_specialize=["M", "rows_per_split"])
    def _lora_grad_x_kernel(X, DA, A, DX, PART, SEED, B1, B2, M, K, R, stride_x, stride_da,
                            stride_a, stride_dx, rows_per_split, threshold, inv_keep,
                            G: tl.constexpr, DROPOUT: tl.constexpr, HAS_DX: tl.constexpr,
                            ACCUMULATE: tl.constexpr, HAS_DA: tl.constexpr, MODE: tl.constexpr,
                            FIX_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dx (+)= ((da @ A) * m) / (1 - p) and PART[split] = da^T @ (x * m) / (1 - p), for one
        block of K columns over one split of the rows."""
        split = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        col0 = tl.program_id(0) * BLOCK_K
        rr = tl.arange(0, BLOCK_R)
        col_ok, r_ok = cols < K, rr < R
        a = tl.load(A + rr[:, None] * stride_a + cols[None, :],
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        seed = 0
        if DROPOUT:
            seed = tl.load(SEED).to(tl.uint32)
        start = tl.cast(split, tl.int64) * rows_per_split
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, rows_per_split, BLOCK_M):
            rows = start + m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            da = tl.load(DA + rows[:, None] * stride_da + rr[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_DA:
                x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            dxl = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            if DROPOUT:
                for j in tl.static_range(G):
                    mine = _adapter_lanes(rr, j, B1, B2, R)
                    daj = tl.where(mine[None, :], da, 0.0)
                    keep = _keep(seed, rows, col0, j, threshold, BLOCK_M, BLOCK_K)
                    if HAS_DX:
                        dxl += tl.where(keep, dot(daj, a, tl.zeros_like(dxl), MODE), 0.0)
                    if HAS_DA:
                        acc = dot(tl.trans(daj), tl.where(keep, x, tl.zeros_like(x)), acc, MODE)
            else:
                if HAS_DX:
                    dxl = dot(da, a, dxl, MODE)
                if HAS_DA:
                    acc = dot(tl.trans(da), x, acc, MODE)
            if HAS_DX:
                ptr = DX + rows[:, None] * stride_dx + cols[None, :]
                dx = dxl * inv_keep
                if ACCUMULATE:
                    dx += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptr, rne(dx, FIX_BF16).to(DX.dtype.element_ty), mask=mask)
        if HAS_DA:
            tl.store(PART + (split * R + rr[:, None]) * K + cols[None, :], acc * inv_keep,
                     mask=r_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------- launch configuration


def block_r(r: int) -> int:
    return max(16, next_power_of_2(r))


def _sms(t: Tensor) -> int:
    return sm_count(t.device.index or 0) if t.is_cuda else 2


def _bounds(ranks: list[int], R: int) -> tuple[int, int]:
    """(B1, B2): where adapters 1 and 2 start in A_cat, R where there is none. Plain integers,
    not a device tensor: a tensor cached on the first call would be allocated inside CUDA
    graphs' memory pool when that call is their warm-up, and outlive it untracked."""
    require(len(ranks) <= 3, f"fastlora: at most 3 adapters share one input (q, k, v), got "
                             f"{len(ranks)}", ValueError)
    starts = [sum(ranks[:i]) for i in range(1, len(ranks))] + [R, R]
    return starts[0], starts[1]


# ---------------------------------------------------------------- launchers (Triton)


def split_extent(extent: int, block: int, other_programs: int, per_sm: int, t: Tensor):
    """(splits, extent per split): cut ``extent`` into block-aligned splits so that
    other_programs x splits is about per_sm programs per SM (per_sm 0: one split)."""
    if per_sm <= 0 or size_hint(extent) <= 0:
        return 1, max(extent, 1) if isinstance(extent, int) else extent
    want = cdiv(per_sm * _sms(t), max(size_hint(other_programs), 1))
    splits = max(1, min(cdiv(size_hint(extent), block), want))
    per = cdiv(cdiv(extent, splits), block) * block
    if not isinstance(per, int):  # a symbolic length: as many splits at every length (some
        return splits, per        # may get no rows; they store zero partial sums)
    return cdiv(extent, per), per


def lora_down_triton(x2, a_cat, seed, p, ranks=None, xa=None):
    """xa [M, R] float32 = dropout(x) @ A_cat^T; ``ranks`` splits R between adapters that
    share x (each gets its own mask, slot j). Long rows are split along K over several
    programs (float32 partial sums, added in a fixed order)."""
    M, K = x2.shape
    R = a_cat.shape[0]
    ranks = ranks or [R]
    if xa is None:
        xa = _buffers.empty((M, R), torch.float32, x2.device)
    a_cat = a_cat if a_cat.stride(-1) == 1 else a_cat.contiguous()
    cfg = tuning.get("lora_down")
    bm, bk = cfg["block_m"], cfg["block_k"]
    if M == 0:
        return xa
    splits, per = split_extent(K, bk, cdiv(M, bm), cfg["per_sm"], x2)
    out = xa if splits == 1 else _buffers.empty((splits, M, R), torch.float32,
                                               x2.device)
    launch(_lora_down_kernel)[(cdiv(M, bm), splits)](
        x2, a_cat, out, seed if seed is not None else xa, *_bounds(ranks, R), M, K, R,
        x2.stride(0), a_cat.stride(0), xa.stride(0) if splits == 1 else R, M * R, per,
        threshold_of(p), inv_keep_of(p), G=len(ranks), DROPOUT=p > 0,
        MODE=dot_mode(x2.device, x2.dtype, a_cat.dtype), BLOCK_M=bm, BLOCK_K=bk,
        BLOCK_R=block_r(R), num_warps=cfg["warps"])
    if splits > 1:
        torch.sum(out, 0, out=xa)
    return xa


def lora_up_triton(base2, xa, b, scale, out):
    """out [M, N] = cast(base + scale * xa @ B^T); ``out`` may be ``base2`` itself."""
    M, N = base2.shape
    R = b.shape[1]
    cfg = tuning.get("lora_up")
    bm, bn = cfg["block_m"], cfg["block_n"]
    if M and N:
        launch(_lora_up_kernel)[(cdiv(M, bm), cdiv(N, bn))](
            base2, xa, b, out, M, N, R, base2.stride(0), xa.stride(0), b.stride(0), out.stride(0),
            scale, MODE=dot_mode(base2.device, out.dtype), FIX_BF16=fix_bf16(out),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r(R), num_warps=cfg["warps"])
    return out


def lora_grad_down_triton(g2, b, scale, da):
    """da [M, r] (a float32 view, possibly a column slice) = scale * g @ B."""
    M, N = g2.shape
    R = b.shape[1]
    cfg = tuning.get("lora_grad_down")
    bm = cfg["block_m"] or (64 if size_hint(M) >= 64 * 2 * _sms(g2) else 32)
    if M:
        launch(_lora_grad_down_kernel)[(cdiv(M, bm),)](
            g2, b, da, M, N, R, g2.stride(0), b.stride(0), da.stride(0), scale,
            MODE=dot_mode(g2.device, g2.dtype, b.dtype), BLOCK_M=bm, BLOCK_N=cfg["block_n"],
            BLOCK_R=block_r(R), num_warps=cfg["warps"])
    return da


def lora_grad_b_triton(g2, xa, scale, out_dtype):
    """dB [N, r] = scale * g^T @ xa (xa may be a column slice of a wider buffer)."""
    M, N = g2.shape
    R = xa.shape[1]
    cfg = tuning.get("lora_grad_b")
    bm, bn = cfg["block_m"], cfg["block_n"]
    nb = cdiv(N, bn)
    splits, per = split_extent(M, bm, nb, cfg["per_sm"], g2)
    alloc = _buffers.empty if M else _buffers.zeros  # every element written when M > 0
    part = alloc((splits, N, R), torch.float32, g2.device)
    if M and N:
        launch(_lora_grad_b_kernel)[(nb, splits)](
            g2, xa, part, M, N, R, g2.stride(0), xa.stride(0), per,
            MODE=dot_mode(g2.device, g2.dtype), BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_R=block_r(R), num_warps=cfg["warps"])
    return (part.sum(0) * scale).to(out_dtype)


def lora_grad_b(g2, xa, scale, out_dtype):
    """dB [N, r] = scale * g^T @ xa: the Triton kernel, or the PyTorch reference off the GPU."""
    fn = lora_grad_b_triton if use_triton(g2) else lora_grad_b_reference
    return fn(g2, xa, scale, out_dtype)


def lora_grad_x_triton(x2, da, a_cat, seed, p, dx=None, accumulate=False, need_da=True,
                       ranks=None):
    """dx (+)= dropout-backward(da @ A_cat) and dA_cat = da^T @ dropout(x); either may be
    skipped (dx None / need_da False). Returns (dx, dA_cat float32 or None)."""
    M, K = x2.shape
    R = a_cat.shape[0]
    ranks = ranks or [R]
    a_cat = a_cat if a_cat.stride(-1) == 1 else a_cat.contiguous()
    br = block_r(R)
    cfg = tuning.get("lora_grad_x")
    bm = cfg["block_m"]

    def run(bk):
        nb = cdiv(K, bk)
        splits, per = split_extent(M, bm, nb, cfg["per_sm"], x2)
        alloc = _buffers.empty if M else _buffers.zeros  # every element written when M > 0
        part = alloc((splits, R, K) if need_da else (1,), torch.float32, x2.device)
        if M and K and (dx is not None or need_da):
            launch(_lora_grad_x_kernel)[(nb, splits)](
                x2, da, a_cat, dx if dx is not None else x2, part,
                seed if seed is not None else part, *_bounds(ranks, R), M, K, R,
                x2.stride(0), da.stride(0), a_cat.stride(0),
                dx.stride(0) if dx is not None else 0, per, threshold_of(p), inv_keep_of(p),
                G=len(ranks), DROPOUT=p > 0, HAS_DX=dx is not None, ACCUMULATE=accumulate,
                HAS_DA=need_da, MODE=dot_mode(x2.device, x2.dtype),
                FIX_BF16=dx is not None and fix_bf16(dx), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br,
                num_warps=cfg["warps"])
        return part

    key = ("grad_x", x2.device, x2.dtype, da.dtype, a_cat.dtype, br, bm, cfg["warps"], p > 0,
           len(ranks), dx is not None, need_da)
    # Traced for inductor (kernels/_launch.py) nothing is launched: halve_until_it_fits has
    # Triton compile and load the tile first, and halves it there if it does not fit.
    part = halve_until_it_fits(run, cfg["block_k"], key)
    return dx, (part.sum(0) if need_da else None)


