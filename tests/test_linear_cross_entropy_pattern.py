"""The linear_cross_entropy pattern: compiled-vs-eager on tiny models (Llama, Gemma 2 with
final-logit softcapping, tied embeddings), the logits stand-in, gradient accumulation with
num_items_in_batch, all-ignored batches, and the near misses."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastlora
from helpers import (compare_compiled, compare_low_precision, lora_grads, rel_err, tiny_llama,
                     with_lora)

NAME = "linear_cross_entropy"


def _opts(disable=(), **extra):
    """Compile options that leave every other pattern off, so these tests see this pattern's
    numerics alone (the combinations are the model-family tests' job)."""
    from fastlora.pattern import registered_patterns
    others = [p.name for p in registered_patterns() if p.name != NAME]
    return {"compiler": "aot_eager", "strict": True, "disable": others + list(disable), **extra}


def _inputs(vocab=97, batch=2, seq=11, prompt=3):
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[:, :prompt] = -100  # prompt tokens are not trained on
    return {"input_ids": ids, "labels": labels, "use_cache": False}


def _tiny_gemma2(**kw):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, **kw)
    return Gemma2ForCausalLM(cfg)


def _match(report=None):
    report = report or fastlora.last_report()
    found = [m for m in report.matches if m["pattern"] == NAME]
    assert len(found) == 1, report
    return found[0]


def _near_misses(report=None):
    report = report or fastlora.last_report()
    return [n["reason"] for n in report.near_misses if n["pattern"] == NAME]


def test_llama_fp32_exact_and_logits_dropped():
    model = with_lora(tiny_llama(layers=2))
    inputs = _inputs()
    loss_err, grad_errs, grads = compare_compiled(model, inputs, _opts())
    match = _match()
    assert fastlora.last_report().counts()[NAME] == 1
    assert match["spelling"] == "causal_lm_loss" and match["class"] == "LlamaForCausalLM"
    assert match["params"]["reduction"] == "mean" and match["params"]["compute_dw"] is False
    assert match["params"]["logits_output"].startswith("dropped")
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    assert len(grads) == 2 * 7 * 2
    # What the user gets back in place of the logits: right shape and dtype, no memory, NaN.
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora", options=_opts())
    logits = compiled(**inputs).logits
    assert logits.shape == (2, 11, 97) and logits.dtype == torch.float32
    assert logits.stride() == (0, 0, 0) and logits.isnan().all()


def test_return_logits_true_keeps_the_unfused_loss():
    model = with_lora(tiny_llama(layers=1))
    inputs = _inputs()
    expected = model(**inputs).logits
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora",
                             options=_opts(return_logits=True))
    out = compiled(**inputs)
    assert NAME not in fastlora.last_report().counts()
    assert any("return_logits" in r for r in _near_misses()), _near_misses()
    assert rel_err(out.logits, expected) < 1e-6


def test_gemma2_softcap_and_tied_embeddings_fp32():
    model = with_lora(_tiny_gemma2(), targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert model.config.tie_word_embeddings and model.config.final_logit_softcapping == 30.0
    loss_err, grad_errs, _ = compare_compiled(model, _inputs(), _opts())
    match = _match()
    assert match["spelling"] == "causal_lm_loss_softcapped" and match["params"]["cap"] == 30.0
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_gemma2_bf16_softcap_rounded_like_eager():
    model = with_lora(_tiny_gemma2(), targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    err_eager, err_compiled = compare_low_precision(model, _inputs(), options=_opts())
    match = _match()
    assert match["params"]["round_steps"] is True
    assert match["params"]["logits_dtype"] == "torch.bfloat16"
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


def test_trained_tied_embedding_gets_its_lm_head_gradient():
    """No LoRA: every weight trains, so the tied embedding/lm_head weight needs dW too."""
    model = tiny_llama(layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loss_err, grad_errs, _ = compare_compiled(model, _inputs(), _opts())
    assert _match()["params"]["compute_dw"] is True
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    assert grad_errs["model.embed_tokens.weight"] < 1e-5


def test_gradient_accumulation_with_num_items_in_batch_equals_one_batch():
    """Two micro-batches the way HF's Trainer runs them (reduction='sum', then / the valid-token
    count of the whole accumulated batch) give the loss and gradients of one big batch."""
    model = with_lora(tiny_llama(layers=1))
    big = _inputs(batch=4)
    big["labels"][2:, :7] = -100  # the second micro-batch has fewer trained tokens
    n_items = (big["labels"][:, 1:] != -100).sum()
    eager = copy.deepcopy(model)
    loss_big = eager(**big).loss
    loss_big.backward()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="fastlora", options=_opts())
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        part = {"input_ids": big["input_ids"][rows], "labels": big["labels"][rows],
                "use_cache": False, "num_items_in_batch": n_items}
        loss = compiled(**part).loss
        loss.backward()  # gradients accumulate
        total = total + loss.detach()
    assert _match()["params"]["reduction"] == "sum"
    assert rel_err(total, loss_big.detach()) < 1e-6
    grads_big, grads_acc = lora_grads(eager), lora_grads(twin)
    assert max(rel_err(grads_acc[n], g) for n, g in grads_big.items()) < 1e-5


@pytest.mark.parametrize("num_items", [False, True])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(num_items):
    model = with_lora(tiny_llama(layers=1))
    inputs = _inputs(prompt=11)  # every label is -100
    if num_items:
        inputs["num_items_in_batch"] = torch.tensor(5)  # tokens of other micro-batches
    eager_loss = copy.deepcopy(model)(**inputs).loss
    assert eager_loss.isnan().item() == (not num_items)  # eager: mean over nothing is NaN
    compiled = torch.compile(model, backend="fastlora", options=_opts())
    loss = compiled(**inputs).loss
    loss.backward()
    assert fastlora.last_report().counts()[NAME] == 1
    assert loss.item() == 0.0
    grads = lora_grads(model)
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_no_grad_evaluation_keeps_real_logits():
    model = with_lora(tiny_llama(layers=1))
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs)
        out = torch.compile(copy.deepcopy(model), backend="fastlora", options=_opts())(**inputs)
    assert NAME not in fastlora.last_report().counts()
    assert any("no gradient flows" in r for r in _near_misses()), _near_misses()
    assert rel_err(out.logits, expected.logits) < 1e-6 and rel_err(out.loss, expected.loss) < 1e-6


def test_autocast_bf16_uses_the_autocast_dtype():
    """Under CPU autocast the fused op computes the logits in bf16 like F.linear does. Compared
    with the same compile with the pattern disabled (aot_eager itself differs from eager under
    autocast in the attention backward, with or without any fastlora pattern)."""
    model = with_lora(tiny_llama(layers=1))
    inputs = _inputs()

    def step(disable):
        twin = copy.deepcopy(model)
        compiled = torch.compile(twin, backend="fastlora", options=_opts(disable=disable))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(**inputs).loss
        loss.backward()
        torch._dynamo.reset()
        return loss.detach(), lora_grads(twin)

    loss_u, grads_u = step([NAME])
    loss_f, grads_f = step([])
    assert _match()["params"]["compute_dtype"] == "torch.bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e = copy.deepcopy(model)(**inputs).loss
    assert rel_err(loss_f, loss_e) < 1e-6 and rel_err(loss_f, loss_u) < 1e-6
    assert max(rel_err(grads_f[n], g) for n, g in grads_u.items()) < 1e-5


class _Head(torch.nn.Module):
    """An lm_head and a loss written by hand, to pin the near-miss reasons."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.lm = torch.nn.Linear(16, 23, bias=variant in ("bias", "frozen_bias"))
        if variant == "frozen_bias":
            self.lm.bias.requires_grad_(False)

    def forward(self, h, labels):
        logits = self.lm(h)
        if self.variant == "bf16_loss":
            return F.cross_entropy(logits.view(-1, 23), labels), logits
        smoothing = 0.1 if self.variant == "label_smoothing" else 0.0
        loss = F.cross_entropy(logits.float().view(-1, 23), labels, label_smoothing=smoothing)
        if self.variant == "logits_used":
            return loss + 0.0 * logits.amax(), logits
        return loss, logits


@pytest.mark.parametrize("variant,reason", [
    ("label_smoothing", "expected the literal 0.0, found 0.1"),
    ("logits_used", "the logits are also used by"),
    ("bias", "the lm_head bias is trained; the fused loss computes no bias gradient"),
    ("frozen_bias", None),
    # the spelling's .float() is verified by the matcher (a bf16 loss has no such cast)
    ("bf16_loss", "casts to torch.float32 where the graph has torch.bfloat16"),
    ("plain", None),
])
def test_hand_written_heads(variant, reason):
    head = _Head(variant)
    if variant == "bf16_loss":
        head = head.to(torch.bfloat16)
    h = torch.randn(2, 5, 16, dtype=head.lm.weight.dtype, requires_grad=True)
    labels = torch.randint(0, 23, (10,))
    loss_e = head(h, labels)[0]
    loss_c, logits_c = torch.compile(head, backend="fastlora", options=_opts())(h, labels)
    misses = _near_misses()
    if reason is None:
        assert fastlora.last_report().counts()[NAME] == 1 and not misses
        assert logits_c.isnan().all()
    else:
        assert NAME not in fastlora.last_report().counts()
        assert len(misses) == 1 and reason in misses[0], misses
    assert rel_err(loss_c, loss_e) < 1e-6


def _tiny_phi():
    from transformers import PhiConfig, PhiForCausalLM
    return PhiForCausalLM(PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    max_position_embeddings=64, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attention_dropout=0.0))


def test_phi_lm_head_bias_joins_the_fused_loss():
    model = with_lora(_tiny_phi(), targets=["q_proj", "k_proj", "v_proj", "dense"])
    assert model.base_model.model.lm_head.bias is not None
    with torch.no_grad():  # a bias that changes the loss, so it cannot be dropped unnoticed
        model.base_model.model.lm_head.bias.normal_(0, 2)
    loss_err, grad_errs, grads = compare_compiled(model, _inputs(), _opts())
    assert _match()["spelling"] == "causal_lm_loss_biased"
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    assert len(grads) == 2 * 4
    err_eager, err_compiled = compare_low_precision(model, _inputs(), options=_opts())
    assert _match()["spelling"] == "causal_lm_loss_biased"
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


@pytest.mark.slow
def test_through_inductor_logits_take_no_memory():
    model = with_lora(tiny_llama(layers=1))
    loss_err, grad_errs, _ = compare_compiled(model, _inputs(), _opts(compiler="inductor"))
    assert fastlora.last_report().counts()[NAME] == 1
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora",
                             options={"compiler": "inductor"})
    logits = compiled(**_inputs()).logits
    assert logits.shape == (2, 11, 97) and logits.untyped_storage().nbytes() <= 8


# ---------------------------------------------------------------- GPU (run on the H200)


@pytest.mark.gpu
def test_cuda_tiny_llama_bf16_matches_eager():
    model = with_lora(tiny_llama(layers=2)).cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _inputs().items()}
    err_eager, err_compiled = compare_low_precision(model, inputs, options=_opts())
    assert fastlora.last_report().counts()[NAME] == 1
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


@pytest.mark.gpu
def test_cuda_peak_memory_with_and_without_the_pattern():
    """One decoder layer with the 1B row's head (hidden 2048, vocab 128256, bf16), 4 x 2048
    tokens: the step's peak memory with the fused loss and with it disabled."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=True)
    base = with_lora(LlamaForCausalLM(cfg).to(torch.bfloat16), r=16).cuda()
    ids = torch.randint(0, 128256, (4, 2048), device="cuda")
    peaks, losses = {}, {}
    for label, disable in (("fused", []), ("unfused", [NAME])):
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend="fastlora",
                                 options=_opts(disable=disable))
        for _ in range(2):  # the second step runs without compiling
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.cuda.synchronize()
        peaks[label] = torch.cuda.max_memory_allocated() / 2 ** 30
        losses[label] = loss.detach()
        del model, compiled, loss
        torch.cuda.empty_cache()
    print(f"peak GiB: {peaks}")
    assert rel_err(losses["fused"], losses["unfused"]) < 1e-3
    assert peaks["fused"] < peaks["unfused"] - 4.0, peaks
