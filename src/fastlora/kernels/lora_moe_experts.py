"""LoRA on the 3-D expert weights of a mixture-of-experts layer, forward and backward:
``torch.ops.fastlora.lora_moe_experts``.

peft (``LoraConfig(target_parameters=[...])``) adapts a stacked expert weight W [E, P, Q]
through a parametrization: every forward it builds W' = W + s * lhs @ rhs (``torch.baddbmm``,
lhs [E, P, r], rhs [E, r, Q]), and transformers' grouped experts forward multiplies the rows
routed to expert e (rows offs[e-1]:offs[e] of x, sorted by expert) with W'_e, transposed when W
is stored [E, out, in] (Qwen3-MoE, Mixtral: ``transposed=True``), as is when it is stored
[E, in, out] (gpt-oss). With W_e [in, out], A_e [in, r], B_e [r, out] the views of W, lhs, rhs in
the [in, out] orientation (A = rhs^T, B = lhs^T when transposed; A = lhs, B = rhs otherwise):

    xa_e = x_e @ A_e                       [n_e, r]
    y_e  = x_e @ W_e + s * xa_e @ B_e      [n_e, out]
backward, g = dy:
    gb_e = g_e @ B_e^T                     [n_e, r]
    dx_e = g_e @ W_e^T + s * gb_e @ A_e^T
    dA_e = s * x_e^T @ gb_e                [in, r]      (0 for an expert with no rows)
    dB_e = s * xa_e^T @ g_e                [r, out]

The base W is frozen: its gradient is never formed. Unfused, every step builds W' (the size of
the whole expert stack), keeps it for backward, forms dW' of the same size in backward and
reduces it to d lhs = dW' @ rhs^T, d rhs = lhs^T @ dW'. Here only x, the [S, r] xa and the rank
factors are kept (W is a parameter), and the adapter costs O(S r (in + out)) per product.

How the products run: bfloat16 tensors whose row strides allow it (in, out and r multiples of
8) go through ``torch._grouped_mm`` (one kernel per product, what transformers uses for the base
product; rows grouped by ``offs``, and K-grouped for dA and dB). Everything else (float32,
float16, odd sizes) runs one ``mm`` per expert, the adapter path in float32, like transformers'
own fallback for those dtypes (one host sync to read ``offs``). Numerics of the grouped path:
base, xa and the adapter product each rounded to bfloat16, summed in float32, rounded once; the
unfused model rounds the merged weight W' to bfloat16 instead, which loses most of the small
delta s * lhs @ rhs, so the fused output is the more accurate one.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import _buffers
from ._common import check_float, check_same_device, require


# ---------------------------------------------------------------- grouped products


def grouped_path(x: Tensor, in_features: int, out_features: int, rank: int) -> bool:
    """Whether ``torch._grouped_mm`` takes this call's products (decided from metadata only,
    so the fake kernel and the real one agree)."""
    return (x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and all(n % 8 == 0 for n in (in_features, out_features, rank)))


def _aligned(t: Tensor) -> Tensor:
    """``t`` as ``torch._grouped_mm`` reads it: one of the last two strides 1, the other a
    multiple of 16 bytes, 16-byte aligned data (a copy only where ``t`` is not already so)."""
    last, second = t.stride(-1), t.stride(-2)
    if not ((last == 1 and second * t.element_size() % 16 == 0)
            or (second == 1 and last * t.element_size() % 16 == 0)):
        t = t.contiguous()
    if not is_fake(t) and t.data_ptr() % 16:  # warm-up plans on fakes: no address to read
        # the same strides in fresh (aligned) storage
        t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return t


def _bounds(offs: Tensor):
    """(expert, first row, end row) of every expert, from the cumulative row counts."""
    ends = offs.tolist()  # one host sync per call, as in transformers' own fallback
    return [(e, start, end) for e, (start, end) in enumerate(zip([0] + ends[:-1], ends))]


def rows_times_experts(a: Tensor, b: Tensor, offs: Tensor, grouped: bool,
                       dtype: torch.dtype) -> Tensor:
    """out[rows of e] = a[rows of e] @ b[e]: a [S, K], b [E, K, N] -> [S, N] in ``dtype``
    (grouped: the dtype of a, rows past offs[-1] left unwritten as by ``torch._grouped_mm``)."""
    if grouped:
        return torch._grouped_mm(_aligned(a), _aligned(b), offs=offs.to(torch.int32))
    out = _buffers.zeros((a.shape[0], b.shape[-1]), dtype, a.device)
    for e, start, end in _bounds(offs):
        if end > start:
            out[start:end] = a[start:end].to(dtype) @ b[e].to(dtype)
    return out


def experts_outer(a: Tensor, b: Tensor, offs: Tensor, grouped: bool,
                  dtype: torch.dtype) -> Tensor:
    """out[e] = a[rows of e]^T @ b[rows of e]: a [S, K], b [S, N] -> [E, K, N], zero for an
    expert with no rows."""
    if grouped:
        out = torch._grouped_mm(_aligned(a.t()), _aligned(b), offs=offs.to(torch.int32))
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        return torch.where((counts == 0)[:, None, None], 0, out)
    out = _buffers.zeros((offs.shape[0], a.shape[1], b.shape[1]), dtype, a.device)
    for e, start, end in _bounds(offs):
        if end > start:
            out[e] = a[start:end].to(dtype).t() @ b[start:end].to(dtype)
    return out


def _in_out_views(weight, lhs, rhs, transposed):
    """(W, A, B) as [E, in, out], [E, in, r], [E, r, out] views."""
    if transposed:
        return weight.transpose(-2, -1), rhs.transpose(-2, -1), lhs.transpose(-2, -1)
    return weight, lhs, rhs


def experts_forward(x, weight, lhs, rhs, offs, scale, transposed):
    """(y [S, out] in x's dtype, xa [S, r] float32)."""
    w, a, b = _in_out_views(weight, lhs, rhs, transposed)
    grouped = grouped_path(x, w.shape[1], w.shape[2], a.shape[2])
    adapter_dtype = x.dtype if grouped else torch.float32
    base = rows_times_experts(x, w, offs, grouped, x.dtype)
    xa = rows_times_experts(x, a.contiguous(), offs, grouped, adapter_dtype)
    up = rows_times_experts(xa, b.contiguous(), offs, grouped, adapter_dtype)
    y = base.float().add_(up.float(), alpha=scale).to(x.dtype)  # one rounding
    return y, xa.float()


def experts_backward(grad, x, weight, lhs, rhs, xa, offs, scale, transposed, needs_dx):
    """(dx or None, d lhs, d rhs)."""
    w, a, b = _in_out_views(weight, lhs, rhs, transposed)
    grouped = grouped_path(x, w.shape[1], w.shape[2], a.shape[2])
    adapter_dtype = x.dtype if grouped else torch.float32
    b_t = b.contiguous().transpose(-2, -1)  # [E, out, r]
    gb = rows_times_experts(grad, b_t, offs, grouped, adapter_dtype)
    dx = None
    if needs_dx:
        base = rows_times_experts(grad, w.transpose(-2, -1), offs, grouped, x.dtype)
        adapter = rows_times_experts(gb, a.contiguous().transpose(-2, -1), offs, grouped,
                                     adapter_dtype)
        dx = base.float().add_(adapter.float(), alpha=scale).to(x.dtype)
    xa = xa.to(adapter_dtype)
    da = experts_outer(x, gb, offs, grouped, adapter_dtype).float() * scale  # [E, in, r]
    db = experts_outer(xa, grad, offs, grouped, adapter_dtype).float() * scale  # [E, r, out]
    if transposed:  # contiguous, as the fake kernel promises (inductor asserts the strides)
        da, db = db.transpose(-2, -1), da.transpose(-2, -1)
    return dx, da.to(lhs.dtype).contiguous(), db.to(rhs.dtype).contiguous()


# ---------------------------------------------------------------- the custom ops


def validate(x, weight, lhs, rhs, offs):
    for name, t in (("x", x), ("weight", weight), ("lhs", lhs), ("rhs", rhs)):
        check_float(name, t)
    require(x.dim() == 2 and weight.dim() == 3 and lhs.dim() == 3 and rhs.dim() == 3,
            f"fastlora.lora_moe_experts: x must be [S, in] and weight, lhs, rhs 3-D, got "
            f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lhs.shape)}, {tuple(rhs.shape)}")
    E, P, Q = weight.shape
    r = lhs.shape[-1]
    require(tuple(lhs.shape) == (E, P, r) and tuple(rhs.shape) == (E, r, Q),
            f"fastlora.lora_moe_experts: lhs must be [{E}, {P}, r] and rhs [{E}, r, {Q}], got "
            f"{tuple(lhs.shape)} and {tuple(rhs.shape)}")
    require(x.dtype == weight.dtype == lhs.dtype == rhs.dtype,
            f"fastlora.lora_moe_experts: x, weight, lhs and rhs must have one dtype, got "
            f"{x.dtype}, {weight.dtype}, {lhs.dtype}, {rhs.dtype}")
    require(offs.dim() == 1 and offs.shape[0] == E and offs.dtype in (torch.int32, torch.int64),
            f"fastlora.lora_moe_experts: offs must be {E} int32/int64 cumulative row counts, got "
            f"{offs.dtype} {tuple(offs.shape)}")
    check_same_device(x=x, weight=weight, lhs=lhs, rhs=rhs, offs=offs)


def _out_features(weight, transposed):
    return weight.shape[1] if transposed else weight.shape[2]


@torch.library.custom_op("fastlora::lora_moe_experts", mutates_args=())
def lora_moe_experts(x: Tensor, weight: Tensor, lhs: Tensor, rhs: Tensor, offs: Tensor,
                     scale: float, transposed: bool) -> tuple[Tensor, Tensor]:
    """(y, xa): y = the grouped product of x with W + scale * lhs @ rhs (transposed when
    ``transposed``) over the experts' row groups ``offs``; xa is what backward needs."""
    validate(x, weight, lhs, rhs, offs)
    require(x.shape[1] == (weight.shape[2] if transposed else weight.shape[1]),
            f"fastlora.lora_moe_experts: x has {x.shape[1]} features, the weight "
            f"{tuple(weight.shape)} (transposed={transposed}) wants another number")
    return experts_forward(x.contiguous(), weight, lhs, rhs, offs, scale, transposed)


@lora_moe_experts.register_fake
def _(x, weight, lhs, rhs, offs, scale, transposed):
    validate(x, weight, lhs, rhs, offs)
    return (x.new_empty((x.shape[0], _out_features(weight, transposed))),
            x.new_empty((x.shape[0], lhs.shape[-1]), dtype=torch.float32))


@torch.library.custom_op("fastlora::lora_moe_experts_backward", mutates_args=())
def lora_moe_experts_backward(grad: Tensor, x: Tensor, weight: Tensor, lhs: Tensor, rhs: Tensor,
                              xa: Tensor, offs: Tensor, scale: float, transposed: bool,
                              needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d lhs, d rhs); dx is empty when not needed."""
    dx, dlhs, drhs = experts_backward(grad.contiguous(), x.contiguous(), weight, lhs, rhs, xa,
                                      offs, scale, transposed, needs_dx)
    return (dx if dx is not None else x.new_empty(0), dlhs, drhs)


@lora_moe_experts_backward.register_fake
def _(grad, x, weight, lhs, rhs, xa, offs, scale, transposed, needs_dx):
    return (x.new_empty(x.shape) if needs_dx else x.new_empty(0),
            lhs.new_empty(lhs.shape), rhs.new_empty(rhs.shape))


def _setup_context(ctx, inputs, output):
    x, weight, lhs, rhs, offs, scale, transposed = inputs
    ctx.save_for_backward(x, weight, lhs, rhs, output[1], offs)
    ctx.scale, ctx.transposed = scale, transposed


def _backward(ctx, grad, _dxa):
    x, weight, lhs, rhs, xa, offs = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, weight, lhs, rhs, offs, scale, transposed
    require(not needs[1], "fastlora.lora_moe_experts: the expert weight is frozen in LoRA; "
                          "its gradient is not computed", RuntimeError)
    dx, dlhs, drhs = torch.ops.fastlora.lora_moe_experts_backward(
        grad, x, weight, lhs, rhs, xa, offs, ctx.scale, ctx.transposed, needs[0])
    return (dx if needs[0] else None, None, dlhs if needs[2] else None,
            drhs if needs[3] else None, None, None, None)


lora_moe_experts.register_autograd(_backward, setup_context=_setup_context)
