"""``offload_lm_head`` (host_lm_head.py) on the CPU: which heads qualify and why not, the op
``linear_from_host`` against a float64 reference, and a model whose lm_head goes through it
trains exactly as eager: loss and every LoRA gradient, with the loss fused (the fused op reads
the head) and unfused (the op's own backward). Pinned host memory and the prefetch on a side
stream need a GPU (tests/test_offload_lm_head_gpu.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora import host_lm_head
from fastlora.kernels import _host_weights
from helpers import checkpointed, rel_err, run_step, tiny_llama, token_batch, with_lora


def _untied(**kw):
    return with_lora(tiny_llama(tie_word_embeddings=False, **kw))


def test_which_heads_qualify():
    assert host_lm_head.why_not(_untied()) is None
    assert "tied" in host_lm_head.why_not(with_lora(tiny_llama(tie_word_embeddings=True)))
    trained = _untied()
    trained.get_output_embeddings().weight.requires_grad_(True)
    assert "trained" in host_lm_head.why_not(trained)
    biased = _untied()
    head = biased.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    assert "bias" in host_lm_head.why_not(biased)
    wrapped = with_lora(tiny_llama(tie_word_embeddings=False), targets=["q_proj", "lm_head"])
    assert "not a plain nn.Linear" in host_lm_head.why_not(wrapped)
    assert "no lm_head" in host_lm_head.why_not(torch.nn.Linear(2, 2))


def test_auto_follows_the_default_and_never_under_cuda_graphs(monkeypatch):
    assert host_lm_head.wanted("auto") and not host_lm_head.wanted("auto", "reduce-overhead")
    monkeypatch.setattr(host_lm_head, "OFFLOAD_BY_DEFAULT", False)
    assert not host_lm_head.wanted("auto")
    assert host_lm_head.wanted(True, "reduce-overhead") and not host_lm_head.wanted(False)
    with pytest.raises(fastlora.OptionsError, match="offload_lm_head"):
        fastlora.compile_for_trainer(_untied(), offload_lm_head="yes")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_op_is_a_linear_layer(dtype, tol):
    x = torch.randn(3, 37, 72, dtype=dtype, requires_grad=True)
    weight = torch.randn(101, 72, dtype=dtype)
    y = torch.ops.fastlora.linear_from_host(x, weight)
    expected = x.detach().double() @ weight.double().t()
    assert y.dtype == dtype and y.shape == (3, 37, 101)
    assert rel_err(y, expected) < tol
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel_err(x.grad, dy.double() @ weight.double()) < tol


def test_the_op_refuses_bad_input():
    x, weight = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.fastlora.linear_from_host(x, weight.bfloat16())
    with pytest.raises(ValueError, match=r"shape \(out, 8\)"):
        torch.ops.fastlora.linear_from_host(x, torch.randn(5, 7))
    with pytest.raises(RuntimeError, match="frozen"):
        torch.ops.fastlora.linear_from_host(x, weight.requires_grad_(True))
    with pytest.raises(RuntimeError, match="pinned host memory"):  # neither there nor pinned
        torch.ops.fastlora.linear_from_host(x.to("meta"), torch.randn(5, 8))


def test_opcheck():
    torch.library.opcheck(torch.ops.fastlora.linear_from_host,
                          (torch.randn(3, 5, 8, requires_grad=True), torch.randn(6, 8)))


def test_a_weight_not_in_pinned_memory_is_used_where_it_is():
    weight = torch.randn(5, 8)
    _host_weights.prefetch(weight, "cpu")  # not pinned (and no GPU): nothing staged
    assert _host_weights.staged() == 0
    assert _host_weights.on_device(weight, torch.device("cpu")) is weight


def _trained(model, inputs, **options):
    fastlora.clear_reports()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(model, **{"strict": True, **options})
    loss, grads = run_step(model, inputs)
    return loss, grads, fastlora.reports(model)


def _spy_on_device(monkeypatch):
    """Records each weight handed to a kernel by _host_weights.on_device (as the ops call it)."""
    from fastlora.kernels import linear_cross_entropy, linear_from_host
    seen = []
    real = _host_weights.on_device
    for module in (linear_cross_entropy, linear_from_host):
        name = module.__name__.rsplit(".", 1)[1]
        monkeypatch.setattr(module, "on_device", lambda w, d, name=name: seen.append(
            (name, tuple(w.shape))) or real(w, d))
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_fused_loss_reads_the_head_and_trains_as_eager(checkpointing, monkeypatch):
    seen = _spy_on_device(monkeypatch)
    torch.manual_seed(0)
    model = _untied(layers=1)
    model.train()
    inputs = checkpointed(model, token_batch()) if checkpointing else token_batch()
    loss_e, grads_e = run_step(model, inputs)
    compiled = copy.deepcopy(model)
    head = compiled.get_output_embeddings().weight
    loss_c, grads_c, reports = _trained(compiled, inputs, offload_lm_head=True)

    assert reports.counts()["linear_cross_entropy"] == 1
    assert seen == [("linear_cross_entropy", tuple(head.shape))]  # once, by the fused loss
    assert compiled.get_output_embeddings().weight is head  # the same parameter
    assert any("linear_from_host on cpu" in n for r in reports for n in r.notes), reports
    assert rel_err(loss_c, loss_e) < 1e-6
    assert set(grads_c) == set(grads_e) and all(g.abs().sum() > 0 for g in grads_e.values())
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert max(errs.values()) < 1e-5, errs


def test_an_unfused_head_trains_through_the_ops_backward(monkeypatch):
    """return_logits=True keeps the logits, so the loss is not fused: the head's product is
    linear_from_host's, forward and backward."""
    seen = _spy_on_device(monkeypatch)
    torch.manual_seed(0)
    model = _untied(layers=1)
    model.train()
    inputs = token_batch()
    loss_e, grads_e = run_step(model, inputs)
    compiled = copy.deepcopy(model)
    loss_c, grads_c, reports = _trained(compiled, inputs, offload_lm_head=True,
                                        return_logits=True, strict=False)
    assert "linear_cross_entropy" not in reports.counts()
    assert [op for op, _ in seen] == ["linear_from_host", "linear_from_host"]  # fwd, bwd
    assert rel_err(loss_c, loss_e) < 1e-6
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert set(grads_c) == set(grads_e) and max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("value", ["auto", True])
def test_auto_moves_the_head_of_a_checkpointed_model_only(value, monkeypatch):
    """What plan() decides at the first call on a GPU (the decision itself, on the CPU): "auto"
    takes a qualifying head only while the model trains with gradient checkpointing, and says
    nothing otherwise; True takes it either way."""
    from fastlora import host_embeddings
    seen = {}
    monkeypatch.setattr(host_embeddings, "plan_move",
                        lambda value, module_of, why_not_now, mark_now, note_of, refused_of,
                        after_move: seen.update(why=why_not_now, refused=refused_of))
    model = _untied(layers=1)
    model.train()
    host_lm_head.plan(model, value)
    if value == "auto":
        assert seen["why"]() == host_lm_head.NOT_CHECKPOINTED
        assert seen["refused"](host_lm_head.NOT_CHECKPOINTED) is None  # no note
    else:
        assert seen["why"]() is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    host_lm_head.plan(model, value)
    assert seen["why"]() is None
    tied = with_lora(tiny_llama(layers=1, tie_word_embeddings=True))
    tied.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tied.train()
    host_lm_head.plan(tied, value)
    assert "tied" in seen["why"]() and "tied" in seen["refused"](seen["why"]())


def _trl_fused_head(model):
    """TRL's fused LM head, as SFTTrainer installs it (on the causal LM under peft): the
    model's forward replaced on the instance, reading ``lm_head.weight`` itself."""
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(model.get_base_model())
    return model


def test_a_head_trl_reads_itself_stays_on_the_gpu(monkeypatch):
    """TRL's fused LM head computes log-probabilities from ``lm_head.weight`` directly, on
    whatever device that weight is: the head is not moved ("auto" and True decided with TRL's
    head in place), and a head moved before TRL patched the model stops the call with an error
    instead of running the loss on the CPU."""
    patched = _trl_fused_head(_untied(layers=1))
    assert "TRL's fused LM head" in host_lm_head.why_not(patched)
    from fastlora import host_embeddings
    seen = {}
    monkeypatch.setattr(host_embeddings, "plan_move",
                        lambda value, module_of, why_not_now, mark_now, note_of, refused_of,
                        after_move: seen.update(why=why_not_now))
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    host_lm_head.plan(patched, "auto")
    assert "TRL's fused LM head" in seen["why"]()
    monkeypatch.undo()

    model = _untied(layers=1)
    fastlora.compile_for_trainer(model, offload_lm_head=True)  # marked now, TRL's head later
    _trl_fused_head(model)
    with pytest.raises(RuntimeError, match="offload_lm_head=False"):
        run_step(model, token_batch())


def test_off_and_refused_heads_are_left_alone():
    model = _untied(layers=1)
    fastlora.compile_for_trainer(model)  # "auto": decided at the first call, on a GPU only
    assert "forward" not in vars(model.get_output_embeddings())
    tied = with_lora(tiny_llama(layers=1, tie_word_embeddings=True))
    fastlora.clear_reports()
    torch._dynamo.reset()
    fastlora.compile_for_trainer(tied, offload_lm_head=True)
    assert "forward" not in vars(tied.get_output_embeddings())
    run_step(tied, token_batch())
    notes = [n for r in fastlora.reports(tied) for n in r.notes]
    assert any("lm_head not moved to host memory: the lm_head is tied" in n for n in notes), notes


def test_prefetched_only_without_checkpointing():
    """The head's copy is started before the call only where no checkpointed layer's forward
    would hold it (host_lm_head._checkpointed)."""
    model = _untied()
    state = {"model": model, "layer": None}
    model.train()
    assert not host_lm_head._checkpointed(state)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert host_lm_head._checkpointed(state)
    model.eval()
    assert not host_lm_head._checkpointed(state)
    assert not host_lm_head._checkpointed({"model": torch.nn.Linear(2, 2), "layer": None})


def test_a_head_unfrozen_after_compiling_or_under_autocast_is_refused():
    model = _untied(layers=1)
    torch._dynamo.reset()
    fastlora.compile_for_trainer(model, offload_lm_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(Exception, match="autocast"):
            run_step(model, token_batch())
    model.get_output_embeddings().weight.requires_grad_(True)
    with pytest.raises(Exception, match="offload_lm_head=False"):
        run_step(model, token_batch())
