"""lora_moe_experts: LoRA on 3-D MoE expert weights (peft ``target_parameters``).

The op against a float64 reference that merges the weight as peft does (both weight
orientations, float32 / float16 per-expert path, bfloat16 grouped path and its unaligned
per-expert fallback, odd sizes, an expert with no rows); then tiny Qwen3-MoE and Mixtral models
with LoRA on attention and on both expert weights, compiled vs eager: loss and every LoRA
gradient, the counts of fused ops pinned, and the near miss of a trainable expert weight.
"""
import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

import fastlora
from fastlora.kernels.lora_moe_experts import grouped_path
from helpers import compare_compiled, compare_low_precision, rel_err, token_batch

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def merged_reference(x, weight, lhs, rhs, offs, scale, transposed):
    """What peft + transformers compute, in float64: W' = W + s lhs @ rhs, rows of expert e
    times W'_e (transposed when W is stored [E, out, in])."""
    merged = weight.double() + scale * lhs.double() @ rhs.double()
    if transposed:
        merged = merged.transpose(-2, -1)
    out = torch.zeros(x.shape[0], merged.shape[-1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ merged[e]
        start = end
    return out


def _operands(dtype, experts, d_in, d_out, r, counts, transposed):
    counts = torch.tensor(counts)
    offs = counts.cumsum(0).to(torch.int32)
    P, Q = (d_out, d_in) if transposed else (d_in, d_out)
    x = torch.randn(int(counts.sum()), d_in).to(dtype).requires_grad_()
    weight = (torch.randn(experts, P, Q) / d_in ** 0.5).to(dtype)
    lhs = (torch.randn(experts, P, r) * 0.3).to(dtype).requires_grad_()
    rhs = (torch.randn(experts, r, Q) * 0.3).to(dtype).requires_grad_()
    return x, weight, lhs, rhs, offs


CASES = [  # dtype, experts, in, out, r, rows per expert (expert 1 gets none)
    (torch.float32, 4, 44, 23, 3, [5, 0, 7, 3]),
    (torch.float16, 3, 40, 24, 4, [6, 0, 9]),
    (torch.bfloat16, 4, 48, 24, 8, [5, 0, 7, 3]),   # torch._grouped_mm
    (torch.bfloat16, 3, 40, 20, 4, [6, 0, 9]),      # unaligned: per-expert mm
]


@pytest.mark.parametrize("transposed", [True, False], ids=["out_in", "in_out"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}-r{c[4]}")
def test_op_matches_float64(case, transposed):
    dtype, experts, d_in, d_out, r, counts = case
    x, weight, lhs, rhs, offs = _operands(dtype, experts, d_in, d_out, r, counts, transposed)
    y, _ = torch.ops.fastlora.lora_moe_experts(x, weight, lhs, rhs, offs, 1.5, transposed)
    g = torch.randn(y.shape).to(dtype)
    dx, dlhs, drhs = torch.autograd.grad(y, (x, lhs, rhs), g)
    ref_in = [t.detach().double().requires_grad_() for t in (x, lhs, rhs)]
    y64 = merged_reference(ref_in[0], weight, ref_in[1], ref_in[2], offs, 1.5, transposed)
    refs = torch.autograd.grad(y64, ref_in, g.double())
    assert y.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
    for name, got, want in (("y", y, y64), ("dx", dx, refs[0]), ("dlhs", dlhs, refs[1]),
                            ("drhs", drhs, refs[2])):
        assert rel_err(got, want) < TOL[dtype], name
    # the expert with no rows gets exactly zero adapter gradient
    assert not dlhs[1].any() and not drhs[1].any()


def test_grouped_path_is_taken_where_aligned():
    x = torch.empty(3, 48, dtype=torch.bfloat16)
    assert grouped_path(x, 48, 24, 8)
    assert not grouped_path(x, 48, 24, 4)
    assert not grouped_path(x.float(), 48, 24, 8)


def test_op_under_compile_matches_eager_op():
    """The op through AOTAutograd (fake kernel, autograd formula) equals the eager op."""
    x, weight, lhs, rhs, offs = _operands(torch.float32, 4, 44, 23, 3, [5, 0, 7, 3], True)

    def f(x, lhs, rhs):
        return torch.ops.fastlora.lora_moe_experts(x, weight, lhs, rhs, offs, 1.5, True)[0]
    g = torch.randn(x.shape[0], 23)
    eager = torch.autograd.grad(f(x, lhs, rhs), (x, lhs, rhs), g)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, lhs, rhs), (x, lhs, rhs), g)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- tiny MoE models

LAYERS = 2


def tiny_moe(family, hidden=44, layers=LAYERS):
    common = dict(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=10 if hidden == 44 else 12,
                  max_position_embeddings=128)
    if family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**common, intermediate_size=60, moe_intermediate_size=24,
                               num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        return T.Qwen3MoeForCausalLM(cfg)
    if family == "gpt_oss":  # experts stored [E, in, out], with biases; interleaved gate/up
        cfg = T.GptOssConfig(**common, intermediate_size=24, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"][:layers])
        model = T.GptOssForCausalLM(cfg)
        with torch.no_grad():  # biases start at zero, which would hide a wrong bias path
            for name, p in model.named_parameters():
                if "experts" in name and "bias" in name:
                    p.normal_(0, 0.1)
        return model
    cfg = T.MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                          num_experts_per_tok=2)
    return T.MixtralForCausalLM(cfg)


def with_expert_lora(model, r=4):
    """LoRA on q/v and on both expert weights, B drawn at random (peft's zero init would make
    every A gradient zero)."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                     target_parameters=EXPERT_TARGETS, init_lora_weights=False)
    return get_peft_model(model, cfg)


def _expert_grads(errs):
    return {n: e for n, e in errs.items() if ".experts." in n}


FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
# layers of the fp32 family test: GPT-OSS's two (a sliding and a full attention layer), one of
# the others (every layer's experts are alike); the bf16 test takes one of each
FAMILY_LAYERS = {"qwen3_moe": 1, "mixtral": 1, "gpt_oss": LAYERS}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_fp32_exact_and_counted(family):
    layers = FAMILY_LAYERS[family]
    model = with_expert_lora(tiny_moe(family, hidden=48 if family == "gpt_oss" else 44,
                                      layers=layers))
    inputs = token_batch(seq=9, vocab=97, use_cache=False)
    fastlora.clear_reports()
    loss_err, errs, _ = compare_compiled(model, inputs)
    assert loss_err < 1e-5
    assert len(_expert_grads(errs)) == 4 * layers  # lora_A and lora_B of two weights a layer
    assert max(errs.values()) < 1e-5, errs
    reports = fastlora.reports()
    assert reports.counts()["lora_moe_experts"] == 2 * layers
    assert not [n for n in reports.near_misses() if n["pattern"] == "lora_moe_experts"]
    orientation = "in_out" if family == "gpt_oss" else "out_in"
    assert {m["spelling"] for r in reports for m in r.matches
            if m["pattern"] == "lora_moe_experts"} == {f"fallback_mm_{orientation}_cached"}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_bf16_close_to_eager_bf16(family):
    """bfloat16 (torch._grouped_mm on the aligned sizes): the compiled model is no further
    from the float32 model than eager bfloat16 is (eager rounds the merged weight to bf16).
    One layer for every family, GPT-OSS too: the experts are what is tested here, and every
    layer's are alike (GPT-OSS's sliding and full layers are both compiled in fp32 above, and
    in bf16 by tests/test_gpt_oss.py)."""
    layers = 1
    model = with_expert_lora(tiny_moe(family, hidden=48, layers=layers), r=8)
    inputs = token_batch(seq=9, vocab=97, use_cache=False)
    fastlora.clear_reports()
    eager_err, compiled_err = compare_low_precision(model, inputs)
    assert compiled_err <= max(1.5 * eager_err, 1e-2), (eager_err, compiled_err)
    assert fastlora.reports().counts()["lora_moe_experts"] == 2 * layers


def test_trainable_expert_weight_is_a_near_miss():
    """One layer: its trainable gate_up weight is the near miss, its down_proj still fuses."""
    model = with_expert_lora(tiny_moe("qwen3_moe", layers=1))
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    experts.gate_up_proj.requires_grad_(True)
    inputs = token_batch(seq=9, vocab=97, use_cache=False)
    fastlora.clear_reports()
    loss_err, errs, _ = compare_compiled(model, inputs)
    assert loss_err < 1e-5 and max(errs.values()) < 1e-5, errs
    reports = fastlora.reports()
    assert reports.counts()["lora_moe_experts"] == 2 * 1 - 1
    misses = [n for n in reports.near_misses() if n["pattern"] == "lora_moe_experts"]
    assert len(misses) == 1 and "expert weight itself is trainable" in misses[0]["reason"]


def _unfused(x, weight, lhs, rhs, offs):
    """peft's merge + transformers' fallback product, as the graph holds them."""
    merged = torch.baddbmm(weight, lhs, rhs, alpha=1.5)
    return torch.ops.transformers.grouped_mm_fallback(x, merged.transpose(-2, -1), offs=offs)


def test_uncached_product_fuses_and_matches():
    """A merged weight read by the product alone (no parametrization cache) fuses through the
    uncached spelling, which does not compute the merged weight at all."""
    x, weight, lhs, rhs, offs = _operands(torch.float32, 4, 44, 23, 3, [5, 0, 7, 3], True)
    g = torch.randn(x.shape[0], 23)
    eager = torch.autograd.grad(_unfused(x, weight, lhs, rhs, offs), (x, lhs, rhs), g)
    fastlora.clear_reports()
    compiled = torch.compile(_unfused, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    got = torch.autograd.grad(compiled(x, weight, lhs, rhs, offs), (x, lhs, rhs), g)
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-5
    (match,) = fastlora.last_report().matches
    assert match["pattern"] == "lora_moe_experts" and match["spelling"] == "fallback_mm_out_in"


def test_saves_no_merged_weight():
    """Saved for backward beyond the inputs: the unfused pair keeps the merged E x out x in
    weight; the op keeps only the [S, r] xa."""
    from helpers import saved_activations
    x, weight, lhs, rhs, offs = _operands(torch.float32, 4, 44, 23, 3, [5, 0, 7, 3], True)
    inputs = (x, weight, lhs, rhs, offs)
    unfused, shapes = saved_activations(lambda: _unfused(*inputs), inputs)
    fused, fused_shapes = saved_activations(
        lambda: torch.ops.fastlora.lora_moe_experts(*inputs, 1.5, True), inputs)
    assert (4, 23, 44) in shapes or (4, 44, 23) in shapes
    assert fused_shapes == [(15, 3)] and fused == 15 * 3 * 4
    assert unfused >= 4 * 23 * 44 * 4


# ---------------------------------------------------------------- CUDA (run with -m gpu)

GPU_CASES = [  # torch._grouped_mm (bf16, aligned), per-expert mm (fp32; bf16 with r = 4)
    (torch.bfloat16, 16, 256, 128, 16),
    (torch.bfloat16, 8, 64, 40, 8),
    (torch.float32, 8, 72, 40, 5),
    (torch.bfloat16, 8, 64, 40, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [True, False], ids=["out_in", "in_out"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-E{c[1]}-{c[2]}x{c[3]}-r{c[4]}")
def test_cuda_op_matches_float64(case, transposed):
    """Odd row counts per expert, two experts without rows (the K-grouped products of dA, dB
    must give them exact zeros)."""
    dtype, experts, d_in, d_out, r = case
    counts = [(7 * e + 3) % 23 if e not in (2, 5) else 0 for e in range(experts)]
    x, weight, lhs, rhs, offs = _operands(dtype, experts, d_in, d_out, r, counts, transposed)
    cuda = [t.detach().cuda().requires_grad_(t.requires_grad) for t in (x, weight, lhs, rhs)]
    y, _ = torch.ops.fastlora.lora_moe_experts(*cuda, offs.cuda(), 1.5, transposed)
    g = torch.randn(y.shape).to(dtype)
    dx, dlhs, drhs = torch.autograd.grad(y, (cuda[0], cuda[2], cuda[3]), g.cuda())
    ref_in = [t.detach().double().requires_grad_() for t in (x, lhs, rhs)]
    y64 = merged_reference(ref_in[0], weight, ref_in[1], ref_in[2], offs, 1.5, transposed)
    refs = torch.autograd.grad(y64, ref_in, g.double())
    for name, got, want in (("y", y, y64), ("dx", dx, refs[0]), ("dlhs", dlhs, refs[1]),
                            ("drhs", drhs, refs[2])):
        assert rel_err(got.cpu(), want) < TOL[dtype], name
    assert not dlhs[2].any() and not drhs[5].any()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cuda_moe_bf16_close_to_eager_bf16(family):
    model = with_expert_lora(tiny_moe(family, hidden=48), r=8).cuda()
    inputs = token_batch(seq=33, vocab=97, use_cache=False, device="cuda")
    fastlora.clear_reports()
    eager_err, compiled_err = compare_low_precision(model, inputs, options={"compiler":
                                                                            "inductor"})
    assert compiled_err <= max(1.5 * eager_err, 1e-2), (eager_err, compiled_err)
    assert fastlora.reports().counts()["lora_moe_experts"] == 2 * LAYERS


def test_peft_parametrization_recompiles_every_step():
    """peft 0.21 registers the experts' parametrization anew in every forward (a new class), so
    Dynamo compiles the experts' graph again at every layer and step (docs/lora.md says so; when
    this fails, peft changed and the docs' limitation is to be re-checked)."""
    model = with_expert_lora(tiny_moe("qwen3_moe"))
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    inputs = token_batch(seq=9, vocab=97, use_cache=False)
    fastlora.clear_reports()
    for step in (1, 2):
        compiled(**inputs).loss.backward()
        assert fastlora.reports().counts()["lora_moe_experts"] == 2 * LAYERS * step
    # the reports say so: the second step's experts graphs are the first step's, compiled again
    again = [r for r in fastlora.reports() if any(n.startswith("compiled again") for n in r.notes)
             and any(m["pattern"] == "lora_moe_experts" for m in r.matches)]
    assert len(again) == LAYERS, [r.notes for r in fastlora.reports()]


def test_batched_mm_experts_are_a_near_miss():
    """experts_implementation="batched_mm" gathers a merged weight per row: not fused, said so,
    and still exact."""
    base = tiny_moe("qwen3_moe", layers=1)  # one near miss per experts weight: one layer
    base.set_experts_implementation("batched_mm")
    model = with_expert_lora(base)
    fastlora.clear_reports()
    loss_err, errs, _ = compare_compiled(model, token_batch(seq=9, vocab=97, use_cache=False))
    assert loss_err < 1e-5 and max(errs.values()) < 1e-5, errs
    reports = fastlora.reports()
    assert "lora_moe_experts" not in reports.counts()
    reasons = [n["reason"] for n in reports.near_misses() if n["pattern"] == "lora_moe_experts"]
    assert len(reasons) == 2 * 1
    assert all("experts_implementation='grouped_mm'" in r and "getitem" in r for r in reasons)


def test_model_code_baddbmm_is_no_near_miss():
    """Only peft's merge is reported: a baddbmm of model code (alibi attention, say) is not."""
    def attention_like(a, b, c):
        return torch.baddbmm(a, b, c, alpha=0.5).relu()
    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 5, 4)
    torch.compile(attention_like, backend="fastlora")(a, b, c).sum().backward()
    assert fastlora.last_report().near_misses == []


def test_moe_under_autocast():
    """A float32 model under bfloat16 autocast: peft merges with autocast off (the graph holds
    that region, and the merged weight the replacement recomputes for the cache stays float32),
    transformers' fallback product is float32; fused, and no further from the float32 run than
    eager autocast is."""
    import copy
    from helpers import _global_err, run_step
    # one layer: every layer's experts merge and multiply alike
    model = with_expert_lora(tiny_moe("qwen3_moe", hidden=48, layers=1), r=8)
    inputs = token_batch(seq=9, vocab=97, use_cache=False)
    loss32, grads32 = run_step(copy.deepcopy(model), inputs)
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, grads_e = run_step(eager, inputs)
    fastlora.clear_reports()
    compiled = torch.compile(compiled_model, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    eager_err = _global_err(loss_e, grads_e, loss32, grads32)
    compiled_err = _global_err(loss_c, grads_c, loss32, grads32)
    assert compiled_err <= max(1.5 * eager_err, 1e-2), (eager_err, compiled_err)
    assert fastlora.reports().counts()["lora_moe_experts"] == 2 * 1


def test_moe_dynamic_shapes():
    """dynamic=True (fastlora train's default): the experts' graph does arithmetic on sizes
    (``torch.arange(perm.size(0))`` with perm.size(0) = tokens * top-k), which canonicalization
    must leave Python's; fused and exact at two sequence lengths."""
    import copy
    from helpers import run_step
    model = with_expert_lora(tiny_moe("mixtral", layers=1))  # every layer's size arithmetic alike
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", dynamic=True,
                             options={"compiler": "aot_eager", "strict": True})
    fastlora.clear_reports()
    for seq in (9, 13):
        inputs = token_batch(seq=seq, vocab=97, use_cache=False)
        loss_e, grads_e = run_step(model, inputs)
        loss_c, grads_c = run_step(compiled, inputs, compiled_model)
        assert rel_err(loss_c, loss_e) < 1e-5
        assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 1e-5
    assert fastlora.reports().counts()["lora_moe_experts"] == 2 * 2 * 1  # a compile a step


@pytest.mark.parametrize("transposed", [True, False], ids=["out_in", "in_out"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: f"{c[0]}")
def test_opcheck_forward_and_backward(case, transposed):
    """The fake kernels promise the real ones' shapes, dtypes and strides (inductor asserts
    the strides of a custom op's outputs: a transposed d lhs failed there on the H100)."""
    dtype, experts, d_in, d_out, r, counts = case
    x, weight, lhs, rhs, offs = _operands(dtype, experts, d_in, d_out, r, counts, transposed)
    torch.library.opcheck(torch.ops.fastlora.lora_moe_experts,
                          (x, weight, lhs, rhs, offs, 1.5, transposed))
    y, xa = torch.ops.fastlora.lora_moe_experts(x, weight, lhs, rhs, offs, 1.5, transposed)
    grad = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastlora.lora_moe_experts_backward,
                          (grad, x.detach(), weight, lhs.detach(), rhs.detach(), xa.detach(),
                           offs, 1.5, transposed, True))


def test_aligning_a_fake_reads_no_address():
    """warm_kernels runs the op's body on fake tensors to plan launches; reading a fake's data
    pointer is deprecated in torch (a warning on the H100 run, an error to come)."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastlora.kernels.lora_moe_experts import _aligned
    with FakeTensorMode():
        fake = torch.empty(8, 16, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _aligned(fake) is fake
