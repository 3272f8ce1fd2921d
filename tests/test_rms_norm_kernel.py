"""RMSNorm kernels (Triton under the interpreter, and the PyTorch reference) vs float64."""
import pytest
import torch

from fastlora.kernels import rms_norm as K
from helpers import rel_err

SHAPES = [(3, 37, 72), (5, 64), (2, 3, 129), (1, 1, 8)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference64(x, w, dy, eps, offset):
    """The math in float64 through autograd: y, dx, dw."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y = n * (w64 + offset)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,cast", [(0.0, True), (1.0, False)])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rms_norm_matches_float64(shape, dtype, offset, cast, impl):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    w = (torch.randn(N) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    eps = 1e-5
    y_ref, dx_ref, dw_ref = reference64(x, w, dy, eps, offset)
    if impl == "triton":
        M = x.numel() // N
        y_out = torch.full((M, N), float("nan"), dtype=dtype)  # poison: every element must be written
        rstd_out = torch.full((M,), float("nan"))
        y, rstd = K.rms_norm_forward_triton(x, w, eps, offset, cast, y=y_out, rstd=rstd_out)
        dx_out = torch.full((M, N), float("nan"), dtype=dtype)
        dx, dw = K.rms_norm_backward_triton(dy, x, w, rstd, offset, cast, True, dx=dx_out)
    else:
        y, rstd = K.rms_norm_forward_reference(x, w, eps, offset, cast)
        dx, dw = K.rms_norm_backward_reference(dy, x, w, rstd, offset, cast, True)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(dx, dx_ref) < TOL[dtype]
    assert rel_err(dw, dw_ref) < TOL[dtype]


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rms_norm_skips_dw_when_frozen(impl):
    x, dy, w = torch.randn(4, 24), torch.randn(4, 24), torch.randn(24)
    bwd = K.rms_norm_backward_triton if impl == "triton" else K.rms_norm_backward_reference
    _, rstd = K.rms_norm_forward_reference(x, w, 1e-6, 0.0, True)
    dx, dw = bwd(dy, x, w, rstd, 0.0, True, False)
    assert dw.numel() == 0
    assert rel_err(dx, reference64(x, w, dy, 1e-6, 0.0)[1]) < 1e-5


def test_custom_op_autograd_and_opcheck():
    x = torch.randn(3, 37, 72, requires_grad=True)
    w = torch.randn(72, requires_grad=True)
    y = torch.ops.fastlora.rms_norm(x, w, 1e-6, 0.0, True)[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference64(x.detach(), w.detach(), dy, 1e-6, 0.0)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(x.grad, dx_ref) < 1e-5 and rel_err(w.grad, dw_ref) < 1e-5
    torch.library.opcheck(torch.ops.fastlora.rms_norm.default,
                          (torch.randn(2, 5, 16), torch.randn(16), 1e-6, 0.0, True))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.fastlora.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6, 0.0, True)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.fastlora.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-6, 0.0, True)
