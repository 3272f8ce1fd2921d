"""SwiGLU, ``silu(gate) * up`` (Llama, Mistral, Qwen, Phi-3 MLPs).

Two spellings: separate gate and up tensors (``act_fn(gate_proj(x)) * up_proj(x)``), and
Phi-3's fused projection split in two (``gate, up = x.chunk(2, dim=-1); up * act_fn(gate)``).
They become ``torch.ops.fastlora.swiglu`` / ``swiglu_packed`` (src/fastlora/kernels/swiglu.py,
swiglu_packed.py), which save only the inputs and recompute the activation in backward.
"""
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.pattern import Pattern, RefusalKind, Reject, register_pattern

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def silu_times_up(gate: torch.Tensor, up: torch.Tensor):
    return F.silu(gate) * up


def silu_of_chunked_gate_up(x: torch.Tensor):
    halves = x.chunk(2, dim=-1)
    return halves[1] * F.silu(halves[0])


def check_gate_up(m, op: str) -> None:
    """The constraints of an elementwise GLU over separate gate and up (shared with geglu)."""
    gate, up = m.value("gate"), m.value("up")
    if gate.dtype not in FLOATS:
        raise Reject(f"gate has dtype {gate.dtype}, not float32, bfloat16 or float16")
    if gate.dtype != up.dtype:
        raise Reject(f"gate is {gate.dtype} but up is {up.dtype}: the model rounds the "
                     f"activation to {gate.dtype} before the product, the fused {op} would not")
    if gate.device != up.device:
        raise Reject("gate and up are on different devices")
    if gate.dim() != up.dim() or not all(statically_known_true(a == b)
                                         for a, b in zip(gate.shape, up.shape)):
        raise Reject(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} do not have one shape "
                     f"(a broadcasting product is not a GLU)")


def check(m):
    if m.spelling == "silu_times_up":
        check_gate_up(m, "swiglu")
        return {}
    x = m.value("x")
    if x.dtype not in FLOATS:
        raise Reject(f"input has dtype {x.dtype}, not float32, bfloat16 or float16")
    if x.dim() == 0 or not statically_known_true(x.shape[-1] % 2 == 0):
        raise Reject(f"the fused gate/up tensor {tuple(x.shape)} does not split into two "
                     f"equal halves")
    return {}


def explain_ungated(anchor, refusal):
    """The near miss at an activation left unfused (shared with geglu): none where no product
    reads the activation, as in a plain MLP (GPT-NeoX, Falcon, StarCoder 2: ``fc2(gelu(fc1(x)))``),
    which is no gated unit at all."""
    if refusal.kind is RefusalKind.NO_SPELLING and not any(
            u.op == "call_function" and u.target is torch.mul for u in anchor.users):
        return None
    return refusal.reason


def replacement(gate=None, up=None, x=None):
    if x is not None:
        return torch.ops.fastlora.swiglu_packed(x)
    return torch.ops.fastlora.swiglu(gate, up)


register_pattern(Pattern(
    name="swiglu",
    spellings=[silu_times_up, silu_of_chunked_gate_up],
    check=check,
    replacement=replacement,
    anchor=F.silu,
    explain_near_miss=explain_ungated,
    description="SwiGLU silu(gate) * up (Llama, Mistral, Qwen; Phi-3's chunked gate_up_proj)",
    builtin=True,
))
