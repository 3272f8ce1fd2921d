"""PyTorch's flash attention (CUDA) as one opaque op: ``torch.ops.fastlora.sdpa_flash``.

Math: plain causal (or full) attention, o = softmax(scale * q k^T [+ causal -inf]) v, with
GQA read natively (k/v keep their own heads). The kernels are PyTorch's own
(``aten._scaled_dot_product_flash_attention`` and its backward); this file adds no kernel.

Why an op of our own: the attention pattern sends plain causal attention in a graph whose
sequence length is symbolic (a dynamic graph, ``compile_for_trainer``'s default) to the flash
backend, because SDPA would pick cuDNN there, which builds an execution graph for every new
length (127 ms per new length at the Llama-1B shape on the H200). Called as the aten op inside
the graph, flash returns the maximum sequence lengths as integers; on the H200 (torch 2.11)
that specialised the compiled graph on the length, one recompile per new length
(``test_gpu_varying_lengths_run_on_flash_not_cudnn``: three graphs for three lengths). Opaque,
the op returns only tensors, whose sizes stay symbolic: one graph for every length.

Memory: the forward keeps q, k, v, o and one float32 per query row (lse), as flash itself
does; the S x S scores never exist. Dropout is always 0 (the pattern refuses dropout), so the
random-number state the backward receives is never read; it is passed through as flash made it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.device.type != "cuda":
        raise ValueError(f"fastlora.sdpa_flash runs PyTorch's CUDA flash kernels; got a tensor "
                         f"on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash attention takes bfloat16 or float16 q, k, v of one dtype; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("fastlora::sdpa_flash", mutates_args=())
def sdpa_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool,
               scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, lse, philox_seed, philox_offset); only ``out`` is the attention."""
    _validate(q, k, v)
    out, lse, _cq, _ck, _mq, _mk, seed, offset, _debug = \
        torch.ops.aten._scaled_dot_product_flash_attention.default(
            q, k, v, 0.0, causal, False, scale=scale)
    return out, lse, seed, offset


@sdpa_flash.register_fake
def _(q, k, v, causal, scale):
    _validate(q, k, v)
    B, H, S, _ = q.shape
    return (torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32),
            q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64))


@torch.library.custom_op("fastlora::sdpa_flash_backward", mutates_args=())
def sdpa_flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        seed: Tensor, offset: Tensor, causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    S_q, S_k = q.shape[2], k.shape[2]  # concrete here: the op is opaque to the compiler
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
        dout.contiguous(), q, k, v, out, lse, None, None, S_q, S_k, 0.0, causal, seed, offset,
        scale=scale)
    return dq, dk, dv


@sdpa_flash_backward.register_fake
def _(dout, q, k, v, out, lse, seed, offset, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse, seed, offset = output
    ctx.save_for_backward(q, k, v, out, lse, seed, offset)
    ctx.params = (causal, scale)


def _backward(ctx, dout, _dlse, _dseed, _doffset):
    q, k, v, out, lse, seed, offset = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastlora.sdpa_flash_backward(dout, q, k, v, out, lse, seed, offset,
                                                        *ctx.params)
    return dq, dk, dv, None, None


sdpa_flash.register_autograd(_backward, setup_context=_setup_context)
