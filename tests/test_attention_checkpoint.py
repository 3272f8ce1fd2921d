"""The attention pattern under gradient checkpointing (HF ``gradient_checkpointing_enable`` with
``use_reentrant=False``): each decoder layer is the body of a ``tag_activation_checkpoint``
higher-order op and the mask enters it as a placeholder. The prover follows that placeholder to
the mask built outside the layer; these tests pin one proven attention per layer, exact losses and
LoRA gradients against eager (padding masks included), and the near misses that must stay
(with their reasons)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

import fastlora
from fastlora.pattern import Reject
from fastlora.patterns._attention_masks import prove_mask
from helpers import compare_compiled, rel_err, tiny_llama, with_lora
from test_attention_padding import padded_inputs
from test_attention_pattern import PACKED, _inputs, only_attention, tiny_gemma2, tiny_mistral

GC = {"use_reentrant": False}
HOP = torch.ops.higher_order.tag_activation_checkpoint


@pytest.fixture
def bodies(monkeypatch):
    """The checkpointed layer bodies the backend saw (so a test knows the layers really were
    checkpoint subgraphs, not inlined)."""
    from fastlora import backend
    seen, real = [], backend._link_callers

    def spy(modules):
        real(modules)
        seen.extend(m for m in modules
                    if any(c.target is HOP for c in getattr(m.graph, "fastlora_callers", [])))
    monkeypatch.setattr(backend, "_link_callers", spy)
    return seen


def _checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC)
    return with_lora(model).train()


def _exact_with_gc(model, inputs):
    """Compiled vs eager with checkpointing on; returns (attention params, near-miss reasons)
    over every graph of the compile (the layers sit in one graph, the loss in another)."""
    fastlora.clear_reports()
    loss_err, grad_errs, _ = compare_compiled(_checkpointed(model), inputs, only_attention())
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-5, (loss_err, grad_errs)
    reports = fastlora.reports()
    params = [m["params"] for r in reports for m in r.matches if m["pattern"] == "attention"]
    misses = [n["reason"] for n in reports.near_misses() if n["pattern"] == "attention"]
    return params, misses


def test_llama_plain_causal_in_each_layer(bodies):
    params, misses = _exact_with_gc(tiny_llama(layers=2), _inputs())
    assert len(bodies) == 2 and misses == []
    assert [(p["kernel"], p["causal"], p["window"]) for p in params] == [("sdpa", True, 0)] * 2


def test_mistral_sliding_window_in_each_layer(bodies):
    params, misses = _exact_with_gc(tiny_mistral(window=4, layers=2), _inputs())
    assert len(bodies) == 2 and misses == []
    assert [(p["kernel"], p["causal"], p["window"]) for p in params] == [("triton", True, 4)] * 2


def test_packed_llama_document_ids_passed_into_each_layer(bodies):
    # The document ids are computed outside the layers; each body gets them as a new operand.
    params, misses = _exact_with_gc(tiny_llama(layers=2),
                                    _inputs(position_ids=PACKED, use_cache=False))
    assert misses == [] and [p["kernel"] for p in params] == ["triton"] * 2
    added = [n for b in bodies for n in b.graph.nodes
             if n.op == "placeholder" and n.target.startswith("fastlora_")]
    assert len(bodies) == 2 and len(added) == 2, added


def test_gemma2_eager_additive_masks(bodies):
    # Eager attention: the additive mask `where(mask, 0, -big)` is built outside the layer; layer 0
    # slides (window 4), layer 1 is global.
    params, misses = _exact_with_gc(tiny_gemma2(), _inputs())
    assert len(bodies) == 2 and misses == []
    assert [(p["kernel"], p["window"], p["softcap"]) for p in params] == \
        [("triton", 4, 1.5), ("triton", 0, 1.5)]


@pytest.mark.parametrize("make,side,kinds", [
    (lambda: tiny_llama(layers=2), "left", [("causal+padding", "zero")] * 2),
    (lambda: tiny_mistral(window=4, layers=2), "right", [("causal+window+padding", "zero")] * 2),
    (tiny_gemma2, "left", [("causal+window+padding", "uniform"), ("causal+padding", "uniform")]),
])
def test_padding_mask_passed_into_each_layer(bodies, make, side, kinds):
    """HF builds the 4-D mask outside the layers from the 2-D ``attention_mask``; the prover
    follows the mask out of each layer, and the 2-D padding mask the kernel reads is passed into
    each body as one more operand."""
    params, misses = _exact_with_gc(make(), padded_inputs(side))
    assert len(bodies) == 2 and misses == []
    assert [(p["kernel"], p["mask"], p["empty_rows"]) for p in params] == \
        [("triton", *kind) for kind in kinds]
    added = [n for b in bodies for n in b.graph.nodes
             if n.op == "placeholder" and n.target.startswith("fastlora_")]
    assert len(added) == 2 and all(n.meta["example_value"].dtype == torch.bool
                                   for n in added), added


# ---------------------------------------------------------------- masks the prover cannot follow


class CheckpointedAttention(nn.Module):
    """SDPA in a checkpointed function whose mask comes from the caller (or the model's input)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)

    def attend(self, x, mask):
        B, S, _ = x.shape
        q, k, v = self.proj(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x, user_mask=None):
        S = x.shape[1]
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        mask = ((j <= i) & (j > i - 3)) if user_mask is None else user_mask
        return checkpoint(self.attend, x, mask, use_reentrant=False)


def _compile_checkpointed(*args):
    module = CheckpointedAttention()
    fastlora.clear_reports()
    compiled = torch.compile(module, backend="fastlora",
                             options=only_attention(compiler="aot_eager", strict=True))
    out = compiled(*args)
    assert rel_err(out, module(*args)) < 1e-5
    out.sum().backward()
    reports = fastlora.reports()
    return ([m["params"] for r in reports for m in r.matches if m["pattern"] == "attention"],
            [n["reason"] for n in reports.near_misses() if n["pattern"] == "attention"])


def test_handwritten_window_mask_followed_out_of_checkpoint(bodies):
    params, misses = _compile_checkpointed(torch.randn(2, 10, 16))
    assert len(bodies) == 1 and misses == []
    assert [(p["causal"], p["window"]) for p in params] == [(True, 3)]


def test_mask_from_the_model_inputs_stays_a_near_miss():
    user_mask = torch.rand(1, 1, 10, 10) > 0.3
    params, misses = _compile_checkpointed(torch.randn(2, 10, 16), user_mask)
    # Followed out of the layer to the compiled graph's own input, which nothing proves.
    assert params == [] and len(misses) == 1, misses
    assert "placeholder) (an input of the compiled graph)" in misses[0], misses


def test_body_called_with_two_different_masks_is_not_followed():
    """Where the calls of one body pass different tensors for the mask, the placeholder has no
    single value outside: the prover must not pick one."""
    body = fx.Graph()
    q, m = body.placeholder("q"), body.placeholder("mask")
    body.output((body.call_function(F.scaled_dot_product_attention, (q, q, q, m)),))
    root = nn.Module()
    root.body = fx.GraphModule(nn.Module(), body)
    outer = fx.Graph()
    x = outer.placeholder("x")
    i = outer.call_function(torch.arange, (6,))
    rows, cols = (outer.call_function(torch.unsqueeze, (i, d)) for d in (1, 0))
    masks = [outer.call_function(op, (cols, rows)) for op in (torch.le, torch.lt)]
    get = outer.get_attr("body")
    calls = [outer.call_function(HOP, (get, x, mask)) for mask in masks]
    outer.output(tuple(calls))
    fx.GraphModule(root, outer)  # `outer`'s owning module, which holds `body`
    # The prover reads shapes and dtypes only: real tensors stand in for Dynamo's fake ones.
    for n in [i, rows, cols, *masks]:
        args = [a.meta["example_value"] if isinstance(a, fx.Node) else a for a in n.args]
        n.meta["example_value"] = n.target(*args)
    for n in (q, x):
        n.meta["example_value"] = torch.empty(1, 2, 6, 8)
    m.meta["example_value"] = masks[0].meta["example_value"]
    body.fastlora_callers = calls  # what the backend records
    shape = (1, 2, 6, 8)
    with pytest.raises(Reject, match="do not bind to one tensor outside it"):
        prove_mask(m, shape, shape)
    body.fastlora_callers = calls[:1]  # one call: followed to `kv <= q`
    assert prove_mask(m, shape, shape) == (True, 0, None, None, "batch", False)
