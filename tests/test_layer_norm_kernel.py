"""LayerNorm kernels (Triton under the interpreter, and the PyTorch reference) vs float64, with
and without weight / bias, dW / dB only when trainable, and GPU checks (`-m gpu`)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora.kernels import layer_norm as K
from helpers import rel_err

SHAPES = [(3, 37, 72), (5, 64), (2, 3, 129), (1, 1, 8)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
AFFINE = ["weight+bias", "weight", "none"]


def reference64(x, w, b, dy, eps):
    """F.layer_norm in float64 through autograd: y, dx, dw, db (None where absent)."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_() if w is not None else None
    b64 = b.double().requires_grad_() if b is not None else None
    y = F.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    leaves = [t for t in (x64, w64, b64) if t is not None]
    grads = list(torch.autograd.grad(y, leaves, dy.double()))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    return y.detach(), dx, dw, db


def _params(n, dtype, affine):
    w = (torch.randn(n) * 0.5 + 1.0).to(dtype) if affine != "none" else None
    b = (torch.randn(n) * 0.5).to(dtype) if affine == "weight+bias" else None
    return w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_layer_norm_matches_float64(shape, dtype, affine, impl):
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w, b = _params(N, dtype, affine)
    dy = torch.randn(shape, dtype=dtype)
    eps = 1e-5
    y_ref, dx_ref, dw_ref, db_ref = reference64(x, w, b, dy, eps)
    has_w, has_b = w is not None, b is not None
    if impl == "triton":
        M = x.numel() // N
        nan = lambda *s, dt=torch.float32: torch.full(s, float("nan"), dtype=dt)
        y, mean, rstd = K.layer_norm_forward_triton(x, w, b, eps, y=nan(M, N, dt=dtype),
                                                    mean=nan(M), rstd=nan(M))
        dx, dw, db = K.layer_norm_backward_triton(dy, x, w, mean, rstd, has_w, has_b,
                                                  dx=nan(M, N, dt=dtype))
    else:
        y, mean, rstd = K.layer_norm_forward_reference(x, w, b, eps)
        dx, dw, db = K.layer_norm_backward_reference(dy, x, w, mean, rstd, has_w, has_b)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(dx, dx_ref) < TOL[dtype]
    if has_w:
        assert dw.dtype == dtype and rel_err(dw, dw_ref) < TOL[dtype]
    else:
        assert dw.numel() == 0
    if has_b:
        assert db.dtype == dtype and rel_err(db, db_ref) < TOL[dtype]
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("tile", [(1, 2), (4, 4, 1), (8, 8, 2)])
def test_layer_norm_tiles(tile, tuned):
    """The launch configurations the tuner may set (benchmarks/tune_rope_ln.py), with and
    without dW / dB, on rows that do not fill the last tile."""
    tuned("layer_norm", tile=tile)
    x, dy = torch.randn(37, 72) * 2 + 0.5, torch.randn(37, 72)
    w, b = _params(72, torch.float32, "weight+bias")
    y_ref, dx_ref, dw_ref, db_ref = reference64(x, w, b, dy, 1e-5)
    nan = lambda *s: torch.full(s, float("nan"))
    y, mean, rstd = K.layer_norm_forward_triton(x, w, b, 1e-5, nan(37, 72), nan(37), nan(37))
    assert rel_err(y, y_ref) < 1e-5
    for trainable in (False, True):
        dx, dw, db = K.layer_norm_backward_triton(dy, x, w, mean, rstd, trainable, trainable,
                                                  dx=nan(37, 72))
        assert rel_err(dx, dx_ref) < 1e-5
        if trainable:
            assert rel_err(dw, dw_ref) < 1e-5 and rel_err(db, db_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_per_head_weight(dtype, impl):
    """Cohere's q/k norms: x [B, T, H, D], weight [H, D], one weight row per head."""
    x = torch.randn(2, 7, 5, 12).to(dtype)
    w = (torch.randn(5, 12) * 0.5 + 1).to(dtype)
    dy = torch.randn(2, 7, 5, 12).to(dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.layer_norm(x64, (12,), None, None, 1e-5) * w64
    dx_ref, dw_ref = torch.autograd.grad(y64, (x64, w64), dy.double())
    fwd = K.layer_norm_forward_triton if impl == "triton" else K.layer_norm_forward_reference
    bwd = K.layer_norm_backward_triton if impl == "triton" else K.layer_norm_backward_reference
    y, mean, rstd = fwd(x, w, None, 1e-5)
    dx, dw, _ = bwd(dy, x, w, mean, rstd, True, False)
    assert dw.shape == w.shape and dw.dtype == dtype
    for got, want in ((y, y64), (dx, dx_ref), (dw, dw_ref)):
        assert rel_err(got, want.detach()) < TOL[dtype]


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rows_with_a_large_mean_keep_their_precision(impl):
    """Centred variance: rows at 1e4 +- 1 normalise as precisely as rows at 0 +- 1."""
    x = torch.randn(6, 96) + 1e4
    dy = torch.randn(6, 96)
    y_ref, dx_ref, _, _ = reference64(x, None, None, dy, 1e-5)
    fwd = K.layer_norm_forward_triton if impl == "triton" else K.layer_norm_forward_reference
    bwd = K.layer_norm_backward_triton if impl == "triton" else K.layer_norm_backward_reference
    y, mean, rstd = fwd(x, None, None, 1e-5)
    dx, _, _ = bwd(dy, x, None, mean, rstd, False, False)
    # a float32 mean of values near 1e4 is good to about ulp(1e4) = 1e-3 (relative to the std
    # of 1: ~1e-3); the one-pass E[x^2] - mean^2 would lose everything (1e8 * 6e-8 = 6)
    assert rel_err(y, y_ref) < 2e-3 and rel_err(dx, dx_ref) < 1e-2


class RecordBackwardFlags(TorchDispatchMode):
    """Records (compute_dw, compute_db) of every fastlora.layer_norm_backward call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastlora.layer_norm_backward.default:
            self.flags.append(tuple(args[5:7]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", [(False, False), (True, False), (False, True), (True, True)])
def test_weight_and_bias_gradients_only_when_trainable(needs):
    x = torch.randn(4, 7, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=needs[0])
    b = torch.randn(24, requires_grad=needs[1])
    y = torch.ops.fastlora.layer_norm(x, w, b, 1e-5)[0]
    dy = torch.randn_like(y)
    with RecordBackwardFlags() as mode:
        y.backward(dy)
    assert mode.flags == [needs]  # the kernel is asked for exactly the trainable gradients
    _, dx_ref, dw_ref, db_ref = reference64(x.detach(), w.detach(), b.detach(), dy, 1e-5)
    assert rel_err(x.grad, dx_ref) < 1e-5
    assert (w.grad is not None) == needs[0] and (b.grad is not None) == needs[1]
    if needs[0]:
        assert rel_err(w.grad, dw_ref) < 1e-5
    if needs[1]:
        assert rel_err(b.grad, db_ref) < 1e-5


def test_custom_op_opcheck_incl_transposed_input():
    for x in (torch.randn(2, 5, 16), torch.randn(2, 16, 5).transpose(1, 2)):
        for w, b in ((torch.randn(16), torch.randn(16)), (torch.randn(16), None), (None, None),
                     (torch.randn(5, 16), torch.randn(16))):
            torch.library.opcheck(torch.ops.fastlora.layer_norm.default, (x, w, b, 1e-5))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.fastlora.layer_norm(torch.randn(2, 8), torch.randn(9), None, 1e-5)
    with pytest.raises(ValueError, match=r"or \(3, 8\) \(one row per head\)"):
        torch.ops.fastlora.layer_norm(torch.randn(2, 3, 8), torch.randn(2, 8), None, 1e-5)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fastlora.layer_norm(torch.randn(2, 8), None, torch.randn(2, 8), 1e-5)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.fastlora.layer_norm(torch.randn(2, 8).double(), None, None, 1e-5)


# ---- through the backend ----------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, norm, d=24):
        super().__init__()
        self.norm, self.proj = norm, torch.nn.Linear(d, d)

    def forward(self, x):
        return self.proj(self.norm(x))


def _compile_and_compare(module, x):
    ref = module(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad()
    compiled = torch.compile(module, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    out = compiled(x)
    out.square().sum().backward()
    assert rel_err(out, ref) < 1e-6
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads[n]) < 1e-5, n
    return fastlora.last_report()


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"elementwise_affine": False}])
@pytest.mark.parametrize("trainable", [True, False])
def test_pattern_matches_nn_layer_norm(kw, trainable):
    norm = torch.nn.LayerNorm(24, **kw)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(1.0, 0.3)
            p.requires_grad_(trainable)
    report = _compile_and_compare(Block(norm), torch.randn(3, 5, 24) * 2 + 1)
    assert report.counts() == {"layer_norm": 1}


def test_near_miss_over_two_dimensions_has_reason():
    norm = torch.nn.LayerNorm((5, 24))
    report = _compile_and_compare(Block(norm), torch.randn(3, 5, 24))
    assert report.counts() == {}
    reasons = [n["reason"] for n in report.near_misses if n["pattern"] == "layer_norm"]
    assert len(reasons) == 1 and "expected a sequence of 1 items" in reasons[0], reasons


# ---- GPU (run with `pytest -m gpu` on the H200) --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 37, 72), (8192, 4096), (4, 2048, 2048), (7, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm_cuda_matches_float64(shape, dtype, affine):
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w, b = _params(N, dtype, affine)
    dy = torch.randn(shape, dtype=dtype)
    y_ref, dx_ref, dw_ref, db_ref = reference64(x, w, b, dy, 1e-5)
    cuda = lambda t: t.cuda() if t is not None else None
    M = x.numel() // N
    nan = lambda *s, dt=torch.float32: torch.full(s, float("nan"), dtype=dt, device="cuda")
    y, mean, rstd = K.layer_norm_forward_triton(cuda(x), cuda(w), cuda(b), 1e-5,
                                                y=nan(M, N, dt=dtype), mean=nan(M), rstd=nan(M))
    dx, dw, db = K.layer_norm_backward_triton(cuda(dy), cuda(x), cuda(w), mean, rstd,
                                              w is not None, b is not None,
                                              dx=nan(M, N, dt=dtype))
    assert rel_err(y.cpu(), y_ref) < TOL[dtype] and rel_err(dx.cpu(), dx_ref) < TOL[dtype]
    if w is not None:
        assert rel_err(dw.cpu(), dw_ref) < TOL[dtype]
    if b is not None:
        assert rel_err(db.cpu(), db_ref) < TOL[dtype]


@pytest.mark.gpu
def test_layer_norm_under_cuda_autocast_runs_in_float32():
    x = torch.randn(4, 64, device="cuda")
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = torch.ops.fastlora.layer_norm(x.bfloat16(), w, b, 1e-5)[0]
        theirs = F.layer_norm(x.bfloat16(), (64,), w, b, 1e-5)
    assert ours.dtype == theirs.dtype == torch.float32
    assert rel_err(ours, theirs) < 1e-6
