"""The row step of the fused lm_head + cross-entropy (linear_cross_entropy.py): for each row of
a chunk of logits, the loss (online max and sum-exp over the vocabulary) and, when asked, the
gradient of the loss with respect to the logits, written over them in place. In Triton
(``_ce_rows``, one program per row) and in plain PyTorch (``ce_rows_reference``, the CPU
kernel); the math (logit scale, softcap, rounding of each step) is in linear_cross_entropy.py.
"""
from __future__ import annotations

import torch

from . import tuning
from ._common import HAVE_TRITON, next_power_of_2
from ._launch import launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(t):
        # tanh without libdevice: an odd series near 0 (where 1 - exp(-2|t|) cancels), else
        # (1 - e) / (1 + e) with e = exp(-2|t|), which never overflows.
        a = tl.abs(t)
        a2 = a * a
        series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        e = tl.exp(-2.0 * a)
        r = tl.where(a < 0.2, series, (1.0 - e) / (1.0 + e))
        return tl.where(t < 0, -r, r)

    @triton.jit
    def _rounded(x, DTYPE: tl.constexpr, RNE_BY_HAND: tl.constexpr):
        # float32 -> DTYPE, rounding to nearest even. The Triton interpreter truncates when it
        # casts float32 to bfloat16 (the GPU rounds), so there the rounding is done on the bits
        # first and the cast is exact.
        if RNE_BY_HAND and DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _logits(x, logit_scale, cap, SCALED: tl.constexpr, SOFTCAP: tl.constexpr,
                ROUND: tl.constexpr, DTYPE: tl.constexpr, RNE_BY_HAND: tl.constexpr):
        # Returns (z, tanh(u / c)) for the logits x: u = a * x, then z = c * tanh(u / c) (or
        # z = u, and tanh = u, unused, without softcap). With ROUND each step is rounded to
        # DTYPE, as eager PyTorch does when these steps run on bf16/fp16 logits.
        if SCALED:
            x = x * logit_scale
            if ROUND:
                x = _rounded(x, DTYPE, RNE_BY_HAND).to(tl.float32)
        if SOFTCAP:
            return _softcap(x, cap, ROUND, DTYPE, RNE_BY_HAND)
        return x, x

    @triton.jit
    def _softcap(x, cap, ROUND: tl.constexpr, DTYPE: tl.constexpr, RNE_BY_HAND: tl.constexpr):
        # Returns (c * tanh(x / c), tanh(x / c)); with ROUND each step is rounded to DTYPE.
        t = x / cap
        if ROUND:
            t = _rounded(t, DTYPE, RNE_BY_HAND).to(tl.float32)
        th = _tanh(t)
        if ROUND:
            th = _rounded(th, DTYPE, RNE_BY_HAND).to(tl.float32)
        z = th * cap
        if ROUND:
            z = _rounded(z, DTYPE, RNE_BY_HAND).to(tl.float32)
        return z, th

    @triton.jit
    def _ce_rows(X, G, LABELS, LOSS, SCALE, stride_x, stride_g, V, ignore_index, cap,
                 logit_scale, SOFTCAP: tl.constexpr, SCALED: tl.constexpr, ROUND: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BY_HAND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        g_row = G + row * stride_g
        label = tl.load(LABELS + row).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        DTYPE: tl.constexpr = X.dtype.element_ty
        if label == ignore_index:
            tl.store(LOSS + row, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(G.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tl.store(g_row + offs, zero, mask=offs < V)
        else:
            in_range = (label >= 0) & (label < V)
            # Pass 1: online max and sum of exp over the vocabulary.
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                z = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                z, _th = _logits(z, logit_scale, cap, SCALED, SOFTCAP, ROUND, DTYPE, RNE_BY_HAND)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            zt = tl.load(x_row + label, mask=in_range, other=0.0).to(tl.float32)
            zt, _tht = _logits(zt, logit_scale, cap, SCALED, SOFTCAP, ROUND, DTYPE, RNE_BY_HAND)
            tl.store(LOSS + row, tl.where(in_range, lse - zt, float("nan")))
            # Pass 2: the gradient of the (scaled) loss w.r.t. the logits, over the logits.
            if WRITE_GRAD:
                scale = tl.load(SCALE)
                poison = tl.where(in_range, 0.0, float("nan"))
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    z = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                    z, th = _logits(z, logit_scale, cap, SCALED, SOFTCAP, ROUND, DTYPE,
                                    RNE_BY_HAND)
                    p = tl.exp(z - lse)
                    d = tl.where(offs == label, p - 1.0, p) * scale + poison
                    if SOFTCAP:
                        d = d * (1.0 - th * th)
                    if SCALED:
                        d = d * logit_scale
                    tl.store(g_row + offs, _rounded(d, G.dtype.element_ty, RNE_BY_HAND), mask=mask)


def ce_config(vocab: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernel."""
    override = tuning.get("linear_cross_entropy")["ce_tile"]
    if override is not None:
        return override
    block = next_power_of_2(vocab)
    if on_gpu:
        return min(block, 4096), 8
    return min(block, 1024), 4


def ce_rows_triton(x, labels, row_loss, scale, ignore_index, softcap, round_steps,
                   write_grad, block_v=None, logit_scale=1.0):
    """Per-row loss into ``row_loss``; with ``write_grad`` the logits ``x`` (rows x V, any
    float dtype, rows contiguous) are overwritten by their gradient times ``scale``."""
    rows, vocab = x.shape
    if rows == 0:
        return
    block, warps = ce_config(vocab, x.is_cuda)
    if block_v is not None:
        block = block_v
    launch(_ce_rows)[(rows,)](x, x, labels, row_loss, scale, x.stride(0), x.stride(0), vocab,
                      ignore_index, float(softcap) if softcap else 1.0, float(logit_scale),
                      SOFTCAP=bool(softcap), SCALED=logit_scale != 1.0, ROUND=bool(round_steps),
                      WRITE_GRAD=write_grad, BLOCK_V=block, RNE_BY_HAND=not x.is_cuda,
                      num_warps=warps)


def ce_rows_reference(x, labels, row_loss, scale, ignore_index, softcap, round_steps,
                      write_grad, block_v=None, logit_scale=1.0):
    """The same step in plain PyTorch (the CPU kernel)."""
    rows, vocab = x.shape
    rnd = (lambda t: t.to(x.dtype).float()) if round_steps else (lambda t: t)
    z = x.float()
    if logit_scale != 1.0:
        z = rnd(z * torch.tensor(logit_scale, dtype=torch.float32))
    th = None
    if softcap:
        th = rnd(torch.tanh(rnd(z / softcap)))
        z = rnd(th * softcap)
    lse = torch.logsumexp(z, dim=-1)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    zt = z.gather(1, safe[:, None])[:, 0]
    nan = torch.full_like(lse, float("nan"))
    row_loss.copy_(torch.where(ignored, torch.zeros_like(lse),
                               torch.where(in_range, lse - zt, nan)))
    if write_grad:
        d = torch.exp(z - lse[:, None])
        d[torch.arange(rows, device=x.device), safe] -= in_range.float()
        d = d * scale + torch.where(in_range, 0.0, float("nan"))[:, None]
        if th is not None:
            d = d * (1.0 - th * th)
        if logit_scale != 1.0:
            d = d * torch.tensor(logit_scale, dtype=torch.float32)
        x.copy_(torch.where(ignored[:, None], torch.zeros_like(d), d))
