"""``offload_embeddings`` (host_embeddings.py) on the CPU: which tables qualify and why not, and a
model whose lookups go through ``embedding_from_host`` trains exactly as eager: loss and every
LoRA gradient, with gradient checkpointing (reentrant, which needs peft's input hook) too. The
move to pinned host memory itself needs a GPU (tests/test_offload_embeddings_gpu.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import fastlora
from fastlora import host_embeddings
from helpers import rel_err, run_step, tiny_llama, token_batch, with_lora


def _untied(**kw):
    return with_lora(tiny_llama(tie_word_embeddings=False, **kw))


def test_which_tables_qualify():
    assert host_embeddings.why_not(_untied()) is None
    assert "tied" in host_embeddings.why_not(with_lora(tiny_llama(tie_word_embeddings=True)))
    trained = _untied()
    trained.get_input_embeddings().weight.requires_grad_(True)
    assert "trained" in host_embeddings.why_not(trained)
    renormed = _untied()
    renormed.get_input_embeddings().max_norm = 1.0
    assert "max_norm" in host_embeddings.why_not(renormed)
    gemma = T.GemmaForCausalLM(T.GemmaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False))
    assert "not a plain nn.Embedding" in host_embeddings.why_not(gemma)  # it scales its rows
    assert "no input embeddings" in host_embeddings.why_not(torch.nn.Linear(2, 2))


def test_auto_follows_the_default_and_never_under_cuda_graphs(monkeypatch):
    monkeypatch.setattr(host_embeddings, "OFFLOAD_BY_DEFAULT", True)
    assert host_embeddings.wanted("auto") and not host_embeddings.wanted("auto", "reduce-overhead")
    assert host_embeddings.wanted(True, "reduce-overhead")
    monkeypatch.setattr(host_embeddings, "OFFLOAD_BY_DEFAULT", False)
    assert not host_embeddings.wanted("auto") and not host_embeddings.wanted(False)
    with pytest.raises(fastlora.OptionsError, match="offload_embeddings"):
        fastlora.compile_for_trainer(_untied(), offload_embeddings="yes")


def _trained(model, inputs, **options):
    fastlora.clear_reports()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(model, strict=True, **options)
    loss, grads = run_step(model, inputs)
    return loss, grads, fastlora.reports(model)


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_lookups_through_the_op_train_as_eager(checkpointing, monkeypatch):
    from fastlora.kernels import embedding_from_host as K
    lookups = []
    for name in ("embedding_from_host_triton", "embedding_from_host_reference"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda ids, table, real=real:
                            lookups.append(ids.shape) or real(ids, table))
    torch.manual_seed(0)
    model = _untied(layers=1)  # (reentrant checkpointing breaks the graph at each layer)
    if checkpointing:  # peft's recipe: the input hook makes the reentrant checkpoint's input
        model.enable_input_require_grads()  # require grad, else no LoRA gradient flows
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    inputs = token_batch(use_cache=False)
    loss_e, grads_e = run_step(model, inputs)
    compiled = copy.deepcopy(model)
    table = compiled.get_input_embeddings().weight
    loss_c, grads_c, reports = _trained(compiled, inputs, offload_embeddings=True)

    assert lookups == [inputs["input_ids"].shape]  # the compiled step looked up through the op
    assert compiled.get_input_embeddings().weight is table  # the same parameter
    assert any("embedding_from_host on cpu" in n for r in reports for n in r.notes), reports
    assert rel_err(loss_c, loss_e) < 1e-6
    assert set(grads_c) == set(grads_e) and all(g.abs().sum() > 0 for g in grads_e.values())
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert max(errs.values()) < 1e-5, errs


def test_off_and_refused_tables_are_left_alone():
    model = _untied()
    fastlora.compile_for_trainer(model, offload_embeddings=False)
    assert "forward" not in vars(model.get_input_embeddings())
    tied = with_lora(tiny_llama(layers=1, tie_word_embeddings=True))  # the table is what counts
    fastlora.clear_reports()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(tied, offload_embeddings=True)
    assert "forward" not in vars(tied.get_input_embeddings())
    run_step(tied, token_batch())
    notes = [n for r in fastlora.reports(tied) for n in r.notes]
    assert any("not moved to host memory: the input embeddings are tied" in n for n in notes), notes


def test_a_table_unfrozen_after_compiling_is_refused():
    model = _untied()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(model, offload_embeddings=True)
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(Exception, match="offload_embeddings=False"):
        run_step(model, token_batch())


def test_auto_leaves_a_cpu_run_with_its_own_lookup(monkeypatch):
    """The default ("auto", on) decides at the first call: a table on the CPU then keeps
    nn.Embedding's lookup and the report says nothing of it (the GPU side:
    tests/test_offload_embeddings_gpu.py)."""
    monkeypatch.setattr(host_embeddings, "OFFLOAD_BY_DEFAULT", True)
    model, inputs = _untied(layers=1), token_batch()  # one layer: the table is what counts
    eager = copy.deepcopy(model)
    fastlora.clear_reports()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(model, strict=True)
    loss_c, grads_c = run_step(model, inputs)
    assert "forward" not in vars(model.get_input_embeddings())
    assert not any("embedding" in n for r in fastlora.reports(model) for n in r.notes)
    loss_e, grads_e = run_step(eager, inputs)
    assert rel_err(loss_c, loss_e) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 1e-5


def test_a_table_on_the_cpu_is_not_moved():
    emb = torch.nn.Embedding(10, 4).requires_grad_(False)
    before = emb.weight.data_ptr()
    assert host_embeddings.keep_on_host(emb) is None and emb.weight.data_ptr() == before
