"""Flash attention, backward: ``torch.ops.fastlora.flash_attention_backward``.

Math (see flash_attention.py for the forward and the visibility rule), per visible (i, j):

    p_ij  = exp(s_ij - lse_i)                  recomputed from q, k and the saved lse
    delta_i = sum_d dO_id * O_id               (= sum_j p_ij dp_ij)
    dp_ij = dO_i . v_j
    ds_ij = p_ij (dp_ij - delta_i)             gradient w.r.t. the (capped) score
    ds_ij *= 1 - tanh(s_raw_ij / c)^2          softcap c: back through c * tanh(s_raw / c)
    dq_i = scale * sum_j ds_ij k_j
    dk_j = scale * sum_i ds_ij q_i             dv_j = sum_i p_ij dO_i

Rows with no visible key (lse_i = -inf): with ``empty_rows_uniform`` p_ij = 1 / S_k for every
key j and the formulas above hold unchanged (ds through the real scores, as autograd
differentiates eager's ``scores + min``); otherwise p_ij = 0 and they contribute nothing.

Two kernels, no atomics: ``_attn_bwd_dq`` (one program per query block and head; it also computes
delta for its rows) and ``_attn_bwd_dkdv`` (one program per key block and key/value head, which
loops over every query head of its GQA group, so dk and dv of a shared head are summed in
registers and the repeated k/v never exist). Both skip blocks nobody sees and mask only the edge
blocks, like the forward. Uniform rows with no visible key see every key: the dq program of a
query block holding one also walks the key blocks outside its range, and each dk/dv program
also walks the query blocks between the first and the last such row (found on the device from
lse). Memory: delta (one float32 per query row) besides the gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _buffers
from ._common import HAVE_TRITON, cdiv, use_triton
from ._launch import launch
from ._attention_blocks import (doc_args, key_mask_args, last_dim_contiguous,
                                probabilities, validate, block_d, dot_precision, kernel_config)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._attention_blocks import (SCAN, block_scores, blocks_end, empty_rows_span, kept_keys,
                                    key_span, query_block, query_keys, query_range, visible_pairs)

    @triton.jit
    def _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn, stride_vn, rows,
                   start_r, end_r, lo, hi, S_K, window, sm_scale, softcap, offs_d,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                   HAS_PAD: tl.constexpr, EMPTY_UNIFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_DIM
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            k_ptrs = K + cols[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = V + cols[None, :] * stride_vn + offs_d[:, None]
            if MASKED or not EVEN_D:
                ld_mask = d_ok[:, None]
                if MASKED:
                    ld_mask = ld_mask & (cols < S_K)[None, :]
                kt = tl.load(k_ptrs, mask=ld_mask, other=0.0)
                vt = tl.load(v_ptrs, mask=ld_mask, other=0.0)
            else:  # interior block, full head dim: no masks at all
                kt = tl.load(k_ptrs)
                vt = tl.load(v_ptrs)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s, t = block_scores(q, kt, sm_scale, softcap, HAS_SOFTCAP, DOT_PREC)
            p = tl.exp2(s - lse2[:, None])  # +inf on rows with no visible key: replaced below
            if MASKED:
                keep = kept_keys(KM, cols, S_K, HAS_PAD)
                vis = visible_pairs(rows[:, None], cols[None, :], start_r[:, None], end_r[:, None],
                               keep[None, :], S_K, window, CAUSAL, HAS_WINDOW, HAS_DOCS, HAS_PAD)
                other = 0.0
                if EMPTY_UNIFORM:
                    other = tl.where(empty_r[:, None] & (cols < S_K)[None, :], 1.0 / S_K, 0.0)
                p = tl.where(vis, p, other)
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dsk = ds.to(K.dtype.element_ty)
            if UPCAST:
                dsk = dsk.to(tl.float32)
            dq += tl.dot(dsk, tl.trans(kt), input_precision=DOT_PREC)
        return dq

    @triton.jit(do_not_specialize=["stride_db", "stride_kmb", "S_Q", "S_K"])
    def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, DS, DE, KM,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
                     stride_db, stride_kmb, H, GROUP, S_Q, S_K, sm_scale, softcap, window,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr, EMPTY_UNIFORM: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     EVEN_D: tl.constexpr):
        pid_bh, b, h, hk, m0 = query_block(H, GROUP, BLOCK_M, CAUSAL)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < S_Q
        offs_d = tl.arange(0, BLOCK_D)
        tile = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                    + offs_d[None, :], mask=tile, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                     + offs_d[None, :], mask=tile, other=0.0)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
                    + offs_d[None, :], mask=tile, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * S_Q + rows, delta, mask=row_ok)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * S_Q + rows, mask=row_ok, other=0.0) \
            * 1.4426950408889634
        empty_r = lse2 == float("-inf")
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        K = K + b * stride_kb + hk * stride_kh
        V = V + b * stride_vb + hk * stride_vh
        DS = DS + b * stride_db
        DE = DE + b * stride_db
        KM = KM + b * stride_kmb
        start_r, end_r, lo, mid_lo, mid_hi, hi = query_keys(
            rows, row_ok, m0, S_Q, S_K, window, DS, DE, KM, BLOCK_M, BLOCK_N, CAUSAL,
            HAS_WINDOW, HAS_DOCS, HAS_PAD)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn, stride_vn, rows,
                        start_r, end_r, lo, mid_lo, S_K, window, sm_scale, softcap, offs_d,
                        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS, HAS_PAD,
                        EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        dq = _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn, stride_vn, rows,
                        start_r, end_r, mid_lo, mid_hi, S_K, window, sm_scale, softcap, offs_d,
                        HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_DOCS, HAS_PAD,
                        EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        dq = _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn, stride_vn, rows,
                        start_r, end_r, mid_hi, hi, S_K, window, sm_scale, softcap, offs_d,
                        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_DOCS, HAS_PAD,
                        EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST, DOT_PREC, EVEN_D)
        if EMPTY_UNIFORM:  # rows with no visible key see every key, 1 / S_K each
            if tl.sum((empty_r & row_ok).to(tl.int32), 0) > 0:
                done = blocks_end(lo, hi, BLOCK_N)
                dq = _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn,
                                stride_vn, rows, start_r, end_r, 0, lo, S_K, window, sm_scale,
                                softcap, offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                                HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST, DOT_PREC,
                                EVEN_D)
                dq = _dq_blocks(dq, q, do, lse2, delta, empty_r, K, V, KM, stride_kn,
                                stride_vn, rows, start_r, end_r, done, S_K, S_K, window,
                                sm_scale, softcap, offs_d, HEAD_DIM, BLOCK_N, True, CAUSAL,
                                HAS_WINDOW, HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP,
                                UPCAST, DOT_PREC, EVEN_D)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm
                 + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile)

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom, cols, keep_n, DS, DE,
                     lo, hi, S_Q, S_K, window, sm_scale, softcap, offs_d,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                     HAS_PAD: tl.constexpr, EMPTY_UNIFORM: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     EVEN_D: tl.constexpr):
        # Tiles are transposed: keys along dim 0, queries along dim 1.
        offs_m = tl.arange(0, BLOCK_M)
        d_ok = offs_d < HEAD_DIM
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            q_ptrs = Q + rows[None, :] * stride_qm + offs_d[:, None]
            do_ptrs = DO + rows[:, None] * stride_dom + offs_d[None, :]
            if MASKED:
                row_ok = rows < S_Q
                qt = tl.load(q_ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                # Rows past the end get lse = +inf, so their probabilities are exactly zero.
                lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            else:  # interior block: every row exists
                if EVEN_D:
                    qt = tl.load(q_ptrs)
                    do = tl.load(do_ptrs)
                else:
                    qt = tl.load(q_ptrs, mask=d_ok[:, None], other=0.0)
                    do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
                lse2 = tl.load(LSE + rows) * 1.4426950408889634
                delta = tl.load(DELTA + rows)
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            st, tt = block_scores(k, qt, sm_scale, softcap, HAS_SOFTCAP, DOT_PREC)
            pt = tl.exp2(st - lse2[None, :])  # +inf on rows with no visible key: replaced below
            if MASKED:
                start_r = rows
                end_r = rows
                if HAS_DOCS:
                    start_r = tl.load(DS + rows, mask=rows < S_Q, other=0)
                    end_r = tl.load(DE + rows, mask=rows < S_Q, other=0)
                vis = visible_pairs(rows[None, :], cols[:, None], start_r[None, :], end_r[None, :],
                               keep_n[:, None], S_K, window, CAUSAL, HAS_WINDOW, HAS_DOCS,
                               HAS_PAD)
                other = 0.0
                if EMPTY_UNIFORM:
                    other = tl.where((lse2 == float("-inf"))[None, :] & (cols < S_K)[:, None],
                                     1.0 / S_K, 0.0)
                pt = tl.where(vis, pt, other)
            pv = pt.to(DO.dtype.element_ty)
            if UPCAST:
                pv = pv.to(tl.float32)
            dv += tl.dot(pv, do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - tt * tt)
            dsq = dst.to(Q.dtype.element_ty)
            if UPCAST:
                dsq = dsq.to(tl.float32)
            dk += tl.dot(dsq, tl.trans(qt), input_precision=DOT_PREC)
        return dk, dv

    @triton.jit(do_not_specialize=["stride_db", "stride_kmb", "S_Q", "S_K"])
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DS, DE, KM,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                       stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                       stride_db, stride_kmb, H, H_KV, GROUP, S_Q, S_K, sm_scale, softcap,
                       window, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PAD: tl.constexpr,
                       EMPTY_UNIFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H_KV).to(tl.int64)
        hk = (pid_bh % H_KV).to(tl.int64)
        n0 = pid_n * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        tile = (cols < S_K)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn
                    + offs_d[None, :], mask=tile, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn
                    + offs_d[None, :], mask=tile, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        DS = DS + b * stride_db
        DE = DE + b * stride_db
        KM = KM + b * stride_kmb
        keep_n = kept_keys(KM, cols, S_K, HAS_PAD)
        kv_lo, kv_hi, holes = key_span(KM, S_K, HAS_PAD, SCAN)
        lo, mid_lo, mid_hi, hi = query_range(n0, S_Q, S_K, window, DS, DE, kv_lo, kv_hi, holes,
                                              BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                              HAS_PAD)
        # Rows with no visible key see every key when they are uniform: the query blocks that
        # hold them, outside the blocks [lo, done) visited anyway.
        e_lo = S_Q * 0
        e_hi = S_Q * 0
        if EMPTY_UNIFORM:
            e_lo, e_hi = empty_rows_span(LSE + (b * H + hk * GROUP) * S_Q, S_Q, SCAN)
            e_lo = (e_lo // BLOCK_M) * BLOCK_M
        done = blocks_end(lo, hi, BLOCK_M)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            Qh = Q + b * stride_qb + h * stride_qh
            DOh = DO + b * stride_dob + h * stride_doh
            LSEh = LSE + (b * H + h) * S_Q
            DELTAh = DELTA + (b * H + h) * S_Q
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom,
                                  cols, keep_n, DS, DE, lo, mid_lo, S_Q, S_K, window, sm_scale,
                                  softcap, offs_d, HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW,
                                  HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST,
                                  DOT_PREC, EVEN_D)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom,
                                  cols, keep_n, DS, DE, mid_lo, mid_hi, S_Q, S_K, window,
                                  sm_scale, softcap, offs_d, HEAD_DIM, BLOCK_M, False, CAUSAL,
                                  HAS_WINDOW, HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP,
                                  UPCAST, DOT_PREC, EVEN_D)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom,
                                  cols, keep_n, DS, DE, mid_hi, hi, S_Q, S_K, window, sm_scale,
                                  softcap, offs_d, HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW,
                                  HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST,
                                  DOT_PREC, EVEN_D)
            if EMPTY_UNIFORM:
                dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm,
                                      stride_dom, cols, keep_n, DS, DE, e_lo,
                                      tl.minimum(e_hi, lo), S_Q, S_K, window, sm_scale, softcap,
                                      offs_d, HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW,
                                      HAS_DOCS, HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST,
                                      DOT_PREC, EVEN_D)
                dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm,
                                      stride_dom, cols, keep_n, DS, DE, tl.maximum(e_lo, done),
                                      e_hi, S_Q, S_K, window, sm_scale, softcap, offs_d,
                                      HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                      HAS_PAD, EMPTY_UNIFORM, HAS_SOFTCAP, UPCAST, DOT_PREC,
                                      EVEN_D)
        tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn
                 + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=tile)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile)


# ---------------------------------------------------------------- launcher


def flash_attention_backward_triton(dout, q, k, v, out, lse, doc_ids, scale, causal, window,
                                    softcap, key_mask=None, empty_rows_uniform=False, dq=None,
                                    dk=None, dv=None):
    """Launch both backward kernels; ``dq``/``dk``/``dv`` may be given (tests poison them)."""
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    B, H, S_Q, D = q.shape
    S_K, H_KV = k.shape[2], k.shape[1]
    dq = _buffers.empty_like(q) if dq is None else dq
    dk = _buffers.empty_like(k) if dk is None else dk
    dv = _buffers.empty_like(v) if dv is None else dv
    delta = _buffers.empty((B, H, S_Q), torch.float32, q.device)
    cfg = kernel_config(D, q.dtype, q.is_cuda)
    ds, de, stride_db = doc_args(doc_ids, q)
    km, stride_kmb = key_mask_args(key_mask, q)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), HAS_WINDOW=window > 0,
                 HAS_DOCS=doc_ids is not None, HAS_PAD=key_mask is not None,
                 EMPTY_UNIFORM=bool(empty_rows_uniform), HAS_SOFTCAP=softcap > 0,
                 UPCAST=not q.is_cuda, DOT_PREC=dot_precision(q.dtype), EVEN_D=block_d(D) == D,
                 num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    scalars = (float(scale), float(softcap) or 1.0, int(window))
    launch(_attn_bwd_dq)[(cdiv(S_Q, cfg["dq_m"]), B * H)](
        q, k, v, out, dout, lse, delta, dq, ds, de, km,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        stride_db, stride_kmb, H, H // H_KV, S_Q, S_K, *scalars,
        BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], **flags)
    launch(_attn_bwd_dkdv)[(cdiv(S_K, cfg["dkv_n"]), B * H_KV)](
        q, k, v, dout, lse, delta, dk, dv, ds, de, km,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        stride_db, stride_kmb, H, H_KV, H // H_KV, S_Q, S_K, *scalars,
        BLOCK_M=cfg["dkv_m"], BLOCK_N=cfg["dkv_n"], **flags)
    return dq, dk, dv


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def flash_attention_backward_reference(dout, q, k, v, out, lse, doc_ids, scale, causal, window,
                                       softcap, key_mask=None, empty_rows_uniform=False,
                                       sinks=None):
    B, H, S_Q, D = q.shape
    H_KV = k.shape[1]
    group = H // H_KV
    p, t, _lse = probabilities(q, k, scale, causal, window, softcap, doc_ids, key_mask,
                                empty_rows_uniform, sinks)
    do = dout.float()
    vf = v.float().repeat_interleave(group, 1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1.0 - t * t)
    dq = torch.matmul(ds, k.float().repeat_interleave(group, 1)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    fold = lambda g: g.reshape(B, H_KV, group, *g.shape[2:]).sum(2)  # noqa: E731
    grads = []
    for like, g in ((q, dq), (k, fold(dk)), (v, fold(dv))):
        buf = torch.empty_like(like)
        buf.copy_(g)
        grads.append(buf)
    return tuple(grads)


# ---------------------------------------------------------------- the custom op


@torch.library.custom_op("fastlora::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, doc_ids: Optional[Tensor], scale: float, causal: bool,
                             window: int, softcap: float, key_mask: Optional[Tensor] = None,
                             empty_rows_uniform: bool = False,
                             sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv. ``sinks`` only for the reference, which recomputes lse; the kernels read the
    forward's lse, which already holds the sinks (flash_attention.py)."""
    validate(q, k, v, doc_ids, window, softcap, key_mask, sinks)
    args = (dout, q, k, v, out, lse, doc_ids, scale, causal, window, softcap, key_mask,
            empty_rows_uniform)
    if use_triton(q):
        return flash_attention_backward_triton(*args)
    return flash_attention_backward_reference(*args, sinks)


@flash_attention_backward.register_fake
def _(dout, q, k, v, out, lse, doc_ids, scale, causal, window, softcap, key_mask=None,
      empty_rows_uniform=False, sinks=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
