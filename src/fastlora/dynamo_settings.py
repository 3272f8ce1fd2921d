"""Dynamo settings fastlora needs before Dynamo traces a model (applied when the backend is
imported, which ``torch.compile(..., backend="fastlora")`` does before the first trace).

Gradient checkpointing with bookkeeping side effects. transformers 5.25 depends on the
``kernels`` package, whose ``use_kernelized_func`` wraps a layer's ``forward`` (LlamaAttention's,
for one) in code that sets a context variable and resets it on the way out. Under gradient
checkpointing that ``forward`` runs inside ``torch.utils.checkpoint``, and Dynamo refuses a
checkpointed body that mutates anything outside it unless
``skip_fwd_side_effects_in_bwd_under_checkpoint`` is on: every checkpointed decoder layer then
falls back to eager, unfused, with no graph for fastlora to see (measured 2026-12-03 on a tiny
Llama: 5 graph breaks, no checkpoint body reached the backend).

Turning it on is exact for the gradients: the recompute in backward replays the traced tensor
operations of the forward, not its Python, so what it computes cannot depend on whether a Python
side effect runs a second time. The only difference from eager checkpointing is that such a side
effect runs once per step instead of twice. The setting is process-wide; ``FASTLORA_KEEP_DYNAMO_
CONFIG=1`` in the environment leaves Dynamo's configuration untouched.
"""
from __future__ import annotations

import os

import torch

SETTINGS = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def apply() -> dict:
    """Apply ``SETTINGS`` that this torch knows; returns what changed ({name: (old, new)})."""
    if os.environ.get("FASTLORA_KEEP_DYNAMO_CONFIG") == "1":
        return {}
    config = torch._dynamo.config
    changed = {}
    for name, value in SETTINGS.items():
        if hasattr(config, name) and getattr(config, name) != value:
            changed[name] = (getattr(config, name), value)
            setattr(config, name, value)
    return changed
