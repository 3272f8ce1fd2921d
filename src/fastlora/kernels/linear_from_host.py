"""A frozen linear layer whose weight lives in pinned host memory: ``torch.ops.fastlora.linear_from_host``.

Math, for inputs x (... x H) and a frozen weight W (V x H), no bias:

    y  = x W^T                (F.linear, computed by cuBLAS on x's device)
    dx = dy W                 (no dW: the weight is frozen; the op refuses one that requires grad)

Memory: W stays in pinned host memory (host_lm_head.py moves a frozen, untied lm_head there):
its GPU copy exists only while the op runs, made by _host_weights.on_device (the copy
host_lm_head.py prefetched on a side stream before the call, or one made now). Llama-3-8B's
lm_head is 128256 x 4096 bfloat16, 0.98 GiB of GPU memory that is no longer held through the
backward, where a checkpointed step peaks. What it costs is the copy over the host link (1 GiB
a step, overlapped with the layers' forward when prefetched). When the loss is fused
(patterns/linear_cross_entropy.py) the fused op takes the weight from host memory itself and
this op's backward never runs; unfused, the backward copies the weight a second time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_float, require
from ._host_weights import check_reachable, on_device


def _validate(x: Tensor, weight: Tensor) -> None:
    check_float("x", x)
    check_float("weight", weight)
    require(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
            f"fastlora.linear_from_host: weight must have shape (out, {x.shape[-1]}) to match "
            f"the last dimension of x, got {tuple(weight.shape)}")
    require(x.dtype == weight.dtype,
            f"fastlora.linear_from_host: x ({x.dtype}) and weight ({weight.dtype}) must have the "
            "same dtype", TypeError)
    require(not weight.requires_grad, "fastlora.linear_from_host: the weight requires grad; "
            "only a frozen weight is read from host memory (the op computes no weight gradient)",
            RuntimeError)
    check_reachable("linear_from_host", "the weight", weight, x.device)


@torch.library.custom_op("fastlora::linear_from_host", mutates_args=())
def linear_from_host(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` on x's device, the weight on that device or in pinned host
    memory."""
    _validate(x, weight)
    return F.linear(x, on_device(weight, x.device))


@linear_from_host.register_fake
def _(x, weight):
    _validate(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastlora::linear_from_host_backward", mutates_args=())
def linear_from_host_backward(grad: Tensor, weight: Tensor) -> Tensor:
    """dx = grad @ W, the weight brought to grad's device again."""
    return torch.matmul(grad, on_device(weight, grad.device))


@linear_from_host_backward.register_fake
def _(grad, weight):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])  # the host weight: no GPU memory held


def _backward(ctx, grad):
    (weight,) = ctx.saved_tensors
    return torch.ops.fastlora.linear_from_host_backward(grad, weight), None


linear_from_host.register_autograd(_backward, setup_context=_setup_context)
