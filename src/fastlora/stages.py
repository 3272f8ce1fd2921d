"""The order in which patterns are tried: the whole list of rewrite passes, in one place.

The rewriter (rewriter.py) runs the stages in this order over each graph, and within a stage the
patterns in the order listed here; a pattern not listed (one of yours, see docs/patterns.md) runs
after the listed ones of its stage, in the order it was registered.

1. ``adapters``: LoRA adapters, grouped before single, so the bigger fusion takes the linears
   first and the single-adapter patterns take what it left (a gate/up pair with different
   dropout, a q/k/v with one projection not LoRA'd). The QLoRA pattern runs before the plain
   adapter pattern, whose ``base`` input would otherwise take the 4-bit matmul's output.
2. ``ops``: one op each, on what the adapters left: norms, RoPE, attention, activations, the
   lm_head + cross-entropy. No two of them overlap, so their order does not matter.
3. ``fused``: fusions of fused ops, matching the ``torch.ops.fastlora.*`` calls the earlier
   stages inserted (a LoRA'd MLP's two ops as one, then the RMSNorm that feeds a grouped LoRA op).
   A later pattern here may read what an earlier one inserted: order matters within the stage.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    description: str
    patterns: tuple[str, ...]  # the built-in patterns of this stage, in the order they run


STAGES: tuple[Stage, ...] = (
    Stage("adapters", "LoRA adapters, grouped before single",
          ("lora_mlp", "lora_qkv", "lora_linear_4bit", "lora_linear", "lora_moe_experts")),
    Stage("ops", "norms, RoPE, attention, activations, lm_head + cross-entropy",
          ("attention", "swiglu", "geglu", "layer_norm", "linear_cross_entropy", "rms_norm",
           "rope")),
    Stage("fused", "fusions of the fused ops the earlier stages inserted",
          ("lora_mlp_block", "rms_norm_lora_qkv", "rms_norm_lora_mlp_block")),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
DEFAULT_STAGE = "ops"


def stage_listing(name: str) -> str | None:
    """The stage that lists pattern ``name`` (None for a pattern no stage lists)."""
    for stage in STAGES:
        if name in stage.patterns:
            return stage.name
    return None


def run_order(patterns) -> list:
    """``patterns`` (registered in the order given) sorted into the order they are tried."""
    def key(item):
        position, pattern = item
        stage = STAGE_NAMES.index(pattern.stage)
        listed = STAGES[stage].patterns
        rank = listed.index(pattern.name) if pattern.name in listed else len(listed)
        return stage, rank, position
    return [p for _, p in sorted(enumerate(patterns), key=key)]
