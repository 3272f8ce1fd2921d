"""SwiGLU, ``silu(gate) * up``: ``torch.ops.fastlora.swiglu``.

Math, elementwise, in float32 whatever the storage dtype (rounded once, at the store):

    s = sigmoid(g) = 1 / (1 + exp(-g))          y  = g * s * u
    dg = dy * u * s * (1 + g * (1 - s))         du = dy * g * s

Memory: the unfused graph keeps silu(g) (and g, u) for backward, three [tokens, ffn] tensors;
the fused op keeps only g and u, which the LoRA/linear backward around it holds anyway, and
recomputes the activation in backward. Inputs may be row-strided views (the chunk halves of
swiglu_packed.py); the kernel reads them in place. Nothing is written into an input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import HAVE_TRITON, check_float, check_same_device, require, use_triton
from ._launch import fused_op
from ._glu_tiles import launch_backward, launch_forward

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._glu_tiles import load_f32, store, tile

    @triton.jit(do_not_specialize=["M"])
    def _swiglu_fwd(G, U, Y, stride_g, stride_u, stride_y, M, N,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = tile(M, N, BLOCK_M, BLOCK_N)
        g = load_f32(G, stride_g, rows, cols, mask)
        u = load_f32(U, stride_u, rows, cols, mask)
        s = 1.0 / (1.0 + tl.exp(-g))
        store(Y, stride_y, rows, cols, mask, g * s * u)

    @triton.jit(do_not_specialize=["M"])
    def _swiglu_bwd(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, M, N,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = tile(M, N, BLOCK_M, BLOCK_N)
        dy = load_f32(DY, stride_dy, rows, cols, mask)
        g = load_f32(G, stride_g, rows, cols, mask)
        u = load_f32(U, stride_u, rows, cols, mask)
        s = 1.0 / (1.0 + tl.exp(-g))
        store(DG, stride_dg, rows, cols, mask, dy * u * s * (1.0 + g * (1.0 - s)))
        store(DU, stride_du, rows, cols, mask, dy * g * s)


def _validate(gate: Tensor, up: Tensor) -> None:
    check_float("gate", gate)
    check_float("up", up)
    check_same_device(gate=gate, up=up)
    require(gate.shape == up.shape, f"fastlora.swiglu: gate and up must have one shape, got "
                                    f"{tuple(gate.shape)} and {tuple(up.shape)}")
    require(gate.dtype == up.dtype, f"fastlora.swiglu: gate and up must have one dtype, got "
                                    f"{gate.dtype} and {up.dtype}")


# ---------------------------------------------------------------- launchers

# Dense inputs: one flat stream, (elements per program, num_warps). H200, 8192 x 14336 bf16
# (benchmarks/tune_glu.py --layout): forward 4362 GB/s (inductor 4359, the [tokens, ffn] tiles
# 4265), backward 4300 (inductor 2704).
FLAT = (1024, 4)


def swiglu_forward_triton(gate, up, y=None):
    return launch_forward(_swiglu_fwd, FLAT, gate, up, y)


def swiglu_backward_triton(dy, gate, up, dgate=None, dup=None):
    """d gate and d up; they may be two views of one buffer (the packed op passes its halves)."""
    return launch_backward(_swiglu_bwd, FLAT, dy, gate, up, dgate, dup)


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


# The reference kernels return contiguous tensors, as the Triton launchers and the fake kernels
# do: elementwise PyTorch keeps a transposed input's strides, which would differ from the strides
# the graph was traced with.


def swiglu_forward_reference(gate, up):
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype).contiguous()


def swiglu_backward_reference(dy, gate, up):
    g, u, d = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    return ((d * u * s * (1 + g * (1 - s))).to(gate.dtype).contiguous(),
            (d * g * s).to(up.dtype).contiguous())


# ---------------------------------------------------------------- the custom ops


@fused_op("fastlora::swiglu")
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, computed in float32; saves only gate and up for backward."""
    _validate(gate, up)
    if use_triton(gate):
        return swiglu_forward_triton(gate, up)
    return swiglu_forward_reference(gate, up)


@swiglu.register_fake
def _(gate, up):
    _validate(gate, up)
    return gate.new_empty(gate.shape)


@fused_op("fastlora::swiglu_backward")
def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(gate):
        return swiglu_backward_triton(dy, gate, up)
    return swiglu_backward_reference(dy, gate, up)


@swiglu_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return torch.ops.fastlora.swiglu_backward(dy, gate, up)


swiglu.register_autograd(_backward, setup_context=_setup)
