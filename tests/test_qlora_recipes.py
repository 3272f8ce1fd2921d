"""QLoRA the way trainers prepare it: peft's k-bit recipe (float32 activations), TRL's bfloat16
adapters, a Trainer's CUDA autocast (emulated on the CPU), and 8-bit bases, whose adapters
lora_linear fuses on bitsandbytes' output. Compiled vs eager, both held to a float32 twin
(tests/qlora_models.py); the 4-bit op and kernels themselves are in test_qlora.py."""
import copy

import pytest
import torch

import fastlora
from helpers import rel_err, run_step, tiny_llama, with_lora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

from qlora_models import (answer_autocast_for_the_cpu, batch, errors, float_twin,  # noqa: E402
                          kbit_recipe, only_lora, quantize_linears, seeded_batch, worst)


def test_qlora_after_prepare_model_for_kbit_training():
    """peft's QLoRA recipe makes norms and embeddings float32, so activations are float32 and
    Linear4bit casts x to its bfloat16 compute dtype and the result back: both casts join the
    match (they were a near miss before), and the fused op's base matmul is a bfloat16 GEMM as
    eager's is. Both are held to a float32 twin: eager's bfloat16 GEMM is bitsandbytes' own CPU
    kernel or torch's, whose summation order depends on the CPU (AVX2 vs AVX-512 differ in the
    last bfloat16 bit), so comparing compiled to eager directly measured the CPU, not us."""
    model = kbit_recipe(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16)), "fp32")
    err_e, err_c = errors(model, seeded_batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 14} and report.near_misses == []
    assert {m["params"]["compute_dtype"] for m in report.matches} == {"torch.bfloat16"}
    # the first layer's q, k, v read the frozen embeddings: bitsandbytes' no-autograd call
    assert [m["params"]["bnb_call"] for m in report.matches] == ["gemm_4bit"] * 3 + \
        ["MatMul4Bit"] * 11
    # eager's error is bfloat16 GEMM rounding (about 5e-3); a wrong formula is far above it
    assert err_c <= 1.1 * err_e + 1e-4, (err_e, err_c)


def test_qlora_the_trl_way():
    """TRL's SFTTrainer casts a quantized model's adapters to bfloat16 after peft's recipe has
    made the activations float32: base and adapter both read x.to(bfloat16). The fused op reads
    that cast x too; its adapter products stay float32 where eager rounds them to bfloat16, so
    compiled is held to eager's own error against a float32 twin (as the other 4-bit tests)."""
    model = kbit_recipe(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16)))
    err_e, err_c = errors(model, batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 14} and report.near_misses == []
    assert {m["params"]["cast_x"] for m in report.matches} == {"torch.bfloat16"}
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_qlora_float32_compute_the_trl_way_is_a_near_miss_that_says_why():
    """float32 weights and compute (``fastlora train --load-in-4bit`` on the CPU) with TRL's
    bfloat16 adapters: the base reads float32 x, the adapter x.to(bfloat16). The 4-bit op reads
    one x, so each 4-bit layer is a near miss whose reason names the two dtypes, TRL's cast and
    the fix; lora_linear fuses the adapter alone on bitsandbytes' output (given the rounded x).
    With the adapters cast back to float32 (what fastlora train does) every 4-bit layer is
    fused."""
    model = kbit_recipe(quantize_linears(tiny_llama(layers=1), dtype=torch.float32))
    err_e, err_c = errors(model, batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 7}
    assert all(m["params"]["autocast_inputs"] == ["x"] for m in report.matches)
    assert err_c <= 1.25 * err_e + 1e-5, (err_e, err_c)
    misses = [n for n in report.near_misses if n["pattern"] == "lora_linear_4bit"]
    assert sorted(n["module"].split(".lora_A")[0] + ".base_layer" for n in misses) == sorted(
        name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    for miss in misses:
        assert "adapter weights are torch.bfloat16 but the 4-bit matmul computes in " \
               "torch.float32" in miss["reason"] and "--dtype fp32" in miss["reason"], miss

    from fastlora.app.sft import keep_adapters_in
    assert keep_adapters_in(model, torch.float32) == 14  # lora_A and lora_B of 7 layers
    err_e, err_c = errors(model, batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 7} and report.near_misses == []
    assert err_c <= 1.25 * err_e + 1e-5, (err_e, err_c)


def test_8bit_adapter_fused_by_lora_linear():
    model = with_lora(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16), kind="8bit"))
    err_e, err_c = errors(model, batch())
    report = fastlora.last_report()
    # the int8 matmul stays bitsandbytes'; lora_linear fuses every adapter (on CPU layer 0's
    # int8 weight is dequantized in the graph, so its base linear is fused too)
    assert report.counts() == {"lora_linear": 14}
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "cuda_autocast"])
def test_8bit_bf16_adapters_on_float32_activations(monkeypatch, autocast):
    """TRL's recipe on an 8-bit model: peft's kbit preparation keeps the activations float32 and
    SFTTrainer stores the adapters in bfloat16, so each adapter rounds x to bfloat16 (peft's cast,
    or under a Trainer's bf16=True CUDA autocast, autocast's) while the base reads it as it is.
    On a base computed elsewhere the op is given the rounded x: every adapter fused (0 and 7 of
    14 were), and held to eager's own error against a float32 twin."""
    if autocast:
        answer_autocast_for_the_cpu(monkeypatch)
    model = kbit_recipe(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16), kind="8bit"))
    inputs = batch()
    loss_r, grads_r = run_step(float_twin(model), inputs)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_e, grads_e = run_step(model, inputs)
        loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 14} and report.near_misses == [], str(report)
    # x rounded by the op wherever the adapter read float32 x: everywhere without autocast,
    # all but o_proj and down_proj under it (they read autocast's bfloat16 outputs)
    rounded = [m["module"] for m in report.matches
               if m["params"].get("cast_to") == "torch.bfloat16"
               and m["params"].get("autocast_inputs") == ["x"]]
    assert len(rounded) == (10 if autocast else 14), [m["params"] for m in report.matches]
    assert all(g.dtype == grads_e[n].dtype for n, g in grads_c.items())
    err_e = worst(loss_e, grads_e, loss_r, grads_r)
    err_c = worst(loss_c, grads_c, loss_r, grads_r)
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


@pytest.mark.parametrize("adapters", ["bf16", "fp32"])
def test_qlora_under_cuda_autocast(monkeypatch, adapters):
    """A Trainer with bf16=True on a GPU runs the step under torch.autocast, and peft's 4-bit
    layer then casts neither x nor the adapter output (it asks torch.is_autocast_enabled(),
    which without a device means CUDA): with peft's float32 activations the adapter linears
    read float32 x and autocast runs them in bfloat16. TRL's SFTTrainer stores the adapters in
    bfloat16 ("bf16"); a plain Trainer leaves them float32 ("fp32"), which autocast casts too.
    On the H200 `fastlora train --load-in-4bit` fused 4 of 28 adapters that way. Emulated here
    with CPU autocast and the question answered for the CPU; fused, and held to eager's own
    error against a float32 twin (the op keeps the adapter products in float32)."""
    answer_autocast_for_the_cpu(monkeypatch)
    model = kbit_recipe(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16)), adapters)
    inputs = batch()
    loss_r, grads_r = run_step(float_twin(model), inputs)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, grads_e = run_step(model, inputs)
        loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 14} and report.near_misses == [], str(report)
    # every adapter reads float32 activations but o_proj (the attention's bfloat16 output)
    casts = [m["params"]["cast_x"] for m in report.matches]
    assert casts.count("torch.bfloat16") == 12 and casts.count(None) == 2, casts
    cast_adapters = {m["params"]["cast_adapters"] for m in report.matches}
    assert cast_adapters == ({None} if adapters == "bf16" else {"torch.bfloat16"})
    assert all(g.dtype == grads_e[n].dtype for n, g in grads_c.items())

    err_e = worst(loss_e, grads_e, loss_r, grads_r)
    err_c = worst(loss_c, grads_c, loss_r, grads_r)
    print(f"{adapters} adapters: eager {err_e:.2e}, compiled {err_c:.2e} from the float32 twin")
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_8bit_falls_back_to_adapter_fusion():
    torch.manual_seed(0)
    model = with_lora(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16).cuda(),
                                       kind="8bit"))
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora", options=only_lora())
    loss_c = compiled(input_ids=ids, labels=ids).loss
    reports = fastlora.reports(compiled)
    counts = reports.counts()
    # On CUDA, bitsandbytes' 8-bit layer breaks Dynamo's graph (the H200 run, bitsandbytes 0.50,
    # torch 2.11: 31 graphs for 2 layers, where the CPU gives one). An adapter whose base
    # output lies in another graph is left as it is, correct but unfused (6 of 14 fused there);
    # docs/troubleshooting.md says so. Here: the fused ones are right, and some are fused.
    assert 1 <= counts.get("lora_linear", 0) <= 14 and set(counts) == {"lora_linear"}, (
        counts, reports.near_misses()[:4], str(reports)[:3000])
    assert rel_err(loss_c, model(input_ids=ids, labels=ids).loss) < 1e-2
