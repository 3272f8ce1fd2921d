"""GeGLU, ``gelu(gate) * up`` (Gemma's MLP): ``torch.ops.fastlora.geglu``.

Math, elementwise, in float32 whatever the storage dtype (rounded once, at the store), with
``approximate`` = "tanh" (Gemma's ``gelu_pytorch_tanh``) or "none" (exact, erf):

    tanh:  z = k (g + 0.044715 g^3), k = sqrt(2 / pi),  t = tanh(z),  a = 0.5 g (1 + t)
           a' = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 * 0.044715 g^2)
    none:  c = 0.5 (1 + erf(g / sqrt(2))),  a = g c,  a' = c + g exp(-g^2 / 2) / sqrt(2 pi)
    y = a u        dg = dy u a'        du = dy a

tanh is written from ``exp`` (the Triton interpreter has no libdevice), and only the two
combinations the formulas need are formed, from e = exp(-2|z|) in (0, 1] (never overflows):
1 + t = 2 / (1 + e) for z >= 0 and 2e / (1 + e) for z < 0, 1 - t^2 = 4e / (1 + e)^2. Neither
cancels, so the tanh GELU is accurate to a few ulps relative everywhere, also in the negative
tail. erf is ``tl.math.erf`` (a core Triton op: libdevice's erff on the GPU, ``math.erf`` under
the interpreter); 1 + erf(x) cancels for x << 0 exactly as in PyTorch's own formula (absolute
error about 1e-7 |g| there, where gelu(g) itself is below 1e-6 |g|).

Memory: the unfused graph keeps gelu(g) besides g and u; the fused op keeps only g and u and
recomputes the activation in backward. Nothing is written into an input.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import HAVE_TRITON, check_float, check_same_device, require, use_triton
from ._launch import fused_op
from ._glu_tiles import launch_backward, launch_forward

APPROXIMATIONS = ("tanh", "none")
_K = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._glu_tiles import load_f32, store, tile

    @triton.jit
    def _gelu_and_grad(g, TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
        """(gelu(g), gelu'(g)); the second is 0 unless NEED_GRAD."""
        if TANH:
            k = 0.7978845608028654  # sqrt(2 / pi)
            z = k * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: never overflows
            r = 1.0 / (1.0 + e)
            one_plus_t = 2.0 * tl.where(z < 0, e, 1.0) * r  # 1 + tanh(z), no cancellation
            a = 0.5 * g * one_plus_t
            da = 0.0 * g
            if NEED_GRAD:
                one_minus_t2 = 4.0 * e * r * r  # 1 - tanh(z)^2
                da = 0.5 * one_plus_t + 0.5 * g * one_minus_t2 * k * (1.0 + 0.134145 * g * g)
        else:
            c = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            a = g * c
            da = 0.0 * g
            if NEED_GRAD:
                da = c + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return a, da

    @triton.jit(do_not_specialize=["M"])
    def _geglu_fwd(G, U, Y, stride_g, stride_u, stride_y, M, N, TANH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = tile(M, N, BLOCK_M, BLOCK_N)
        g = load_f32(G, stride_g, rows, cols, mask)
        u = load_f32(U, stride_u, rows, cols, mask)
        a, _ = _gelu_and_grad(g, TANH, False)
        store(Y, stride_y, rows, cols, mask, a * u)

    @triton.jit(do_not_specialize=["M"])
    def _geglu_bwd(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, M, N,
                   TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask = tile(M, N, BLOCK_M, BLOCK_N)
        dy = load_f32(DY, stride_dy, rows, cols, mask)
        g = load_f32(G, stride_g, rows, cols, mask)
        u = load_f32(U, stride_u, rows, cols, mask)
        a, da = _gelu_and_grad(g, TANH, True)
        store(DG, stride_dg, rows, cols, mask, dy * u * da)
        store(DU, stride_du, rows, cols, mask, dy * a)


def _validate(gate: Tensor, up: Tensor, approximate: str) -> None:
    check_float("gate", gate)
    check_float("up", up)
    check_same_device(gate=gate, up=up)
    require(approximate in APPROXIMATIONS,
            f"fastlora.geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    require(gate.shape == up.shape, f"fastlora.geglu: gate and up must have one shape, got "
                                    f"{tuple(gate.shape)} and {tuple(up.shape)}")
    require(gate.dtype == up.dtype, f"fastlora.geglu: gate and up must have one dtype, got "
                                    f"{gate.dtype} and {up.dtype}")


# ---------------------------------------------------------------- launchers

# Dense inputs: one flat stream, (elements per program, num_warps). H200, tanh GeGLU 8192 x 9216
# bf16 (benchmarks/tune_glu.py --layout): forward 4308 GB/s at 2048/4 (1024/4: 4133; inductor
# 4356; the [tokens, ffn] tiles 4103); the more arithmetic per element wants more in flight.
FLAT = (2048, 4)


def geglu_forward_triton(gate, up, approximate, y=None):
    return launch_forward(_geglu_fwd, FLAT, gate, up, y, TANH=approximate == "tanh")


def geglu_backward_triton(dy, gate, up, approximate, dgate=None, dup=None):
    return launch_backward(_geglu_bwd, FLAT, dy, gate, up, dgate, dup, TANH=approximate == "tanh")


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def _gelu_and_grad_reference(g: Tensor, approximate: str):
    if approximate == "tanh":
        t = torch.tanh(_K * (g + 0.044715 * g.pow(3)))
        a = 0.5 * g * (1 + t)
        da = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _K * (1 + 3 * 0.044715 * g * g)
    else:
        c = 0.5 * (1 + torch.erf(g * _INV_SQRT2))
        a = g * c
        da = c + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return a, da


def geglu_forward_reference(gate, up, approximate):
    # contiguous, as the Triton launchers and the fake kernels return it
    a, _ = _gelu_and_grad_reference(gate.float(), approximate)
    return (a * up.float()).to(gate.dtype).contiguous()


def geglu_backward_reference(dy, gate, up, approximate):
    a, da = _gelu_and_grad_reference(gate.float(), approximate)
    d, u = dy.float(), up.float()
    return (d * u * da).to(gate.dtype).contiguous(), (d * a).to(up.dtype).contiguous()


# ---------------------------------------------------------------- the custom ops


@fused_op("fastlora::geglu")
def geglu(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    """gelu(gate, approximate) * up, computed in float32; saves only gate and up."""
    _validate(gate, up, approximate)
    if use_triton(gate):
        return geglu_forward_triton(gate, up, approximate)
    return geglu_forward_reference(gate, up, approximate)


@geglu.register_fake
def _(gate, up, approximate):
    _validate(gate, up, approximate)
    return gate.new_empty(gate.shape)


@fused_op("fastlora::geglu_backward")
def geglu_backward(dy: Tensor, gate: Tensor, up: Tensor,
                   approximate: str) -> tuple[Tensor, Tensor]:
    if use_triton(gate):
        return geglu_backward_triton(dy, gate, up, approximate)
    return geglu_backward_reference(dy, gate, up, approximate)


@geglu_backward.register_fake
def _(dy, gate, up, approximate):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, approximate = inputs
    ctx.save_for_backward(gate, up)
    ctx.approximate = approximate


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.fastlora.geglu_backward(dy, gate, up, ctx.approximate)
    return dgate, dup, None


geglu.register_autograd(_backward, setup_context=_setup)
