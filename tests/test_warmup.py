"""``warm_kernels`` (warmup.py): while a graph compiles, the launches its first step will make
are planned on fake tensors and their Triton kernels compiled ahead on a thread pool.

Checked here without a GPU: every Triton kernel of fastlora is replaced by a recorder (as in
test_length_specializations.py), the plan made while the forward and backward graphs compile is
replayed into the recorders, and it must ask for exactly the specializations (constexprs,
integer classes, pointer dtypes and alignment) the first training step then launches. The
compile itself (Triton's ``run(..., warmup=True)`` on the H200) is tested in
test_warmup_gpu.py. Planning must add no guard: the model still compiles once for every length.
"""
from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import warmup
from fastlora.options import Options, OptionsError
from helpers import tiny_llama, with_lora
from kernel_recorders import batch, replace_kernels, tiny_lora_llama

triton = pytest.importorskip("triton")
from fastlora.kernels._common import interpret_on_cpu  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpret_on_cpu(), reason=(
    "records the launches of CPU tensors, which need TRITON_INTERPRET=1 (set by conftest.py "
    "on a machine without CUDA)"))


def _key(call) -> tuple:
    name, ints, kwargs = call
    return name, tuple(sorted(ints.items())), tuple(sorted(kwargs.items()))


@needs_interpreter
@pytest.mark.parametrize("kind,variant", [
    ("right", "float32"), ("packed", "float32"), ("right", "bfloat16"),
    ("right", "dropout"), ("packed", "checkpointing")])
def test_the_plan_is_what_the_first_step_launches(monkeypatch, kind, variant):
    calls, plans = [], []
    recorders = replace_kernels(monkeypatch, calls, pointers=True)
    monkeypatch.setattr(warmup, "start", lambda launches: plans.append(launches) or [])
    model = tiny_lora_llama(variant)
    fastlora.compile_for_trainer(model, warm_kernels=True)

    model(**batch(kind, 40)).loss.backward()
    launched = {_key(c) for c in calls}
    graphs = len(fastlora.reports(model))  # 1; 3 with checkpointing (peft's hook breaks it)
    assert len(plans) >= 2 * graphs - 1, "a plan per forward and per backward compiled"
    calls.clear()
    for kernel, grid, args, kwargs in [launch for p in plans for launch in p]:
        assert kernel in recorders.values(), kernel
        _, args, kwargs = warmup.mock_arguments(args, kwargs)
        kernel[grid](*args, **kwargs)
    planned = {_key(c) for c in calls}
    assert len(launched) > 10, launched  # the fused ops' kernels, forward and backward
    assert launched - planned == set(), "launched, not planned"
    assert planned - launched == set(), "planned, not launched (a compile for nothing)"

    for seq in (33, 57):  # planning added no guard: no graph compiled again
        model(**batch(kind, seq)).loss.backward()
    assert len(fastlora.reports(model)) == graphs
    notes = [n for r in fastlora.reports(model) for n in r.notes if "warm_kernels" in n]
    assert len(notes) == len([p for p in plans if p]), notes


def test_a_plan_holds_no_symbolic_size_and_no_repeated_call():
    """The plan of a graph whose sizes are symbolic gives each distinct call once, at the
    example sizes."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    def two_norms(x, w):
        y = torch.ops.fastlora.rms_norm(x, w, 1e-6, 0.0, False)[0]
        return torch.ops.fastlora.rms_norm(y, w, 1e-6, 0.0, False)[0]

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.randn(3, 37, 64), static_shapes=False)
    w = mode.from_tensor(torch.randn(64))
    with mode:
        gm = make_fx(two_norms, tracing_mode="symbolic")(x, w)
    symbolic = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"][0]
    assert isinstance(symbolic.shape[1], torch.SymInt)
    launches = warmup.plan(gm)
    assert len(launches) == 1 if interpret_on_cpu() else launches == []
    for kernel, grid, args, kwargs in launches:
        for a in list(args) + list(kwargs.values()):
            assert not isinstance(a, (torch.SymInt, torch.SymFloat))
            if isinstance(a, torch.Tensor):  # the example sizes: 3 x 37 rows of 64
                assert all(type(d) is int for d in a.shape), a.shape
                assert a.numel() in (3 * 37 * 64, 3 * 37, 64), a.shape


def test_mock_pointers_keep_dtype_and_alignment():
    base = torch.empty(100, dtype=torch.bfloat16)
    devices, args, kwargs = warmup.mock_arguments((base[8:], 5), {"o": base[1:]})
    assert devices == [base.device] and args[1] == 5
    assert (args[0].dtype, args[0].data_ptr() % 16) == (torch.bfloat16, 0)
    assert (kwargs["o"].dtype, kwargs["o"].data_ptr() % 16 == 0) == (torch.bfloat16, False)


def test_warm_kernels_option():
    assert Options.parse({"warm_kernels": True}).warm_kernels is True
    with pytest.raises(OptionsError, match="warm_kernels"):
        Options.parse({"warm_kernels": "yes"})
    cpu = [torch.zeros(2)]
    assert warmup.wanted(True, cpu) and not warmup.wanted(False, cpu)
    assert not warmup.wanted("auto", cpu)  # no GPU tensor: nothing to compile for


@pytest.mark.parametrize("setting", [False, "auto"])
def test_no_plan_unless_asked(monkeypatch, setting):
    """Off, and "auto" on a CPU graph: the compile neither plans nor starts anything."""
    def refuse(*_):
        raise AssertionError("planned")
    monkeypatch.setattr(warmup, "plan", refuse)
    model = with_lora(tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2, inter=128,
                                 vocab=128), r=8)
    fastlora.compile_for_trainer(model, warm_kernels=setting)
    model(**batch("right", 24)).loss.backward()
    assert not [n for r in fastlora.reports(model) for n in r.notes if "warm_kernels" in n]
