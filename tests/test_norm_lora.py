"""rms_norm_lora_qkv / rms_norm_lora_mlp_block: rms_norm + the grouped LoRA op as one op that
recomputes the norm's output y in backward.

The ops against the two unfused ops (same seeds: the same values bit for bit) and against float64
on odd shapes, Llama's and Gemma's norm (offset 0 / 1, cast before / after the weight); opcheck;
the bytes they save for backward; the patterns compiled vs eager on tiny Llamas, the bytes the
compiled model keeps, and a near miss where y has a second reader.
"""
import copy

import pytest
import torch
from torch import nn

import fastlora
from helpers import (checkpointed, compare_compiled, rel_err, saved_activations,
                     saved_of_shape, tiny_llama, with_lora)
from helpers import token_batch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
M, HID, FFN = 37, 72, 40  # tokens, hidden, ffn (odd sizes: masked tiles everywhere)
NQ, NKV = 72, 24
OPTIONS = {"compiler": "aot_eager", "strict": True}
EPS = 1e-6
_ops = torch.ops.fastlora


def _leaf(*shape, scale=1.0, dt=torch.float32, grad=True):
    return (torch.randn(*shape, dtype=dt) * scale).requires_grad_(grad)


def _norm_operands(dtype, offset, norm_grad, lead=(M,)):
    w = (_leaf(HID, scale=0.2, dt=dtype, grad=False) + (0.0 if offset else 1.0))
    return dict(x=_leaf(*lead, HID, dt=dtype), norm_weight=w.detach().requires_grad_(norm_grad))


def _qkv_operands(dtype, r, bias, offset, norm_grad, lead=(M,)):
    t = _norm_operands(dtype, offset, norm_grad, lead)
    for b, n in (("q", NQ), ("k", NKV), ("v", NKV)):
        t.update({f"{b}_weight": _leaf(n, HID, scale=0.15, dt=dtype, grad=False),
                  f"{b}_bias": _leaf(n, dt=dtype) if bias else None,
                  f"{b}_A": _leaf(r, HID, scale=0.15), f"{b}_B": _leaf(n, r)})
    return t


def _mlp_operands(dtype, r, bias, offset, norm_grad, lead=(M,)):
    t = _norm_operands(dtype, offset, norm_grad, lead)
    for b, n, k in (("gate", FFN, HID), ("up", FFN, HID), ("down", HID, FFN)):
        t.update({f"{b}_weight": _leaf(n, k, scale=0.15, dt=dtype, grad=False),
                  f"{b}_bias": _leaf(n, dt=dtype) if bias else None,
                  f"{b}_A": _leaf(r, k, scale=0.15), f"{b}_B": _leaf(n, r)})
    return t


def _qkv_lora_args(t, p, dtype):
    seed = torch.tensor([7]) if p else None
    return [t[f"{b}_{n}"] for b in "qkv" for n in ("weight", "bias", "A", "B")] + [
        seed, 0.5, 0.7, 1.5, p, dtype]


def _mlp_lora_args(t, p, dtype):
    seeds = (torch.tensor([11]), torch.tensor([12])) if p else (None, None)
    g = [t[f"{b}_{n}"] for b in ("gate", "up") for n in ("weight", "bias", "A", "B")]
    d = [t[f"down_{n}"] for n in ("weight", "bias", "A", "B")]
    return g + [seeds[0], 0.5, 0.7, p, "silu", dtype] + d + [seeds[1], 1.5, p, dtype]


KINDS = {"qkv": (_qkv_operands, _qkv_lora_args, _ops.rms_norm_lora_qkv, _ops.lora_qkv, 3),
         "mlp": (_mlp_operands, _mlp_lora_args, _ops.rms_norm_lora_mlp_block,
                 _ops.lora_mlp_block, 1)}


def _fused(kind, t, p, dtype, offset):
    make, lora_args, fused, _, n_out = KINDS[kind]
    cbw = offset == 0.0
    return fused(t["x"], t["norm_weight"], EPS, offset, cbw, *lora_args(t, p, dtype))[:n_out]


def _two_ops(kind, t, p, dtype, offset):
    make, lora_args, _, lora, n_out = KINDS[kind]
    y = _ops.rms_norm(t["x"], t["norm_weight"], EPS, offset, offset == 0.0)[0]
    return lora(y, *lora_args(t, p, dtype))[:n_out]


def _reference64(kind, t, offset, douts):
    """Outputs and the gradients of every trainable leaf in float64 (no dropout)."""
    d = {k: v.detach().double().requires_grad_(v.requires_grad) if v is not None else None
         for k, v in t.items()}
    x = d["x"]
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (d["norm_weight"] + offset)

    def lin(inp, b, s):
        bias = d[f"{b}_bias"] if d[f"{b}_bias"] is not None else 0
        return inp @ d[f"{b}_weight"].T + bias + s * (inp @ d[f"{b}_A"].T) @ d[f"{b}_B"].T
    if kind == "qkv":
        outs = [lin(y, "q", 0.5), lin(y, "k", 0.7), lin(y, "v", 1.5)]
    else:
        h = torch.nn.functional.silu(lin(y, "gate", 0.5)) * lin(y, "up", 0.7)
        outs = [lin(h, "down", 1.5)]
    names = [k for k, v in d.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(outs, [d[k] for k in names], [g.double() for g in douts])
    return outs, dict(zip(names, grads))


def _grads(t):
    return {k: v.grad for k, v in t.items() if v is not None and v.requires_grad}


def _clone(t):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None
            for k, v in t.items()}


# ---------------------------------------------------------------- the ops


@pytest.mark.parametrize("kind", ["qkv", "mlp"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype,r,bias,p,offset,norm_grad", [
    (torch.float32, 1, True, 0.0, 0.0, False),   # Llama: w * cast(n)
    (torch.float32, 8, False, 0.25, 1.0, True),  # Gemma: cast(n * (1 + w)), trainable norm
    (torch.bfloat16, 8, True, 0.0, 1.0, False),
    (torch.bfloat16, 4, False, 0.2, 0.0, True),
])
def test_op_equals_two_ops_and_float64(kind, impl, dtype, r, bias, p, offset, norm_grad,
                                       monkeypatch):
    if impl == "reference":  # CPU tensors take the PyTorch references instead of the kernels
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = KINDS[kind][0](dtype, r, bias, offset, norm_grad)
    outs = _fused(kind, t, p, dtype, offset)
    douts = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, douts)
    got = _grads(t)
    t2 = _clone(t)
    outs2 = _two_ops(kind, t2, p, dtype, offset)
    torch.autograd.backward(outs2, douts)
    # the same functions on the same values: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(outs, outs2))
    want2 = _grads(t2)
    assert set(got) == set(want2) and ("norm_weight" in got) == norm_grad
    for name, g in want2.items():
        assert torch.equal(got[name], g), name
    if p == 0.0:
        outs64, want = _reference64(kind, t, offset, douts)
        for o, o64 in zip(outs, outs64):
            assert o.dtype == dtype and rel_err(o, o64) < TOL[dtype]
        for name, g in want.items():
            assert rel_err(got[name], g) < TOL[dtype], name


@pytest.mark.parametrize("kind", ["qkv", "mlp"])
def test_three_dim_input_and_needs_no_dx(kind):
    t = KINDS[kind][0](torch.float32, 4, False, 0.0, False, lead=(3, 5))
    t["x"].requires_grad_(False)
    outs = _fused(kind, t, 0.0, torch.float32, 0.0)
    assert outs[0].shape[:2] == (3, 5)
    douts = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, douts)
    _, want = _reference64(kind, t, 0.0, douts)
    assert t["x"].grad is None
    for name, g in _grads(t).items():
        assert rel_err(g, want[name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["qkv", "mlp"])
def test_opcheck_and_frozen_bases(kind):
    make, lora_args, fused, _, _ = KINDS[kind]
    t = make(torch.float32, 4, True, 1.0, True, lead=(2, 3))
    args = (t["x"], t["norm_weight"], EPS, 1.0, False, *lora_args(t, 0.1, torch.float32))
    torch.library.opcheck(fused.default, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    outs = fused(*plain)
    if kind == "qkv":  # drop the biases; add the saved xa and the needs flags
        lora = plain[5:]
        bw = [outs[0], outs[1], outs[2], *plain[:5]] + [
            a for i, a in enumerate(lora[:12]) if i % 4 != 1] + [outs[3], *lora[12:17]]
        torch.library.opcheck(_ops.rms_norm_lora_qkv_backward.default, (*bw, True, True, True))
    else:
        g = plain[5:]
        bw = [outs[0], *plain[:5], g[0], g[2], g[3], g[4], g[6], g[7], outs[1], outs[2],
              outs[3], *g[8:14], g[14], g[16], g[17], outs[4], *g[18:21]]
        torch.library.opcheck(_ops.rms_norm_lora_mlp_block_backward.default,
                              (*bw, True, True, True, True))
    trainable = dict(t, x=t["x"].detach().requires_grad_())
    base = "q_weight" if kind == "qkv" else "down_weight"
    trainable[base] = trainable[base].detach().requires_grad_()
    out = _fused(kind, trainable, 0.1, torch.float32, 1.0)[0]
    with pytest.raises(RuntimeError, match="base weights must be frozen"):
        out.sum().backward()


@pytest.mark.parametrize("kind", ["qkv", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_no_norm_output(kind, dtype):
    t = KINDS[kind][0](dtype, 8, False, 0.0, False)
    inputs = [*t.values(), *KINDS[kind][1](t, 0.1, dtype)]
    fused, _ = saved_activations(lambda: _fused(kind, t, 0.1, dtype, 0.0), inputs)
    unfused, _ = saved_activations(lambda: _two_ops(kind, t, 0.1, dtype, 0.0), inputs)
    e = torch.finfo(dtype).bits // 8
    assert unfused - fused == M * HID * e + 4 * M  # exactly y, and rstd (recomputed too)


# ---------------------------------------------------------------- the patterns


def _inputs():
    return token_batch()


@pytest.mark.parametrize("layers,bias,checkpoint", [(2, False, False), (1, True, True)])
def test_llama_compiled_vs_eager(layers, bias, checkpoint):
    model = with_lora(tiny_llama(layers=layers, attention_bias=bias, mlp_bias=bias))
    inputs = _inputs()
    if checkpoint:  # the patterns also fire inside the checkpointed layer bodies
        inputs = checkpointed(model, inputs)
    fastlora.clear_reports()
    loss_err, grad_errs, grads = compare_compiled(model, inputs, OPTIONS)
    reports = fastlora.reports()
    counts = reports.counts()
    assert counts["rms_norm_lora_qkv"] == counts["rms_norm_lora_mlp_block"] == layers, counts
    assert counts["rms_norm"] == 2 * layers + 1  # + the final norm, which stays alone
    assert len(grads) == 2 * 7 * layers
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    assert not [n for n in reports.near_misses() if n["pattern"].startswith("rms_norm_lora")]
    absorbed = [m["pattern"] for r in reports for m in r.matches
                if (m.get("absorbed_into") or "").startswith("rms_norm_lora")]
    assert sorted(absorbed) == sorted(["rms_norm"] * 2 * layers + ["lora_qkv"] * layers
                                      + ["lora_mlp_block"] * layers)


def test_compiled_model_saves_no_norm_output():
    """Distinct [batch, seq, hidden] tensors the compiled model keeps for backward: two fewer per
    layer (the two norm outputs) with the patterns than without, but one less in all: the first
    layer's norm reads the embeddings, which the unfused graph does not keep (no gradient flows
    into the frozen embedding) and the fused op keeps in place of y, to recompute it."""
    model = with_lora(tiny_llama(layers=2, hidden=48))
    found = {bool(disable): saved_of_shape(model, {**OPTIONS, "disable": disable}, _inputs,
                                           (2, 11, 48))
             for disable in ([], ["rms_norm_lora_qkv", "rms_norm_lora_mlp_block"])}
    assert found[True] - found[False] == 2 * 2 - 1, found


class NormQKV(nn.Module):
    """A Llama RMSNorm then q/k/v; with ``leak`` the norm's output is also read elsewhere."""

    def __init__(self, leak):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        self.leak = leak
        self.norm = LlamaRMSNorm(24)
        self.q_proj, self.k_proj = nn.Linear(24, 24, bias=False), nn.Linear(24, 8, bias=False)
        self.v_proj = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        y = self.norm(x)
        out = self.q_proj(y).sum(-1) + self.k_proj(y).sum(-1) + self.v_proj(y).sum(-1)
        return out + (y.mean(-1) if self.leak else 0)


@pytest.mark.parametrize("leak", [True, False])
def test_near_miss_when_y_has_another_reader(leak):
    model = with_lora(NormQKV(leak), targets=["q_proj", "k_proj", "v_proj"])
    x = torch.randn(2, 7, 24, requires_grad=True)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=OPTIONS)
    xc = x.detach().clone().requires_grad_()
    loss_c = compiled(xc).square().mean()
    loss_c.backward()
    report = fastlora.last_report()
    counts = report.counts()
    assert counts.get("rms_norm_lora_qkv", 0) == (0 if leak else 1), counts
    misses = [n for n in report.near_misses if n["pattern"].startswith("rms_norm_lora")]
    if leak:
        assert len(misses) == 1 and misses[0]["pattern"] == "rms_norm_lora_qkv"
        assert "also read by torch.mean" in misses[0]["reason"], misses
    else:
        assert not misses
    loss_e = model(x).square().mean()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < 1e-6 and rel_err(xc.grad, x.grad) < 1e-5
    for (n, p), (_, q) in zip(model.named_parameters(), compiled_model.named_parameters()):
        if p.requires_grad:
            assert rel_err(q.grad, p.grad) < 1e-5, n
