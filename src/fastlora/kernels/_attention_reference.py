"""The PyTorch reference of the flash-attention kernels (flash_attention.py forward,
flash_attention_backward.py backward): which (query, key) pairs a causal / sliding-window /
packed-document / key-padded attention sees (documents as runs of equal ids), and the float32 probabilities the CPU path of both
directions computes from it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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


def visible_mask(S_Q: int, S_K: int, causal: bool, window: int, doc_ids: Optional[Tensor],
                 device, key_mask: Optional[Tensor] = None) -> Tensor:
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
    if key_mask is not None:
        vis = vis & (key_mask != 0)[:, None, None, :]
    return vis


def probabilities(q, k, scale, causal, window, softcap, doc_ids, key_mask=None,
                   empty_rows_uniform=False, sinks=None):
    """float32 probabilities (B, H, S_Q, S_K), the capped scores' tanh (or None), and lse
    (-inf on rows with no visible key, whose probabilities are 0, or 1 / S_K on every key when
    ``empty_rows_uniform``). ``sinks`` (H,): one more logit per head in each row's softmax,
    without a value: it joins lse, and the probabilities of the keys sum to less than 1."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    vis = visible_mask(q.shape[2], k.shape[2], causal, window, doc_ids, q.device, key_mask)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float()[None, :, None].expand_as(lse))
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: all zero
    if empty_rows_uniform:
        p = torch.where(torch.isneginf(lse)[..., None], 1.0 / k.shape[2], p)
    return p, t, lse
