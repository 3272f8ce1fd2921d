"""FASTLORA_LAUNCH=inductor on CUDA: inductor's generated code launches the fused ops' Triton
kernels itself (kernels/_launch.py). Each op compiled by inductor must give what the same op
gives called eagerly (its Python launcher), for the forward and every gradient, at odd shapes,
in float32 and bfloat16, and a new length must not recompile (lengths stay symbolic).
GPU only: on CPU tensors the ops stay opaque (their route is tested by every CPU test)."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fastlora
from fastlora.kernels import _launch
from helpers import rel_err, tiny_llama, with_lora

pytestmark = pytest.mark.gpu
needs_inductor_route = pytest.mark.skipif(_launch.LAUNCH != "inductor",
                                          reason="FASTLORA_LAUNCH=python: every op is opaque")


def _adapter(n, k, r, dtype, adapter_dtype=torch.float32):
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    a = (torch.randn(r, k, device="cuda") / k ** 0.5).to(adapter_dtype).requires_grad_()
    b = torch.randn(n, r, device="cuda").to(adapter_dtype).requires_grad_()
    return w, a, b


def _linear(x, w, a, b, seed, p):
    return torch.ops.fastlora.lora_linear(x, w, None, None, a, b, seed, 2.0, p, x.dtype)[0]


def _qkv(x, params, seed, p):
    (qw, qa, qb), (kw, ka, kb), (vw, va, vb) = params
    q, k, v, _ = torch.ops.fastlora.lora_qkv(x, qw, None, qa, qb, kw, None, ka, kb, vw, None, va,
                                             vb, seed, 2.0, 1.0, 0.5, p, x.dtype)
    return torch.cat([q, k, v], -1)


def _mlp(x, params, seed, p):
    (gw, ga, gb), (uw, ua, ub), (dw, da, db) = params
    return torch.ops.fastlora.lora_mlp_block(x, gw, None, ga, gb, uw, None, ua, ub, seed, 2.0,
                                             1.0, p, "silu", x.dtype, dw, None, da, db, seed, 0.5,
                                             p, x.dtype)[0]


def _case(op, k, n, r, dtype):
    if op == "lora_linear":
        w, a, b = _adapter(n, k, r, dtype)
        return (lambda x, seed, p: _linear(x, w, a, b, seed, p)), [a, b]
    if op == "lora_qkv":
        params = [_adapter(n, k, r, dtype), _adapter(n // 2, k, r + 1, dtype),
                  _adapter(n // 2, k, r, dtype)]
        return (lambda x, seed, p: _qkv(x, params, seed, p)), [t for _, a, b in params
                                                             for t in (a, b)]
    params = [_adapter(n, k, r, dtype), _adapter(n, k, r, dtype), _adapter(k, n, r, dtype)]
    return (lambda x, seed, p: _mlp(x, params, seed, p)), [t for _, a, b in params
                                                          for t in (a, b)]


def _step(fn, x, seed, p, g, params):
    x = x.detach().requires_grad_()
    y = fn(x, seed, p)
    grads = torch.autograd.grad(y, [x, *params], g)
    return [y.detach(), *grads]


@needs_inductor_route
@pytest.mark.parametrize("op", ["lora_linear", "lora_qkv", "lora_mlp_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_inductor_launch_matches_python_launch(op, dtype, p):
    """Compiled (dynamic lengths): the kernels in inductor's code, no fastlora op left in it;
    three lengths, one compile; every output and gradient equal to the eager op's."""
    torch.manual_seed(0)
    k, n, r = 72, 136, 5
    fn, params = _case(op, k, n, r, dtype)
    seed = torch.tensor([4321], device="cuda")
    compiled = torch.compile(fn, backend="inductor", dynamic=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, m in enumerate((37, 300, 1029)):
        x = torch.randn(2, m, k, device="cuda", dtype=dtype)
        g = torch.randn(2, m, n if op != "lora_mlp_block" else k, device="cuda", dtype=dtype)
        if op == "lora_qkv":
            g = torch.randn(2, m, 2 * n, device="cuda", dtype=dtype)
        want = _step(fn, x, seed, p, g, params)
        if i == 0:
            got, code = run_and_get_code(_step, compiled, x, seed, p, g, params)
            code = "\n".join(code)
            assert "_lora_down_kernel" in code and "torch.ops.fastlora" not in code
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = _step(compiled, x, seed, p, g, params)
        for name, a, b in zip(["y", "dx"] + [f"d{i}" for i in range(len(params))], got, want):
            assert rel_err(a.float(), b.float()) < tol, (m, name, rel_err(a.float(), b.float()))


@needs_inductor_route
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastlora_model_step_inductor_launch_matches_eager(dtype):
    """The whole fastlora-compiled tiny Llama (dynamic lengths): loss and every LoRA gradient
    vs eager, two lengths without a recompile."""
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=2)).cuda().to(dtype)
    compiled = torch.compile(model, backend="fastlora", dynamic=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, seq in enumerate((33, 70)):
        ids = torch.randint(0, 97, (2, seq), device="cuda")
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        want = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
        model.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss_c = compiled(input_ids=ids, labels=ids).loss
            loss_c.backward()
        assert rel_err(loss_c.float(), loss.float()) < tol
        for name, g in want.items():
            got = dict(model.named_parameters())[name].grad
            assert rel_err(got.float(), g.float()) < tol, name
    assert fastlora.last_report().counts().get("lora_qkv", 0) == 2
