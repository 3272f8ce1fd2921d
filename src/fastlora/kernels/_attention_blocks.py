"""What the flash-attention forward (flash_attention.py) and backward
(flash_attention_backward.py) share: the visibility geometry of causal / sliding-window /
packed-document / key-padded attention (which key blocks a query block sees, which query
blocks see a key block, and the mask of an edge block), the softcapped scores, the launch
configuration and input validation. The PyTorch probabilities that the CPU reference of both
directions uses are in _attention_reference.py. The math is in flash_attention.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import tuning
from ._attention_reference import (document_bounds, probabilities,  # noqa: F401
                                   visible_mask)  # (document_bounds used here; all re-exported)
from ._common import HAVE_TRITON, check_float, check_same_device, next_power_of_2, require

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if HAVE_TRITON:
    import triton
    import triton.language as tl

    # Keys (or lse values) per step of the scans over a whole row (key_span, empty_rows_span).
    SCAN = tl.constexpr(1024)

    @triton.jit
    def _tanh(x):
        """tanh to about one ulp in float32, without libdevice.

        |x| < 0.6: the Taylor series x - x^3/3 + 2x^5/15 - ... through x^19 (truncation below
        4e-9 relative). Softcapped scores live here (Gemma 2: |s| / 50), and the closed form
        1 - 2 / (exp(2x) + 1) loses digits to cancellation there: 1 - 0.98 at x = 0.01.
        |x| >= 0.6: that closed form on |x|, with the sign put back (exact at infinity)."""
        a = tl.abs(x)
        x2 = x * x
        p = -0.00023912911424355248
        p = p * x2 + 0.000590027440945586
        p = p * x2 - 0.0014558343870513183
        p = p * x2 + 0.003592128036572481
        p = p * x2 - 0.008863235529902197
        p = p * x2 + 0.021869488536155203
        p = p * x2 - 0.05396825396825397
        p = p * x2 + 0.13333333333333333
        p = p * x2 - 0.3333333333333333
        series = x + x * (p * x2)
        closed = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        closed = tl.where(x < 0.0, -closed, closed)
        return tl.where(a < 0.6, series, closed)

    @triton.jit
    def visible_pairs(i, j, start_i, end_i, keep_j, S_K, window, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr):
        """Mask of visible (query i, key j) pairs; i, j (and start_i, end_i shaped like i,
        keep_j like j) are 2-D broadcastable index tensors, so the same code serves both tile
        orientations."""
        vis = j < S_K
        if CAUSAL:
            vis = vis & (j <= i)
        if HAS_WINDOW:
            vis = vis & (j > i - window)
        if HAS_DOCS:
            vis = vis & (j >= start_i) & (j < end_i)
        if HAS_PAD:
            vis = vis & keep_j
        return vis

    @triton.jit
    def kept_keys(KM, cols, S_K, HAS_PAD: tl.constexpr):
        """keep[j] = KM[j] != 0 for the keys ``cols`` (False past the end); True without a mask."""
        keep = cols >= 0
        if HAS_PAD:
            keep = tl.load(KM + cols, mask=cols < S_K, other=0) != 0
        return keep

    @triton.jit
    def key_span(KM, S_K, HAS_PAD: tl.constexpr, SCAN: tl.constexpr):
        """(kv_lo, kv_hi, holes) of one batch row's key mask: the first kept key, one past the
        last, and whether some key between them is masked (then no block is mask-free). Without
        a mask: (0, S_K, False). A row with no kept key gives kv_lo = S_K > kv_hi = 0."""
        if HAS_PAD:
            kv_lo = S_K + 0
            kv_hi = S_K * 0
            kept = S_K * 0
            for j0 in range(0, S_K, SCAN):
                j = j0 + tl.arange(0, SCAN)
                keep = tl.load(KM + j, mask=j < S_K, other=0) != 0
                kv_lo = tl.minimum(kv_lo, tl.min(tl.where(keep, j, S_K), 0))
                kv_hi = tl.maximum(kv_hi, tl.max(tl.where(keep, j + 1, 0), 0))
                kept += tl.sum(keep.to(tl.int32), 0)
            holes = kept < kv_hi - kv_lo
        else:
            kv_lo = S_K * 0
            kv_hi = S_K + 0
            holes = kv_lo != kv_lo
        return kv_lo, kv_hi, holes

    @triton.jit
    def empty_rows_span(LSE, S_Q, SCAN: tl.constexpr):
        """[first, last + 1) of the query rows whose lse is -inf (no visible key); first > last
        when there are none."""
        first = S_Q + 0
        last = S_Q * 0
        for i0 in range(0, S_Q, SCAN):
            i = i0 + tl.arange(0, SCAN)
            empty = tl.load(LSE + i, mask=i < S_Q, other=0.0) == float("-inf")
            first = tl.minimum(first, tl.min(tl.where(empty, i, S_Q), 0))
            last = tl.maximum(last, tl.max(tl.where(empty, i + 1, 0), 0))
        return first, last

    @triton.jit
    def _key_range(m0, S_Q, S_K, window, DS, DE, kv_lo, kv_hi, holes, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr):
        """For query rows [m0, m0 + BLOCK_M): keys in [lo, hi) are visible to some row, keys in
        [mid_lo, mid_hi) (whole blocks) to every row. Document bounds are non-decreasing in i;
        a key mask limits both ranges to [kv_lo, kv_hi), and with holes no block is whole."""
        m_last = tl.minimum(m0 + BLOCK_M, S_Q) - 1
        lo = m0 * 0
        hi = lo + S_K
        full_lo = lo
        full_hi = hi
        if CAUSAL:
            hi = tl.minimum(hi, m_last + 1)
            full_hi = tl.minimum(full_hi, m0 + 1)
        if HAS_WINDOW:
            lo = tl.maximum(lo, m0 - window + 1)
            full_lo = tl.maximum(full_lo, m_last - window + 1)
        if HAS_DOCS:
            lo = tl.maximum(lo, tl.load(DS + m0))
            full_lo = tl.maximum(full_lo, tl.load(DS + m_last))
            hi = tl.minimum(hi, tl.load(DE + m_last))
            full_hi = tl.minimum(full_hi, tl.load(DE + m0))
        if HAS_PAD:
            lo = tl.maximum(lo, kv_lo)
            hi = tl.minimum(hi, kv_hi)
            full_lo = tl.maximum(full_lo, kv_lo)
            full_hi = tl.where(holes, full_lo, tl.minimum(full_hi, kv_hi))
        return _whole_blocks(lo, full_lo, full_hi, hi, BLOCK_N)

    @triton.jit
    def query_range(n0, S_Q, S_K, window, DS, DE, kv_lo, kv_hi, holes, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr):
        """For keys [n0, n0 + BLOCK_N): queries in [lo, hi) see some key, queries in
        [mid_lo, mid_hi) (whole blocks) see every key of the block. With a key mask only the
        block's keys inside [kv_lo, kv_hi) can be seen, and whole rows need the block to lie
        inside that span, without holes."""
        n_last = tl.minimum(n0 + BLOCK_N, S_K) - 1
        j_lo = n0  # the first and last key of the block that someone may see
        j_last = n_last
        if HAS_PAD:
            unseen = (kv_lo > n_last) | (kv_hi <= n0)
            j_lo = tl.where(unseen, n0, tl.maximum(n0, kv_lo))
            j_last = tl.where(unseen, n_last, tl.minimum(n_last, kv_hi - 1))
        lo = n0 * 0
        hi = lo + S_Q
        full_lo = lo
        full_hi = hi
        if CAUSAL:
            lo = tl.maximum(lo, j_lo)
            full_lo = tl.maximum(full_lo, n_last)
        if HAS_WINDOW:
            hi = tl.minimum(hi, j_last + window)
            full_hi = tl.minimum(full_hi, n0 + window)
        if HAS_DOCS:
            lo = tl.maximum(lo, tl.load(DS + j_lo))
            full_lo = tl.maximum(full_lo, tl.load(DS + n_last))
            hi = tl.minimum(hi, tl.load(DE + j_last))
            full_hi = tl.minimum(full_hi, tl.load(DE + n0))
        if HAS_PAD:
            hi = tl.where(unseen, lo, hi)
            inside = (n0 >= kv_lo) & (n_last < kv_hi) & (holes == 0)
            full_hi = tl.where(inside, full_hi, full_lo)
        return _whole_blocks(lo, full_lo, full_hi, hi, BLOCK_M)

    @triton.jit
    def _whole_blocks(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
        """(lo, mid_lo, mid_hi, hi): the visible range [lo, hi) with lo rounded down to a block
        (empty, hi = lo, when nothing is visible), and inside it [mid_lo, mid_hi), the whole
        blocks within [full_lo, full_hi) (no mask). The loops over [lo, mid_lo), [mid_lo,
        mid_hi) and [mid_hi, hi) together visit the blocks of [lo, blocks_end(lo, hi))."""
        nothing = hi <= lo
        lo = (lo // BLOCK) * BLOCK
        hi = tl.where(nothing, lo, hi)
        mid_lo = tl.minimum(tl.maximum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, lo), hi)
        mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK) * BLOCK, hi), mid_lo)
        return lo, mid_lo, mid_hi, hi

    @triton.jit
    def blocks_end(lo, hi, BLOCK: tl.constexpr):
        """One past the last block that the loops over a range of _whole_blocks visit."""
        return tl.maximum(lo, ((hi + BLOCK - 1) // BLOCK) * BLOCK)

    @triton.jit
    def query_block(H, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
        """(batch x head program id, batch, head, its k/v head, first query row) of this
        program of a query-block grid; causal grids start with the last query blocks, which
        see the most keys."""
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        return pid_bh, b, h, h // GROUP, pid_m * BLOCK_M

    @triton.jit
    def query_keys(rows, row_ok, m0, S_Q, S_K, window, DS, DE, KM, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr):
        """Each query row's document [start, end) (the row itself without documents; DS, DE,
        KM already at this batch row) and the block's key ranges of _key_range."""
        start_r = rows
        end_r = rows
        if HAS_DOCS:
            start_r = tl.load(DS + rows, mask=row_ok, other=0)
            end_r = tl.load(DE + rows, mask=row_ok, other=0)
        kv_lo, kv_hi, holes = key_span(KM, S_K, HAS_PAD, SCAN)
        lo, mid_lo, mid_hi, hi = _key_range(m0, S_Q, S_K, window, DS, DE, kv_lo, kv_hi, holes,
                                            BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                            HAS_PAD)
        return start_r, end_r, lo, mid_lo, mid_hi, hi

    @triton.jit
    def block_scores(q, kt, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
        """(scores in log2 units, tanh(scale * q.k / softcap) or the scores): float32, [M, N]."""
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            t = _tanh(s * (sm_scale / softcap))
            s = t * (softcap * 1.4426950408889634)
        else:
            s = s * (sm_scale * 1.4426950408889634)
            t = s
        return s, t


def block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


# Tuning entry "flash_attention" (both directions): each key None takes kernel_config's value;
# tests set small blocks (several blocks per sequence on tiny shapes), benchmarks sweep them.
_CONFIG_KEYS = ("fwd_m", "fwd_n", "fwd_warps", "fwd_stages", "dq_m", "dq_n", "dkv_m", "dkv_n",
                "bwd_warps", "bwd_stages")
tuning.register("flash_attention", **dict.fromkeys(_CONFIG_KEYS))


def kernel_config(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Block sizes by head dim and dtype (a heuristic for the H200 until
    benchmarks/kernel_cases/attention.py sweeps them; float32, for exactness tests, gets tiles
    that fit shared memory at twice the bytes); tiny blocks under the interpreter, where each
    program costs milliseconds."""
    wide = block_d(head_dim) > 128
    if not on_gpu:
        cfg = dict(fwd_m=16, fwd_n=16, fwd_warps=1, fwd_stages=1, dq_m=16, dq_n=16, dkv_m=16,
                   dkv_n=16, bwd_warps=1, bwd_stages=1)
    elif dtype == torch.float32:
        m, n = (32, 16) if wide else (64, 32)
        cfg = dict(fwd_m=m, fwd_n=n, fwd_warps=4, fwd_stages=2, dq_m=n, dq_n=n, dkv_m=n,
                   dkv_n=n, bwd_warps=4, bwd_stages=1)
    elif block_d(head_dim) <= 64:
        cfg = dict(fwd_m=128, fwd_n=64, fwd_warps=4, fwd_stages=3, dq_m=64, dq_n=64, dkv_m=64,
                   dkv_n=64, bwd_warps=4, bwd_stages=2)
    elif not wide:
        cfg = dict(fwd_m=128, fwd_n=64, fwd_warps=8, fwd_stages=3, dq_m=64, dq_n=64, dkv_m=64,
                   dkv_n=64, bwd_warps=8, bwd_stages=2)
    else:
        cfg = dict(fwd_m=64, fwd_n=32, fwd_warps=8, fwd_stages=2, dq_m=32, dq_n=32, dkv_m=32,
                   dkv_n=32, bwd_warps=8, bwd_stages=1)
    cfg.update({k: v for k, v in tuning.get("flash_attention").items() if v is not None})
    return cfg


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact (IEEE) products, not TF32: the op promises fp32 accuracy."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- shared by both directions


def validate(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], window: int,
              softcap: float, key_mask: Optional[Tensor] = None,
              sinks: Optional[Tensor] = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        require(t.dim() == 4, f"fastlora.flash_attention: {name} must be (batch, heads, seq, "
                              f"head_dim), got shape {tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    require(q.dtype == k.dtype == v.dtype,
            f"fastlora.flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})",
            TypeError)
    B, H, S_Q, D = q.shape
    require(k.shape[0] == B and v.shape[0] == B and k.shape[2] == v.shape[2],
            f"fastlora.flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit "
            f"q {tuple(q.shape)}")
    require(k.shape[3] == D and v.shape[3] == D,
            f"fastlora.flash_attention: head dims differ (q {D}, k {k.shape[3]}, "
            f"v {v.shape[3]}); only equal head dims are supported")
    require(k.shape[1] == v.shape[1] and H % k.shape[1] == 0,
            f"fastlora.flash_attention: {H} query heads cannot share {k.shape[1]} key/value "
            "heads evenly")
    require(D <= 256, f"fastlora.flash_attention: head dim {D} > 256 is not supported")
    if sinks is not None:
        check_float("sinks", sinks)
        require(sinks.dim() == 1 and sinks.shape[0] == H, f"fastlora.flash_attention: sinks "
                f"must have shape ({H},), one per query head, got {tuple(sinks.shape)}")
        check_same_device(q=q, sinks=sinks)
    require(window >= 0, f"fastlora.flash_attention: window must be >= 0 (0 = none), got {window}")
    require(softcap >= 0.0, f"fastlora.flash_attention: softcap must be >= 0 (0 = none), got "
                            f"{softcap}")
    if doc_ids is not None:
        require(doc_ids.dim() == 2 and doc_ids.shape[-1] == S_Q == k.shape[2]
                and doc_ids.shape[0] in (1, B),
                f"fastlora.flash_attention: doc_ids must have shape ({B} or 1, {S_Q}) and keys "
                f"must be as long as queries, got doc_ids {tuple(doc_ids.shape)}, "
                f"{k.shape[2]} keys")
        require(not doc_ids.is_floating_point() and not doc_ids.is_complex(),
                f"fastlora.flash_attention: doc_ids must be integers, got {doc_ids.dtype}",
                TypeError)
        require(doc_ids.device == q.device, "fastlora.flash_attention: doc_ids on another device")
    if key_mask is not None:
        require(key_mask.dim() == 2 and key_mask.shape[-1] == k.shape[2]
                and key_mask.shape[0] in (1, B),
                f"fastlora.flash_attention: key_mask must have shape ({B} or 1, {k.shape[2]}), "
                f"got {tuple(key_mask.shape)}")
        require(not key_mask.is_floating_point() and not key_mask.is_complex(),
                f"fastlora.flash_attention: key_mask must be bool or integers, got "
                f"{key_mask.dtype}", TypeError)
        require(key_mask.device == q.device,
                "fastlora.flash_attention: key_mask on another device")


def doc_args(doc_ids: Optional[Tensor], q: Tensor):
    """(start, end, batch stride) for the kernels; dummies when there are no documents."""
    if doc_ids is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, 0
    start, end = document_bounds(doc_ids)
    return start, end, (start.stride(0) if start.shape[0] > 1 else 0)


def key_mask_args(key_mask: Optional[Tensor], q: Tensor):
    """(mask, batch stride) for the kernels: the key mask as it is (a bool mask read as bytes,
    no copy), or a dummy when there is none."""
    if key_mask is None:
        return torch.zeros(1, dtype=torch.uint8, device=q.device), 0
    if key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)
    key_mask = last_dim_contiguous(key_mask)
    return key_mask, (key_mask.stride(0) if key_mask.shape[0] > 1 else 0)


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
