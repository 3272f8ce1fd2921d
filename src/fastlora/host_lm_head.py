"""A frozen lm_head kept in pinned host memory, on the GPU only for the loss (``offload_lm_head``).

A LoRA fine-tune does not train the lm_head, yet its weight holds GPU memory through the whole
step: 0.98 GiB for Llama-3-8B's 128256 x 4096 bfloat16 head. With the loss fused
(patterns/linear_cross_entropy.py) the head is read once a step, in the forward: the fused op
computes the hidden states' gradient there and never reads the head again. So the head can live
in pinned host memory and come to the GPU for the loss alone. A checkpointed step peaks in the
backward, where the head is then no longer on the GPU.

How, without editing the model's code (as host_embeddings.py does for the input table):
``compile_for_trainer`` gives the lm_head module *instance* a ``forward`` attribute that
computes its product with ``torch.ops.fastlora.linear_from_host``; Dynamo traces that op, and
the fused loss has a spelling for it (``causal_lm_loss_host_head``). Before each call of the
compiled model, :func:`plan`'s hook moves the weight's data to pinned host memory if it is on a
GPU (``host_embeddings.keep_on_host``: the same parameter object); the loss copies it to the
GPU when it runs and frees the copy when it returns. Without gradient checkpointing the copy is
started before the call instead, on a side stream (kernels/_host_weights.py), overlapping the
decoder layers' forward (:func:`_checkpointed` says why not with checkpointing). A
product that is not fused (``return_logits=True``, evaluation, ``generate``) reads the head
through ``linear_from_host`` too, copying it at each call (and again in its backward).

Only where it is provably the same computation (:func:`why_not`): a plain ``nn.Linear`` without
bias (a LoRA-wrapped head is trained), frozen, not tied to the input embeddings, in one process.
"""
from __future__ import annotations

import functools

import torch

from . import host_embeddings
from .kernels import _host_weights

# "auto": on for a model that trains with gradient checkpointing at the first call. Measured on
# one H100 (2026-12-06, Llama-3-8B, 4 x 2048, checkpointed, the input table in host memory too):
# LoRA 16.30 GiB at 11,665 tok/s against 17.28 GiB at 11,943 with the head on the GPU; QLoRA
# 6.28 GiB at 10,493 tok/s against 7.14 at 10,403-10,480 (an earlier H100). Without
# checkpointing the step peaks at the loss, where the head must be on the GPU anyway: no saving,
# so "auto" leaves it there. OFFLOAD_BY_DEFAULT False turns "auto" off altogether.
OFFLOAD_BY_DEFAULT = True
NOT_CHECKPOINTED = "the model trains without gradient checkpointing"

_MARK = "_fastlora_host_head"


def wanted(value, mode: str | None = None) -> bool:
    """Whether ``offload_lm_head=value`` asks for it (``"auto"``: ``OFFLOAD_BY_DEFAULT``, and
    never under CUDA graphs, which do not capture a host tensor input; :func:`plan` then also
    waits for a checkpointed model)."""
    return host_embeddings.wanted(value, mode, by_default=OFFLOAD_BY_DEFAULT)


def lm_head(model: torch.nn.Module):
    """``model.get_output_embeddings()``, or None where the model has none."""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def why_not(model: torch.nn.Module) -> str | None:
    """Why ``model``'s lm_head cannot be read from host memory, else None."""
    head = lm_head(model)
    if head is None:
        return "the model has no lm_head (get_output_embeddings)"
    if type(head) is not torch.nn.Linear:
        return (f"the lm_head is a {type(head).__name__}, not a plain nn.Linear (a LoRA-wrapped "
                "head is trained)")
    if head.weight.requires_grad:
        return "the lm_head is trained (requires_grad)"
    if head.bias is not None:
        return "the lm_head has a bias"
    if sum(p is head.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return "the lm_head is tied to another weight (tie_word_embeddings)"
    if host_embeddings._several_processes():
        return host_embeddings.DISTRIBUTED
    return _replaced_forward(_holders(model))


def _holders(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that hold the lm_head: ``model`` and each module on the path down to it."""
    head = lm_head(model)
    for name, module in model.named_modules(remove_duplicate=False):
        if module is head:
            parts = name.split(".") if name else []
            return [model] + [model.get_submodule(".".join(parts[:i]))
                              for i in range(1, len(parts))]
    return [model]


def _replaced_forward(holders: list[torch.nn.Module]) -> str | None:
    """Why the head may be read outside its own forward, else None: one of its ``holders``
    (:func:`_holders`) has a ``forward`` replaced on the instance. TRL's trainers do that
    (``add_fused_lm_head``: the model's forward computes log-probabilities from
    ``lm_head.weight`` itself, and would compute them wherever that weight is, on the CPU from
    host memory)."""
    for module in holders:
        if "forward" in vars(module):
            return (f"the {type(module).__name__} holding the lm_head has a forward of its own on "
                    "the instance (TRL's fused LM head, for one), which may read the head's "
                    "weight itself")
    return None


def _project(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A marked lm_head's ``forward``: its product, wherever its weight is."""
    if head.weight.requires_grad:
        raise RuntimeError("fastlora: the lm_head was frozen when compile_for_trainer moved it "
                           "to linear_from_host and now requires grad; compile with "
                           "offload_lm_head=False to train it")
    if torch.is_autocast_enabled(x.device.type):
        raise RuntimeError("fastlora: offload_lm_head does not run under autocast (its product "
                           "would not be cast as nn.Linear's is); load the model in the "
                           "training dtype or compile with offload_lm_head=False")
    return torch.ops.fastlora.linear_from_host(x, head.weight)


def mark(model: torch.nn.Module) -> torch.nn.Linear:
    """Route the lm_head's product through ``linear_from_host`` (``why_not`` must be None);
    returns the module. The weight moves at the next call of the compiled model."""
    head = lm_head(model)
    if "forward" in vars(head) and not getattr(head, _MARK, False):
        raise RuntimeError(f"the lm_head ({type(head).__name__}) has a forward of its own on the "
                           "instance (set by another library); pass offload_lm_head=False")
    head.forward = functools.partial(_project, head)
    setattr(head, _MARK, True)
    return head


def note(head: torch.nn.Linear, kept_because: str | None) -> str:
    """What the report of a graph traced now says about the lm_head."""
    weight = head.weight
    if kept_because:
        return refused_note(kept_because)
    if _host_weights.is_on_host(weight):
        return (f"lm_head kept in pinned host memory, copied to the GPU for the loss "
                f"({weight.numel() * weight.element_size() / 2**30:.2f} GiB; offload_lm_head)")
    return f"lm_head computed by linear_from_host on {weight.device} " \
           "(offload_lm_head: the weight is not in pinned host memory)"


def refused_note(reason: str) -> str:
    return f"lm_head not moved to host memory: {reason} (offload_lm_head)"


def _checkpointed(state: dict) -> bool:
    """Whether the model trains with gradient checkpointing now (the flag transformers sets on
    the decoder model and its layers). Such a step peaks in a layer's backward or forward, and a
    head prefetched at the start of the call sits through every layer's forward: on one H100
    (Llama-3-8B, 4 x 2048, checkpointed, input table in host memory too) the peak with the head
    prefetched was 16.30 GiB, against 16.80 with the head on the GPU: half of its 0.98 GiB. So
    a checkpointed step copies the head when the loss runs (its GPU copy exists only during the
    loss); a step without checkpointing, whose saved activations peak at the loss anyway,
    prefetches. (Measured since, on another H100 call: copied at the loss, the peak was the
    same 16.30 GiB, 17.28 with the head on the GPU: the peak is where both forms hold it.)"""
    if state.get("layer") is None:  # the first module with transformers' flag (the decoder)
        state["layer"] = next((m for m in state["model"].modules()
                               if isinstance(getattr(m, "gradient_checkpointing", None), bool)),
                              False)
    layer = state["layer"]
    return bool(layer) and layer.training and layer.gradient_checkpointing


def plan(model: torch.nn.Module, value, mode: str | None = None):
    """``(before_each_call, note)`` for ``offload_lm_head=value`` in compile_for_trainer
    (host_embeddings.plan_move): ``True`` decides now; ``"auto"`` at the first call, for a head
    on a GPU of a model that trains with gradient checkpointing then. Before each call the
    weight is kept in (or moved to) pinned host memory and, without gradient checkpointing, its
    copy to the GPU it came from is started (:func:`_checkpointed` says why not with it)."""
    if not wanted(value, mode):
        return (lambda: None), None
    state = {"device": None, "model": model, "layer": None}

    def why_not_now():
        if value == "auto" and not _checkpointed(state):
            return NOT_CHECKPOINTED
        return why_not(model)

    def refused(reason):  # "auto" on a model without checkpointing: nothing to say
        return None if reason == NOT_CHECKPOINTED else refused_note(reason)

    holders = _holders(model)

    def after_move(head: torch.nn.Linear, was_on: torch.device):
        """Each call, the head in host memory: still read only through its forward (a forward
        replaced after compiling stops the call), then prefetched where that pays."""
        replaced = _replaced_forward(holders)
        if replaced is not None:
            raise RuntimeError(f"fastlora: {replaced}; the head is in host memory "
                               "(offload_lm_head): compile with offload_lm_head=False")
        if was_on.type == "cuda":
            state["device"] = was_on
        if state["device"] is not None and not _checkpointed(state):
            _host_weights.prefetch(head.weight, state["device"])
    return host_embeddings.plan_move(value, lambda: lm_head(model), why_not_now,
                                     lambda: mark(model), note, refused, after_move=after_move)
