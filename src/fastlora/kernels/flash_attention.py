"""Flash attention, forward: ``torch.ops.fastlora.flash_attention`` (backward kernels in
flash_attention_backward.py).

Math, for batch b, query head h (key/value head h // group: GQA/MQA read the shared head, the
repeated k/v are never built), query row i, key column j, all in float32:

    s_ij = scale * q_i . k_j
    s_ij = c * tanh(s_ij / c)                        softcap c > 0 (Gemma 2), else unchanged
    visible(i, j) = j < S_k
        and j <= i                                   causal (top-left aligned, like SDPA's)
        and i - j < window                           window > 0 (Mistral, Gemma 2/3 local layers)
        and start[b, i] <= j < end[b, i]             doc_ids given: i's document (packed rows)
    lse_i = log sum_{visible j} exp(s_ij)            o_i = sum_{visible j} exp(s_ij - lse_i) v_j

Each program owns BLOCK_M query rows of one head and walks the key blocks that some of its rows
can see, keeping a running max, sum and output (online softmax): the S x S score matrix never
exists. Key blocks every row sees fully are processed without masks; only the edge blocks
(diagonal, window edge, document edges, sequence end) pay for the mask.

Documents: ``doc_ids[b, i]`` (any integer dtype, shape (B or 1, S)) labels each token's
document; a document is a run of equal consecutive ids (HF's ``packed_sequence_mask``, a
cumsum, is one run per document). The launcher turns the ids into the first index and one past
the last index of each token's run (``document_bounds``), so blocks outside a document are
skipped, not masked.

Memory: the forward keeps q, k, v, o and one float32 per query row (lse) for backward, which
recomputes the scores. Eager attention keeps the S x S scores and probabilities per head (float32
and a cast copy), and SDPA with an explicit mask reads an S x S mask per call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import HAVE_TRITON, check_float, check_same_device, require, use_triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        # No libdevice: tanh(x) = 1 - 2 / (exp(2x) + 1), which is exact at both infinities.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _visible(i, j, start_i, end_i, S_K, window,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
        """Mask of visible (query i, key j) pairs; i, j (and start_i, end_i, shaped like i) are
        2-D broadcastable index tensors, so the same code serves both tile orientations."""
        vis = j < S_K
        if CAUSAL:
            vis = vis & (j <= i)
        if HAS_WINDOW:
            vis = vis & (j > i - window)
        if HAS_DOCS:
            vis = vis & (j >= start_i) & (j < end_i)
        return vis

    @triton.jit
    def _key_range(m0, S_Q, S_K, window, DS, DE, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
        """For query rows [m0, m0 + BLOCK_M): keys in [lo, hi) are visible to some row, keys in
        [mid_lo, mid_hi) (whole blocks) to every row. Document bounds are non-decreasing in i."""
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
        lo = (lo // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), hi)
        mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), mid_lo)
        return lo, mid_lo, mid_hi, hi

    @triton.jit
    def _scores(q, kt, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
        """(scores in log2 units, tanh(scale * q.k / softcap) or the scores): float32, [M, N]."""
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            t = _tanh(s * (sm_scale / softcap))
            s = t * (softcap * 1.4426950408889634)
        else:
            s = s * (sm_scale * 1.4426950408889634)
            t = s
        return s, t

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, rows, start_r, end_r,
                    lo, hi, S_K, window, sm_scale, softcap, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                    EVEN_D: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_DIM
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            if MASKED:
                col_ok = cols < S_K
                kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None],
                             mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            elif EVEN_D:  # interior block, full head dim: no masks at all
                kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None])
                v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :])
            else:
                kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
                v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :],
                            mask=d_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s, _t = _scores(q, kt, sm_scale, softcap, HAS_SOFTCAP, DOT_PREC)
            if MASKED:
                vis = _visible(rows[:, None], cols[None, :], start_r[:, None], end_r[:, None],
                               S_K, window, CAUSAL, HAS_WINDOW, HAS_DOCS)
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = p.to(V.dtype.element_ty)  # rounded like the GPU's tensor-core operand
            if UPCAST:
                pv = pv.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, DS, DE,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_db,
                  H, GROUP, S_Q, S_K, sm_scale, softcap, window,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:  # the last query blocks see the most keys: start them first
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < S_Q
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        Q = Q + b * stride_qb + h * stride_qh
        K = K + b * stride_kb + hk * stride_kh
        V = V + b * stride_vb + hk * stride_vh
        DS = DS + b * stride_db
        DE = DE + b * stride_db
        q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        start_r = rows
        end_r = rows
        if HAS_DOCS:
            start_r = tl.load(DS + rows, mask=row_ok, other=0)
            end_r = tl.load(DE + rows, mask=row_ok, other=0)
        lo, mid_lo, mid_hi, hi = _key_range(m0, S_Q, S_K, window, DS, DE, BLOCK_M, BLOCK_N,
                                            CAUSAL, HAS_WINDOW, HAS_DOCS)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # A finite floor (not -inf) keeps rows whose first blocks are fully masked free of NaN.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, rows, start_r,
                                    end_r, lo, mid_lo, S_K, window, sm_scale, softcap, offs_d,
                                    HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                    HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, rows, start_r,
                                    end_r, mid_lo, mid_hi, S_K, window, sm_scale, softcap,
                                    offs_d, HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_WINDOW,
                                    HAS_DOCS, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, rows, start_r,
                                    end_r, mid_hi, hi, S_K, window, sm_scale, softcap, offs_d,
                                    HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                    HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        O = O + b * stride_ob + h * stride_oh
        tl.store(O + rows[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + pid_bh.to(tl.int64) * S_Q + rows, lse, mask=row_ok)


# ---------------------------------------------------------------- configuration

# Tests set this to force small blocks (several blocks per sequence on tiny shapes); benchmarks
# set it to sweep. Keys: fwd_m, fwd_n, fwd_warps, fwd_stages, dq_m, dq_n, dkv_m, dkv_n, bwd_warps,
# bwd_stages.
CONFIG_OVERRIDE: dict | None = None


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


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
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    return cfg


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact (IEEE) products, not TF32: the op promises fp32 accuracy."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- shared by both directions


def _validate(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], window: int,
              softcap: float) -> None:
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


def document_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(start, end), int32, shaped like ``doc_ids``: the first index of each token's run of
    equal ids and one past its last index."""
    S = doc_ids.shape[-1]
    idx = torch.arange(S, device=doc_ids.device, dtype=torch.int32).expand_as(doc_ids)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cat([torch.ones_like(change[:, :1]), change], 1)
    last = torch.cat([change, torch.ones_like(change[:, :1])], 1)
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx + 1, S).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _doc_args(doc_ids: Optional[Tensor], q: Tensor):
    """(start, end, batch stride) for the kernels; dummies when there are no documents."""
    if doc_ids is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, 0
    start, end = document_bounds(doc_ids)
    return start, end, (start.stride(0) if start.shape[0] > 1 else 0)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _output_like(q: Tensor, dtype=None) -> Tensor:
    """An empty (B, H, S, D) tensor laid out as (B, S, H, D): the layout the model's next
    ``transpose(1, 2).contiguous()`` wants, so that copy becomes free."""
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D), dtype=dtype).transpose(1, 2)


# ---------------------------------------------------------------- launcher


def flash_attention_forward_triton(q, k, v, doc_ids, scale, causal, window, softcap, out=None,
                                   lse=None):
    """Launch the forward; ``out`` / ``lse`` may be given (tests pass poisoned buffers)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, S_Q, D = q.shape
    S_K, H_KV = k.shape[2], k.shape[1]
    if out is None:
        out = _output_like(q)
    if lse is None:
        lse = torch.empty((B, H, S_Q), dtype=torch.float32, device=q.device)
    require(out.stride(-1) == 1 and lse.is_contiguous(), "fastlora: bad output buffers")
    cfg = kernel_config(D, q.dtype, q.is_cuda)
    ds, de, stride_db = _doc_args(doc_ids, q)
    grid = (triton.cdiv(S_Q, cfg["fwd_m"]), B * H)
    _attn_fwd[grid](
        q, k, v, out, lse, ds, de,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        stride_db, H, H // H_KV, S_Q, S_K, float(scale), float(softcap) or 1.0, int(window),
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"],
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_DOCS=doc_ids is not None,
        HAS_SOFTCAP=softcap > 0, UPCAST=not q.is_cuda, DOT_PREC=dot_precision(q.dtype),
        EVEN_D=block_d(D) == D, num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return out, lse


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def visible_mask(S_Q: int, S_K: int, causal: bool, window: int, doc_ids: Optional[Tensor],
                 device) -> Tensor:
    """(B or 1, 1, S_Q, S_K) bool: which keys each query sees (the op's definition)."""
    i = torch.arange(S_Q, device=device)[:, None]
    j = torch.arange(S_K, device=device)[None, :]
    vis = torch.ones(S_Q, S_K, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= i)
    if window > 0:
        vis = vis & (j > i - window)
    vis = vis[None, None]
    if doc_ids is not None:
        start, end = document_bounds(doc_ids)
        vis = vis & (j >= start[:, None, :, None].long()) & (j < end[:, None, :, None].long())
    return vis


def _probabilities(q, k, scale, causal, window, softcap, doc_ids):
    """float32 probabilities (B, H, S_Q, S_K), the capped scores' tanh (or None), and lse."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    vis = visible_mask(q.shape[2], k.shape[2], causal, window, doc_ids, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: all zero
    return p, t, lse


def flash_attention_forward_reference(q, k, v, doc_ids, scale, causal, window, softcap):
    p, _t, lse = _probabilities(q, k, scale, causal, window, softcap, doc_ids)
    group = q.shape[1] // k.shape[1]
    o = torch.matmul(p, v.float().repeat_interleave(group, 1))
    out = _output_like(q)
    out.copy_(o)
    return out, lse


# ---------------------------------------------------------------- the custom op


@torch.library.custom_op("fastlora::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], scale: float,
                    causal: bool, window: int, softcap: float) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): out (B, H, S, D) like q (stored as (B, S, H, D)), lse (B, H, S)
    float32, the per-row log-sum-exp the backward recomputes the probabilities from.
    ``window`` 0 and ``softcap`` 0 mean none; ``doc_ids`` None means one document per row."""
    _validate(q, k, v, doc_ids, window, softcap)
    if use_triton(q):
        return flash_attention_forward_triton(q, k, v, doc_ids, scale, causal, window, softcap)
    return flash_attention_forward_reference(q, k, v, doc_ids, scale, causal, window, softcap)


@flash_attention.register_fake
def _(q, k, v, doc_ids, scale, causal, window, softcap):
    _validate(q, k, v, doc_ids, window, softcap)
    B, H, S, _ = q.shape
    return _output_like(q), q.new_empty((B, H, S), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, scale, causal, window, softcap = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_ids)
    ctx.params = (scale, causal, window, softcap)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastlora.flash_attention_backward(dout, q, k, v, out, lse, doc_ids,
                                                             *ctx.params)
    return dq, dk, dv, None, None, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


from . import flash_attention_backward as _backward_kernels  # noqa: E402,F401  (registers the op)
