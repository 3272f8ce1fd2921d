"""Pad tokens removed before the compiled model runs: ``compile_for_trainer(model,
remove_padding=True)``.

A padded batch (``input_ids [B, S]``, ``attention_mask [B, S]`` with 1 on tokens and 0 on pads)
costs B*S tokens in every token-wise op (the norms, the seven LoRA projections, the MLP, the LM
head and the loss) and B*S query rows in attention, while only T = mask.sum() tokens are real.
The model already trains fused on packed rows (TRL's ``padding_free``: one row, position ids
restarting per example, no mask; HF splits such a row into documents and fastlora's attention
keeps them apart). This module turns a padded call into that call, outside the compiled graph,
and the outputs back; the user's collator is unchanged.

Pack (index work in eager PyTorch, outside Dynamo: T depends on the data; the compiled graph sees
``[1, T]`` with T symbolic, the graph of the padding-free path, compiled once for all lengths)::

    idx = nonzero(mask.flatten())                  # [T] the real tokens, row by row
    row = idx // S                                 # which example each belongs to
    input_ids'    = input_ids.flatten()[idx][None]            # [1, T]
    position_ids' = P.flatten()[idx][None]        # P: the caller's position_ids, or arange(S) in
                                                  # every row: what Llama, Mistral, Qwen2/3 and
                                                  # Gemma 1/2 use without them, left padding too
    labels'       = labels.flatten()[idx][None], set to -100 where row[k] != row[k-1]
    attention_mask dropped, use_cache=False (HF looks for documents only without a cache)

Why it is exact; each point is checked at each call (``plan``), else the call runs padded as
given, with the reason logged once and noted in the report of the graph it compiles:

- **Attention.** Eager lets real token (r, c) attend to the keys (r, c') with c' <= c and
  mask[r, c'] = 1 (a sliding window adds c - c' < w). Checked: every row's tokens are one run of
  columns, and the packed position ids step by exactly 1 inside a row and by anything else
  between rows. Then HF's documents (where positions do not step by 1) are the rows, a token
  sees the earlier tokens of its row, and distances in the row are distances in the window; the
  position ids, hence RoPE, are eager's. Pad queries are not computed: eager's outputs there
  feed nothing but pad logits.
- **Loss.** Eager's shifted loss predicts labels[r, c] from the logits at (r, c - 1), for every
  c >= 1 with labels[r, c] != -100. The packed row predicts labels'[k] from token k - 1, which is
  (r, c - 1) when both columns are real in one row; labels' at each row's first token are -100
  so no prediction crosses rows. Checked: every eager target has mask[r, c] = mask[r, c - 1] = 1.
  This refuses labels on pads (a collator that leaves them: eager trains on pad targets), and
  left padding whose first real token is a target (eager predicts it from the pad before it; a
  completion-only loss, -100 on the prompt, passes). The targets are then the same set, so the
  mean (or the sum over ``num_items_in_batch``, passed on) is eager's, and so is every gradient.
- **The rest** is token-wise: norms, projections, MLP, the LM head. Refused: families not in
  ``FAMILIES`` (MoE router losses, recurrent or convolutional mixers, other default positions),
  models that are not ``*ForCausalLM`` (a classifier pools one token per row),
  attention implementations other than sdpa/eager, ``inputs_embeds``, ``past_key_values``,
  ``use_cache=True``, ``cache_position``, a mask that is not 2-D of 0/1, positional arguments,
  ``output_attentions``/``output_hidden_states``, ``return_dict=False``, ``logits_to_keep``, and
  any argument not named here (a None value is passed on as given).

Outputs: the loss as returned. Per-token outputs come back in eager's layout: a ``[1, T, ...]``
tensor (logits, hidden states of a base model) as ``[B, S, ...]``, a ``[1, T - 1, ...]`` tensor
(TRL's ``fused_lm_head`` fields: ``log_probs``, ``label_mask``, ...; shifted: k predicts k + 1)
as ``[B, S - 1, ...]``; **pad positions hold zeros** (False for booleans), differentiable
scatters. fastlora's NaN stand-in for dropped logits (``return_logits=False``) stays a stand-in,
NaN of the padded shape, no memory. ``past_key_values`` is None (no cache was asked for).

What it saves: B*S - T tokens of every token-wise op and their activations, and the pad query
rows of attention. What it costs: the index computation and gathers above, two host syncs per
call on a GPU (nonzero's size, then every check at once), and a ``[B, S, V]`` scatter when
logits are returned. LoRA dropout draws its random mask over T tokens instead of B*S: the same
distribution, other bits.
"""
from __future__ import annotations

import collections
import functools
import weakref

import torch

from . import regions
from .report import log

# config.model_type, checked in transformers 5.25: position_ids default to arange(S) (plus the
# cache length) whatever the mask, masks come from create_causal_mask /
# create_sliding_window_causal_mask (which split packed position ids into documents), and
# nothing outside attention mixes tokens. Each is compared with eager in
# tests/test_remove_padding.py.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})
ATTENTION = frozenset({"sdpa", "eager"})

# keyword -> the values that may be passed on unchanged (None is always fine)
_FIXED = {"use_cache": (False,), "return_dict": (True,), "output_attentions": (False,),
          "output_hidden_states": (False,), "logits_to_keep": (0,)}
_HANDLED = {"input_ids", "attention_mask", "labels", "position_ids", "num_items_in_batch",
            "fused_lm_head"}

PACKED_NOTE = ("remove_padding: this graph runs padded batches packed into one row, pad tokens "
               "removed before the call (unpad.py)")


class Packed:
    """One packed call: ``kwargs`` for the compiled model, ``repad`` for its output."""

    def __init__(self, kwargs: dict, idx: torch.Tensor, rows: int, width: int,
                 same_row_next: torch.Tensor):
        self.kwargs, self.idx, self.rows, self.width = kwargs, idx, rows, width
        self._next = same_row_next  # [T - 1] bool: packed token k + 1 is in k's row

    def repad(self, out):
        """``out`` of the packed call with its per-token tensors back in the padded layout."""
        if not hasattr(out, "keys"):  # return_dict=False is refused: a ModelOutput or a dict
            return out
        T = self.idx.numel()
        for key in list(out.keys()):
            value = out[key]
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != 1:
                continue
            if value.shape[1] == T:
                out[key] = self._scatter(value, self.idx, self.width)
            elif value.shape[1] == T - 1:  # shifted: position k predicts token k + 1
                keep = self._next.nonzero().squeeze(1)
                flat = self.idx[keep]  # (row, col) of k; col <= S - 2 as k + 1 is in its row
                flat = flat // self.width * (self.width - 1) + flat % self.width
                out[key] = self._scatter(value[:, keep], flat, self.width - 1)
        return out

    def _scatter(self, value, flat, width):
        shape = (self.rows, width, *value.shape[2:])
        if all(s == 0 for s in value.stride()):  # a stand-in (NaN logits): keep it one value
            return value[(0,) * value.dim()].expand(shape)
        full = value.new_zeros((self.rows * width, *value.shape[2:]))
        return full.index_copy(0, flat, value[0]).view(shape)


def plan(model, args: tuple, kwargs: dict) -> Packed | str | None:
    """The packed call for ``model(*args, **kwargs)``; else why not (a one-line reason); None
    when there is nothing to remove (no ``attention_mask``)."""
    if kwargs.get("attention_mask") is None:
        return None
    if args:
        return "positional arguments (only keyword calls are packed)"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's
    if not type(inner).__name__.endswith("ForCausalLM"):
        return f"{type(inner).__name__} is not a causal LM (its outputs are not per token)"
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return (f"model family {family!r} is not one whose packed rows are proven equal to its "
                f"padded rows ({', '.join(sorted(FAMILIES))})")
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ATTENTION:
        return f"attention implementation {attn!r} (packed rows checked for sdpa and eager)"
    for key, value in kwargs.items():
        if value is None or key in _HANDLED or (key in _FIXED and not isinstance(
                value, torch.Tensor) and value in _FIXED[key]):
            continue
        return f"argument {key}={_short(value)} (a padded call keeps its own semantics for it)"
    ids, mask = kwargs.get("input_ids"), kwargs["attention_mask"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "no 2-D input_ids"
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))}, not input_ids' " \
               f"{tuple(ids.shape)}"
    B, S = ids.shape
    pos, labels = kwargs.get("position_ids"), kwargs.get("labels")
    if pos is not None and (pos.dim() != 2 or pos.shape[1] != S or pos.shape[0] not in (1, B)):
        return f"position_ids of shape {tuple(pos.shape)}"
    if labels is not None and labels.shape != ids.shape:
        return f"labels of shape {tuple(labels.shape)}"
    m = mask != 0
    idx = m.flatten().nonzero().squeeze(1)  # the one data-dependent size (a sync on a GPU)
    row = idx // S
    P = torch.arange(S, device=ids.device).expand(B, S) if pos is None else pos.expand(B, S)
    P = P.to(ids.device).flatten()[idx]
    same_row = row[1:] == row[:-1]
    start = m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]  # a run of tokens starts here
    checks = [((mask == 0) | (mask == 1)).all(),
              (start.sum(1) <= 1).all(),
              ((P[1:] - P[:-1] == 1) == same_row).all()]
    if labels is not None:
        target = labels[:, 1:] != -100
        checks.append((~target | (m[:, 1:] & m[:, :-1])).all())
    ok = torch.stack(checks).tolist()  # one sync for every check
    if idx.numel() == 0:
        return "no token in the batch (the mask is all zeros)"
    for passed, why in zip(ok, ("attention_mask values other than 0 and 1",
                                "a row whose tokens are not one run (holes in the mask)",
                                "position ids that do not step by 1 within each row and break "
                                "between rows (packed rows would not be the batch's rows)",
                                "a label on a pad, or a target predicted from a pad (left padding "
                                "whose first token is a target); eager trains on it")):
        if not passed:
            return why
    new = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    new["input_ids"] = ids.flatten()[idx][None]
    new["position_ids"] = P[None]
    new["use_cache"] = False
    if labels is not None:
        packed = labels.flatten()[idx].clone()
        packed[torch.nn.functional.pad(~same_row, (1, 0), value=True)] = -100
        new["labels"] = packed[None]
    return Packed(new, idx, B, S, same_row)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# model -> {"packed": calls packed, "padded": Counter of reasons}
_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def stats(model: torch.nn.Module) -> dict:
    """How many calls of ``model`` were packed, and why the others ran padded (reason: count)."""
    s = _STATS.get(model) or {"packed": 0, "padded": collections.Counter()}
    return {"packed": s["packed"], "padded": dict(s["padded"])}


def wrap(compiled, model: torch.nn.Module):
    """``compiled`` (the model's compiled call) called on the packed batch where ``plan`` proves
    it exact, else on the batch as given. Each reason for the latter is logged once (WARNING on
    the ``fastlora`` logger) and noted in the report of a graph it traces."""
    ref = weakref.ref(model)
    _STATS[model] = {"packed": 0, "padded": collections.Counter()}

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        owner = ref()
        packed = plan(owner, args, kwargs) if owner is not None else None
        s = _STATS.get(owner) if owner is not None else None
        if isinstance(packed, Packed):
            if s is not None:
                s["packed"] += 1
            with regions.noting(PACKED_NOTE):
                out = compiled(**packed.kwargs)
            return packed.repad(out)
        if packed is None:
            return compiled(*args, **kwargs)
        if s is not None:
            if not s["padded"][packed]:
                log.warning("fastlora: remove_padding: a batch runs padded: %s", packed)
            s["padded"][packed] += 1
        with regions.noting(f"remove_padding: this graph runs padded batches as given: {packed}"):
            return compiled(*args, **kwargs)
    return call
