"""Attention, GQA 32/8 heads, head dim 128, seq 2k / 8k / 32k (16k tokens per batch): the Triton
flash-attention op against what a model runs without fastlora.

    causal        vs SDPA is_causal (cuDNN / flash): decides the dispatch rule in
                  patterns/attention.py (`choose_kernel`: plain causal stays SDPA)
    window W      vs SDPA with HF's explicit sliding-window mask and repeated k/v (Mistral)
    documents     vs SDPA with HF's explicit packed-document mask and repeated k/v
    softcap 50    vs flex_attention with a softcap score_mod, compiled (SDPA cannot softcap;
                  HF runs Gemma 2 eagerly, which at these lengths does not fit in memory)
    right / left pad   rows padded by 0, 1/4, 1/2, 3/4 of their length (cycled over the batch),
                  vs SDPA with HF's padding mask and repeated k/v (what runs unfused); the
                  right-padded rows also vs SDPA is_causal, exact on the real rows only, which
                  tells whether that dispatch (unprovable in the graph, see choose_kernel)
                  would be worth a runtime proof; "left pad uniform" is eager attention's
                  padding (rows that see nothing attend to every key) vs SDPA with HF's
                  additive mask, 2k and 8k only

TFLOP/s count only the visible (query, key) pairs: forward 4 * B * H * D * pairs, backward
2.5 x that (five matmuls instead of two), so an implementation that computes masked-out blocks
shows it as a lower rate. ``FASTLORA_ATTENTION_SWEEP=1`` adds block-size variants of the
Triton kernel at 8k (their "eager" column is the default configuration).
"""
import os

import torch
import torch.nn.functional as F

from . import Case

H, H_KV, D = 32, 8, 128
TOKENS = 16384
SOFTCAP = 50.0
DOC_LENGTHS = [1536, 512, 1024, 256, 768, 2048, 128, 1920]  # cycled to fill each row


def _doc_ids(batch, seq):
    ids, doc, at = torch.empty(seq, dtype=torch.long), 0, 0
    while at < seq:
        n = DOC_LENGTHS[doc % len(DOC_LENGTHS)]
        ids[at:at + n] = doc
        at, doc = at + n, doc + 1
    return ids.cuda()[None].expand(batch, -1).contiguous()


def _pairs(seq, window=0, doc_ids=None):
    """Visible (query, key) pairs of one row (causal)."""
    if doc_ids is not None:
        lengths = torch.unique_consecutive(doc_ids[0], return_counts=True)[1].double()
        return int((lengths * (lengths + 1) / 2).sum())
    if window and window < seq:
        return window * (window + 1) // 2 + (seq - window) * window
    return seq * (seq + 1) // 2


PAD_FRACTIONS = [0, 0.25, 0.5, 0.75]  # of each row's length, cycled over the batch


def _key_mask(batch, seq, side):
    """HF's 2-D attention_mask, int64: 1 on the real tokens."""
    keep = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        pads = int(seq * PAD_FRACTIONS[b % len(PAD_FRACTIONS)])
        if side == "right":
            keep[b, seq - pads:] = 0
        else:
            keep[b, :pads] = 0
    return keep.cuda()


def _padded_pairs(key_mask, side, uniform=False):
    """Visible (query, key) pairs per row, averaged over the batch (causal): L real tokens see
    L(L+1)/2; right pads each see the L real keys; left pads see none, or all S keys when
    uniform (eager's additive mask)."""
    seq, total = key_mask.shape[1], 0
    for L in key_mask.sum(1).tolist():
        total += L * (L + 1) // 2
        if side == "right":
            total += (seq - L) * L
        elif uniform:
            total += (seq - L) * seq
    return total // key_mask.shape[0]


def _mask(seq, window=0, doc_ids=None, key_mask=None):
    """The boolean mask HF builds for SDPA: (B or 1, 1, S, S)."""
    i = torch.arange(seq, device="cuda")
    m = i[None, :] <= i[:, None]
    if window:
        m &= i[None, :] > i[:, None] - window
    m = m[None, None]
    if doc_ids is not None:
        m = m & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_mask is not None:
        m = m & key_mask.bool()[:, None, None, :]
    return m


def _additive(mask, dtype):
    """HF's eager mask: 0 where visible, the dtype's minimum elsewhere."""
    return torch.where(mask, torch.zeros((), device="cuda", dtype=dtype), torch.finfo(dtype).min)


def _qkv(batch, seq, dtype):
    """Leaves laid out as HF's projections give them: (B, S, heads, D)."""
    q = torch.randn(batch, seq, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq, H_KV, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seq, H_KV, D, device="cuda", dtype=dtype, requires_grad=True)
    return {"q": q, "k": k, "v": v}


def _heads_first(q, k, v):
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def sdpa_causal(q, k, v, **_):
    q, k, v = _heads_first(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_masked(q, k, v, mask=None, **_):
    """HF's masked SDPA path: k/v repeated to every query head, an explicit mask."""
    q, k, v = _heads_first(q, k, v)
    k, v = (t.repeat_interleave(H // H_KV, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fastlora(q, k, v, window=0, softcap=0.0, doc_ids=None, config=None, key_mask=None,
             uniform=False, **_):
    from fastlora.kernels import tuning
    q, k, v = _heads_first(q, k, v)
    with tuning.override("flash_attention", **(config or {})):
        return torch.ops.fastlora.flash_attention(q, k, v, doc_ids, D ** -0.5, True, window,
                                                  softcap, key_mask, uniform)[0]


_FLEX = {}


def flex_softcap(q, k, v, block_mask=None, **_):
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)

    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    q, k, v = _heads_first(q, k, v)
    return _FLEX["fn"](q, k, v, score_mod=softcap, block_mask=block_mask, enable_gqa=True)


def _causal_block_mask(seq):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seq, seq,
                             device="cuda")


def cases(dtype=torch.bfloat16):
    out = []
    for seq in (2048, 8192, 32768):
        batch = max(1, TOKENS // seq)
        window = 1024 if seq <= 2048 else 4096

        def case(name, eager, extra, pairs, seq=seq, batch=batch, fast=fastlora):
            def make():
                return {**_qkv(batch, seq, dtype), **extra()}
            flops = 4 * batch * H * D * pairs
            out.append(Case("attention", f"s{seq} b{batch} {name}", make, eager, fast,
                            flops_fwd=flops, flops_bwd=int(2.5 * flops), inductor=False))

        case("causal", sdpa_causal, dict, _pairs(seq))
        case(f"window {window}", sdpa_masked,
             lambda seq=seq, w=window: {"mask": _mask(seq, w), "window": w},
             _pairs(seq, window))
        docs = _doc_ids(batch, seq)
        case("documents", sdpa_masked,
             lambda seq=seq, d=docs: {"mask": _mask(seq, 0, d), "doc_ids": d},
             _pairs(seq, 0, docs))
        case(f"softcap {SOFTCAP:g} vs flex", flex_softcap,
             lambda seq=seq: {"block_mask": _causal_block_mask(seq), "softcap": SOFTCAP},
             _pairs(seq))
        for side in ("right", "left"):
            km = _key_mask(batch, seq, side)
            case(f"{side} pad", sdpa_masked,
                 lambda seq=seq, km=km: {"mask": _mask(seq, 0, None, km), "key_mask": km},
                 _padded_pairs(km, side))
            if side == "right":
                case("right pad vs is_causal", sdpa_causal, lambda km=km: {"key_mask": km},
                     _padded_pairs(km, side))
            elif seq <= 8192:
                case("left pad uniform", sdpa_masked,
                     lambda seq=seq, km=km: {"mask": _additive(_mask(seq, 0, None, km), dtype),
                                             "key_mask": km, "uniform": True},
                     _padded_pairs(km, side, uniform=True))
        if os.environ.get("FASTLORA_ATTENTION_SWEEP") == "1" and seq == 8192:
            for fwd_m, fwd_n, warps, stages in ((128, 64, 4, 3), (128, 128, 8, 3),
                                                (64, 64, 4, 3), (128, 64, 8, 4)):
                for bwd_m, bwd_n, bwd_warps in ((64, 64, 4), (32, 128, 8), (128, 128, 8)):
                    cfg = dict(fwd_m=fwd_m, fwd_n=fwd_n, fwd_warps=warps, fwd_stages=stages,
                               dq_m=bwd_n, dq_n=bwd_m, dkv_m=bwd_m, dkv_n=bwd_n,
                               bwd_warps=bwd_warps)
                    case(f"window {window} cfg {cfg}", fastlora,
                         lambda seq=seq, w=window: {"window": w}, _pairs(seq, window),
                         fast=lambda cfg=cfg, **kw: fastlora(**kw, config=cfg))
    return out
