"""LoRA linear compiled vs eager on tiny peft models: float32 against a float64 twin, bf16 bases
with float32 adapters and the reverse, autocast, rsLoRA, two adapters, DoRA's fallback, and
dropout against a seeded eager twin (tests/lora_models.py; the semantics are in the docstring of
test_lora_linear.py, which tests the kernels and the op).
"""
import copy

import pytest
import torch
from torch import nn

import fastlora
from helpers import checkpointed, rel_err, run_step, tiny_llama, token_batch, with_lora
from lora_models import errors_vs, mixed_dtypes, only_lora, seeded_twin


@pytest.mark.parametrize("r,bias", [(1, True), (8, False), (64, True)])
def test_fp32_llama_exact(r, bias):
    model = with_lora(tiny_llama(layers=1, attention_bias=bias, mlp_bias=bias), r=r)
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, token_batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7}
    assert {m["spelling"] for m in report.matches} == {"peft_lora"}
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_bf16_base_fp32_adapters():
    model32 = with_lora(tiny_llama(layers=1))
    err_e, err_c = errors_vs(model32, mixed_dtypes(copy.deepcopy(model32)), token_batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7}
    assert all(m["params"]["out_dtype"] == "torch.bfloat16" and "cast_to" not in m["params"]
               for m in report.matches)
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_fp32_base_bf16_adapters_fused_on_the_base_output():
    """Adapters stored in bfloat16 on a float32 model: peft rounds x to bfloat16 for the adapter
    only, while the base linear reads it unrounded. One op over both cannot read x twice, so the
    base linear stays a linear and the adapter is fused on its output, given the rounded x."""
    model32 = with_lora(tiny_llama(layers=1))
    model = copy.deepcopy(model32)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.bfloat16()
    err_e, err_c = errors_vs(model32, model, token_batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7} and report.near_misses == []
    assert {m["spelling"] for m in report.matches} == {"adapter_on_base"}
    assert all(m["params"]["cast_to"] == "torch.bfloat16"
               and m["params"]["autocast_inputs"] == ["x"] for m in report.matches)
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_autocast_bf16():
    model = with_lora(tiny_llama(layers=1), r=8)
    err_e, err_c = errors_vs(copy.deepcopy(model), model, token_batch(), autocast=torch.bfloat16)
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7}
    assert {m["spelling"] for m in report.matches} == {"peft_lora_autocast"}
    assert all(m["params"]["cast_to"] == "torch.bfloat16" for m in report.matches)
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_rslora_scaling_is_captured():
    model = with_lora(tiny_llama(layers=1), targets=["q_proj", "v_proj"], r=16, use_rslora=True)
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, token_batch())
    scales = {m["params"]["scale"] for m in fastlora.last_report().matches}
    assert scales == {32 / 16 ** 0.5}  # alpha / sqrt(r), not alpha / r
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_dropout_seeded_twin_is_exact():
    p = 0.25
    model = with_lora(tiny_llama(layers=1), dropout=p)
    twin = seeded_twin(model, p)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora())
    inputs = token_batch()
    torch.manual_seed(1)
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7}
    assert all(m["params"]["dropout"] == p for m in report.matches)
    torch.manual_seed(1)
    loss_t, grads_t = run_step(twin, inputs)
    assert rel_err(loss_c, loss_t) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-5
    torch.manual_seed(2)  # another seed, other masks
    loss_2, _ = run_step(compiled, inputs, compiled_model)
    assert rel_err(loss_2, loss_c) > 1e-4
    model.eval()  # eval mode: dropout off, exact against plain eager
    compiled_model.eval()
    with torch.no_grad():
        out_e = model(**inputs).loss
        out_c = compiled(**inputs).loss
    assert rel_err(out_c, out_e) < 1e-6


def test_dropout_with_gradient_checkpointing_uses_one_mask():
    """Checkpointing recomputes the layer in backward; the seed must not be redrawn there, so
    the compiled checkpointed model still equals the seeded eager twin."""
    p = 0.3
    model = with_lora(tiny_llama(layers=1), dropout=p, targets=["v_proj", "down_proj"])
    twin = seeded_twin(model, p)
    inputs = checkpointed(model, token_batch())
    compiled = torch.compile(model, backend="fastlora", options=only_lora())
    torch.manual_seed(3)
    loss_c, grads_c = run_step(compiled, inputs, model)
    assert fastlora.reports(compiled).counts() == {"lora_linear": 2}
    torch.manual_seed(3)
    loss_t, grads_t = run_step(twin, inputs)
    assert rel_err(loss_c, loss_t) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-5


def test_two_adapters_fp32_both_fused():
    from peft import LoraConfig
    model = with_lora(tiny_llama(layers=1), targets=["q_proj", "v_proj"])
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                      init_lora_weights=False))
    model.base_model.set_adapter(["default", "b"])
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, token_batch())
    spellings = sorted(m["spelling"] for m in fastlora.last_report().matches)
    assert spellings == ["adapter_on_base", "peft_lora", "peft_lora"]
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_two_adapters_bf16_base_both_fused():
    """peft casts x to float32 once and both adapters read that cast (the second adapter's cast
    is a no-op): the shared cast stays in the graph as the input of both fused adapters. The
    first adapter then adds onto its bf16 base linear as a precomputed base (the float32 sum
    is only cast back after the second adapter)."""
    from peft import LoraConfig
    model = with_lora(tiny_llama(layers=1), targets=["q_proj", "v_proj"])
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                      init_lora_weights=False))
    model.base_model.set_adapter(["default", "b"])
    reference = copy.deepcopy(model)
    err_e, err_c = errors_vs(reference, mixed_dtypes(model), token_batch())
    report = fastlora.last_report()
    spellings = sorted(m["spelling"] for m in report.matches)
    assert spellings == ["adapter_on_base", "adapter_on_base_uncast", "peft_lora"]
    assert report.near_misses == []
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_dora_falls_back_with_reason():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(24, 40)),
                           LoraConfig(r=4, target_modules=["0"], use_dora=True,
                                      init_lora_weights=False))
    x = torch.randn(3, 5, 24)
    fastlora.clear_reports()
    expected = model(x)
    out = torch.compile(model, backend="fastlora", options=only_lora())(x)
    reports = fastlora.reports()
    assert reports.counts() == {}
    reasons = {m["reason"] for r in reports for m in r.near_misses}
    assert reasons and all(r.startswith("DoRA adapter") for r in reasons), reasons
    assert rel_err(out, expected) < 1e-6


def test_unadapted_linears_are_not_near_misses():
    model = with_lora(tiny_llama(layers=1), targets=["q_proj", "v_proj"])
    compiled = torch.compile(model, backend="fastlora", options=only_lora())
    compiled(**token_batch()).loss.backward()
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 2} and report.near_misses == []


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_tiny_llama_compiled_vs_eager(compiler):
    torch.manual_seed(0)
    model32 = with_lora(tiny_llama(layers=2)).cuda()
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    inputs = {"input_ids": ids, "labels": ids}
    both = ("lora_linear", "lora_mlp", "lora_qkv")
    err_e, err_c = errors_vs(copy.deepcopy(model32).double(), model32, inputs,
                             options={"compiler": compiler}, patterns=both)
    counts = fastlora.last_report().counts()
    assert counts.get("lora_linear", 0) + 2 * counts.get("lora_mlp", 0) \
        + 3 * counts.get("lora_qkv", 0) == 14 and counts.get("lora_qkv") == 2, counts
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)
    err_e, err_c = errors_vs(model32, mixed_dtypes(copy.deepcopy(model32)), inputs,
                             options={"compiler": compiler}, patterns=both)
    assert err_c <= 1.5 * err_e + 1e-3, (err_e, err_c)


@pytest.mark.gpu
def test_cuda_dropout_seeded_twin():
    p = 0.1
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=1), dropout=p, targets=["q_proj", "o_proj"]).cuda()
    twin = seeded_twin(model, p)
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    inputs = {"input_ids": ids, "labels": ids}
    compiled = torch.compile(model, backend="fastlora", options=only_lora())
    torch.manual_seed(1)
    loss_c, grads_c = run_step(compiled, inputs, model)
    torch.manual_seed(1)
    loss_t, grads_t = run_step(twin, inputs)
    assert rel_err(loss_c, loss_t) < 1e-5
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-4
