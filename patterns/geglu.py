"""GeGLU, ``gelu(gate) * up`` with exact or tanh-approximate GELU (Gemma, Gemma 2, Gemma 3).

Becomes ``torch.ops.fastlora.geglu`` (src/fastlora/kernels/geglu.py), which saves only gate and
up and recomputes the activation in backward. The constraints are SwiGLU's (patterns/swiglu.py).
"""
import torch
import torch.nn.functional as F

from fastlora.pattern import Pattern, Reject, register_pattern
from fastlora.patterns.swiglu import check_gate_up, explain_ungated


def gelu_times_up(gate: torch.Tensor, up: torch.Tensor, approximate: str):
    return F.gelu(gate, approximate=approximate) * up


def check(m):
    if m["approximate"] not in ("tanh", "none"):
        raise Reject(f"GELU approximation {m['approximate']!r} is neither 'tanh' nor 'none'")
    check_gate_up(m, "geglu")
    return {}


def replacement(gate, up, approximate):
    return torch.ops.fastlora.geglu(gate, up, approximate)


register_pattern(Pattern(
    name="geglu",
    spellings=[gelu_times_up],
    check=check,
    replacement=replacement,
    anchor=F.gelu,
    explain_near_miss=explain_ungated,
    description="GeGLU gelu(gate) * up, exact or tanh GELU (Gemma family)",
    builtin=True,
))
