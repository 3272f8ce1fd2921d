"""QLoRA: the Triton NF4/FP4 dequantization vs bitsandbytes, the fused 4-bit LoRA op vs float64,
and compiled-vs-eager on tiny Llamas whose linears are bitsandbytes 4-bit layers (the models:
tests/qlora_models.py; trainers' recipes, autocast and 8-bit bases: test_qlora_recipes.py).

bitsandbytes 0.50.2 runs 4-bit and 8-bit layers on the CPU (its default backend), so all of this
runs here; the CUDA path (peft's bnb LoRA classes, bitsandbytes' CUDA kernels) is in the GPU
tests at the bottom.
"""
import copy

import pytest
import torch

import fastlora
from fastlora.kernels import _lora_blocks as K
from fastlora.kernels import tuning
from fastlora.kernels import lora_linear_4bit as Q
from fastlora.patterns import qlora as QP
from helpers import rel_err, run_step, tiny_llama, token_batch, with_lora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
BF = pytest.importorskip("bitsandbytes.functional")

from qlora_models import batch, errors, float_twin, only_lora, quantize_linears, worst  # noqa: E402


def quantized(n, k, quant_type, double, blocksize=64, device="cpu"):
    w = torch.randn(n, k, device=device)
    packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double,
                                  quant_type=quant_type)
    nested = (qs.state2.absmax, qs.state2.code, qs.offset) if double else (None, None, None)
    return packed, qs, (packed, qs.absmax, *nested, n, k, blocksize, quant_type)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("n,k,blocksize", [(40, 72, 64), (37, 33, 128), (300, 256, 64)])
@pytest.mark.parametrize("impl", ["triton-flat", "triton-rows", "triton-rows-small",
                                  "reference"])
def test_dequant_is_bitwise_bitsandbytes(quant_type, double, n, k, blocksize, impl):
    """Both layouts of the Triton kernel (tuning entry dequant_4bit; -small: one quantization
    block per program and a 64-byte flat block, so many programs and a partial last one)."""
    packed, qs, args = quantized(n, k, quant_type, double, blocksize)
    layout = {"layout": impl.split("-")[1]} if impl != "reference" else {}
    if impl.endswith("-small"):
        layout["block"] = 64
    for dtype in (torch.bfloat16, torch.float32):
        expected = BF.dequantize_4bit(packed, qs).to(dtype)
        if impl != "reference":
            with tuning.override("dequant_4bit", **layout):
                out = Q.dequantize_4bit_triton(
                    *args, dtype, out=torch.full((n, k), float("nan"), dtype=dtype))
        else:
            out = Q.dequantize_4bit_reference(*args, dtype)
        assert torch.equal(out, expected)


def test_code_tables_follow_the_spec():
    cpu = torch.device("cpu")
    assert torch.equal(Q.code_table("nf4", cpu), torch.tensor(Q.NF4))
    # bitsandbytes' CPU FP4 table rounds to 4 digits; its CUDA table (and ours) are exact
    assert (Q.code_table("fp4", cpu) - torch.tensor(Q.FP4)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="nf4"):
        Q.dequantize_4bit(*quantized(4, 64, "nf4", False)[2][:-1], "int4", torch.float32)


# ---------------------------------------------------------------- the fused op


@pytest.mark.parametrize("double,p,x_dtype", [(True, 0.0, torch.bfloat16),
                                               (False, 0.3, torch.bfloat16),
                                               (True, 0.3, torch.float32)])
def test_op_matches_float64(double, p, x_dtype):
    """bfloat16 compute dtype; float32 x is the prepare_model_for_kbit_training case (the base
    matmul on x cast to bfloat16, its output cast back, the adapter on float32 x)."""
    n, k, r = 40, 72, 8
    _, _, args = quantized(n, k, "nf4", double)
    w = Q.dequantize_4bit_reference(*args, torch.float64)
    x = torch.randn(3, 7, k, dtype=x_dtype, requires_grad=True)
    bias = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, k) / k ** 0.5).requires_grad_()
    b = torch.randn(n, r, requires_grad=True)
    seed = torch.tensor([77])
    packed, absmax, absmax2, code2, offset = args[:5]
    y, _ = torch.ops.fastlora.lora_linear_4bit(x, packed, absmax, absmax2, code2, offset, bias, a,
                                               b, seed, n, k, 64, "nf4", 0.5, p, x_dtype,
                                               torch.bfloat16)
    assert y.dtype == x_dtype
    g = torch.randn_like(y)
    y.backward(g)
    keep = (K.keep_mask_reference(77, 21, k, 0, p).view(3, 7, k) if p
            else torch.ones(3, 7, k, dtype=torch.bool))
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (x, a, b, bias))
    y64 = x64 @ w.T + bias64 + 0.5 * ((x64 * keep / (1 - p)) @ a64.T) @ b64.T
    grads = torch.autograd.grad(y64, (x64, a64, b64, bias64), g.double())
    assert rel_err(y, y64) < 1e-2
    for got, want in zip((x.grad, a.grad, b.grad, bias.grad), grads):
        assert rel_err(got, want) < 1e-2


def test_op_opcheck():
    _, _, args = quantized(40, 64, "fp4", True)
    packed, absmax, absmax2, code2, offset = args[:5]
    torch.library.opcheck(torch.ops.fastlora.lora_linear_4bit.default,
                          (torch.randn(2, 5, 64, dtype=torch.bfloat16), packed, absmax, absmax2,
                           code2, offset, None, torch.randn(4, 64, requires_grad=True),
                           torch.randn(40, 4, requires_grad=True), None, 40, 64, 64, "fp4", 2.0,
                           0.0, torch.bfloat16, torch.bfloat16))


# ---------------------------------------------------------------- tiny quantized models


@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("fp4", False)])
def test_qlora_llama_both_graph_forms(quant_type, double):
    model = with_lora(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16),
                                       quant_type=quant_type, double=double))
    err_e, err_c = errors(model, batch())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 14}
    calls = [m["params"]["bnb_call"] for m in report.matches]
    # q, k, v of layer 0 read the (frozen) embeddings: bitsandbytes calls gemm_4bit directly;
    # every later input depends on an adapter, requires grad, and goes through its MatMul4Bit
    # autograd.Function (a higher-order op in the graph)
    assert calls == ["gemm_4bit"] * 3 + ["MatMul4Bit"] * 11
    assert all(m["params"]["quant_type"] == quant_type and m["params"]["double_quant"] == double
               for m in report.matches)
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_unread_outputs_of_the_4bit_autograd_function_join_the_match():
    """torch 2.11's Dynamo leaves an unread ``getitem(MatMul4Bit's autograd_function_apply, 1)``
    beside the read ``[0]`` (seen for every layer of a from_pretrained 4-bit Llama, on the card
    and on the CPU); torch 2.13 removes it. Such a graph, built here by adding that getitem:
    every layer still fuses (the getitem goes with the match), and loss and gradients are
    eager's."""
    import operator

    from fastlora.backend import fastlora_backend
    hop_op = torch.ops.higher_order.autograd_function_apply
    added = []

    def backend(gm, example_inputs):
        for hop in [n for n in gm.graph.nodes if n.target is hop_op]:
            with gm.graph.inserting_after(hop):
                added.append(gm.graph.call_function(operator.getitem, (hop, 1)))
        gm.recompile()
        return fastlora_backend(gm, example_inputs, only_lora())

    model = with_lora(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16)))
    twin = copy.deepcopy(model)
    inputs = batch()
    loss_e, grads_e = run_step(model, inputs)
    loss_c, grads_c = run_step(torch.compile(twin, backend=backend), inputs, twin)
    assert len(added) == 11  # the MatMul4Bit layers (q, k, v of layer 0 call gemm_4bit)
    assert fastlora.last_report().counts() == {"lora_linear_4bit": 14}
    # bfloat16: the fused op keeps the adapter products in float32 where eager rounds them
    # (1.1e-2 here); the other 4-bit tests hold that against a float32 twin
    assert rel_err(loss_c, loss_e) < 1e-3
    assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 3e-2


def test_code_table_is_built_at_compile_time(monkeypatch):
    """The op's cached 16-entry code table is built by the pattern when the graph is compiled,
    not on the op's first call, which under mode="reduce-overhead" is a CUDA-graph warm-up whose
    memory pool would own the cached tensor."""
    import inspect

    callers, real = [], Q.code_table

    def spy(quant_type, device):
        callers.append(inspect.stack()[1].filename)
        return real(quant_type, device)

    monkeypatch.setattr(Q, "_CODES", {})
    monkeypatch.setattr(Q, "code_table", spy)
    monkeypatch.setattr(QP, "code_table", spy)
    model = with_lora(quantize_linears(tiny_llama(layers=1).to(torch.bfloat16)))
    torch.compile(model, backend="fastlora", options=only_lora())(**batch())
    assert fastlora.last_report().counts() == {"lora_linear_4bit": 7}
    assert callers and callers[0].endswith("qlora.py")


def test_qlora_dropout_and_bias_against_seeded_twin():
    from lora_models import SeededDropout
    p = 0.2
    model = with_lora(quantize_linears(tiny_llama(layers=2, attention_bias=True)
                                       .to(torch.bfloat16)), dropout=p,
                      targets=["q_proj", "v_proj", "down_proj"])
    twin = float_twin(model)
    for module in twin.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = SeededDropout(p)
    inputs = batch()
    torch.manual_seed(5)
    loss_r, grads_r = run_step(twin, inputs)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora())
    torch.manual_seed(5)
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 6}
    assert all(m["params"]["dropout"] == p for m in report.matches)
    # float32 twin with the same masks vs the bf16 compiled model: bf16 rounding only
    assert rel_err(loss_c, loss_r) < 1e-2
    assert max(rel_err(grads_c[n], g) for n, g in grads_r.items()) < 5e-2


def test_4bit_disabled_adapter_still_fused_on_bnb_output():
    model = with_lora(quantize_linears(tiny_llama(layers=1).to(torch.bfloat16)),
                      targets=["q_proj", "o_proj"])
    opts = only_lora()
    opts["disable"] = opts["disable"] + ["lora_linear_4bit"]
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora", options=opts)
    inputs = batch()
    loss_c = compiled(**inputs).loss
    assert fastlora.last_report().counts() == {"lora_linear": 2}
    assert rel_err(loss_c, model(**inputs).loss) < 1e-2


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("fp4", False)])
def test_cuda_dequant_is_bitwise_bitsandbytes(quant_type, double):
    packed, qs, args = quantized(4096, 14336 // 4, quant_type, double, device="cuda")
    expected = BF.dequantize_4bit(packed, qs).to(torch.bfloat16)
    for layout in ("flat", "rows"):
        with tuning.override("dequant_4bit", layout=layout):
            out = Q.dequantize_4bit_triton(*args, torch.bfloat16,
                                           out=torch.full(expected.shape, float("nan"),
                                                          dtype=torch.bfloat16, device="cuda"))
        assert torch.equal(out, expected), layout


@pytest.mark.gpu
def test_cuda_qlora_llama_compiled_vs_eager():
    torch.manual_seed(0)
    model = with_lora(quantize_linears(tiny_llama(layers=2).to(torch.bfloat16).cuda()))
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    err_e, err_c = errors(model, {"input_ids": ids, "labels": ids},
                           twin=float_twin(model).cuda())
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear_4bit": 14}
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_dequant_follows_the_format_spec():
    """bitsandbytes 0.50.2's native CPU dequantize kernel disagrees with its own quantizer for
    some row lengths (K = 32, 48, 96: it errs by up to ~2 absmax units); ours follows the format
    (flat blocks of ``blocksize``), so the round trip stays within NF4's own error."""
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    packed, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    out = Q.dequantize_4bit_triton(packed, qs.absmax, None, None, None, 48, 32, 64, "nf4",
                                   torch.float32)
    gaps = torch.tensor(Q.NF4).diff().max() / 2  # farthest a value can be from its code
    scale = qs.absmax.repeat_interleave(64)[:w.numel()].view(48, 32)
    assert ((out - w).abs() <= gaps * scale + 1e-6).all()


def test_near_miss_explanation_walks_each_graph_once(monkeypatch):
    """QLoRA's near-miss explanation runs for every adapter it does not fuse (here all of them:
    the model has no 4-bit layer). It finds a graph's 4-bit layers once per graph: a walk of
    the whole graph per adapter made the compile quadratic in depth (135k module_path calls
    for a 16-layer tiny Llama)."""
    from collections import Counter
    seen = []
    real = QP.module_path
    monkeypatch.setattr(QP, "module_path", lambda node: (seen.append(node), real(node))[1])
    model = with_lora(tiny_llama(layers=4))
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    run_step(compiled, token_batch(), model)
    assert seen, "the explanation never ran: the test no longer covers it"
    assert max(Counter(seen).values()) <= 2, max(Counter(seen).values())


def test_4bit_layers_compiled_one_by_one_and_fused(tmp_path):
    """reuse_layers on a QLoRA model (loaded as users load it: quantized by transformers):
    torch 2.11's Dynamo failed comparing two 4-bit layer bodies on the H200 (KeyError:
    'example_value'), torch 2.13's shares them only with static shapes; so the layers are
    compiled one by one, the report says why, and every adapter is fused and exact."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastlora import regions

    tiny_llama(layers=4).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = with_lora(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                           dtype=torch.float32))
    # from_pretrained returns an eval-mode model; a Trainer trains in train mode. (In eval mode,
    # on a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight for its CPU kernel at
    # the first call whose input needs no gradient, and refuses these tiny widths.)
    model.train()
    inputs = batch()
    loss_r, grads_r = run_step(float_twin(model), inputs)
    loss_e, grads_e = run_step(model, inputs)
    fastlora.clear_reports()
    torch._dynamo.reset()
    compiled = fastlora.compile_for_trainer(copy.deepcopy(model), reuse_layers=True,
                                            **only_lora())
    loss_c, grads_c = run_step(compiled, inputs)
    reports = fastlora.reports(compiled)

    assert not any(getattr(m, regions._MARK, False) for m in compiled.modules())
    notes = " ".join(n for r in reports for n in r.notes)
    assert regions.QUANTIZED in notes, notes
    assert sum(r.counts().get("lora_linear_4bit", 0) for r in reports) == 28

    assert worst(loss_c, grads_c, loss_r, grads_r) <= \
        1.25 * worst(loss_e, grads_e, loss_r, grads_r) + 1e-3

