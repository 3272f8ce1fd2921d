"""The whole LoRA'd gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``, all three LoRA'd.

This pattern matches the graph as the LoRA patterns left it: a ``torch.ops.fastlora.lora_mlp``
(patterns/lora_grouped.py) whose h is read only by the ``torch.ops.fastlora.lora_linear`` of
down_proj (patterns/lora_linear.py), as its x. It replaces the pair with
``torch.ops.fastlora.lora_mlp_block`` (src/fastlora/kernels/lora_mlp_block.py), which computes the
same values but recomputes h in backward instead of keeping it: M x F x e bytes less saved per
layer (M tokens, F the ffn width, e the bytes of the dtype).

The spelling calls the two ops exactly as the other patterns' replacements insert them, so it
traces to the same node targets (the ``OpOverloadPacket``s and ``operator.getitem``). It runs
in the ``fused`` stage, after both (src/fastlora/stages.py). Where h has another user, the
rewriter's escape check leaves the two ops alone and the report says which node reads h.
"""
import torch

import fastlora.kernels  # noqa: F401  (registers the ops named below)
from fastlora.matcher import describe
from fastlora.pattern import Pattern, RefusalKind, Reject, register_pattern

T = torch.Tensor


def mlp_then_down(x: T, gate_weight: T, gate_bias, gate_A: T, gate_B: T, up_weight: T, up_bias,
                  up_A: T, up_B: T, seed, gate_scale: float, up_scale: float, dropout_p: float,
                  activation, hidden_dtype, down_weight: T, down_bias, down_A: T, down_B: T,
                  down_seed, down_scale: float, down_dropout_p: float, out_dtype):
    h = torch.ops.fastlora.lora_mlp(x, gate_weight, gate_bias, gate_A, gate_B, up_weight, up_bias,
                                    up_A, up_B, seed, gate_scale, up_scale, dropout_p, activation,
                                    hidden_dtype)[0]
    # base=None: down_proj's own linear is fused (an adapter on a precomputed base is not)
    return torch.ops.fastlora.lora_linear(h, down_weight, down_bias, None, down_A, down_B,
                                          down_seed, down_scale, down_dropout_p, out_dtype)[0]


ARGS = ("x", "gate_weight", "gate_bias", "gate_A", "gate_B", "up_weight", "up_bias", "up_A",
        "up_B", "seed", "gate_scale", "up_scale", "dropout_p", "activation", "hidden_dtype",
        "down_weight", "down_bias", "down_A", "down_B", "down_seed", "down_scale",
        "down_dropout_p", "out_dtype")


def check(m):
    for name in ("gate_weight", "up_weight", "down_weight"):
        if m.value(name).requires_grad:
            raise Reject(f"{name} is trainable; the fused MLP keeps the base weights frozen")
    return {}


def replacement(**args):
    return torch.ops.fastlora.lora_mlp_block(*(args[n] for n in ARGS))[0]


def explain_near_miss(node, refusal):
    """Name the node that reads h where it is not (only) down_proj's fused lora_linear."""
    readers = [u for g in node.users if g.args[1:] == (0,) for u in g.users]
    others = [u for u in readers if u.target is not torch.ops.fastlora.lora_linear]
    if not others:
        return refusal.reason
    names = ", ".join(describe(u) for u in others)
    if refusal.kind is RefusalKind.ESCAPE:
        return (f"h (lora_mlp's output) is also read by {names}; the fused op does not return h, "
                f"so lora_mlp and lora_linear stay two ops (h kept for backward)")
    return (f"h (lora_mlp's output) goes to {names}, not to a fused lora_linear (down_proj has "
            f"no LoRA adapter, or its lora_linear did not fuse)")


register_pattern(Pattern(
    name="lora_mlp_block",
    spellings=[mlp_then_down],
    check=check,
    replacement=replacement,
    anchor=torch.ops.fastlora.lora_mlp,
    explain_near_miss=explain_near_miss,
    stage="fused",
    description="lora_mlp + down_proj's lora_linear as one op that recomputes h in backward",
    builtin=True,
))
