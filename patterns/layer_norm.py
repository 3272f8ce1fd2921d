"""LayerNorm over the last dimension: ``F.layer_norm`` (nn.LayerNorm with or without bias, OLMo's
weightless norm computed in float32) and Cohere's hand-written spelling (mean, centred variance,
rsqrt, weight, no bias; its per-head q/k norms have one weight row per head). Becomes
``torch.ops.fastlora.layer_norm`` (src/fastlora/kernels/layer_norm.py), which computes dW / dB
only when they require grad.
"""
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.pattern import Pattern, Reject, register_pattern

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# `weight` and `bias` are not annotated: they bind a tensor or the literal None.
def layer_norm_fp32(x: torch.Tensor, n: int, weight, bias, eps: float):
    return F.layer_norm(x.to(torch.float32), (n,), weight, bias, eps).to(x.dtype)


def layer_norm(x: torch.Tensor, n: int, weight, bias, eps: float):
    return F.layer_norm(x, (n,), weight, bias, eps)


def cohere_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    return (weight.to(torch.float32) * h).to(x.dtype)


def check(m):
    x = m.value("x")
    if x.dtype not in FLOATS:
        raise Reject(f"input dtype {x.dtype} is not float32, bfloat16 or float16")
    if x.dim() == 0:
        raise Reject("the input is a scalar")
    if m.spelling != "cohere_layer_norm" and not statically_known_true(x.shape[-1] == m["n"]):
        raise Reject(f"normalized_shape ({m['n']},) is not the last dimension of the input "
                     f"{tuple(x.shape)}")
    for name in ("weight", "bias"):
        if name not in m.bindings or m[name] is None:
            continue
        p = m.value(name)
        if not isinstance(p, torch.Tensor):
            raise Reject(f"{name} is {p!r}, not a tensor or None")
        per_head = name == "weight" and p.dim() == 2 and x.dim() >= 2 and all(
            statically_known_true(a == b) for a, b in zip(p.shape, x.shape[-2:]))
        if not per_head and (p.dim() != 1
                             or not statically_known_true(p.shape[0] == x.shape[-1])):
            raise Reject(f"{name} of shape {tuple(p.shape)} scales neither the last dimension "
                         f"({x.shape[-1]}) of the input nor its last two (one row per head)")
        if p.dtype not in FLOATS or p.device != x.device:
            raise Reject(f"{name} is {p.dtype} on {p.device}; the kernel needs a float tensor "
                         f"on {x.device}")
    if m.spelling == "cohere_layer_norm":
        stat = m.nodes_calling(torch.rsqrt)[0].meta["example_value"]
        if stat.dtype != torch.float32:
            raise Reject(f"the model computes the statistics in {stat.dtype}; the kernel "
                         "computes them in float32, which would change the numerics")
    return {}


def replacement(x, eps, weight=None, bias=None, n=None):
    return torch.ops.fastlora.layer_norm(x, weight, bias, eps)[0]


register_pattern(Pattern(
    name="layer_norm",
    spellings=[layer_norm_fp32, layer_norm, cohere_layer_norm],
    check=check,
    replacement=replacement,
    anchor=F.layer_norm,
    description="LayerNorm with or without weight/bias (nn.LayerNorm, OLMo, Cohere's manual norm)",
    builtin=True,
))
