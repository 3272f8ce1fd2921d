"""Decoder layers compiled once: each identical layer's call becomes a nested compile region.

Without this, Dynamo inlines every decoder layer into one graph, and fastlora and inductor
rewrite and compile each layer again: compile time grows with depth (the warm-up of a 16-layer
Llama-3.2-1B took 63 s on the H200). ``torch.compiler.nested_compile_region`` marks a function
whose calls Dynamo turns into ``invoke_subgraph(body, identifier, *operands)`` calls that share
one body (a GraphModule attribute of the graph) when the traced bodies are the same. The
backend rewrites that body once (backend.py) and AOTAutograd and inductor compile it once.

How a layer is marked, without editing the model's code: the layer *instance* gets a ``forward``
attribute, ``functools.partial(_LAYER_CALL, layer)``; ``nn.Module.__call__`` calls it, hooks
included, and it calls the class's own ``forward`` (which under gradient checkpointing is the
checkpointing wrapper transformers puts there). ``_LAYER_CALL`` is one module-level function for
every layer: torch 2.11 keys the bodies it may share on the marked function's identity, torch
2.13 on its code. :func:`unmark` removes the attribute again.

Layers are the members of an ``nn.ModuleList`` of two or more modules of one class that is a
transformers ``GradientCheckpointingLayer`` (every decoder layer of a recent model).

What decides which calls share a body is Dynamo's comparison of the traced bodies: a layer whose
input differs (the first, whose input is the embedding's output and needs no gradient when the
embedding is frozen) gets a body of its own, as does a layer of another shape or class; so the
depth-independent part is one or two bodies, whatever the depth.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import torch

from .kernels import _launch

_MARK = "_fastlora_region"  # set on a layer this module marked
_RULES = "_fastlora_region_rules"  # its Rules


class Rules(NamedTuple):
    """What decides at each call whether a marked layer runs as a region (``_layer_forward``).

    - ``dynamic``: the model is compiled with dynamic shapes (checkpointed layers are shared
      then only on torch 2.13, ``CHECKPOINTED_SHARED``);
    - ``gpu_only``: ``reuse_layers="auto"``: regions only while the layer is on a GPU;
    - ``offload_on_gpu`` / ``offload_on_cpu``: whether a checkpointed layer's input is
      offloaded to host memory (``offload_activations``, offload.py) in a graph on a GPU / on
      the CPU. The offload needs each layer in the graph: inside a shared body a layer's input
      is an item of the body's call, which PyTorch's partitioner does not offload, so a
      checkpointed layer whose input is offloaded runs unmarked (``OFFLOADED``).
    - ``budget``: ``memory_budget`` is a size, which under checkpointing keeps the last layers
      that fit (memory_budget.py): it counts the layers of one graph, so checkpointed layers
      run unmarked (``BUDGETED``; in a shared body one layer's room would keep every layer).
    - ``offload_sized``: ``offload_activations`` is a size (every saved activation of at least
      that many MiB): what a shared body saves is an item of its call, never offloaded, so
      every layer runs unmarked, checkpointed or not (``OFFLOADED_SIZED``).
    """
    dynamic: bool = False
    gpu_only: bool = False
    offload_on_gpu: bool = False
    offload_on_cpu: bool = False
    budget: bool = False
    offload_sized: bool = False


def _call_layer(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


# nested_compile_region(fn) is the form both torch 2.11 and 2.13 take (2.13 adds keywords).
_LAYER_CALL = torch.compiler.nested_compile_region(_call_layer)


def _checkpointed(layer) -> bool:
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training \
        and torch.is_grad_enabled()


def on_gpu(module: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in module.parameters())


def _layer_forward(layer, rules: Rules, *args, **kwargs):
    """A marked layer's ``forward``: the region, except where it is not proven safe or would
    cost the offload of its input (``why``) or, with ``rules.gpu_only`` (``reuse_layers=
    "auto"``), not on a GPU: there the layer runs as it would unmarked. Dynamo traces this
    choice (and guards on it). Decided at each call: a Trainer turns checkpointing on, and moves
    the model to its GPU, after it was compiled."""
    if _unmarked_now(layer, rules):
        return _call_layer(layer, *args, **kwargs)
    return _LAYER_CALL(layer, *args, **kwargs)


def _refused(layer, rules: Rules, gpu: bool | None = None) -> str | None:
    """Why ``layer`` runs unmarked in this call (checkpointed, or an offload by size), else
    None. ``gpu``: whether the layer is on a GPU, when the caller knows it."""
    if rules.offload_sized:
        return OFFLOADED_SIZED
    if not _checkpointed(layer):
        return None
    if rules.dynamic and not CHECKPOINTED_SHARED:
        return CHECKPOINT_DYNAMIC
    if rules.offload_on_gpu != rules.offload_on_cpu and gpu is None:
        gpu = on_gpu(layer)
    if rules.offload_on_gpu if gpu else rules.offload_on_cpu:
        return OFFLOADED
    if rules.budget:
        return BUDGETED
    return None


def _unmarked_now(layer, rules: Rules, gpu: bool | None = None) -> bool:
    """Whether marked ``layer`` runs as it would unmarked in this call (``_layer_forward``).
    ``gpu``: whether the layer is on a GPU, when the caller knows it."""
    if rules.gpu_only:
        gpu = on_gpu(layer) if gpu is None else gpu
        if not gpu:
            return True
    return _refused(layer, rules, gpu) is not None


# Checkpointed layers with dynamic shapes share one body on torch 2.13, where compile_for_trainer
# makes only the batch and sequence sizes symbolic (trainer.mark_batch_dims; with every size
# symbolic, Dynamo failed to reuse the body: KeyError in stamp_out_subgraph). Not checked on
# older torch: there they are compiled one by one.
CHECKPOINTED_SHARED = torch.__version__ >= (2, 13)
CHECKPOINT_DYNAMIC = ("decoder layers compiled one by one: gradient checkpointing with dynamic "
                      f"shapes on torch {torch.__version__.split('+')[0]} (checked on 2.13 only, "
                      "where one checkpointed body serves every layer)")
OFFLOADED = ("decoder layers compiled one by one: their inputs are offloaded to host memory "
             "under gradient checkpointing (offload_activations), which needs each layer in the "
             "graph; offload_activations=False compiles them once")
OFFLOADED_SIZED = ("decoder layers compiled one by one: offload_activations is a size, and "
                   "what a layer compiled once saves stays inside its shared body, where it "
                   "cannot be offloaded")
BUDGETED = ("decoder layers compiled one by one: memory_budget chooses which checkpointed "
            "layers to keep, which needs each layer in the graph")


def shares_checkpointed(layers: list[torch.nn.Module]) -> bool:
    """Whether the marked ``layers`` run checkpointed as regions in a call now
    (``_layer_forward``'s choice): then compile_for_trainer makes only the batch and sequence
    sizes symbolic (trainer.mark_batch_dims). Asked before every step: the layers are taken to
    be on the first one's device (one walk of its parameters, not one per layer: 2.7 ms a step
    for 32 layers on a CPU otherwise)."""
    if not CHECKPOINTED_SHARED or not layers:
        return False
    gpu = on_gpu(layers[0])
    return any(_checkpointed(m) and not _unmarked_now(m, getattr(m, _RULES), gpu)
               for m in layers)


def why(model: torch.nn.Module) -> str | None:
    """Why ``model``'s marked layers run unmarked in a call now (``_layer_forward``), else None."""
    for m in model.modules():
        reason = _refused(m, getattr(m, _RULES)) if getattr(m, _MARK, False) else None
        if reason:
            return reason
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``: members of a ModuleList of 2+ modules of one class that
    is a transformers GradientCheckpointingLayer."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers too old or absent: nothing to mark
        return []
    found = []
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) == 1 and issubclass(kinds.pop(), GradientCheckpointingLayer):
            found.extend(module)
    return found


def resolve(value) -> bool:
    """Whether ``reuse_layers=value`` asks to mark the layers. ``"auto"``: on where inductor
    launches the fused ops' kernels (``FASTLORA_LAUNCH=inductor``, the default route), whose
    compile it shortens (Llama-3.2-1B's first step 104.5 s against 176.9 s on the H200); off on
    the Python launch route, where it saved nothing (65.0 s against 67.9 s). Marked layers
    with ``"auto"`` run as regions only while on a GPU (``Rules.gpu_only``): on the CPU
    every op stays opaque and regions saved nothing either (docs/options.md)."""
    if value != "auto":
        return bool(value)
    return _launch.LAUNCH == "inductor"


# Layers whose weights are bitsandbytes-quantized are compiled one by one: torch 2.11's Dynamo
# failed comparing two such traced bodies on the H200 (`fastlora train --load-in-4bit`:
# KeyError 'example_value' in are_same_graph_modules), and torch 2.13's shares them only with
# static shapes (with dynamic ones every layer got a body of its own: nothing saved).
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")  # bitsandbytes' weight classes
QUANTIZED = ("bitsandbytes quantized layers (torch 2.11's Dynamo fails comparing their layer "
             "bodies; torch 2.13's shares them only with static shapes)")


def why_not(options, model: torch.nn.Module | None = None) -> str | None:
    """Why layers cannot be compiled once with these backend ``options`` (an ``Options``) on
    ``model``."""
    if not options.reuse_layers:
        return "turned off (reuse_layers=False)"
    if options.compiler == "eager":
        return ("compiler='eager' runs the graph without AOTAutograd, which a shared layer "
                "body (invoke_subgraph) needs for its backward")
    if model is not None and any(type(p).__name__ in _QUANTIZED_PARAMS
                                 for p in model.parameters()):
        return QUANTIZED
    return None


def mark(model: torch.nn.Module, rules: Rules = Rules()) -> list[torch.nn.Module]:
    """Make each decoder layer's call a nested compile region; returns the layers marked.
    ``rules``: when a marked layer runs unmarked instead (``Rules``, ``_layer_forward``)."""
    layers = decoder_layers(model)
    for layer in layers:
        if "forward" in vars(layer) and not getattr(layer, _MARK, False):
            raise RuntimeError(f"{type(layer).__name__} has a forward of its own on the instance "
                               "(set by another library); pass reuse_layers=False")
        layer.forward = functools.partial(_layer_forward, layer, rules)
        setattr(layer, _MARK, True)
        setattr(layer, _RULES, rules)
    return layers


def unmark(model: torch.nn.Module) -> None:
    """Undo :func:`mark`."""
    for layer in model.modules():
        if getattr(layer, _MARK, False):
            del layer.forward
            delattr(layer, _MARK)
            delattr(layer, _RULES)


# What the report of a graph traced inside a compile_for_trainer call says about the layers and
# the batch (decided at each call, before Dynamo traces: the trainer turns checkpointing on after
# compiling; remove_padding packs a call or leaves it padded).
_NOTES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fastlora_notes",
                                                                         default=())


@contextlib.contextmanager
def noting(*notes):
    """While Dynamo traces inside this block, ``notes()`` holds ``notes`` (the ones not None)
    after those of the blocks around it. A note may be a function returning one (or None),
    called only when the notes are read: a call that traces nothing does not compute it."""
    token = _NOTES.set(_NOTES.get() + tuple(n for n in notes if n))
    try:
        yield
    finally:
        _NOTES.reset(token)


def notes() -> tuple[str, ...]:
    return tuple(n for n in (note() if callable(note) else note for note in _NOTES.get()) if n)
