"""Grouped LoRA projections: the fused gate/up + activation kernels vs float64, and the lora_mlp
pattern compiled vs eager on tiny Llama (SwiGLU) and Gemma (GeGLU) models.

Dropout is checked against a seeded eager twin, as in test_lora_linear.py: the grouped op draws
one seed for both adapters and gives gate slot 0 and up slot 1 of the Philox stream.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora.kernels import _lora_blocks as K
from fastlora.kernels import lora_mlp as G
from helpers import rel_err, run_step, tiny_llama, with_lora
from helpers import token_batch
from lora_models import errors_vs, mixed_dtypes, only_lora

BOTH = ("lora_linear", "lora_mlp")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _act(g, activation):
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("activation,p,dtype", [("silu", 0.0, torch.float32),
                                                ("gelu_tanh", 0.2, torch.float32),
                                                ("gelu", 0.0, torch.bfloat16),
                                                ("silu", 0.3, torch.bfloat16)])
def test_lora_mlp_op_matches_float64(activation, p, dtype):
    M, Kd, N, rg, ru = 37, 40, 56, 8, 1
    x = torch.randn(M, Kd, dtype=dtype, requires_grad=True)
    gw, uw = torch.randn(N, Kd, dtype=dtype) / 6, torch.randn(N, Kd, dtype=dtype) / 6
    gb = torch.randn(N, dtype=dtype, requires_grad=True)
    ga, gB = (torch.randn(rg, Kd) / 6).requires_grad_(), torch.randn(N, rg).requires_grad_()
    ua, uB = (torch.randn(ru, Kd) / 6).requires_grad_(), torch.randn(N, ru).requires_grad_()
    h, _, _, _ = torch.ops.fastlora.lora_mlp(x, gw, gb, ga, gB, uw, None, ua, uB,
                                             torch.tensor([99]), 0.5, 0.7, p, activation, dtype)
    dh = torch.randn_like(h)
    h.backward(dh)
    ones = torch.ones(M, Kd, dtype=torch.bool)
    kg = K.keep_mask_reference(99, M, Kd, 0, p) if p else ones
    ku = K.keep_mask_reference(99, M, Kd, 1, p) if p else ones
    X, GB, GA, GBB, UA, UBB = (t.detach().double().requires_grad_()
                               for t in (x, gb, ga, gB, ua, uB))
    gate = X @ gw.double().T + GB + 0.5 * ((X * kg / (1 - p)) @ GA.T) @ GBB.T
    up = X @ uw.double().T + 0.7 * ((X * ku / (1 - p)) @ UA.T) @ UBB.T
    H = _act(gate, activation) * up
    grads = torch.autograd.grad(H, (X, GB, GA, GBB, UA, UBB), dh.double())
    assert h.dtype == dtype and rel_err(h, H) < TOL[dtype]
    for got, want in zip((x.grad, gb.grad, ga.grad, gB.grad, ua.grad, uB.grad), grads):
        assert rel_err(got, want) < TOL[dtype]


# launch configurations of the two GLU kernels that change which program does what:
# several column splits of 32 (the partial-sum path of large shapes); forward programs of
# several row blocks (the last one partly past M) and the backward's B tiles loaded once
CONFIGS = {"default": {},
           "split": {"lora_glu_bwd": dict(block_m=32, block_n=32, warps=4, per_sm=8)},
           "rows_one_b": {"lora_glu_fwd": dict(block_m=16, block_n=32, row_blocks=2),
                          "lora_glu_bwd": dict(block_m=16, block_n=32, per_sm=8,
                                               one_b=True)}}


def _use(config: str, tuned) -> None:
    """The launch configuration CONFIGS[config], until the test ends."""
    for op, cfg in CONFIGS[config].items():
        tuned(op, **cfg)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("config", CONFIGS)
def test_glu_kernels_write_every_element(impl, config, tuned):
    _use(config, tuned)
    M, N, rg, ru = 37, 72, 4, 8
    bg, bu = torch.randn(M, N, dtype=torch.bfloat16), torch.randn(M, N, dtype=torch.bfloat16)
    xa, wg, wu = torch.randn(M, rg + ru), torch.randn(N, rg), torch.randn(N, ru)
    dh = torch.randn(M, N, dtype=torch.bfloat16)
    gate = (bg.double() + 0.5 * xa[:, :rg].double() @ wg.double().T).bfloat16().double()
    up = (bu.double() + 2.0 * xa[:, rg:].double() @ wu.double().T).bfloat16().double()
    nan = float("nan")
    if impl == "triton":
        h = G.glu_forward_triton(bg, bu, xa, wg, wu, 0.5, 2.0, "gelu_tanh", torch.bfloat16,
                                 h=torch.full((M, N), nan, dtype=torch.bfloat16))
        dg, du, da = G.glu_backward_triton(
            dh, bg, bu, xa, wg, wu, 0.5, 2.0, "gelu_tanh", torch.bfloat16,
            dg=torch.full((M, N), nan, dtype=torch.bfloat16),
            du=torch.full((M, N), nan, dtype=torch.bfloat16), da=torch.full((M, rg + ru), nan))
    else:
        h = G.glu_forward_reference(bg, bu, xa, wg, wu, 0.5, 2.0, "gelu_tanh", torch.bfloat16)
        dg, du, da = G.glu_backward_reference(dh, bg, bu, xa, wg, wu, 0.5, 2.0, "gelu_tanh",
                                              torch.bfloat16)
    g = gate.clone().requires_grad_()
    a = _act(g, "gelu_tanh")
    (da_act,) = torch.autograd.grad(a.sum(), g)
    dg_ref, du_ref = dh.double() * up * da_act, dh.double() * a.detach()
    assert rel_err(h, a.detach() * up) < 1e-2
    assert rel_err(dg, dg_ref) < 1e-2 and rel_err(du, du_ref) < 1e-2
    assert rel_err(da[:, :rg], 0.5 * dg.double() @ wg.double()) < 1e-5
    assert rel_err(da[:, rg:], 2.0 * du.double() @ wu.double()) < 1e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_glu_backward_written_over_its_declared_inputs_gives_the_same_bits(config, tuned):
    """_launch.WRITES_OVER: d gate over base gate, d up over base up (reuse_dead_inputs.py
    gives them those buffers in inductor's graphs): each tile is read before it is written."""
    from fastlora.kernels._launch import WRITES_OVER

    assert WRITES_OVER[G._lora_glu_bwd_kernel] == {"DG": "BG", "DU": "BU"}
    _use(config, tuned)
    M, N, rg, ru = 37, 72, 4, 8
    bg, bu, dh = (torch.randn(M, N, dtype=torch.bfloat16) for _ in range(3))
    xa, wg, wu = torch.randn(M, rg + ru), torch.randn(N, rg), torch.randn(N, ru)
    args = (xa, wg, wu, 0.5, 2.0, "silu", torch.bfloat16)
    want = G.glu_backward_triton(dh, bg, bu, *args)
    over_g, over_u = bg.clone(), bu.clone()
    got = G.glu_backward_triton(dh, over_g, over_u, *args, dg=over_g, du=over_u)
    assert got[0].data_ptr() == over_g.data_ptr() and got[1].data_ptr() == over_u.data_ptr()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_lora_mlp_opcheck_and_errors():
    args = (torch.randn(2, 3, 16), torch.randn(24, 16), None, torch.randn(4, 16),
            torch.randn(24, 4), torch.randn(24, 16), None, torch.randn(4, 16), torch.randn(24, 4),
            None, 2.0, 2.0, 0.0, "silu", torch.float32)
    torch.library.opcheck(torch.ops.fastlora.lora_mlp.default, args)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.fastlora.lora_mlp(*args[:13], "relu", torch.float32)
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.fastlora.lora_mlp(*args[:12], 0.1, "silu", torch.float32)


# ---------------------------------------------------------------- compiled vs eager


def _inputs():
    return token_batch()


def test_llama_swiglu_fp32_exact():
    model = with_lora(tiny_llama(layers=1, mlp_bias=True))
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, _inputs(), patterns=BOTH)
    report = fastlora.last_report()
    assert report.counts() == {"lora_mlp": 1, "lora_linear": 5}  # q, k, v, o, down
    mlp = next(m for m in report.matches if m["pattern"] == "lora_mlp")
    assert mlp["class"] == "LlamaMLP" and mlp["params"]["activation"] == "silu"
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_llama_swiglu_bf16_base_fp32_adapters():
    model32 = with_lora(tiny_llama(layers=1))
    err_e, err_c = errors_vs(model32, mixed_dtypes(copy.deepcopy(model32)), _inputs(), patterns=BOTH)
    assert fastlora.last_report().counts() == {"lora_mlp": 1, "lora_linear": 5}
    assert err_c <= 1.5 * err_e + 1e-3, (err_e, err_c)


def _tiny_gemma(**kw):
    from transformers import GemmaConfig, GemmaForCausalLM
    cfg = GemmaConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                      max_position_embeddings=128, **kw)
    return GemmaForCausalLM(cfg)


@pytest.mark.parametrize("family", ["gemma", "llama_gelu"])
def test_geglu_fp32_exact(family):
    # Gemma's GeGLU is the tanh GELU (it maps hidden_act="gelu" to it); exact-GELU MLPs exist in
    # other families, here a Llama with hidden_act="gelu"
    base = _tiny_gemma() if family == "gemma" else tiny_llama(layers=1, hidden_act="gelu")
    model = with_lora(base, targets=["gate_proj", "up_proj"])
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, _inputs(), patterns=BOTH)
    report = fastlora.last_report()
    assert report.counts() == {"lora_mlp": 1}
    expected = "gelu_tanh" if family == "gemma" else "gelu"
    assert report.matches[0]["params"]["activation"] == expected
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


class _SharedSeed:
    seed = None


class GroupSeededDropout(nn.Module):
    """Eager twin of a grouped op's dropout: the first adapter (slot 0) draws the seed, the
    others (slots 1, 2) reuse it."""

    def __init__(self, p, slot, shared):
        super().__init__()
        self.p, self.slot, self.shared = p, slot, shared

    def forward(self, x):
        if self.slot == 0:
            self.shared.seed = int(torch.randint_like(torch.zeros(1, device=x.device), 0,
                                                      2 ** 31 - 1, dtype=torch.int64))
        x2 = x.reshape(-1, x.shape[-1])
        keep = K.keep_mask_reference(self.shared.seed, *x2.shape, self.slot, self.p, x.device)
        return (x2 * keep / (1 - self.p)).view(x.shape)


def test_dropout_seeded_twin():
    from lora_models import SeededDropout
    p = 0.2
    model = with_lora(tiny_llama(layers=1), dropout=p)
    twin = copy.deepcopy(model)
    shared = _SharedSeed()
    for name, module in twin.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            if name.endswith("gate_proj"):
                module.lora_dropout["default"] = GroupSeededDropout(p, 0, shared)
            elif name.endswith("up_proj"):
                module.lora_dropout["default"] = GroupSeededDropout(p, 1, shared)
            else:
                module.lora_dropout["default"] = SeededDropout(p)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora(*BOTH))
    inputs = _inputs()
    torch.manual_seed(4)
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    assert fastlora.last_report().counts() == {"lora_mlp": 1, "lora_linear": 5}
    torch.manual_seed(4)
    loss_t, grads_t = run_step(twin, inputs)
    assert rel_err(loss_c, loss_t) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-5


def test_autocast_bf16():
    model = with_lora(tiny_llama(layers=1), r=8)
    err_e, err_c = errors_vs(copy.deepcopy(model), model, _inputs(), autocast=torch.bfloat16,
                             patterns=BOTH)
    report = fastlora.last_report()
    assert report.counts() == {"lora_mlp": 1, "lora_linear": 5}
    assert err_c <= 1.5 * err_e + 1e-3, (err_e, err_c)


def test_unequal_dropout_falls_back_to_single_adapters():
    model = with_lora(tiny_llama(layers=1), targets=["gate_proj", "up_proj"], dropout=0.1)
    model.base_model.model.model.layers[0].mlp.up_proj.lora_dropout["default"].p = 0.2
    compiled = torch.compile(model, backend="fastlora", options=only_lora(*BOTH))
    compiled(**_inputs()).loss.backward()
    report = fastlora.last_report()
    assert report.counts() == {"lora_linear": 2}
    assert sorted(m["params"]["dropout"] for m in report.matches) == [0.1, 0.2]


# ---------------------------------------------------------------- lora_qkv

ALL = ("lora_linear", "lora_mlp", "lora_qkv")


@pytest.mark.parametrize("p,dtype", [(0.0, torch.float32), (0.2, torch.float32),
                                     (0.1, torch.bfloat16)])
def test_lora_qkv_op_matches_float64(p, dtype):
    M, Kd, ns, rs, sc = 37, 40, (40, 20, 20), (8, 4, 1), (0.5, 1.0, 2.0)
    x = torch.randn(M, Kd, dtype=dtype, requires_grad=True)
    ws = [torch.randn(n, Kd, dtype=dtype) / 6 for n in ns]
    bs = [torch.randn(n, dtype=dtype, requires_grad=True) for n in ns]
    As = [(torch.randn(r, Kd) / 6).requires_grad_() for r in rs]
    Bs = [torch.randn(n, r).requires_grad_() for n, r in zip(ns, rs)]
    args = [x] + [t for j in range(3) for t in (ws[j], bs[j], As[j], Bs[j])]
    outs = torch.ops.fastlora.lora_qkv(*args, torch.tensor([3]), *sc, p, dtype)
    gs = [torch.randn_like(o) for o in outs[:3]]
    torch.autograd.backward(outs[:3], gs)
    X = x.detach().double().requires_grad_()
    P = [t.detach().double().requires_grad_() for t in bs + As + Bs]
    refs = []
    for j in range(3):
        keep = (K.keep_mask_reference(3, M, Kd, j, p) if p
                else torch.ones(M, Kd, dtype=torch.bool))
        refs.append(X @ ws[j].double().T + P[j]
                    + sc[j] * ((X * keep / (1 - p)) @ P[3 + j].T) @ P[6 + j].T)
    grads = torch.autograd.grad(refs, [X] + P, [g.double() for g in gs])
    for o, r in zip(outs, refs):
        assert o.dtype == dtype and rel_err(o, r) < TOL[dtype]
    for got, want in zip([x.grad] + [t.grad for t in bs + As + Bs], grads):
        assert rel_err(got, want) < TOL[dtype]


def test_lora_qkv_opcheck():
    q = (torch.randn(24, 16), None, torch.randn(4, 16, requires_grad=True),
         torch.randn(24, 4, requires_grad=True))
    kv = (torch.randn(8, 16), torch.randn(8), torch.randn(2, 16, requires_grad=True),
          torch.randn(8, 2, requires_grad=True))
    torch.library.opcheck(torch.ops.fastlora.lora_qkv.default,
                          (torch.randn(2, 3, 16), *q, *kv, *kv, None, 2.0, 2.0, 1.0, 0.0,
                           torch.float32))


def test_llama_qkv_with_bias_fp32_exact():
    model = with_lora(tiny_llama(layers=2, attention_bias=True))
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, _inputs(), patterns=ALL)
    report = fastlora.last_report()
    assert report.counts() == {"lora_qkv": 2, "lora_mlp": 2, "lora_linear": 4}  # o, down
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_llama_qkv_bf16_base_fp32_adapters():
    model32 = with_lora(tiny_llama(layers=1))
    err_e, err_c = errors_vs(model32, mixed_dtypes(copy.deepcopy(model32)), _inputs(), patterns=ALL)
    assert fastlora.last_report().counts() == {"lora_qkv": 1, "lora_mlp": 1, "lora_linear": 2}
    assert err_c <= 1.5 * err_e + 1e-3, (err_e, err_c)


def test_qkv_needs_all_three_adapted():
    model = with_lora(tiny_llama(layers=1), targets=["q_proj", "v_proj"])  # peft's default
    err_e, err_c = errors_vs(copy.deepcopy(model).double(), model, _inputs(), patterns=ALL)
    assert fastlora.last_report().counts() == {"lora_linear": 2}
    assert err_c <= max(1e-5, 1.5 * err_e), (err_e, err_c)


def test_qkv_dropout_seeded_twin():
    from lora_models import SeededDropout
    p = 0.2
    model = with_lora(tiny_llama(layers=1), dropout=p, targets=["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])
    twin = copy.deepcopy(model)
    shared = _SharedSeed()
    slots = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    for name, module in twin.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            slot = slots.get(name.rsplit(".", 1)[-1])
            module.lora_dropout["default"] = (SeededDropout(p) if slot is None
                                              else GroupSeededDropout(p, slot, shared))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora(*ALL))
    inputs = _inputs()
    torch.manual_seed(6)
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    assert fastlora.last_report().counts() == {"lora_qkv": 1, "lora_linear": 1}
    torch.manual_seed(6)
    loss_t, grads_t = run_step(twin, inputs)
    assert rel_err(loss_c, loss_t) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-5


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,f", [(37, 40, 56), (8192, 2048, 8192), (8192, 4096, 14336)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("config", ["default", "other"])
def test_cuda_lora_mlp_matches_float64(m, k, f, activation, p, config, tuned):
    if config == "other":  # the GLU kernels' other code paths (see CONFIGS), GPU-sized tiles
        tuned("lora_glu_fwd", row_blocks=4, warps=8)
        tuned("lora_glu_bwd", one_b=True, stages=3)
    torch.manual_seed(0)
    dev, dtype, r = "cuda", torch.bfloat16, 16
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    gw = torch.randn(f, k, device=dev, dtype=dtype) / k ** 0.5
    uw = torch.randn(f, k, device=dev, dtype=dtype) / k ** 0.5
    ga, ua = ((torch.randn(r, k, device=dev) / k ** 0.5).requires_grad_() for _ in range(2))
    gB, uB = ((torch.randn(f, r, device=dev) * 0.1).requires_grad_() for _ in range(2))
    h, _, _, _ = torch.ops.fastlora.lora_mlp(x, gw, None, ga, gB, uw, None, ua, uB,
                                             torch.tensor([5], device=dev), 2.0, 2.0, p,
                                             activation, dtype)
    dh = torch.randn_like(h)
    h.backward(dh)
    ones = torch.ones(m, k, dtype=torch.bool, device=dev)
    kg = K.keep_mask_reference(5, m, k, 0, p, dev) if p else ones
    ku = K.keep_mask_reference(5, m, k, 1, p, dev) if p else ones
    X, GA, GBB, UA, UBB = (t.detach().double().requires_grad_() for t in (x, ga, gB, ua, uB))
    gate = X @ gw.double().T + 2.0 * ((X * kg / (1 - p)) @ GA.T) @ GBB.T
    up = X @ uw.double().T + 2.0 * ((X * ku / (1 - p)) @ UA.T) @ UBB.T
    H = _act(gate, activation) * up
    grads = torch.autograd.grad(H, (X, GA, GBB, UA, UBB), dh.double())
    assert rel_err(h, H) < 1e-2
    for got, want in zip((x.grad, ga.grad, gB.grad, ua.grad, uB.grad), grads):
        assert rel_err(got, want) < 1e-2
