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

import functools

import torch

from .options import Options
from .pattern import registered_patterns


def compile_for_trainer(model: torch.nn.Module, *, dynamic: bool | None = True, **options):
    """Compile ``model`` in place with ``backend="fastlora"`` so a Trainer trains it compiled.

    ``options`` are the backend's options (``fastlora.Options``: ``disable``, ``print_report``,
    ``compiler``, ...), checked here, pattern names included, so a typo fails now with a
    one-line ``OptionsError`` rather than at the first step.

    ``dynamic`` is ``torch.compile``'s. ``True`` (default): batch and sequence lengths are
    symbolic from the first call, so one forward/backward pair serves every length a padding
    or padding-free collator produces (``None`` compiles the first shape statically and
    recompiles with dynamic shapes when a second length arrives: two full compiles; ``False``
    recompiles for every length). While Dynamo traces this model, Python floats stay
    specialized (Dynamo's ``specialize_float``): with ``dynamic=True`` it would otherwise turn
    the model's float constants (norm eps, LoRA scaling, dropout p) into run-time values that
    no kernel can take as constants, and every fusion but a few would be lost. Returns
    ``model``.
    """
    Options.parse(options).check_pattern_names({p.name for p in registered_patterns()})
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("this model is already compiled in place; compile it only once")
    model.compile(backend="fastlora", options=options or None, dynamic=dynamic)
    if dynamic:
        model._compiled_call_impl = _floats_specialized(model._compiled_call_impl)
    return model


def _floats_specialized(compiled):
    """``compiled`` called with Dynamo's ``specialize_float`` on, the way ``torch.compile``'s
    own ``dynamic=`` is applied: a configuration patch around each call of this compiled
    function only (Dynamo reads it while tracing; a call that traces nothing pays a few
    microseconds)."""
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)
    return call


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process (every recompilation counts)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
