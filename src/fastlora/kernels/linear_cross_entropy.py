"""Fused lm_head + cross-entropy: ``torch.ops.fastlora.linear_cross_entropy``.

Math, for token i with hidden state h_i (H features), lm_head weight W (V x H) and label y_i:

    x_i  = h_i W^T (+ b)                  in the logits dtype, exactly what F.linear returns
                                          (b: a frozen lm_head bias, e.g. Phi's)
    u_i  = a * x_i                        (a logit scale: Cohere's logit_scale, Granite's
                                           1 / logits_scaling; a = 1 for every other model)
    z_i  = u_i, or c * tanh(u_i / c)      (final-logit softcapping, Gemma 2/3)
           with ``round_steps`` each of these elementwise steps is rounded to the logits dtype,
           as eager does when it runs them on bf16/fp16 logits
    lse_i = log sum_v exp(z_iv)           loss_i = lse_i - z_i,y_i   (0 where y_i == ignore_index)
    loss  = sum_i loss_i / n_valid        ("mean"; 0, not NaN, when no label is valid)
          | sum_i loss_i                  ("sum": HF divides by num_items_in_batch outside)
    dx_iv = s * (softmax(z_i)_v - [v == y_i]) * (1 - tanh^2(u_iv / c)) * a   s = 1/n_valid or 1
    dh    = dx @ W          dW = dx^T @ h   (only when W requires grad)

How: tokens are processed in chunks of ``chunk_rows`` rows. For each chunk, cuBLAS (torch.mm)
writes the chunk's logits into one reusable buffer; a Triton kernel (_cross_entropy_rows.py;
one program per row, two passes over the vocabulary: online max/sum-exp, then the gradient)
writes the per-row loss and overwrites the logits with their gradient in place; torch.mm then produces that chunk's rows of
dh (and adds its share of dW). The gradient is therefore produced during the forward and saved;
the backward only scales it by the incoming gradient of the loss. That costs no extra matmul
(the unfused path does the same forward GEMM, dh GEMM and optional dW GEMM) and needs no
recompute. An out-of-range label (neither ignore_index nor in [0, V)) gives a NaN loss and NaN
gradient rows instead of a device assert, so it cannot pass unnoticed.

Memory: the unfused path holds N x V logits in the model dtype, their float32 copy, the float32
log-softmax saved for backward, then the float32 gradient and its cast (8192 tokens x 128256
vocab: 2 + 4 + 4 + 4 + 2 GiB). Here only one chunk of logits exists (chunk_rows x V in the
logits dtype, by default about max(size of h, 256 MiB)), plus dh (the size of h), N float32 row
losses, and, only when W is trainable, dW (V x H, accumulated in float32 across chunks).
A frozen W may be in pinned host memory (``offload_lm_head``, host_lm_head.py): the op reads it
only here, in the forward, through a GPU copy freed when the op returns (_host_weights.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import check_float, check_same_device, require, use_triton
from ._cross_entropy_rows import ce_rows_reference, ce_rows_triton
from ._host_weights import check_reachable, on_device

# chunk_rows: rows per chunk (None: chunk_rows' rule below); ce_tile: (BLOCK_V, num_warps) of the
# row kernel (None: _cross_entropy_rows.ce_config's rule). Tests and benchmarks/kernel_cases sweep chunk_rows.
tuning.register("linear_cross_entropy", chunk_rows=None, ce_tile=None)
_MIN_CHUNK_BYTES = 256 << 20


def chunk_rows(n_rows: int, hidden: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: a chunk of logits about the size of the input h, but at least 256 MiB
    (smaller chunks make the dh GEMM, K = vocab with a thin output, run below cuBLAS's peak)."""
    override = tuning.get("linear_cross_entropy")["chunk_rows"]
    if override is not None:
        return max(1, min(n_rows, override))
    budget = max(n_rows * hidden * element_size, _MIN_CHUNK_BYTES)
    rows = max(1, budget // (vocab * element_size))
    if rows >= 128:
        rows -= rows % 64
    return max(1, min(n_rows, rows))


# ---------------------------------------------------------------- the chunked forward


_MM_OUT_DTYPE_OK = True  # flips to False the first time addmm(..., out_dtype=) is refused


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc float32 and no rounding of a @ b to the inputs' dtype."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _MM_OUT_DTYPE_OK and acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE_OK = False
    acc.addmm_(a.float(), b.float())


def _validate(h: Tensor, weight: Tensor, labels: Tensor, reduction: str, softcap: float,
              logit_scale: float = 1.0, bias: Tensor | None = None):
    check_float("h", h)
    check_float("weight", weight)
    check_same_device(h=h, labels=labels)
    check_reachable("linear_cross_entropy", "weight", weight, h.device)
    if bias is not None:
        check_same_device(h=h, bias=bias)
        require(bias.shape == weight.shape[:1] and bias.dtype == weight.dtype,
                f"fastlora.linear_cross_entropy: bias must be a {weight.dtype} vector of "
                f"{weight.shape[0]}, got {bias.dtype} {tuple(bias.shape)}")
    require(weight.dim() == 2 and weight.shape[1] == h.shape[-1],
            f"fastlora.linear_cross_entropy: weight must have shape (vocab, {h.shape[-1]}) to "
            f"match the last dimension of h, got {tuple(weight.shape)}")
    require(h.dtype == weight.dtype,
            f"fastlora.linear_cross_entropy: h ({h.dtype}) and weight ({weight.dtype}) must "
            "have the same dtype (the logits are computed in it)", TypeError)
    require(not labels.is_floating_point() and not labels.is_complex()
            and labels.dtype != torch.bool,
            f"fastlora.linear_cross_entropy: labels must be integers, got {labels.dtype}",
            TypeError)
    require(labels.numel() == h.numel() // max(1, h.shape[-1]),
            f"fastlora.linear_cross_entropy: {labels.numel()} labels for "
            f"{h.numel() // max(1, h.shape[-1])} rows of h")
    require(reduction in ("mean", "sum"),
            f"fastlora.linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    require(softcap >= 0.0, f"fastlora.linear_cross_entropy: softcap must be >= 0 (0 = none), "
                            f"got {softcap}")
    require(math.isfinite(logit_scale), f"fastlora.linear_cross_entropy: logit_scale must be "
                                        f"finite, got {logit_scale}")


def linear_cross_entropy_forward(h, weight, labels, ignore_index=-100, reduction="mean",
                                 softcap=0.0, round_steps=False, compute_dh=True,
                                 compute_dw=False, logit_scale=1.0, bias=None, *,
                                 impl="triton", chunk=None, block_v=None, dh=None, dw=None,
                                 row_loss=None, buffer=None):
    """The chunked forward; returns (loss, dh, dw) (empty dh/dw where not computed).

    ``impl`` picks the row step ("triton" or "reference"); ``chunk`` the rows per chunk;
    ``dh`` (N x H), ``dw`` (V x H), ``row_loss`` (N) and ``buffer`` (chunk x V) may be given,
    e.g. poisoned with NaN by tests.
    """
    _validate(h, weight, labels, reduction, softcap, logit_scale, bias)
    require(not (compute_dw and weight.device != h.device),
            "fastlora.linear_cross_entropy: a weight in host memory is frozen; compute_dw needs "
            "it on h's device")
    weight = on_device(weight, h.device)  # a frozen lm_head in pinned host memory: its GPU copy
    step = ce_rows_triton if impl == "triton" else ce_rows_reference
    H, V = h.shape[-1], weight.shape[0]
    h2 = h.reshape(-1, H).contiguous()
    N = h2.shape[0]
    labels = labels.reshape(-1).contiguous()
    n_valid = (labels != ignore_index).sum()
    divisor = n_valid.clamp(min=1)
    scale = (1.0 / divisor.float()) if reduction == "mean" else torch.ones(
        (), dtype=torch.float32, device=h.device)
    rows = chunk or chunk_rows(N, H, V, h.element_size())
    if buffer is None:
        buffer = _buffers.empty((min(rows, N), V), h.dtype, h.device)
    if row_loss is None:
        row_loss = _buffers.empty((N,), torch.float32, h.device)
    if compute_dh:
        dh = _buffers.empty((N, H), h.dtype, h.device) if dh is None else dh.view(N, H)
    if compute_dw:
        dw = _buffers.empty(weight.shape, weight.dtype, weight.device) if dw is None else dw
        acc = dw if (weight.dtype == torch.float32 or N <= rows) else _buffers.zeros(
            weight.shape, torch.float32, h.device)
    wt = weight.t()
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        hc, x = h2[r0:r1], buffer[:r1 - r0]
        if bias is None:
            torch.mm(hc, wt, out=x)
        else:  # what F.linear runs with a bias
            torch.addmm(bias, hc, wt, out=x)
        step(x, labels[r0:r1], row_loss[r0:r1], scale, ignore_index, softcap, round_steps,
             compute_dh or compute_dw, block_v, logit_scale)
        if compute_dh:
            torch.mm(x, weight, out=dh[r0:r1])
        if compute_dw:
            if acc is dw and r0 == 0:
                torch.mm(x.t(), hc, out=dw)
            else:
                _addmm_fp32(acc, x.t(), hc)
    if compute_dw and acc is not dw:
        dw.copy_(acc)
    if compute_dw and N == 0:
        dw.zero_()
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / divisor
    empty = h.new_empty(0)
    return (loss, dh.view(h.shape) if compute_dh else empty,
            dw if compute_dw else weight.new_empty(0))


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("fastlora::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                         reduction: str, softcap: float, round_steps: bool, compute_dh: bool,
                         compute_dw: bool, logit_scale: float = 1.0,
                         bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss, dh, dw): the float32 loss and its gradients for an incoming gradient of 1
    (dh only if compute_dh, dw only if compute_dw; empty otherwise). ``bias`` is added to the
    logits and gets no gradient: it must be frozen."""
    impl = "triton" if use_triton(h) else "reference"
    return linear_cross_entropy_forward(h, weight, labels, ignore_index, reduction, softcap,
                                        round_steps, compute_dh, compute_dw, logit_scale, bias,
                                        impl=impl)


@linear_cross_entropy.register_fake
def _(h, weight, labels, ignore_index, reduction, softcap, round_steps, compute_dh, compute_dw,
      logit_scale=1.0, bias=None):
    _validate(h, weight, labels, reduction, softcap, logit_scale, bias)
    loss = h.new_empty((), dtype=torch.float32)
    dh = h.new_empty(h.shape) if compute_dh else h.new_empty(0)
    dw = weight.new_empty(weight.shape) if compute_dw else weight.new_empty(0)
    return loss, dh, dw


@torch.library.custom_op("fastlora::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: Tensor, dh: Tensor, dw: Tensor) -> tuple[Tensor, Tensor]:
    """Scales the saved gradients by the incoming gradient of the loss (a float32 scalar)."""
    return dh * grad, dw * grad


@linear_cross_entropy_backward.register_fake
def _(grad, dh, dw):
    return torch.empty_like(dh), torch.empty_like(dw)


def _setup_context(ctx, inputs, output):
    _loss, dh, dw = output
    bias = inputs[10] if len(inputs) > 10 else None
    require(bias is None or not bias.requires_grad,
            "fastlora.linear_cross_entropy: the bias requires grad, but this op computes no "
            "bias gradient (freeze the lm_head bias, or leave this loss unfused)")
    ctx.save_for_backward(dh, dw)
    ctx.mark_non_differentiable(dh, dw)
    ctx.compute_dh, ctx.compute_dw = inputs[7], inputs[8]


def _backward(ctx, grad, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    dh, dw = torch.ops.fastlora.linear_cross_entropy_backward(grad, dh, dw)
    return (dh if ctx.compute_dh else None), (dw if ctx.compute_dw else None), \
        None, None, None, None, None, None, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
