"""Training through Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` with the fastlora backend.

``TrainingArguments(torch_compile_backend="fastlora")`` cannot work: accelerate checks the name
against a fixed list of backends and rejects it when the trainer is built. The supported route is
to compile the model in place before training::

    fastlora.compile_for_trainer(model)                  # = model.compile(backend="fastlora")
    trainer = SFTTrainer(model=model, args=SFTConfig(...), ...)
    trainer.train()

The model stays the same object (a ``PeftModel`` stays a ``PeftModel``): saving, ``generate`` and
the trainer's own unwrapping are unchanged. See docs/trl.md.
"""
from __future__ import annotations

import torch

from .options import Options
from .pattern import registered_patterns


def compile_for_trainer(model: torch.nn.Module, *, dynamic: bool | None = None, **options):
    """Compile ``model`` in place with ``backend="fastlora"`` so a Trainer trains it compiled.

    ``options`` are the backend's options (``fastlora.Options``: ``disable``, ``print_report``,
    ``compiler``, ...), checked here, pattern names included, so a typo fails now with a
    one-line ``OptionsError`` rather than at the first step.
    ``dynamic`` is ``torch.compile``'s: ``None`` (default) compiles the first shape statically
    and recompiles once with dynamic shapes when a second sequence length arrives. Returns
    ``model``.
    """
    Options.parse(options).check_pattern_names({p.name for p in registered_patterns()})
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("this model is already compiled in place; compile it only once")
    model.compile(backend="fastlora", options=options or None, dynamic=dynamic)
    return model


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process (every recompilation counts)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
