"""Frozen input embeddings kept in pinned host memory (``offload_embeddings``).

A LoRA fine-tune never trains the input embedding table, yet it holds GPU memory for the whole
run: 0.98 GiB for Llama-3-8B's 128256 x 4096 bfloat16 table, about an eighth of an 8B QLoRA
step's peak. Each step only reads the rows of its tokens (64 MiB for 4 x 2048 tokens), so the
table can live in pinned host memory and be read in place by the GPU
(kernels/embedding_from_host.py): the same values, copied, none computed.

How, without editing the model's code: ``compile_for_trainer`` gives the embedding module
*instance* a ``forward`` attribute (``nn.Module.__call__`` calls it, hooks included, such as
peft's ``enable_input_require_grads``) that looks the ids up with
``torch.ops.fastlora.embedding_from_host``; Dynamo traces that op. Before each call of the
compiled model, :func:`keep_on_host` moves the table's data to pinned host memory if it is on a
GPU (the first call; or again after a ``model.to("cuda")``, such as the Trainer's at its
construction). The parameter object stays the same: the state dict, saving and ``generate``
see the same values, on the CPU.

Only where it is provably the same computation (:func:`why_not`): a plain ``nn.Embedding``
(a subclass may scale or add, as Gemma's does), frozen, not tied to another weight (a tied
lm_head would read the table on every step), without ``max_norm`` (which rewrites the table) or
sparse gradients, in one process (distributed wrappers broadcast parameters). Anything else
keeps its table on the GPU and the report says why.
"""
from __future__ import annotations

import functools

import torch

# "auto": on where the table is on a GPU at the first call. Measured no slower (Llama-3-8B,
# 4 x 2048, checkpointed, one H100: LoRA 11.10k vs 11.14k tok/s, QLoRA 10.48k vs 10.50k) and
# 0.98 GiB lower (docs/options.md).
OFFLOAD_BY_DEFAULT = True

_MARK = "_fastlora_host_table"
DISTRIBUTED = "distributed training (not tried with several processes)"


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wanted(value, mode: str | None = None, by_default: bool | None = None) -> bool:
    """Whether ``offload_embeddings=value`` asks for it. ``"auto"`` follows ``by_default``
    (``OFFLOAD_BY_DEFAULT`` if None) and is off under CUDA graphs (a graph with a host tensor
    input is not captured)."""
    if value == "auto":
        by_default = OFFLOAD_BY_DEFAULT if by_default is None else by_default
        return by_default and mode != "reduce-overhead"
    return bool(value)


def input_embeddings(model: torch.nn.Module):
    """``model.get_input_embeddings()``, or None where the model has none."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def why_not(model: torch.nn.Module) -> str | None:
    """Why ``model``'s input embedding table cannot be read from host memory, else None."""
    emb = input_embeddings(model)
    if emb is None:
        return "the model has no input embeddings (get_input_embeddings)"
    if type(emb) is not torch.nn.Embedding:
        return (f"the input embeddings are a {type(emb).__name__}, not a plain nn.Embedding "
                "(its forward may do more than a lookup)")
    weight = emb.weight
    if weight.requires_grad:
        return "the input embeddings are trained (requires_grad)"
    if emb.max_norm is not None or emb.sparse:
        return "the input embeddings use max_norm or sparse gradients"
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return "the input embeddings are tied to another weight (tie_word_embeddings)"
    if _several_processes():
        return DISTRIBUTED
    return None


def _lookup(emb: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """A marked embedding's ``forward``: its rows, wherever its table is."""
    if emb.weight.requires_grad:
        raise RuntimeError("fastlora: the input embeddings were frozen when compile_for_trainer "
                           "moved their lookups to embedding_from_host and now require grad; "
                           "compile with offload_embeddings=False to train them")
    return torch.ops.fastlora.embedding_from_host(ids, emb.weight)


def mark(model: torch.nn.Module) -> torch.nn.Embedding:
    """Route the input embeddings' lookups through ``embedding_from_host`` (``why_not`` must
    be None); returns the module. The table moves at the next :func:`keep_on_host`."""
    emb = input_embeddings(model)
    if "forward" in vars(emb) and not getattr(emb, _MARK, False):
        raise RuntimeError(f"{type(emb).__name__} has a forward of its own on the instance (set "
                           "by another library); pass offload_embeddings=False")
    emb.forward = functools.partial(_lookup, emb)
    setattr(emb, _MARK, True)
    return emb


def keep_on_host(emb: torch.nn.Embedding) -> str | None:
    """Before a call: a marked table on a GPU moves to pinned host memory (in place: the same
    parameter). Returns why it stays on the GPU, else None."""
    weight = emb.weight
    if not weight.is_cuda or weight.requires_grad:  # (a trained table: _lookup refuses it)
        return None
    if _several_processes():
        return DISTRIBUTED
    host = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=True)
    host.copy_(weight.detach())
    weight.data = host
    return None


def refused_note(reason: str) -> str:
    return f"input embeddings not moved to host memory: {reason} (offload_embeddings)"


def note(emb: torch.nn.Embedding, kept_because: str | None) -> str:
    """What the report of a graph traced now says about the table."""
    weight = emb.weight
    if kept_because:
        return refused_note(kept_because)
    if weight.is_pinned():
        return (f"input embeddings read from pinned host memory "
                f"({weight.numel() * weight.element_size() / 2**30:.2f} GiB off the GPU; "
                "offload_embeddings)")
    return f"input embeddings looked up by embedding_from_host on {weight.device} " \
           "(offload_embeddings: the table is not in pinned host memory)"


def plan(model: torch.nn.Module, value, mode: str | None = None):
    """``(before_each_call, note)`` for ``offload_embeddings=value`` in compile_for_trainer:
    the function to call before each call of the compiled model, and the report's note (a
    string, a function returning one, or None). ``True`` decides now; ``"auto"`` at the first
    call, and only for a table on a GPU then: a CPU run keeps nn.Embedding's own lookup, and
    its report says nothing of it."""
    if not wanted(value, mode):
        return (lambda: None), None
    return plan_move(value, lambda: input_embeddings(model), lambda: why_not(model),
                     lambda: mark(model), note, refused_note)


def plan_move(value, module_of, why_not_now, mark_now, note_of, refused_note_of,
              after_move=lambda module, was_on: None):
    """The plan of a frozen weight moved to pinned host memory, shared by the input table
    (here) and the lm_head (host_lm_head.py): ``(before_each_call, note)``. ``True`` decides
    (``why_not_now()``, then ``mark_now()`` returns the module) now; ``"auto"`` at the first
    call, and only where ``module_of()``'s weight is on a GPU then. Before each call a marked
    module's weight is kept in (or moved to) pinned host memory (:func:`keep_on_host`), then
    ``after_move(module, the device its weight was on)`` runs. ``note_of(module, kept_because)``
    and ``refused_note_of(reason)`` give the report's note."""
    state = {"undecided": value == "auto", "module": None, "note": None, "kept_because": None}

    def decide():
        refused = why_not_now()
        if refused is not None:
            state["note"] = refused_note_of(refused)
        else:
            state["module"] = mark_now()
    if not state["undecided"]:
        decide()

    def before_each_call():
        if state["undecided"]:
            state["undecided"] = False
            weight = getattr(module_of(), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_cuda:
                decide()
        module = state["module"]
        if module is not None:
            was_on = module.weight.device
            state["kept_because"] = keep_on_host(module)
            after_move(module, was_on)

    def report_note():
        if state["module"] is None:
            return state["note"]
        return note_of(state["module"], state["kept_because"])
    return before_each_call, report_note
