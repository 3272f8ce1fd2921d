"""Causal-LM loss: ``linear(h, W_lm)`` -> (scale, softcap) -> float -> view -> ``cross_entropy``.

Becomes ``torch.ops.fastlora.linear_cross_entropy`` (src/fastlora/kernels/linear_cross_entropy.py),
which never holds more than one chunk of logits. The label shift (pad, slice, view) stays in the
graph and feeds the op; so does HF's ``/ num_items_in_batch`` after a ``reduction="sum"`` loss.

Each spelling has two outputs: the loss and the logits the model returns. The fused op does not
compute the logits, so a match is only taken when nothing in the graph reads them except the
graph's output, and ``options["return_logits"]`` is False (the default). The graph then returns a
stand-in for them: a NaN scalar expanded to the logits' shape and dtype (no memory, and no
plausible numbers for anyone who reads them). The report says so in the match's parameters.
"""
import math

import torch
import torch.nn.functional as F

from fastlora.options import Options
from fastlora.pattern import Pattern, Reject, register_pattern

DROPPED = "dropped: a NaN stand-in is returned (options return_logits=False)"


def causal_lm_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int,
                   ignore_index: int, reduction):
    """Llama, Mistral, Qwen, Phi-3, ...: HF's ForCausalLMLoss on the lm_head output."""
    logits = F.linear(h, weight)
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_host_head(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             vocab: int, ignore_index: int, reduction):
    """An lm_head kept in pinned host memory (``offload_lm_head``, host_lm_head.py): its product
    is fastlora's ``linear_from_host``; the fused op reads the weight from host memory too."""
    logits = torch.ops.fastlora.linear_from_host(h, weight)
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_biased(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          labels: torch.Tensor, vocab: int, ignore_index: int, reduction):
    """Phi (phi-1.5, phi-2) and other lm_heads with a bias: the bias, frozen, joins the op."""
    logits = F.linear(h, weight, bias)
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_softcapped(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              vocab: int, ignore_index: int, reduction, cap: float):
    """Gemma 2/3: final-logit softcapping on the logits in the model's dtype, then the loss."""
    logits = torch.tanh(F.linear(h, weight) / cap) * cap
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_softcapped_fp32(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   vocab: int, ignore_index: int, reduction, cap: float):
    """Softcapping after the float32 cast (e.g. transformers' Beam)."""
    logits = torch.tanh(F.linear(h, weight).float() / cap) * cap
    flat = logits.view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_scaled(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          vocab: int, ignore_index: int, reduction, logit_scale: float):
    """Cohere, Cohere 2: ``logits * logit_scale`` in the model's dtype, then the loss."""
    logits = F.linear(h, weight) * logit_scale
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def causal_lm_loss_divided(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           vocab: int, ignore_index: int, reduction, logits_scaling: float):
    """Granite (and its MoE variants): ``logits / logits_scaling`` in the model's dtype."""
    logits = F.linear(h, weight) / logits_scaling
    flat = logits.float().view(-1, vocab)
    return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction=reduction), logits


def logit_scale_of(m) -> float:
    """The factor the logits are multiplied by (1.0 where the spelling has none). Granite's
    division by s becomes a product with float32(1 / float32(s)), which is what eager's CUDA
    kernel computes for a tensor divided by a number (CPU eager divides: the two differ by at
    most one float32 rounding of the scaled logit)."""
    if "logit_scale" in m.bindings:
        scale = m["logit_scale"]
    elif "logits_scaling" in m.bindings:
        s = torch.tensor(float(m["logits_scaling"]), dtype=torch.float32)
        scale = (1.0 / s).item() if s != 0 else float("inf")
    else:
        return 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) \
            or not math.isfinite(float(scale)) or scale == 0:
        raise Reject(f"logit scale {scale!r} is not a finite non-zero number")
    return float(scale)


def _describe(node) -> str:
    from fastlora.matcher import describe
    return describe(node)


def check(m):
    opts = m.options or Options()
    h, w, labels = m.value("h"), m.value("weight"), m.value("labels")
    logits_node = m.outputs[1]
    logits = m.output_value(1)
    host_head = m.spelling == "causal_lm_loss_host_head"
    product = torch.ops.fastlora.linear_from_host if host_head else F.linear
    linear = m.nodes_calling(product)[0].meta["example_value"]
    flat = m.nodes_calling(F.cross_entropy)[0].args[0]
    if not m.top_level:
        raise Reject("the loss is inside the body of a higher-order op (e.g. a checkpointed "
                     "region), whose outputs fastlora cannot follow")
    for name, t in (("h", h), ("the lm_head weight", w)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise Reject(f"{name} is {t.dtype}, not float32, bfloat16 or float16")
    if linear.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Reject(f"the logits are {linear.dtype}, not float32, bfloat16 or float16")
    flat_value = flat.meta.get("example_value") if hasattr(flat, "meta") else None
    if flat_value is None or flat_value.dtype != torch.float32:
        raise Reject("the cross-entropy runs on non-float32 logits; the fused op computes it in "
                     "float32, which would change the numerics")
    if w.dim() != 2 or w.shape[1] != h.shape[-1] or w.shape[0] != m["vocab"]:
        raise Reject(f"lm_head weight of shape {tuple(w.shape)} does not map {h.shape[-1]} "
                     f"features to the vocabulary of {m['vocab']} the loss views the logits with")
    if labels.dim() != 1 or labels.is_floating_point():
        raise Reject(f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} are not "
                     "one integer per token")
    if h.device != labels.device or (w.device != h.device and not host_head):
        raise Reject("hidden states, lm_head weight and labels are on different devices")
    if "bias" in m.bindings:
        bias = m.value("bias")
        if bias.requires_grad:
            raise Reject("the lm_head bias is trained; the fused loss computes no bias gradient")
        if bias.dtype != w.dtype or tuple(bias.shape) != (w.shape[0],):
            raise Reject(f"lm_head bias {bias.dtype} {tuple(bias.shape)} is not a {w.dtype} "
                         f"vector of the vocabulary's {w.shape[0]}")
    if m["reduction"] not in ("mean", "sum"):
        raise Reject(f"reduction={m['reduction']!r}: the fused op computes 'mean' or 'sum' only")
    if not isinstance(m["ignore_index"], int):
        raise Reject(f"ignore_index {m['ignore_index']!r} is not an integer")
    if not (h.requires_grad or w.requires_grad):
        raise Reject("no gradient flows through this loss (evaluation or torch.no_grad): the "
                     "logits are kept, since evaluation code usually reads them")
    outside = [u for u in logits_node.users if u not in m.region]
    others = [u for u in outside if u.op != "output"]
    if others:
        raise Reject(f"the logits are also used by {_describe(others[0])} inside the compiled "
                     "graph, so they must be computed")
    if outside and opts.return_logits:
        raise Reject("the model returns the logits and options['return_logits'] is True, so "
                     "the loss is left unfused (the logits would be materialised anyway); set "
                     "return_logits=False to fuse it")
    params = {"compute_dh": bool(h.requires_grad), "compute_dw": bool(w.requires_grad),
              "logits_dtype": logits.dtype, "logits_ndim": logits.dim(),
              "logits_output": DROPPED if outside else "not returned"}
    if linear.dtype != h.dtype or linear.dtype != w.dtype:  # autocast: no cast nodes in graph
        params["compute_dtype"] = linear.dtype
    scale = logit_scale_of(m)
    if scale != 1.0:
        params["scale"] = scale
    if m.spelling in ("causal_lm_loss_softcapped", "causal_lm_loss_scaled",
                      "causal_lm_loss_divided"):
        params["round_steps"] = True  # scale / softcap in the logits dtype, as eager
    return params


def replacement(h, weight, labels, vocab, ignore_index, reduction, cap=0.0, bias=None, *,
                compute_dh, compute_dw, logits_dtype, logits_ndim, logits_output,
                compute_dtype=None, round_steps=False, scale=1.0, logit_scale=None,
                logits_scaling=None):
    if compute_dtype is not None:
        h = torch.ops.aten._to_copy.default(h, dtype=compute_dtype)
        weight = torch.ops.aten._to_copy.default(weight, dtype=compute_dtype)
        if bias is not None:
            bias = torch.ops.aten._to_copy.default(bias, dtype=compute_dtype)
    loss = torch.ops.fastlora.linear_cross_entropy(h, weight, labels, ignore_index, reduction,
                                                   float(cap), round_steps, compute_dh,
                                                   compute_dw, scale, bias)[0]
    sizes = [torch.ops.aten.sym_size.int(h, i) for i in range(logits_ndim - 1)] + [vocab]
    nan = torch.ops.aten.new_full.default(h, [], float("nan"), dtype=logits_dtype)
    return loss, torch.broadcast_to(nan, sizes)


register_pattern(Pattern(
    name="linear_cross_entropy",
    spellings=[causal_lm_loss, causal_lm_loss_host_head, causal_lm_loss_biased,
               causal_lm_loss_softcapped, causal_lm_loss_softcapped_fp32, causal_lm_loss_scaled,
               causal_lm_loss_divided],
    check=check,
    replacement=replacement,
    anchor=F.cross_entropy,
    description="lm_head + cross-entropy (HF causal-LM loss, optional frozen bias, logit "
                "scale or final-logit softcap)",
    builtin=True,
))
