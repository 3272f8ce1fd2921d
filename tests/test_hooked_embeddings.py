"""Input embeddings with a forward hook are called outside Dynamo (hooked_embeddings.py): with
gradient checkpointing, the ``requires_grad_()`` hook transformers installs made Dynamo trace the
whole model again once per nested frame; compile_for_trainer breaks the graph at the embedding's
call instead, and the step is eager's."""
from __future__ import annotations

import copy
import pickle

import torch

import fastlora
from fastlora import hooked_embeddings
from helpers import checkpointed, rel_err, run_step, tiny_llama, token_batch, with_lora

LEAKED = hooked_embeddings.LEAKED


def _graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return {k.splitlines()[0]: v for k, v in counters["graph_break"].items()}


def test_a_checkpointed_model_is_traced_once_and_trains_as_eager():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=2))
    inputs = checkpointed(model, token_batch())  # installs transformers' requires_grad_ hook
    assert model.get_input_embeddings()._forward_hooks
    loss_e, grads_e = run_step(model, inputs)
    compiled = copy.deepcopy(model)
    fastlora.clear_reports()
    torch._dynamo.reset()
    counters.clear()
    fastlora.compile_for_trainer(compiled, strict=True)
    loss_c, grads_c = run_step(compiled, inputs)

    breaks = _graph_breaks()
    assert not any(LEAKED in k for k in breaks), breaks  # no whole-model trace thrown away
    assert any("torch.compiler.disable" in k for k in breaks), breaks
    reports = fastlora.reports(compiled)
    assert reports.counts()["rms_norm_lora_qkv"] == 2 and reports.counts()["linear_cross_entropy"] == 1
    assert any(n == hooked_embeddings.NOTE for r in reports for n in r.notes)
    assert rel_err(loss_c, loss_e) < 1e-6
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert set(grads_c) == set(grads_e) and max(errs.values()) < 1e-5, errs


def _require_grads(module, inputs, output):  # transformers' hook (a module-level function:
    output.requires_grad_(True)                 # a hook is pickled with its module)


def test_the_slot_follows_the_hooks():
    emb = torch.nn.Embedding(10, 4)
    assert not hooked_embeddings.keep_eager(emb) and emb._compiled_call_impl is None
    handle = emb.register_forward_hook(_require_grads)
    assert hooked_embeddings.keep_eager(emb) and emb._compiled_call_impl is not None
    ids = torch.tensor([1, 2])
    assert torch.equal(emb(ids), emb.weight[ids])  # the call itself is unchanged
    assert copy.deepcopy(emb)._compiled_call_impl is None  # nn.Module.__getstate__ drops it
    assert pickle.loads(pickle.dumps(emb))._compiled_call_impl is None
    handle.remove()
    assert not hooked_embeddings.keep_eager(emb) and emb._compiled_call_impl is None
    assert not hooked_embeddings.keep_eager(None)


def test_a_slot_filled_by_someone_else_is_left_alone():
    emb = torch.nn.Embedding(10, 4)
    emb.register_forward_hook(lambda m, i, o: None)
    theirs = emb._compiled_call_impl = emb._call_impl
    assert not hooked_embeddings.keep_eager(emb) and emb._compiled_call_impl is theirs


def test_plain_torch_compile_pays_the_retraces_and_the_report_says_so():
    """torch.compile(model, backend="fastlora") cannot change the embeddings: Dynamo still
    throws traces away, and the first graph's report says so and what to use instead."""
    from torch._dynamo.utils import counters
    model = with_lora(tiny_llama(layers=1))
    inputs = checkpointed(model, token_batch())
    fastlora.clear_reports()
    torch._dynamo.reset()
    counters.clear()
    hooked_embeddings.retraced_note()  # counted from here
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    run_step(compiled, inputs, params_of=model)
    assert any(LEAKED in k for k in _graph_breaks())
    notes = [n for r in fastlora.reports(model) for n in r.notes]
    assert sum("compile_for_trainer calls such embeddings outside Dynamo" in n
               for n in notes) == 1, notes
