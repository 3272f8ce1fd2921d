"""GPT-OSS (tiny, LoRA on the attention projections): its eager attention with learned sinks,
sliding and full layers and padding masks becomes flash attention with sinks, its RoPE of two
halves the fused rope; compiled vs eager, loss and every LoRA gradient (and the sinks' own,
when they are trained)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import fastlora
from helpers import compare_compiled, rel_err, run_step, with_lora

LAYERS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_gpt_oss():
    torch.manual_seed(0)
    model = T.GptOssForCausalLM(T.GptOssConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():  # sinks at their init (zeros) would hide a sign error
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.5)
    return with_lora(model, TARGETS)


def _inputs(padding):
    ids = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 8:] = 0
    elif padding == "left":
        mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False,
            "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_sink_attention_fused_and_exact(padding):
    model = tiny_gpt_oss()
    fastlora.clear_reports()
    loss_err, grad_errs, grads = compare_compiled(model, _inputs(padding))
    matches = [m for r in fastlora.reports() for m in r.matches]
    attention = [m for m in matches if m["pattern"] == "attention"]
    assert len(attention) == LAYERS, fastlora.reports()
    assert {m["spelling"] for m in attention} == {"eager_sinks_masked"}
    windows = sorted(m["params"]["window"] for m in attention)
    assert windows == [0, 4] and all("sinks" in m["params"]["mask"] for m in attention)
    assert all(m["params"]["kernel"] == "triton" for m in attention)
    assert sum(m["pattern"] == "rope" for m in matches) == LAYERS
    assert len(grads) == 2 * LAYERS * len(TARGETS)
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_trained_sinks_get_eager_gradients():
    model = tiny_gpt_oss()
    for layer in model.base_model.model.model.layers:
        layer.self_attn.sinks.requires_grad_(True)
    model.train()
    inputs = _inputs("right")
    loss_e, grads_e = run_step(model, inputs)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    loss_c, grads_c = run_step(compiled, inputs, twin)
    assert sum(m["pattern"] == "attention" for m in fastlora.last_report().matches) == LAYERS
    assert any(n.endswith("sinks") for n in grads_e) and set(grads_c) == set(grads_e)
    assert rel_err(loss_c, loss_e) < 1e-6
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert max(errs.values()) < 1e-5, errs


def test_bf16_no_less_accurate_than_eager_bf16():
    """The kernel's softmax runs in float32 where GPT-OSS's eager one runs in the model's dtype."""
    model32 = tiny_gpt_oss()
    model32.train()
    inputs = _inputs("left")
    loss32, grads32 = run_step(model32, inputs)
    flat = lambda g: torch.cat([g[n].double().flatten() for n in sorted(grads32)])  # noqa: E731
    low = copy.deepcopy(model32).to(torch.bfloat16)
    loss_e, grads_e = run_step(copy.deepcopy(low), inputs)
    compiled_model = copy.deepcopy(low)
    compiled = torch.compile(compiled_model, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    assert sum(m["pattern"] == "attention" for m in fastlora.last_report().matches) == LAYERS
    err_e = max(rel_err(loss_e, loss32), rel_err(flat(grads_e), flat(grads32)))
    err_c = max(rel_err(loss_c, loss32), rel_err(flat(grads_c), flat(grads32)))
    assert err_c <= 1.5 * err_e + 5e-3, (err_e, err_c)
