"""lora_mlp_block: lora_mlp + down_proj's lora_linear as one op that recomputes h in backward.

The op against the two unfused ops (same seeds: the same masks, so the same values bit for bit)
and against float64 on odd shapes; the bytes it saves for backward; the pattern compiled vs
eager on tiny Llamas (plain, bias, seeded dropout twin) and a near miss where h has a second user.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora.kernels import _lora_blocks as K
from helpers import (checkpointed, compare_compiled, mlp_block_case, rel_err, run_step,
                     saved_activations, saved_of_shape, tiny_llama, with_lora)
from helpers import token_batch
from test_lora_grouped import GroupSeededDropout, _SharedSeed
from lora_models import SeededDropout, errors_vs, mixed_dtypes

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
M, HID, FFN, OUT = 37, 72, 40, 72  # tokens, hidden, ffn (odd sizes: masked tiles everywhere)
OPTIONS = {"compiler": "aot_eager", "strict": True}
PATTERNS = ("lora_mlp", "lora_linear", "lora_mlp_block")


def _act(g, activation):
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def _operands(dtype, r, bias, p, lead=(M,)):
    """Leaf tensors of one MLP: base weights frozen in ``dtype``, fp32 adapters trainable."""
    def leaf(*shape, scale=1.0, dt=torch.float32, grad=True):
        return (torch.randn(*shape, dtype=dt) * scale).requires_grad_(grad)
    t = dict(x=leaf(*lead, HID, dt=dtype),
             gate_weight=leaf(FFN, HID, scale=0.15, dt=dtype, grad=False),
             gate_bias=leaf(FFN, dt=dtype) if bias else None,
             gate_A=leaf(r, HID, scale=0.15), gate_B=leaf(FFN, r),
             up_weight=leaf(FFN, HID, scale=0.15, dt=dtype, grad=False),
             up_bias=leaf(FFN, dt=dtype) if bias else None,
             up_A=leaf(3, HID, scale=0.15), up_B=leaf(FFN, 3),
             down_weight=leaf(OUT, FFN, scale=0.15, dt=dtype, grad=False),
             down_bias=leaf(OUT, dt=dtype) if bias else None,
             down_A=leaf(r, FFN, scale=0.15), down_B=leaf(OUT, r))
    seeds = (torch.tensor([11]), torch.tensor([12])) if p else (None, None)
    return t, seeds


def _block(t, seeds, p, activation, dtype):
    return torch.ops.fastlora.lora_mlp_block(
        t["x"], t["gate_weight"], t["gate_bias"], t["gate_A"], t["gate_B"], t["up_weight"],
        t["up_bias"], t["up_A"], t["up_B"], seeds[0], 0.5, 0.7, p, activation, dtype,
        t["down_weight"], t["down_bias"], t["down_A"], t["down_B"], seeds[1], 1.5, p, dtype)


def _two_ops(t, seeds, p, activation, dtype):
    h = torch.ops.fastlora.lora_mlp(
        t["x"], t["gate_weight"], t["gate_bias"], t["gate_A"], t["gate_B"], t["up_weight"],
        t["up_bias"], t["up_A"], t["up_B"], seeds[0], 0.5, 0.7, p, activation, dtype)[0]
    return torch.ops.fastlora.lora_linear(h, t["down_weight"], t["down_bias"], None, t["down_A"],
                                          t["down_B"], seeds[1], 1.5, p, dtype)


def _reference64(t, p, activation, dy):
    """y and the gradients of every trainable leaf, in float64, with the ops' dropout masks."""
    d = {k: v.detach().double().requires_grad_(v.requires_grad) if v is not None else None
         for k, v in t.items()}
    x2 = d["x"].reshape(-1, HID)
    ones = torch.ones(x2.shape[0], HID, dtype=torch.bool)
    kg = K.keep_mask_reference(11, x2.shape[0], HID, 0, p) if p else ones
    ku = K.keep_mask_reference(11, x2.shape[0], HID, 1, p) if p else ones
    kd = K.keep_mask_reference(12, x2.shape[0], FFN, 0, p) if p else ones[:, :FFN]

    def lin(inp, w, b, a, bb, s, keep):
        base = inp @ w.T + (b if b is not None else 0)
        return base + s * ((inp * keep / (1 - p)) @ a.T) @ bb.T
    gate = lin(x2, d["gate_weight"], d["gate_bias"], d["gate_A"], d["gate_B"], 0.5, kg)
    up = lin(x2, d["up_weight"], d["up_bias"], d["up_A"], d["up_B"], 0.7, ku)
    h = _act(gate, activation) * up
    y = lin(h, d["down_weight"], d["down_bias"], d["down_A"], d["down_B"], 1.5, kd)
    names = [k for k, v in d.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [d[k] for k in names], dy.double().reshape(y.shape))
    return y, dict(zip(names, grads))


def _grads(t):
    return {k: v.grad for k, v in t.items() if v is not None and v.requires_grad}


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype,r,bias,p,activation", [
    (torch.float32, 1, True, 0.0, "silu"),
    (torch.float32, 8, False, 0.25, "gelu_tanh"),
    (torch.bfloat16, 8, True, 0.0, "gelu"),
    (torch.bfloat16, 1, True, 0.2, "silu"),
])
@pytest.mark.parametrize("grad_a", [False, True])
def test_op_equals_two_ops_and_float64(impl, dtype, r, bias, p, activation, grad_a, monkeypatch,
                                       tuned):
    if impl == "reference":  # CPU tensors take the PyTorch references instead of the kernels
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    tuned("lora_glu_grad_a", on=grad_a)  # dA_down with h made in registers (p = 0 only)
    t, seeds = _operands(dtype, r, bias, p)
    y, bg, bu, xa, xa_d = _block(t, seeds, p, activation, dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = _grads(t)
    t2 = {k: v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None
          for k, v in t.items()}
    y2, xa_d2 = _two_ops(t2, seeds, p, activation, dtype)
    y2.backward(dy)
    # the same functions on the same values: bit for bit
    assert torch.equal(y, y2) and torch.equal(xa_d, xa_d2)
    for name, g in _grads(t2).items():
        assert torch.equal(got[name], g), name
    y64, want = _reference64(t, p, activation, dy)
    assert y.dtype == dtype and rel_err(y, y64) < TOL[dtype]
    assert set(got) == set(want)
    for name, g in want.items():
        assert rel_err(got[name], g) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [False, True])
def test_down_grad_a_from_the_glu_inputs(dtype, splits, tuned):
    """kernels/_glu_grad_a.py: dA_down = da_down^T @ h with h made in registers, against float64
    on the forward kernel's h (the same bits); several row splits (partial sums) or one."""
    from fastlora.kernels import _glu_grad_a, lora_mlp

    if splits:
        tuned("lora_glu_grad_a", block_m=16, block_n=32, per_sm=64)
    rg, ru, rd = 4, 8, 5
    bg, bu = (torch.randn(M, FFN, dtype=dtype) for _ in range(2))
    xa, wg, wu = torch.randn(M, rg + ru), torch.randn(FFN, rg), torch.randn(FFN, ru)
    da = torch.randn(M, rd)
    args = (bg, bu, xa, wg, wu, 0.5, 2.0, "gelu_tanh")
    got = _glu_grad_a.glu_grad_a_triton(*args, da)
    h = lora_mlp.glu_forward_triton(*args, dtype)
    assert got.shape == (rd, FFN) and got.dtype == torch.float32
    assert rel_err(got, da.double().T @ h.double()) < 1e-5
    no_rows = _glu_grad_a.glu_grad_a_triton(*(t[:0] for t in (bg, bu, xa)), wg, wu, 0.5, 2.0,
                                            "gelu_tanh", da[:0])
    assert no_rows.shape == (rd, FFN) and not no_rows.any()
    tuned("lora_glu_grad_a", on=True)
    assert _glu_grad_a.fusable(bg, dtype, 0.0) and not _glu_grad_a.fusable(bg, dtype, 0.1)
    tuned("lora_glu_grad_a", on=False)
    assert not _glu_grad_a.fusable(bg, dtype, 0.0)


def test_three_dim_input_and_needs_no_dx():
    t, seeds = _operands(torch.float32, 4, False, 0.1, lead=(3, 5))
    t["x"].requires_grad_(False)
    y = _block(t, seeds, 0.1, "silu", torch.float32)[0]
    assert y.shape == (3, 5, OUT)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, want = _reference64(t, 0.1, "silu", dy)
    for name, g in _grads(t).items():
        assert rel_err(g, want[name]) < 1e-5, name


def test_opcheck_and_errors():
    t, seeds = _operands(torch.float32, 4, True, 0.1, lead=(2, 3))
    args = (t["x"], t["gate_weight"], t["gate_bias"], t["gate_A"], t["gate_B"], t["up_weight"],
            t["up_bias"], t["up_A"], t["up_B"], seeds[0], 0.5, 0.7, 0.1, "silu", torch.float32,
            t["down_weight"], t["down_bias"], t["down_A"], t["down_B"], seeds[1], 1.5, 0.1,
            torch.float32)
    torch.library.opcheck(torch.ops.fastlora.lora_mlp_block.default, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    y, bg, bu, xa, xa_d = torch.ops.fastlora.lora_mlp_block(*plain)
    torch.library.opcheck(torch.ops.fastlora.lora_mlp_block_backward.default,
                          (torch.randn_like(y), *plain[0:2], *plain[3:6], *plain[7:9], bg, bu,
                           xa, seeds[0], 0.5, 0.7, 0.1, "silu", torch.float32, plain[15],
                           plain[17], plain[18], xa_d, seeds[1], 1.5, 0.1, True, True, True))
    op = torch.ops.fastlora.lora_mlp_block
    with pytest.raises(ValueError, match="down_weight must be"):
        op(*args[:15], torch.randn(OUT, FFN + 1), *args[16:])
    with pytest.raises(ValueError, match="one-element int64 seed"):
        op(*args[:19], None, *args[20:])
    trainable = dict(t, down_weight=t["down_weight"].detach().requires_grad_())
    y = _block(trainable, seeds, 0.1, "silu", torch.float32)[0]
    with pytest.raises(RuntimeError, match="base weights must be frozen"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_no_hidden_state(dtype):
    t, seeds = _operands(dtype, 8, False, 0.1)
    fused, shapes = saved_activations(lambda: _block(t, seeds, 0.1, "silu", dtype),
                                            [*t.values(), *seeds])
    unfused, _ = saved_activations(lambda: _two_ops(t, seeds, 0.1, "silu", dtype),
                                         [*t.values(), *seeds])
    e = torch.finfo(dtype).bits // 8
    assert shapes.count((M, FFN)) == 2  # base_gate, base_up; no h
    assert fused == 2 * M * FFN * e + 4 * M * (8 + 3 + 8)  # + the float32 xa's
    assert unfused - fused == M * FFN * e  # exactly h


# ---------------------------------------------------------------- the pattern


def _inputs():
    return token_batch()


@pytest.mark.parametrize("layers,r,bias,checkpoint", [(2, 4, False, False), (1, 1, True, False),
                                                     (2, 8, False, True)])
def test_llama_compiled_vs_eager(layers, r, bias, checkpoint):
    model = with_lora(tiny_llama(layers=layers, mlp_bias=bias), r=r)
    inputs = _inputs()
    if checkpoint:  # the pattern also fires inside the checkpointed layer bodies
        inputs = checkpointed(model, inputs)
    fastlora.clear_reports()
    loss_err, grad_errs, grads = compare_compiled(model, inputs, OPTIONS)
    reports = fastlora.reports()
    assert reports.counts()["lora_mlp_block"] == layers, reports.counts()
    assert len(grads) == 2 * 7 * layers
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs
    assert not [n for n in reports.near_misses() if n["pattern"] == "lora_mlp_block"]
    blocks = [m for r in reports for m in r.matches if m["pattern"] == "lora_mlp_block"]
    assert {m["params"]["activation"] for m in blocks} == {"silu"}


@pytest.mark.parametrize("mode", ["bf16_base_fp32_adapters", "autocast_bf16"])
def test_llama_bf16(mode):
    """Against the float32 model: the compiled error may not exceed eager bf16's own error."""
    model32 = with_lora(tiny_llama(layers=1), r=8)
    if mode == "autocast_bf16":
        errs = errors_vs(copy.deepcopy(model32), model32, _inputs(), autocast=torch.bfloat16,
                         patterns=PATTERNS)
    else:
        errs = errors_vs(model32, mixed_dtypes(copy.deepcopy(model32)), _inputs(), patterns=PATTERNS)
    assert fastlora.last_report().counts() == {"lora_mlp": 1, "lora_linear": 5,
                                               "lora_mlp_block": 1}
    assert errs[1] <= 1.5 * errs[0] + 1e-3, errs


def test_compiled_model_saves_no_hidden_state():
    """Distinct [batch, seq, ffn] tensors the compiled model keeps for backward: base_gate and
    base_up per layer with the pattern, + h without it."""
    model = with_lora(tiny_llama(layers=2, inter=56))
    found = {bool(disable): saved_of_shape(model, {**OPTIONS, "disable": disable}, _inputs,
                                           (2, 11, 56))
             for disable in ([], ["lora_mlp_block"])}
    assert found == {False: 2 * 2, True: 3 * 2}


def test_dropout_seeded_twin():
    p = 0.2
    model = with_lora(tiny_llama(layers=1), dropout=p)
    twin, shared = copy.deepcopy(model), _SharedSeed()
    for name, module in twin.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            slot = {"gate_proj": 0, "up_proj": 1}.get(name.rsplit(".", 1)[-1])
            module.lora_dropout["default"] = (SeededDropout(p) if slot is None
                                              else GroupSeededDropout(p, slot, shared))
    # q/k/v as single adapters, like the twin
    others = [p_.name for p_ in fastlora.registered_patterns() if p_.name not in PATTERNS]
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora",
                             options={**OPTIONS, "disable": others})
    torch.manual_seed(4)
    loss_c, grads_c = run_step(compiled, _inputs(), compiled_model)
    report = fastlora.last_report()
    assert report.counts() == {"lora_mlp": 1, "lora_linear": 5, "lora_mlp_block": 1}
    block = next(m for m in report.matches if m["pattern"] == "lora_mlp_block")
    assert block["params"]["dropout_p"] == block["params"]["down_dropout_p"] == p
    torch.manual_seed(4)
    loss_t, grads_t = run_step(twin, _inputs())
    assert rel_err(loss_c, loss_t) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_t.items()) < 1e-5


class GatedMLP(nn.Module):
    """A gated MLP; with ``leak`` its hidden state h is also read outside down_proj."""

    def __init__(self, leak):
        super().__init__()
        self.leak = leak
        self.gate_proj, self.up_proj = nn.Linear(24, 40, bias=False), nn.Linear(24, 40, bias=False)
        self.down_proj = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h) + (h.mean(-1, keepdim=True) if self.leak else 0)


@pytest.mark.parametrize("leak", [True, False])
def test_near_misses_stay_two_ops(leak):
    """h read by a second node; or down_proj without an adapter (a plain F.linear reads h)."""
    targets = ["gate_proj", "up_proj"] + (["down_proj"] if leak else [])
    model = with_lora(GatedMLP(leak), targets=targets)
    x = torch.randn(2, 7, 24)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", options=OPTIONS)
    loss_c = compiled(x).square().mean()
    loss_c.backward()
    report = fastlora.last_report()
    assert report.counts() == ({"lora_mlp": 1, "lora_linear": 1} if leak else {"lora_mlp": 1})
    misses = [n for n in report.near_misses if n["pattern"] == "lora_mlp_block"]
    why = "also read by torch.mean" if leak else "goes to F.linear"
    assert len(misses) == 1 and why in misses[0]["reason"], misses
    loss_e = model(x).square().mean()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < 1e-6
    for (n, p), (_, q) in zip(model.named_parameters(), compiled_model.named_parameters()):
        if p.requires_grad:
            assert rel_err(q.grad, p.grad) < 1e-5, n


def test_report_marks_the_matches_fused_further():
    """The lora_mlp and down_proj lora_linear entries stay in the report (counted), marked as
    fused into lora_mlp_block; o_proj's lora_linear is not."""
    model = with_lora(tiny_llama(layers=2))
    fastlora.clear_reports()
    compare_compiled(model, _inputs(), OPTIONS)
    matches = [m for r in fastlora.reports() for m in r.matches]
    absorbed = sorted((m["pattern"], m["module"].rsplit(".", 1)[-1]) for m in matches
                      if m.get("absorbed_into") == "lora_mlp_block")
    assert absorbed == [("lora_linear", "down_proj")] * 2 + [("lora_mlp", "mlp")] * 2, absorbed
    assert all("absorbed_into" not in m for m in matches if m["module"].endswith("o_proj"))
    assert "lora_mlp (in lora_mlp_block)" in str(fastlora.reports()[0])


# ---- GPU (run with `pytest -m gpu` on the H200) --------------------------------------------------


@pytest.mark.gpu
def test_backward_keeps_two_new_hidden_sized_buffers_cuda():
    """The op's backward makes at most two [M, F] buffers (dh, and h recomputed only with
    dropout on h: kernels/_glu_grad_a.py) and writes d gate / d up into them: at its highest
    point it holds at most 2 [M, F] buffers more than its inputs (3 when d up had a buffer of
    its own), and the gradients are those of float32 autograd. The
    caching allocator is filled with NaN first, so a buffer read before written shows."""
    m, k, f, r, dt, dev = 4096, 256, 4096, 8, torch.bfloat16, "cuda"
    torch.manual_seed(0)
    c = mlp_block_case(m, k, f, r, dt, dev)
    x, gw, uw, dw, ga, gb, ua, ub, da, db = (c.x, c.gw, c.uw, c.dw, c.ga, c.gb, c.ua, c.ub, c.da,
                                              c.db)
    dy = torch.randn_like(c.y)
    poison = torch.full((4 * m * f,), float("nan"), dtype=dt, device=dev)
    del poison
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = c.backward(dy, x, c.bg, c.bu, c.xa, c.xa_d)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - start) / (m * f * 2)
    assert extra < 2.5, f"{extra:.2f} [M, F] buffers above the inputs"

    leaves = [t.float().requires_grad_() for t in (x, ga, gb, ua, ub, da, db)]
    xf, gaf, gbf, uaf, ubf, daf, dbf = leaves
    gate = xf @ gw.float().T + 0.5 * (xf @ gaf.T) @ gbf.T
    up = xf @ uw.float().T + 0.7 * (xf @ uaf.T) @ ubf.T
    h = F.silu(gate) * up
    y32 = h @ dw.float().T + 1.5 * (h @ daf.T) @ dbf.T
    want = torch.autograd.grad(y32, leaves, dy.float())
    names = ("dx", "d gate_A", "d gate_B", "d up_A", "d up_B", "d down_A", "d down_B")
    for name, g, w in zip(names, [got[i] for i in (0, 1, 2, 3, 4, 7, 8)], want):
        assert torch.isfinite(g).all() and rel_err(g.float(), w) < 2e-2, name
