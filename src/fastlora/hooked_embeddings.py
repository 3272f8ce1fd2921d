"""Input embeddings with a forward hook are called outside Dynamo (compile_for_trainer).

With gradient checkpointing, transformers (``gradient_checkpointing_enable``, through
``enable_input_require_grads``) and peft put a forward hook on the input embeddings that calls
``output.requires_grad_(True)``. Dynamo cannot keep that call in a graph whose outputs derive
from the tensor, and finds out only when it compiles the graph's outputs, after tracing the
whole model; it then restarts, and again for each frame the call is nested in (the peft model,
the causal LM, the decoder model, the module call, the hook). A 4-layer checkpointed tiny Llama
was traced eight times over (first step 44.2 s on this repository's 2-core CPU machine, 13.0 s
with the embeddings called outside Dynamo); each retrace costs what tracing every layer does,
so the waste grows with depth.

So ``compile_for_trainer`` runs such an embedding module's call outside Dynamo: before each
call of the compiled model, a module whose forward hooks are not empty gets a
``torch.compiler.disable``-d call in its instance slot ``_compiled_call_impl`` (the slot
``nn.Module.compile`` fills; ``nn.Module.__call__`` calls it, hooks included). Dynamo then
breaks the graph at the embedding's call as soon as it reaches it: the lookup and its hooks run
eagerly, as they would have after the restarts, and the rest of the model is one graph whose
input is the embedding's output (with compile_for_trainer's dynamic shapes, its batch and
sequence sizes marked symbolic, as the call's own arguments are). Nothing is computed
differently. A module without hooks (or
whose hooks were removed) is left or put back as it was; a slot someone else filled (the
embedding compiled on its own) is left alone. ``nn.Module.__getstate__`` drops the slot, so a
copy or pickle of the model does not carry it.
"""
from __future__ import annotations

import torch

from . import host_embeddings

_MARK = "_fastlora_eager_embedding_call"  # set on the disabled call (not on the module, whose
# __dict__ a pickle would carry)
NOTE = ("input embeddings called outside the compiled graph: a forward hook on them "
        "(enable_input_require_grads, with gradient checkpointing) calls requires_grad_(), which "
        "Dynamo finds only after tracing the whole model, once per nested frame")


def _eager_call(module: torch.nn.Module, mark_batch_dims: bool):
    """The module's call, outside Dynamo. ``mark_batch_dims``: its output's batch and sequence
    dimensions become symbolic where Dynamo resumes with it (trainer.mark_batch_dims; with
    compile_for_trainer's dynamic shapes only those two of the call's arguments are marked,
    and the graph after the break starts from this output)."""
    from .trainer import mark_batch_dims as mark

    def call(*args, **kwargs):
        out = module._call_impl(*args, **kwargs)
        if mark_batch_dims:
            mark(out)
        return out
    call = torch.compiler.disable(call, reason="fastlora: the input embeddings' forward hook")
    setattr(call, _MARK, True)
    return call


def keep_eager(module: torch.nn.Module | None, mark_batch_dims: bool = False) -> bool:
    """Before a call: ``module`` is called outside Dynamo while it has forward hooks, and as
    before once it has none. Returns whether it is called outside Dynamo now."""
    if module is None:
        return False
    ours = getattr(module._compiled_call_impl, _MARK, False)
    if module._forward_hooks:
        if module._compiled_call_impl is None:
            module._compiled_call_impl = _eager_call(module, mark_batch_dims)
            return True
        return ours
    if ours:
        module._compiled_call_impl = None
    return False


LEAKED = "requires_grad_() intermediate leaked as output"  # Dynamo's graph break, first line
_leaks_seen = 0


def retraced_note() -> str | None:
    """For the backend, at each graph: a note when Dynamo threw traces away for a
    ``requires_grad_()`` leak since the last graph (a model compiled with plain
    ``torch.compile``, whose embeddings this module cannot change), else None."""
    global _leaks_seen
    from torch._dynamo.utils import counters
    leaks = sum(n for reason, n in counters["graph_break"].items() if LEAKED in reason)
    new, _leaks_seen = leaks - _leaks_seen, leaks
    if new <= 0:
        return None
    return (f"Dynamo traced this model {new} more time(s) and threw the traces away: "
            f"requires_grad_() on an intermediate (transformers' enable_input_require_grads hook "
            f"on the input embeddings, with gradient checkpointing); "
            f"fastlora.compile_for_trainer calls such embeddings outside Dynamo")


def plan(model: torch.nn.Module, dynamic: bool):
    """``(before_each_call, note)`` for compile_for_trainer (``dynamic``: its ``dynamic=True``,
    whose batch and sequence sizes the embeddings' output keeps symbolic)."""
    state = {"module": None, "eager": False}

    def before_each_call():
        if state["module"] is None:
            state["module"] = host_embeddings.input_embeddings(model) or False
        state["eager"] = keep_eager(state["module"] or None, dynamic)

    return before_each_call, (lambda: NOTE if state["eager"] else None)
