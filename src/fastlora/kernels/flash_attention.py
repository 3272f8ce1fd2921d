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
        and key_mask[b, j] != 0                      key_mask given: padding (HF attention_mask)
    lse_i = log sum_{visible j} exp(s_ij)            o_i = sum_{visible j} exp(s_ij - lse_i) v_j

Sinks (GPT-OSS): a learned logit sink_h per query head joins every row's softmax as one more
column with no value: lse_i = log(exp(sink_h) + sum_{visible j} exp(s_ij)), o_i as above with
that lse (so the row's weights sum to less than 1). A row with no visible key then gives o_i = 0
and lse_i = sink_h, as the model's eager attention does. The backward is unchanged given lse;
d sink_h = -sum_{b, i} exp(sink_h - lse_i) delta_i (delta_i = dO_i . O_i), in PyTorch.

A row with no visible key (a pad query under left padding and causal attention, say) gets
lse_i = -inf and, as the model's own attention gives it:
    o_i = 0                          empty_rows_uniform False: SDPA with a boolean mask
    o_i = (1 / S_k) sum_{all j} v_j  empty_rows_uniform True: an additive mask of the dtype's
                                     minimum (HF's eager masks): every score becomes that
                                     minimum, so softmax is uniform over all S_k keys
(the backward differentiates the uniform row through the real scores, as autograd does eager).

Each program owns BLOCK_M query rows of one head and walks the key blocks that some of its rows
can see, keeping a running max, sum and output (online softmax): the S x S score matrix never
exists. Key blocks every row sees fully are processed without masks; only the edge blocks
(diagonal, window edge, document edges, padding edges, sequence end) pay for the mask.

Documents: ``doc_ids[b, i]`` (any integer dtype, shape (B or 1, S)) labels each token's
document; a document is a run of equal consecutive ids (HF's ``packed_sequence_mask``, a
cumsum, is one run per document). The launcher turns the ids into the first index and one past
the last index of each token's run (``document_bounds``), so blocks outside a document are
skipped, not masked.

Padding: ``key_mask[b, j]`` (bool or integers, (B or 1, S_k)), read on the device: each program
scans its batch row for the first and one past the last kept key (``key_span``) and skips the
key blocks outside; when a masked key lies between them (a mask with holes) every block is
masked, else only the edge blocks. No host sync, nothing computed per length on the host.

Memory: the forward keeps q, k, v, o and one float32 per query row (lse) for backward, which
recomputes the scores. Eager attention keeps the S x S scores and probabilities per head (float32
and a cast copy), and SDPA with an explicit mask reads an S x S mask per call.

Sequence lengths (S_Q, S_K) and the batch strides of the per-token arrays are left unspecialised
(``do_not_specialize``): one compiled kernel serves every length.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _buffers
from ._attention_blocks import (LN2, LOG2E, doc_args, key_mask_args,  # noqa: F401
                                last_dim_contiguous, probabilities, validate, block_d,
                                document_bounds, dot_precision, kernel_config, visible_mask)
# (re-exported: tests and benchmarks reach the shared helpers through this module)
from ._common import HAVE_TRITON, cdiv, require, use_triton
from ._launch import launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._attention_blocks import block_scores, kept_keys, query_block, query_keys, visible_pairs

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, K, V, KM, stride_kn, stride_vn, rows, start_r, end_r,
                    lo, hi, S_K, window, sm_scale, softcap, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                    HAS_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
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
            s, _t = block_scores(q, kt, sm_scale, softcap, HAS_SOFTCAP, DOT_PREC)
            if MASKED:
                keep = kept_keys(KM, cols, S_K, HAS_PAD)
                vis = visible_pairs(rows[:, None], cols[None, :], start_r[:, None], end_r[:, None],
                               keep[None, :], S_K, window, CAUSAL, HAS_WINDOW, HAS_DOCS, HAS_PAD)
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
    def _value_mean(V, stride_vn, S_K, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """(1 / S_K) sum_j v_j in float32: the output of a row whose attention is uniform."""
        offs_n = tl.arange(0, BLOCK_N)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, S_K, BLOCK_N):
            cols = n0 + offs_n
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :],
                        mask=(cols < S_K)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            total += tl.sum(v.to(tl.float32), 0)
        return total / S_K

    @triton.jit(do_not_specialize=["stride_db", "stride_kmb", "S_Q", "S_K"])
    def _attn_fwd(Q, K, V, O, LSE, DS, DE, KM, SINKS,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_db,
                  stride_kmb, H, GROUP, S_Q, S_K, sm_scale, softcap, window,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr, EMPTY_UNIFORM: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                  EVEN_D: tl.constexpr, HAS_SINKS: tl.constexpr):
        pid_bh, b, h, hk, m0 = query_block(H, GROUP, BLOCK_M, CAUSAL)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < S_Q
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        Q = Q + b * stride_qb + h * stride_qh
        K = K + b * stride_kb + hk * stride_kh
        V = V + b * stride_vb + hk * stride_vh
        DS = DS + b * stride_db
        DE = DE + b * stride_db
        KM = KM + b * stride_kmb
        q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        start_r, end_r, lo, mid_lo, mid_hi, hi = query_keys(
            rows, row_ok, m0, S_Q, S_K, window, DS, DE, KM, BLOCK_M, BLOCK_N, CAUSAL,
            HAS_WINDOW, HAS_DOCS, HAS_PAD)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # A finite floor (not -inf) keeps rows whose first blocks are fully masked free of NaN.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        if HAS_SINKS:  # the sink's column, already summed: exp2(m - m) = 1, no value
            sink2 = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634  # log2 units
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink2
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KM, stride_kn, stride_vn, rows,
                                    start_r, end_r, lo, mid_lo, S_K, window, sm_scale, softcap,
                                    offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                                    HAS_DOCS, HAS_PAD, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KM, stride_kn, stride_vn, rows,
                                    start_r, end_r, mid_lo, mid_hi, S_K, window, sm_scale,
                                    softcap, offs_d, HEAD_DIM, BLOCK_N, False, CAUSAL,
                                    HAS_WINDOW, HAS_DOCS, HAS_PAD, HAS_SOFTCAP, UPCAST, DOT_PREC,
                                    EVEN_D)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, KM, stride_kn, stride_vn, rows,
                                    start_r, end_r, mid_hi, hi, S_K, window, sm_scale, softcap,
                                    offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                                    HAS_DOCS, HAS_PAD, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        empty = l_i == 0.0  # no visible key (l_i >= 1 on any other row)
        if EMPTY_UNIFORM:
            if tl.sum((empty & row_ok).to(tl.int32), 0) > 0:
                acc = tl.where(empty[:, None],
                               _value_mean(V, stride_vn, S_K, offs_d, HEAD_DIM, BLOCK_N,
                                           BLOCK_D)[None, :], acc)
        l_safe = tl.where(empty, 1.0, l_i)
        o = acc / l_safe[:, None]
        O = O + b * stride_ob + h * stride_oh
        tl.store(O + rows[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * S_Q + rows, lse, mask=row_ok)


# ---------------------------------------------------------------- launcher


def _output_like(q: Tensor, dtype=None) -> Tensor:
    """An empty (B, H, S, D) tensor laid out as (B, S, H, D): the layout the model's next
    ``transpose(1, 2).contiguous()`` wants, so that copy becomes free."""
    B, H, S, D = q.shape
    return _buffers.empty((B, S, H, D), dtype or q.dtype, q.device).transpose(1, 2)


def flash_attention_forward_triton(q, k, v, doc_ids, scale, causal, window, softcap,
                                   key_mask=None, empty_rows_uniform=False, sinks=None, out=None,
                                   lse=None):
    """Launch the forward; ``out`` / ``lse`` may be given (tests pass poisoned buffers)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, S_Q, D = q.shape
    S_K, H_KV = k.shape[2], k.shape[1]
    if out is None:
        out = _output_like(q)
    if lse is None:
        lse = _buffers.empty((B, H, S_Q), torch.float32, q.device)
    require(out.stride(-1) == 1 and lse.is_contiguous(), "fastlora: bad output buffers")
    cfg = kernel_config(D, q.dtype, q.is_cuda)
    ds, de, stride_db = doc_args(doc_ids, q)
    km, stride_kmb = key_mask_args(key_mask, q)
    grid = (cdiv(S_Q, cfg["fwd_m"]), B * H)
    launch(_attn_fwd)[grid](
        q, k, v, out, lse, ds, de, km, sinks.contiguous() if sinks is not None else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        stride_db, stride_kmb, H, H // H_KV, S_Q, S_K, float(scale), float(softcap) or 1.0,
        int(window), HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"],
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_DOCS=doc_ids is not None,
        HAS_PAD=key_mask is not None, EMPTY_UNIFORM=bool(empty_rows_uniform),
        HAS_SOFTCAP=softcap > 0, UPCAST=not q.is_cuda, DOT_PREC=dot_precision(q.dtype),
        EVEN_D=block_d(D) == D, HAS_SINKS=sinks is not None, num_warps=cfg["fwd_warps"],
        num_stages=cfg["fwd_stages"])
    return out, lse


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def flash_attention_forward_reference(q, k, v, doc_ids, scale, causal, window, softcap,
                                      key_mask=None, empty_rows_uniform=False, sinks=None):
    p, _t, lse = probabilities(q, k, scale, causal, window, softcap, doc_ids, key_mask,
                                empty_rows_uniform, sinks)
    group = q.shape[1] // k.shape[1]
    o = torch.matmul(p, v.float().repeat_interleave(group, 1))
    out = _output_like(q)
    out.copy_(o)
    return out, lse


# ---------------------------------------------------------------- the custom op


@torch.library.custom_op("fastlora::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], scale: float,
                    causal: bool, window: int, softcap: float, key_mask: Optional[Tensor] = None,
                    empty_rows_uniform: bool = False,
                    sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): out (B, H, S, D) like q (stored as (B, S, H, D)), lse (B, H, S)
    float32, the per-row log-sum-exp the backward recomputes the probabilities from (-inf on a
    row with no visible key). ``window`` 0 and ``softcap`` 0 mean none; ``doc_ids`` None means
    one document per row; ``key_mask`` None means every key is kept; ``empty_rows_uniform``
    picks what a row with no visible key gives (see the math above); ``sinks`` (H,) one more
    logit per head in every row's softmax (None: none)."""
    validate(q, k, v, doc_ids, window, softcap, key_mask, sinks)
    args = (q, k, v, doc_ids, scale, causal, window, softcap, key_mask,
            empty_rows_uniform and sinks is None, sinks)
    if use_triton(q):
        return flash_attention_forward_triton(*args)
    return flash_attention_forward_reference(*args)


@flash_attention.register_fake
def _(q, k, v, doc_ids, scale, causal, window, softcap, key_mask=None, empty_rows_uniform=False,
      sinks=None):
    validate(q, k, v, doc_ids, window, softcap, key_mask, sinks)
    B, H, S, _ = q.shape
    return _output_like(q), q.new_empty((B, H, S), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, scale, causal, window, softcap, key_mask, empty_rows_uniform, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_ids, key_mask, sinks)
    ctx.params = (scale, causal, window, softcap)
    ctx.empty_rows_uniform = empty_rows_uniform and sinks is None


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_ids, key_mask, sinks = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastlora.flash_attention_backward(
        dout, q, k, v, out, lse, doc_ids, *ctx.params, key_mask, ctx.empty_rows_uniform, sinks)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[10]:  # -sum_{b,i} p_sink,bhi * delta_bhi
        delta = (dout.float() * out.float()).sum(-1)
        dsinks = -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum((0, 2))
        dsinks = dsinks.to(sinks.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, dsinks


flash_attention.register_autograd(_backward, setup_context=_setup_context)


from . import flash_attention_backward as _backward_kernels  # noqa: E402,F401  (registers the op)
