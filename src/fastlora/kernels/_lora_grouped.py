"""Several LoRA branches on one input x (q/k/v: kernels/lora_qkv.py; gate/up:
kernels/lora_mlp.py): the A matrices are stacked into one A_cat, so one pass over x computes
every branch's rank-r product, each with its own dropout mask (slot j), and dx is one buffer.

    xa = dropout_j(x) @ A_cat^T / (1 - p)                          [M, r_1 + ... + r_G]
    dx = sum_j g_j @ W_j  +  dropout-backward(sum_j da_j @ A_j)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import use_triton
from ._lora_blocks import (lora_down_reference, lora_down_triton, lora_grad_x_reference,
                           lora_grad_x_triton)


def grouped_down(x2, lora_As, seed, p):
    """xa [M, sum r] for adapters sharing x, each with its own dropout slot."""
    ranks = [a.shape[0] for a in lora_As]
    a_cat = torch.cat(lora_As, 0)
    if use_triton(x2):
        return lora_down_triton(x2, a_cat, seed, p, ranks=ranks), a_cat, ranks
    return lora_down_reference(x2, a_cat, seed, p, ranks=ranks), a_cat, ranks


def grouped_dx(grads, x2, weights, da, a_cat, ranks, seed, p, needs_dx):
    """dx = sum_j g_j @ W_j (one cuBLAS buffer) + the adapters' part; dA_cat (float32)."""
    dx = None
    if needs_dx:
        dx = grads[0] @ weights[0]
        for g, w in zip(grads[1:], weights[1:]):
            dx.addmm_(g, w)  # our own buffer: cuBLAS accumulates with beta = 1
    fn = lora_grad_x_triton if use_triton(x2) else lora_grad_x_reference
    return fn(x2, da, a_cat, seed, p, dx=dx, accumulate=True, ranks=ranks)


def split_ranks(t: Tensor, ranks, dim):
    return list(torch.split(t, ranks, dim))
