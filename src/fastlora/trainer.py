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

import contextlib
import dataclasses
import functools

import torch

from . import (distributed, hooked_embeddings, host_embeddings, host_lm_head, memory_budget,
               offload, regions, unpad)
from .options import Options
from .pattern import registered_patterns


def compile_for_trainer(model: torch.nn.Module, *, dynamic: bool | None = True, **options):
    """Compile ``model`` in place with ``backend="fastlora"`` so a Trainer trains it compiled.

    ``options`` are the backend's options (``fastlora.Options``: ``disable``, ``print_report``,
    ``compiler``, ...), checked here, pattern names included, so a typo fails now with a
    one-line ``OptionsError`` rather than at the first step.

    ``dynamic``: ``True`` (default): batch and sequence lengths are symbolic from the first
    call, so one forward/backward pair serves every length a padding or padding-free collator
    produces (every size symbolic, as ``torch.compile(dynamic=True)``; with checkpointed layers
    compiled once, only those two, ``mark_batch_dims``). ``None`` and ``False`` are
    ``torch.compile``'s (``None`` compiles the first shape statically and
    recompiles with dynamic shapes when a second length arrives: two full compiles; ``False``
    recompiles for every length). While Dynamo traces this model, Python floats stay
    specialized (Dynamo's ``specialize_float``): with dynamic shapes it would otherwise turn
    the model's float constants (norm eps, LoRA scaling, dropout p) into run-time values that
    no kernel can take as constants, and every fusion but a few would be lost.

    With ``reuse_layers=True`` identical decoder layers are compiled once and reused
    (regions.py): each layer instance's call becomes a ``torch.compiler.nested_compile_region``,
    without editing the model's code. The report still counts each fusion once per layer; its
    notes say whether layers were marked, or why not. ``"auto"`` (the default) marks them where
    inductor launches the kernels (the default ``FASTLORA_LAUNCH=inductor``, a model on a GPU),
    whose compile it shortens, and not on the Python launch route or the CPU, where it saved no
    compile time (docs/options.md).

    With gradient checkpointing on (``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs={"use_reentrant": False})``, as the Trainer's
    ``gradient_checkpointing=True`` does with those kwargs), the checkpointed layers' inputs go
    to pinned host memory between forward and backward on a GPU (``offload_activations``,
    "auto" by default: the backend sees the checkpointed regions in the graph it is given;
    ``offload_activations=False`` turns it off; docs/options.md). Those layers then run
    unmarked whatever ``reuse_layers`` says: inside a shared layer body an input cannot be
    offloaded (``regions.Rules``). The ``requires_grad_()`` hook that checkpointing puts on the
    input embeddings made Dynamo trace the whole model again once per nested frame: input
    embeddings with a forward hook are called outside Dynamo (hooked_embeddings.py).

    Wrapped in ``DistributedDataParallel`` afterwards (as a Trainer launched by ``torchrun`` or
    ``accelerate launch`` does), the model's graphs are fused whole and then split at DDP's
    gradient buckets, instead of being split by Dynamo before fastlora sees them (which loses
    the fusions a bucket boundary cuts; distributed.py, docs/multi_gpu.md).

    With ``remove_padding=True`` (off by default: on the H200 it measured no faster than the
    padded batch, its host syncs costing the host/GPU overlap; docs/options.md) a padded call
    (``attention_mask`` with zeros) is packed into one padding-free row before the compiled
    model runs, and its per-token outputs are put back in the padded layout (pad positions
    hold zeros): no pad token goes through the norms, projections, MLP or loss, and the graph
    is the padding-free path's, compiled once for every length. Each call is packed only where
    unpad.py proves the loss and gradients eager's (label and mask checks, supported families);
    otherwise it runs padded as given, with the reason logged once and noted in the report
    (``unpad.stats(model)`` counts both). Returns ``model``.
    """
    opts = Options.parse(options)
    opts.check_pattern_names({p.name for p in registered_patterns()})
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("this model is already compiled in place; compile it only once")
    gpu_only = opts.reuse_layers == "auto"  # "auto": regions only while the model is on a GPU
    opts = dataclasses.replace(opts, reuse_layers=regions.resolve(opts.reuse_layers))
    refused = regions.why_not(opts, model)
    rules = regions.Rules(dynamic=bool(dynamic), gpu_only=gpu_only,
                          offload_on_gpu=offload.offloads_layer_inputs(opts, on_gpu=True),
                          offload_on_cpu=offload.offloads_layer_inputs(opts, on_gpu=False),
                          budget=memory_budget.size_in_bytes(opts.memory_budget) is not None,
                          offload_sized=offload.offloads_by_size(opts))
    layers = regions.mark(model, rules) if refused is None else []
    marked = len(layers)
    if not opts.reuse_layers:  # off (or "auto" on the Python launch route): nothing to say
        note = None
    elif refused is None:
        note = f"{marked} decoder layers marked to be compiled once (reuse_layers)" \
            if marked else "no decoder layers found to compile once (reuse_layers)"
    else:
        note = f"decoder layers compiled one by one: {refused}"
    before_table, table_note = host_embeddings.plan(model, opts.offload_embeddings, opts.mode)
    before_head, head_note = host_lm_head.plan(model, opts.offload_lm_head, opts.mode)
    before_hooked, hooked_note = hooked_embeddings.plan(model, dynamic is True)

    def before_each_call():
        before_table()
        before_head()
        before_hooked()
    # dynamic=True is applied per call (_traced_with_settings): every size symbolic, as
    # torch.compile(dynamic=True) makes them, except for checkpointed layers compiled once
    model.compile(backend="fastlora", options=options or None,
                  dynamic=None if dynamic is True else dynamic)
    call = _traced_with_settings(
        model._compiled_call_impl, specialize_float=bool(dynamic),
        dynamic=(lambda: "batch" if regions.shares_checkpointed(layers) else "all")
        if dynamic is True else None,
        notes=(lambda: None if gpu_only and not regions.on_gpu(model) else
               (regions.why(model) if marked else None) or note, table_note, head_note,
               hooked_note),
        before_each_call=before_each_call)
    model._compiled_call_impl = unpad.wrap(call, model) if opts.remove_padding else call
    return model


def _traced_with_settings(compiled, specialize_float: bool, notes=(),
                          before_each_call=lambda: None, dynamic=None):
    """``compiled`` called with fastlora's Dynamo settings for this model, applied the way
    ``torch.compile``'s own ``dynamic=`` is: configuration patches around each call of this
    compiled function only (Dynamo reads them while tracing; a call that traces nothing pays a
    few microseconds).

    - ``specialize_float`` (with dynamic shapes): float constants stay constants.
    - ``dynamic()`` (``compile_for_trainer``'s ``dynamic=True``, asked at each call): ``"all"``,
      every size symbolic, which is what ``torch.compile(dynamic=True)`` patches in; ``"batch"``,
      only the first two dimensions (batch, sequence) of every tensor argument
      (``mark_batch_dims``): what lets checkpointed decoder layers share one compiled body.
    - under DDP, Dynamo's split at gradient buckets is left to the backend, after fusion
      (``distributed.fuse_before_ddp_split``).
    - ``notes``: what each report says about the decoder layers (compiled once or why not) and
      the input embeddings (regions.noting: strings, or functions called only when a call
      traces).
    - ``before_each_call()``: offload_embeddings' move of the table to host memory
      (host_embeddings.py) and offload_lm_head's of the head, whose copy to the GPU it starts
      (host_lm_head.py); input embeddings with a forward hook called outside Dynamo
      (hooked_embeddings.py); before Dynamo sees the call.
    """
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        before_each_call()
        with contextlib.ExitStack() as stack:
            if dynamic is not None and dynamic() == "batch":
                mark_batch_dims(*args, *kwargs.values())
            elif dynamic is not None:
                stack.enter_context(torch._dynamo.config.patch(assume_static_by_default=False))
            if specialize_float:
                stack.enter_context(torch._dynamo.config.patch(specialize_float=True))
            stack.enter_context(distributed.fuse_before_ddp_split())
            stack.enter_context(regions.noting(*notes))  # read only while Dynamo traces
            return compiled(*args, **kwargs)
    return call


def mark_batch_dims(*values) -> None:
    """Dimensions 0 and 1 of each tensor in ``values`` (batch and sequence: ``input_ids``,
    ``attention_mask``, ``labels``, ``position_ids``, ``inputs_embeds``) become symbolic at
    Dynamo's first trace, the weak form (``maybe_mark_dynamic``): a dimension the model's code
    specializes (a size 1, a branch on it) stays static without an error. Every other size
    (hidden, heads, vocabulary) stays static. With every size symbolic, as
    ``torch.compile(dynamic=True)`` makes them, torch 2.13's Dynamo failed to reuse a
    checkpointed decoder layer's body (KeyError in stamp_out_subgraph); with these marks the
    checkpointed layers share one. Frames Dynamo resumes after a graph break (TRL's chunked
    loss head) get intermediate tensors, not marked: static at their first compile, dynamic
    after one recompile. So this is used only where layers are shared under checkpointing."""
    for value in values:
        if isinstance(value, torch.Tensor):
            for dim in range(min(2, value.dim())):
                torch._dynamo.maybe_mark_dynamic(value, dim)


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process (every recompilation counts)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
