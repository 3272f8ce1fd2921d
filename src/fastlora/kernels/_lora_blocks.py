"""Building blocks of the LoRA ops (lora_linear, lora_linear_4bit, lora_mlp): Triton kernels for
the rank-r products, their launchers, and the PyTorch reference of each (the CPU kernel).

Every block works on 2-D row-major views (rows = tokens). ``A_cat`` may stack the A matrices of
several adapters that share one input (ranks ``ranks``); adapter j then gets its own dropout
mask (slot j). The math of each block is in its docstring; the op files compose them.

Dot precision (``_dot``): MODE 0 is a native 16-bit tensor-core dot (exact products, float32
accumulation) for two 16-bit operands; MODE 1 casts to float32 and uses Triton's ``tf32x3``
(three TF32 products: ~22 mantissa bits, i.e. float32-level accuracy on tensor cores) whenever
a float32 operand is involved; MODE 2 is exact float32 (the interpreter).

Dropout mask spec (shared by the kernels and ``keep_mask_reference``): Philox4x32-10 keyed by the
low 32 bits of the seed, counter (col // 4, row, slot, 0), word col % 4; kept when the word's top
24 bits are >= round(p * 2^24), i.e. with probability 1 - p (to 2^-24). Kept values are scaled by
1 / (1 - p), applied to the float32 products.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import HAVE_TRITON, _sm_count

PRECISION = "tf32x3"  # dot precision for float32 operands on the GPU ("ieee" to compare)
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF

if HAVE_TRITON:
    import triton
    import triton.language as tl

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
    def _dot(a, b, acc, MODE: tl.constexpr):
        """acc + a @ b. MODE 0: native 16-bit tensor-core dot; 1: float32 operands through tf32x3
        (~fp32 accuracy on tensor cores); 2: exact float32 (the interpreter)."""
        if MODE == 0:
            return tl.dot(a, b, acc)
        elif MODE == 1:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

    @triton.jit
    def _rne(x, FIX: tl.constexpr):
        """float32 -> bfloat16 rounding to nearest even where the conversion truncates (the
        Triton interpreter does; FIX is False on the GPU, whose cvt.rn already rounds)."""
        if FIX:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _lora_down_kernel(X, A, XA, SEED, OFFS, M, K, R, stride_x, stride_a, stride_xa,
                          threshold, inv_keep, G: tl.constexpr, DROPOUT: tl.constexpr,
                          MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr):
        """xa = (x * m_j) @ A^T / (1 - p) for row block; adapter j owns ranks OFFS[j]..OFFS[j+1]."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        seed = 0
        if DROPOUT:
            seed = tl.load(SEED).to(tl.uint32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            at = tl.load(A + rr[None, :] * stride_a + cols[:, None],
                         mask=(rr < R)[None, :] & col_ok[:, None], other=0.0)
            if DROPOUT:
                for j in tl.static_range(G):
                    mine = (rr >= tl.load(OFFS + j)) & (rr < tl.load(OFFS + j + 1))
                    keep = _keep(seed, rows, k0, j, threshold, BLOCK_M, BLOCK_K)
                    acc = _dot(tl.where(keep, x, tl.zeros_like(x)),
                               tl.where(mine[None, :], at, tl.zeros_like(at)), acc, MODE)
            else:
                acc = _dot(x, at, acc, MODE)
        if DROPOUT:
            acc = acc * inv_keep
        tl.store(XA + rows[:, None] * stride_xa + rr[None, :], acc,
                 mask=row_ok[:, None] & (rr < R)[None, :])

    @triton.jit
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
        lora = _dot(xa, bt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), MODE)
        mask = row_ok[:, None] & col_ok[None, :]
        base = tl.load(BASE + rows[:, None] * stride_base + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :],
                 _rne(base + scale * lora, FIX_BF16).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
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
            acc = _dot(g, b, acc, MODE)
        tl.store(DA + rows[:, None] * stride_da + rr[None, :], acc * scale,
                 mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
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
            acc = _dot(tl.trans(g), xa, acc, MODE)
        tl.store(PART + (split * N + cols[:, None]) * R + rr[None, :], acc,
                 mask=col_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_grad_x_kernel(X, DA, A, DX, PART, SEED, OFFS, M, K, R, stride_x, stride_da,
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
                    mine = (rr >= tl.load(OFFS + j)) & (rr < tl.load(OFFS + j + 1))
                    daj = tl.where(mine[None, :], da, 0.0)
                    keep = _keep(seed, rows, col0, j, threshold, BLOCK_M, BLOCK_K)
                    if HAS_DX:
                        dxl += tl.where(keep, _dot(daj, a, tl.zeros_like(dxl), MODE), 0.0)
                    if HAS_DA:
                        acc = _dot(tl.trans(daj), tl.where(keep, x, tl.zeros_like(x)), acc, MODE)
            else:
                if HAS_DX:
                    dxl = _dot(da, a, dxl, MODE)
                if HAS_DA:
                    acc = _dot(tl.trans(da), x, acc, MODE)
            if HAS_DX:
                ptr = DX + rows[:, None] * stride_dx + cols[None, :]
                dx = dxl * inv_keep
                if ACCUMULATE:
                    dx += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptr, _rne(dx, FIX_BF16).to(DX.dtype.element_ty), mask=mask)
        if HAS_DA:
            tl.store(PART + (split * R + rr[:, None]) * K + cols[None, :], acc * inv_keep,
                     mask=r_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------- dropout mask (shared spec)


def threshold_of(p: float) -> int:
    """Keep an element when the top 24 bits of its random word are >= this."""
    return min(1 << 24, int(round(p * (1 << 24))))


def _inv_keep(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0 else 1.0


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for int64 tensors holding uint32 values."""
    t1, t2 = a * (b >> 16), a * (b & 0xFFFF)
    low = ((t1 & 0xFFFF) << 16) + t2
    return ((t1 >> 16) + (low >> 32)) & _MASK32, low & _MASK32


def philox_reference(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: int):
    """Philox4x32-10 in PyTorch (int64 tensors holding uint32), the same words as ``_philox``."""
    k0, k1 = key & _MASK32, 0
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def keep_mask_reference(seed: int, rows: int, cols: int, slot: int, p: float,
                        device=None) -> Tensor:
    """The dropout keep-mask (bool [rows, cols]) the kernels use for ``seed`` and adapter slot."""
    q = torch.arange((cols + 3) // 4, dtype=torch.int64, device=device)
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c0 = q[None, :].expand(rows, -1)
    c1 = (r[:, None] & _MASK32).expand(-1, q.numel())
    words = philox_reference(c0, c1, torch.full_like(c0, slot), torch.zeros_like(c0), seed)
    u = torch.stack(words, dim=-1).reshape(rows, -1)[:, :cols]
    return (u >> 8) >= threshold_of(p)


# ---------------------------------------------------------------- launch configuration


def dot_mode(device: torch.device, *dtypes: torch.dtype) -> int:
    if device.type != "cuda":
        return 2
    if all(d in (torch.bfloat16, torch.float16) for d in dtypes) and len(set(dtypes)) == 1:
        return 0
    return 1 if PRECISION == "tf32x3" else 2


def fix_bf16(out: Tensor) -> bool:
    """Round bfloat16 stores by hand under the interpreter (it truncates; the GPU rounds)."""
    return out.dtype == torch.bfloat16 and not out.is_cuda


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _sms(t: Tensor) -> int:
    return _sm_count(t.device.index or 0) if t.is_cuda else 2


def _splits(t: Tensor, rows: int, block_m: int, blocks: int) -> int:
    """Rows per split so that blocks x splits programs fill the GPU (2 per SM), a multiple of
    block_m; fewer programs under the interpreter."""
    want = max(1, triton.cdiv(2 * _sms(t), max(blocks, 1)))
    splits = max(1, min(triton.cdiv(rows, block_m), want))
    return triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m


_OFFSETS: dict = {}


def _offsets(ranks: list[int], device) -> Tensor:
    """Rank boundaries of the adapters in A_cat, a cached device tensor (no copy per call)."""
    key = (tuple(ranks), str(device))
    if key not in _OFFSETS:
        offs = [0]
        for r in ranks:
            offs.append(offs[-1] + r)
        _OFFSETS[key] = torch.tensor(offs, dtype=torch.int32, device=device)
    return _OFFSETS[key]


def rows2d(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# ---------------------------------------------------------------- launchers (Triton)


def lora_down_triton(x2, a_cat, seed, p, ranks=None, xa=None):
    """xa [M, R] float32 = dropout(x) @ A_cat^T; ``ranks`` splits R between adapters that
    share x (each gets its own mask, slot j)."""
    M, K = x2.shape
    R = a_cat.shape[0]
    ranks = ranks or [R]
    if xa is None:
        xa = torch.empty((M, R), dtype=torch.float32, device=x2.device)
    a_cat = a_cat if a_cat.stride(-1) == 1 else a_cat.contiguous()
    br = _block_r(R)
    bm, bk = (64 if M >= 64 * 2 * _sms(x2) else 32), (128 if x2.element_size() == 2 else 64)
    if M:
        _lora_down_kernel[(triton.cdiv(M, bm),)](
            x2, a_cat, xa, seed if seed is not None else xa, _offsets(ranks, x2.device), M, K, R,
            x2.stride(0), a_cat.stride(0), xa.stride(0), threshold_of(p), _inv_keep(p),
            G=len(ranks), DROPOUT=p > 0, MODE=dot_mode(x2.device, x2.dtype, a_cat.dtype),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4)
    return xa


def lora_up_triton(base2, xa, b, scale, out):
    """out [M, N] = cast(base + scale * xa @ B^T); ``out`` may be ``base2`` itself."""
    M, N = base2.shape
    R = b.shape[1]
    bm, bn = 64, 128
    if M and N:
        _lora_up_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            base2, xa, b, out, M, N, R, base2.stride(0), xa.stride(0), b.stride(0), out.stride(0),
            scale, MODE=dot_mode(base2.device, torch.float32), FIX_BF16=fix_bf16(out),
            BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_R=_block_r(R), num_warps=8)
    return out


def lora_grad_down_triton(g2, b, scale, da):
    """da [M, r] (a float32 view, possibly a column slice) = scale * g @ B."""
    M, N = g2.shape
    R = b.shape[1]
    bm = 64 if M >= 64 * 2 * _sms(g2) else 32
    if M:
        _lora_grad_down_kernel[(triton.cdiv(M, bm),)](
            g2, b, da, M, N, R, g2.stride(0), b.stride(0), da.stride(0), scale,
            MODE=dot_mode(g2.device, g2.dtype, b.dtype), BLOCK_M=bm, BLOCK_N=128,
            BLOCK_R=_block_r(R), num_warps=4)
    return da


def lora_grad_b_triton(g2, xa, scale, out_dtype):
    """dB [N, r] = scale * g^T @ xa (xa may be a column slice of a wider buffer)."""
    M, N = g2.shape
    R = xa.shape[1]
    bm, bn = 64, 128
    nb = triton.cdiv(N, bn)
    per = _splits(g2, M, bm, nb)
    splits = triton.cdiv(M, per) if M else 1
    alloc = torch.empty if M else torch.zeros  # every element written when M > 0
    part = alloc((splits, N, R), dtype=torch.float32, device=g2.device)
    if M and N:
        _lora_grad_b_kernel[(nb, splits)](
            g2, xa, part, M, N, R, g2.stride(0), xa.stride(0), per,
            MODE=dot_mode(g2.device, torch.float32), BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_R=_block_r(R), num_warps=4)
    return (part.sum(0) * scale).to(out_dtype)


def lora_grad_x_triton(x2, da, a_cat, seed, p, dx=None, accumulate=False, need_da=True,
                       ranks=None):
    """dx (+)= dropout-backward(da @ A_cat) and dA_cat = da^T @ dropout(x); either may be
    skipped (dx None / need_da False). Returns (dx, dA_cat float32 or None)."""
    M, K = x2.shape
    R = a_cat.shape[0]
    ranks = ranks or [R]
    a_cat = a_cat if a_cat.stride(-1) == 1 else a_cat.contiguous()
    br = _block_r(R)
    bm, bk = 64, (64 if br >= 64 else 128)
    nb = triton.cdiv(K, bk)
    per = _splits(x2, M, bm, nb)
    splits = triton.cdiv(M, per) if M else 1
    alloc = torch.empty if M else torch.zeros  # every element written when M > 0
    part = alloc((splits, R, K) if need_da else (1,), dtype=torch.float32, device=x2.device)
    if M and K and (dx is not None or need_da):
        _lora_grad_x_kernel[(nb, splits)](
            x2, da, a_cat, dx if dx is not None else x2, part,
            seed if seed is not None else part, _offsets(ranks, x2.device), M, K, R,
            x2.stride(0), da.stride(0), a_cat.stride(0), dx.stride(0) if dx is not None else 0,
            per, threshold_of(p), _inv_keep(p), G=len(ranks), DROPOUT=p > 0,
            HAS_DX=dx is not None, ACCUMULATE=accumulate, HAS_DA=need_da,
            MODE=dot_mode(x2.device, torch.float32),
            FIX_BF16=dx is not None and fix_bf16(dx), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br,
            num_warps=8 if br >= 64 else 4)
    return dx, (part.sum(0) if need_da else None)


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def lora_down_reference(x2, a_cat, seed, p, ranks=None):
    xf, af = x2.float(), a_cat.float()
    if p == 0:
        return xf @ af.T
    M, K = x2.shape
    parts, lo = [], 0
    for j, r in enumerate(ranks or [a_cat.shape[0]]):
        keep = keep_mask_reference(int(seed.reshape(-1)[0]), M, K, j, p, x2.device)
        parts.append((xf * keep) @ af[lo:lo + r].T * _inv_keep(p))
        lo += r
    return torch.cat(parts, 1)


def lora_up_reference(base2, xa, b, scale, out_dtype):
    return (base2.float() + scale * (xa @ b.float().T)).to(out_dtype)


def lora_grad_down_reference(g2, b, scale):
    return scale * (g2.float() @ b.float())


def lora_grad_b_reference(g2, xa, scale, out_dtype):
    return (scale * (g2.float().T @ xa)).to(out_dtype)


def lora_grad_x_reference(x2, da, a_cat, seed, p, dx=None, accumulate=False, need_da=True,
                          ranks=None):
    """Returns (dx or None, dA_cat float32 or None); dx, when given, is replaced, not written."""
    M, K = x2.shape
    xf, af = x2.float(), a_cat.float()
    dxl, da_parts, lo = torch.zeros(M, K, device=x2.device), [], 0
    for j, r in enumerate(ranks or [a_cat.shape[0]]):
        keep = (keep_mask_reference(int(seed.reshape(-1)[0]), M, K, j, p, x2.device) if p > 0
                else torch.ones(M, K, dtype=torch.bool, device=x2.device))
        dxl += (da[:, lo:lo + r] @ af[lo:lo + r]) * keep
        da_parts.append(da[:, lo:lo + r].T @ (xf * keep))
        lo += r
    out = None
    if dx is not None:
        out = (dxl * _inv_keep(p) + (dx.float() if accumulate else 0)).to(dx.dtype)
    return out, (torch.cat(da_parts, 0) * _inv_keep(p) if need_da else None)
