"""SwiGLU of the two halves of one tensor: ``torch.ops.fastlora.swiglu_packed``.

``swiglu_packed(x)`` is ``swiglu`` (kernels/swiglu.py: the math, the kernels) with gate and up
the two halves of one tensor (Phi-3's ``gate_up_proj`` output, ``gate, up = x.chunk(2, -1)``):
the kernels read the halves in place as row-strided views, and the backward writes d gate and
d up straight into the two halves of one d x buffer, so autograd needs no ``cat`` of the two.

Memory: as swiglu, x is kept for backward (the halves' storage) and the activation recomputed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers
from ._common import check_float, require, use_triton
from .swiglu import (swiglu_backward_reference, swiglu_backward_triton, swiglu_forward_reference,
                     swiglu_forward_triton)


def _validate_packed(x: Tensor) -> None:
    check_float("x", x)
    require(x.dim() >= 1 and x.shape[-1] % 2 == 0,
            f"fastlora.swiglu_packed: the last dimension must be even, got {tuple(x.shape)}")


# ---------------------------------------------------------------- launchers (swiglu's kernels)


def _halves(x: Tensor):
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def swiglu_packed_forward_triton(x, y=None):
    g, u = _halves(x)
    return swiglu_forward_triton(g, u, y)


def swiglu_packed_backward_triton(dy, x, dx=None):
    if dx is None:
        dx = _buffers.empty(x.shape, x.dtype, x.device)
    g, u = _halves(x)
    dg, du = _halves(dx)
    swiglu_backward_triton(dy, g, u, dg, du)
    return dx


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def swiglu_packed_backward_reference(dy, x):
    return torch.cat(swiglu_backward_reference(dy, *_halves(x)), -1)


# ---------------------------------------------------------------- the custom op


# Opaque on every device: its gate and up are column halves of one tensor (rows with gaps),
# which inductor could hand a kernel as compact copies (kernels/_launch.py).
@torch.library.custom_op("fastlora::swiglu_packed", mutates_args=())
def swiglu_packed(x: Tensor) -> Tensor:
    """silu(x[..., :n]) * x[..., n:] with n = x.shape[-1] // 2 (Phi-3's gate_up_proj)."""
    _validate_packed(x)
    if use_triton(x):
        return swiglu_packed_forward_triton(x)
    return swiglu_forward_reference(*_halves(x))


@swiglu_packed.register_fake
def _(x):
    _validate_packed(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fastlora::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward(dy: Tensor, x: Tensor) -> Tensor:
    if use_triton(x):
        return swiglu_packed_backward_triton(dy, x)
    return swiglu_packed_backward_reference(dy, x)


@swiglu_packed_backward.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.fastlora.swiglu_packed_backward(dy, x)


swiglu_packed.register_autograd(_backward, setup_context=_setup)
