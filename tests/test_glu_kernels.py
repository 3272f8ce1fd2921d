"""SwiGLU and GeGLU kernels (Triton under the interpreter, and the PyTorch reference) vs
float64, the custom ops' autograd, the packed (chunked gate_up) variant, and GPU checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora.kernels import geglu as G
from fastlora.kernels import swiglu as S
from fastlora.kernels import swiglu_packed as P
from helpers import rel_err

# (3, 5, 2048) is dense with a multiple of 1024 elements: it runs as one flat stream
SHAPES = [(3, 37, 72), (5, 64), (2, 3, 129), (1, 1, 8), (2, 4100), (3, 5, 2048)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def act64(g, kind):
    if kind == "silu":
        return F.silu(g)
    return F.gelu(g, approximate=kind)


def reference64(gate, up, dy, kind):
    g = gate.double().requires_grad_()
    u = up.double().requires_grad_()
    y = act64(g, kind) * u
    dg, du = torch.autograd.grad(y, (g, u), dy.double())
    return y.detach(), dg, du


def _inputs(shape, dtype, scale=3.0):
    # a wide range, so that both tails of the activations are exercised
    return (torch.randn(shape) * scale).to(dtype), torch.randn(shape, dtype=dtype), \
        torch.randn(shape, dtype=dtype)


def run(kind, impl, gate, up, dy):
    nan = lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)
    if kind == "silu":
        if impl == "triton":
            y = S.swiglu_forward_triton(gate, up, y=nan(gate))
            dg, du = S.swiglu_backward_triton(dy, gate, up, dgate=nan(gate), dup=nan(up))
        else:
            y = S.swiglu_forward_reference(gate, up)
            dg, du = S.swiglu_backward_reference(dy, gate, up)
    elif impl == "triton":
        y = G.geglu_forward_triton(gate, up, kind, y=nan(gate))
        dg, du = G.geglu_backward_triton(dy, gate, up, kind, dgate=nan(gate), dup=nan(up))
    else:
        y = G.geglu_forward_reference(gate, up, kind)
        dg, du = G.geglu_backward_reference(dy, gate, up, kind)
    return y, dg, du


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "tanh", "none"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_glu_matches_float64(shape, dtype, kind, impl):
    gate, up, dy = _inputs(shape, dtype)
    y_ref, dg_ref, du_ref = reference64(gate, up, dy, kind)
    y, dg, du = run(kind, impl, gate, up, dy)
    for got, want in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("kind", ["silu", "tanh", "none"])
def test_activation_elementwise_accuracy_fp32(kind):
    """Elementwise (not only norm-wise): every output within a few float32 ulps of float64,
    over the range where tanh / erf / exp are hardest (near 0, the tails, up to +-30)."""
    g = torch.cat([torch.linspace(-30, 30, 6001), torch.logspace(-8, 0, 200),
                   -torch.logspace(-8, 0, 200)]).reshape(1, -1)
    up, dy = torch.ones_like(g), torch.ones_like(g)
    y_ref, dg_ref, _ = reference64(g, up, dy, kind)
    y, dg, _ = run(kind, "triton", g, up, dy)
    worst = lambda a, b: g[0, ((a.double() - b).abs() / (b.abs() + 1e-12))[0].argmax()].item()
    # relative 2e-6 (a few ulps), plus a tiny absolute slack where the value underflows; exact
    # GELU's 1 + erf(g / sqrt 2) cancels for g << 0 as in PyTorch's formula: 3e-7 |g| there
    slack = 3e-7 * g.double().abs() if kind == "none" else 1e-12
    assert ((y.double() - y_ref).abs() <= 2e-6 * y_ref.abs() + slack).all(), worst(y, y_ref)
    assert ((dg.double() - dg_ref).abs() <= 2e-6 * dg_ref.abs() + 1e-7 + slack).all(), \
        worst(dg, dg_ref)


def test_packed_swiglu_matches_split_and_writes_one_gradient():
    x = torch.randn(3, 7, 2 * 45)
    dy = torch.randn(3, 7, 45)
    gate, up = x.chunk(2, -1)
    y_ref, dg_ref, du_ref = reference64(gate, up, dy, "silu")
    y = P.swiglu_packed_forward_triton(x)
    dx = P.swiglu_packed_backward_triton(dy, x, dx=torch.full_like(x, float("nan")))
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(dx, torch.cat([dg_ref, du_ref], -1)) < 1e-5
    assert rel_err(P.swiglu_packed_backward_reference(dy, x), torch.cat([dg_ref, du_ref], -1)) \
        < 1e-5


def test_flat_stream_and_tiles_give_the_same_bits():
    """Dense inputs run as one flat stream (each op's FLAT); the [tokens, ffn] tiles over the
    same tensors must give the same bits, forward and backward."""
    from fastlora.kernels import _glu_tiles as T
    from fastlora.kernels import tuning
    gate, up, dy = _inputs((3, 5, 2048), torch.bfloat16)
    rows = lambda t: t.reshape(-1, t.shape[-1])
    assert T.dense_shape((rows(gate), rows(up)), S.FLAT) == (30, 1024)
    assert T.dense_shape((rows(gate), rows(up)), G.FLAT) == (15, 2048)
    assert T.dense_shape((rows(gate)[:, :1024], rows(up)[:, :1024]), S.FLAT) is None
    for kind in ("silu", "tanh", "none"):
        flat = run(kind, "triton", gate, up, dy)
        with tuning.override("glu", flat=False):
            tiled = run(kind, "triton", gate, up, dy)
        for a, b in zip(flat, tiled):
            assert torch.equal(a, b)


def test_strided_inputs_are_read_in_place():
    """gate/up as row-strided views (the halves of a fused projection) and a transposed view."""
    base = torch.randn(4, 6, 100)
    gate, up = base[..., :50], base[..., 50:]
    dy = torch.randn(4, 6, 50)
    for kind in ("silu", "tanh"):
        y_ref, dg_ref, du_ref = reference64(gate, up, dy, kind)
        for impl in ("triton", "reference"):
            y, dg, du = run(kind, impl, gate, up, dy)
            assert rel_err(y, y_ref) < 1e-5 and rel_err(dg, dg_ref) < 1e-5
    g_t = torch.randn(50, 24).t()  # dense but transposed: outputs come back contiguous
    y = torch.ops.fastlora.swiglu(g_t, torch.randn(24, 50))
    assert y.is_contiguous()


@pytest.mark.parametrize("op,extra", [("swiglu", ()), ("geglu", ("tanh",)), ("geglu", ("none",))])
def test_custom_op_autograd_and_opcheck(op, extra):
    gate = torch.randn(3, 37, 72, requires_grad=True)
    up = torch.randn(3, 37, 72, requires_grad=True)
    y = getattr(torch.ops.fastlora, op)(gate, up, *extra)
    dy = torch.randn_like(y)
    y.backward(dy)
    kind = extra[0] if extra else "silu"
    y_ref, dg_ref, du_ref = reference64(gate.detach(), up.detach(), dy, kind)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(gate.grad, dg_ref) < 1e-5 and rel_err(up.grad, du_ref) < 1e-5
    for g in (torch.randn(2, 5, 16), torch.randn(2, 16, 5).transpose(1, 2)):
        torch.library.opcheck(getattr(torch.ops.fastlora, op).default,
                              (g, torch.randn(2, 5, 16), *extra))
    if op == "swiglu":
        torch.library.opcheck(torch.ops.fastlora.swiglu_packed.default, (torch.randn(2, 5, 16),))


def test_saves_only_the_two_inputs():
    saved = []
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.fastlora.geglu(gate, up, "tanh")
        torch.ops.fastlora.swiglu(gate, up)
    assert len(saved) == 4 and all(s is gate or s is up for s in saved)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.fastlora.swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.fastlora.swiglu(torch.randn(2, 8), torch.randn(2, 8).bfloat16())
    with pytest.raises(ValueError, match="'tanh' or 'none'"):
        torch.ops.fastlora.geglu(torch.randn(2, 8), torch.randn(2, 8), "erf")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.fastlora.geglu(torch.randn(2, 8).double(), torch.randn(2, 8).double(), "tanh")
    with pytest.raises(ValueError, match="must be even"):
        torch.ops.fastlora.swiglu_packed(torch.randn(2, 9))


# ---- through the backend ----------------------------------------------------------------------


class GatedMLP(torch.nn.Module):
    def __init__(self, act, d=24, ffn=40, up_dtype=None, broadcast_up=False, leak=False):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(d, ffn), torch.nn.Linear(d, ffn),
                                         torch.nn.Linear(ffn, d))
        self.act, self.up_dtype, self.broadcast_up, self.leak = act, up_dtype, broadcast_up, leak

    def forward(self, x):
        a = self.act(self.gate(x))
        u = self.up(x)
        if self.up_dtype is not None:
            u = u.to(self.up_dtype)
        if self.broadcast_up:
            u = u[..., :1, :]
        out = self.down((a * u).to(x.dtype))
        return out + a.sum(-1, keepdim=True) if self.leak else out


ACTS = {"silu": (F.silu, "swiglu"),
        "tanh": (lambda t: F.gelu(t, approximate="tanh"), "geglu"),
        "none": (F.gelu, "geglu")}


def _compile_and_compare(module, x):
    ref = module(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled = torch.compile(module, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    out = compiled(x)
    out.square().sum().backward()
    assert rel_err(out, ref) < 1e-6
    for p, g in zip(module.parameters(), grads):
        assert rel_err(p.grad, g) < 1e-5
    return fastlora.last_report()


@pytest.mark.parametrize("kind", list(ACTS))
def test_pattern_matches_gated_mlp(kind):
    act, name = ACTS[kind]
    report = _compile_and_compare(GatedMLP(act), torch.randn(3, 5, 24))
    assert report.counts() == {name: 1}
    if name == "geglu":
        assert report.matches[0]["params"]["approximate"] == kind


@pytest.mark.parametrize("variant,reason", [
    ({"broadcast_up": True}, "gate (3, 5, 40) and up (3, 1, 40) do not have one shape"),
    ({"up_dtype": torch.float64}, "gate is torch.float32 but up is torch.float64"),
    ({"leak": True}, "is also used outside the pattern"),
])
@pytest.mark.parametrize("kind", ["silu", "tanh"])
def test_near_misses_are_left_alone_with_their_reason(kind, variant, reason):
    act, name = ACTS[kind]
    report = _compile_and_compare(GatedMLP(act, **variant), torch.randn(3, 5, 24))
    assert name not in report.counts()
    reasons = [n["reason"] for n in report.near_misses if n["pattern"] == name]
    assert len(reasons) == 1 and reason in reasons[0], reasons


class PlainMLP(torch.nn.Module):  # fc2(act(fc1(x))): GPT-NeoX, Falcon, StarCoder 2
    def __init__(self, act, d=24, ffn=40):
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(d, ffn), torch.nn.Linear(ffn, d), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("kind", list(ACTS))
def test_an_ungated_activation_is_no_near_miss(kind):
    act, name = ACTS[kind]
    report = _compile_and_compare(PlainMLP(act), torch.randn(3, 5, 24))
    assert report.counts() == {} and report.near_misses == []
    # an activation a product reads (here by a number, no GLU): still reported
    report = _compile_and_compare(PlainMLP(lambda t: act(t) * 2.0), torch.randn(3, 5, 24))
    assert [n["pattern"] for n in report.near_misses] == [name], report.near_misses


# ---- GPU (run with `pytest -m gpu` on the H200) --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 37, 72), (8192, 8192), (4, 2048, 14336), (7, 4100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "tanh", "none"])
def test_glu_cuda_matches_float64(shape, dtype, kind):
    gate, up, dy = _inputs(shape, dtype)
    y_ref, dg_ref, du_ref = reference64(gate, up, dy, kind)
    y, dg, du = run(kind, "triton", gate.cuda(), up.cuda(), dy.cuda())
    for got, want in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        assert rel_err(got.cpu(), want) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["silu", "tanh", "none"])
def test_activation_elementwise_accuracy_cuda(kind):
    """libdevice erff / the exp-based tanh on the GPU, elementwise, as on the CPU above."""
    g = torch.cat([torch.linspace(-30, 30, 6001), torch.logspace(-8, 0, 200),
                   -torch.logspace(-8, 0, 200)]).reshape(1, -1)
    y_ref, dg_ref, _ = reference64(g, torch.ones_like(g), torch.ones_like(g), kind)
    ones = torch.ones_like(g).cuda()
    y, dg, _ = run(kind, "triton", g.cuda(), ones, ones)
    slack = 3e-7 * g.double().abs() if kind == "none" else 1e-12
    assert ((y.cpu().double() - y_ref).abs() <= 4e-6 * y_ref.abs() + slack).all()
    assert ((dg.cpu().double() - dg_ref).abs() <= 4e-6 * dg_ref.abs() + 1e-7 + slack).all()
    assert math.isfinite(y.abs().max().item())
