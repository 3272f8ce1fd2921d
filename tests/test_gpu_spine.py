"""GPU checks of the spine (run with `pytest -m gpu` on a CUDA machine; skipped elsewhere)."""
import pytest
import torch

import fastlora
from fastlora.kernels import rms_norm as K
from helpers import (compare_compiled, compare_low_precision, rel_err, run_step, tiny_llama,
                     with_lora)
from helpers import token_batch
from test_rms_norm_kernel import reference64

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(3, 37, 72), (8192, 4096), (4, 2048, 2048), (7, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,cast", [(0.0, True), (1.0, False)])
def test_rms_norm_cuda_matches_float64(shape, dtype, offset, cast):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = (torch.randn(N, device="cuda") * 0.5 + 1.0 - offset).to(dtype)
    dy = torch.randn(shape, dtype=dtype, device="cuda")
    M = x.numel() // N
    y, rstd = K.rms_norm_forward_triton(
        x, w, 1e-6, offset, cast,
        y=torch.full((M, N), float("nan"), dtype=dtype, device="cuda"),
        rstd=torch.full((M,), float("nan"), device="cuda"))
    dx, dw = K.rms_norm_backward_triton(dy, x, w, rstd, offset, cast, True,
                                        dx=torch.full((M, N), float("nan"), dtype=dtype,
                                                      device="cuda"))
    y_ref, dx_ref, dw_ref = reference64(x.cpu(), w.cpu(), dy.cpu(), 1e-6, offset)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y.cpu(), y_ref) < tol
    assert rel_err(dx.cpu(), dx_ref) < tol
    assert rel_err(dw.cpu(), dw_ref) < tol


def _inputs():
    return token_batch(seq=33, device="cuda")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_tiny_llama_cuda_fp32(compiler):
    model = with_lora(tiny_llama(layers=2)).cuda()
    loss_err, grad_errs, _ = compare_compiled(model, _inputs(), {"compiler": compiler})
    counts = fastlora.last_report().counts()
    assert counts["rms_norm"] == 5
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs


def test_tiny_llama_cuda_bf16():
    err_eager, err_compiled = compare_low_precision(with_lora(tiny_llama(layers=2)).cuda(),
                                                    _inputs(), options={"compiler": "inductor"})
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


def test_tiny_llama_cuda_graphs_match_eager():
    """``mode="reduce-overhead"``: inductor's CUDA graphs around the rewritten graph (the
    fastlora-cg benchmark variant). Every custom op must be capturable (no host sync, no
    allocation of host data after warm-up); three steps cover warm-up, recording and replay."""
    import copy

    model = with_lora(tiny_llama(layers=2)).cuda()
    twin = copy.deepcopy(model)
    # torch.compile refuses mode= beside options=: the mode goes into the options
    compiled = torch.compile(twin, backend="fastlora",
                             options={"strict": True, "mode": "reduce-overhead"})
    for _ in range(3):
        inputs = _inputs()
        loss_e, grads_e = run_step(model, inputs)
        loss_c, grads_c = run_step(compiled, inputs, twin)
        loss_c = loss_c.clone()  # a graph output is overwritten by the next replay
        assert rel_err(loss_c, loss_e) < 1e-5
        assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 1e-4
    assert fastlora.last_report().counts()["rms_norm"] == 5
