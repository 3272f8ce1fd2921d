"""RMSNorm: Llama style ``w * cast(x * rsqrt(mean(x^2) + eps))``, Gemma's ``(1 + w)`` style, and
OLMo 2's and Helium's ``cast(w * x * rsqrt(...))`` (the weight multiplies in float32, then the
cast: Gemma's order without the offset; in float32 it is Llama's).

Becomes ``torch.ops.fastlora.rms_norm`` (src/fastlora/kernels/rms_norm.py).
"""
import torch

from fastlora.pattern import Pattern, Reject, register_pattern


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (offset + weight.float())).type_as(x)


def float_weight_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):  # Helium
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


def promoted_weight_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):  # OLMo 2
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)  # the float32 rows promote the weight to float32


def check(m):
    x, w = m.value("x"), m.value("weight")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Reject(f"input dtype {x.dtype} is not float32, bfloat16 or float16")
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        raise Reject(f"weight of shape {tuple(w.shape)} does not scale the last dimension "
                     f"({x.shape[-1]}) of the input")
    if w.device != x.device:
        raise Reject("weight and input are on different devices")
    stat = m.nodes_calling(torch.rsqrt)[0].meta["example_value"]
    if stat.dtype != torch.float32:
        raise Reject(f"the model computes the norm statistics in {stat.dtype}; the kernel "
                     "computes them in float32, which would change the numerics")
    if m.spelling == "llama_rms_norm":
        return {"offset": 0.0, "cast_before_weight": True}
    offset = float(m["offset"]) if m.spelling == "gemma_rms_norm" else 0.0
    return {"offset": offset, "cast_before_weight": False}


def replacement(x, weight, eps, offset=0.0, cast_before_weight=True):
    return torch.ops.fastlora.rms_norm(x, weight, eps, offset, cast_before_weight)[0]


register_pattern(Pattern(
    name="rms_norm",
    spellings=[llama_rms_norm, gemma_rms_norm, float_weight_rms_norm, promoted_weight_rms_norm],
    check=check,
    replacement=replacement,
    anchor=torch.rsqrt,
    description="RMSNorm (Llama, Mistral, Qwen, Phi-3; Gemma's 1 + w; OLMo 2's and Helium's "
                "weight before the cast)",
    builtin=True,
))
