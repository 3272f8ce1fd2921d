"""``warm_kernels`` (warmup.py): while a graph compiles, the launches its first step will make
are planned on fake tensors and their Triton kernels compiled ahead on a thread pool.

Checked here without a GPU: every Triton kernel of fastlora is replaced by a recorder (as in
test_length_specializations.py), the compiles ``start`` would make of the plan made while the
forward and backward graphs compile (``compile_jobs``: one per specialization) are replayed
into the recorders, and they must ask for exactly the specializations (constexprs, integer
classes, pointer dtypes and alignment) the first training step then launches, each once. The
compile itself (Triton's ``run(..., warmup=True)`` on a GPU) is tested in test_warmup_gpu.py.
Planning must add no guard: the model still compiles once for every length.
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
    launches = [launch for p in plans for launch in p]
    assert all(kernel in recorders.values() for kernel, *_ in launches)
    jobs = warmup.compile_jobs(launches, device_type="cpu")  # what start() compiles on a GPU
    for kernel, _, grid, args, kwargs in jobs:
        kernel[grid](*args, **kwargs)
    planned = {_key(c) for c in calls}
    assert len(launched) > 10, launched  # the fused ops' kernels, forward and backward
    assert launched - planned == set(), "launched, not planned"
    assert planned - launched == set(), "planned, not launched (a compile for nothing)"
    assert len(jobs) == len(planned), "a specialization compiled twice"

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


def test_one_compile_per_specialization():
    """Two launches share a compile exactly where Triton compiles one kernel for both:
    constexprs by value, integers by class (1, a multiple of 16, other; their type alone where
    not specialized), pointers by dtype and alignment, launch options by value. On the H100
    (torch 2.11, triton 3.6) lora_down's G=2, BLOCK_R=32 launch was compiled in the first step:
    its compile had been taken for G=3, BLOCK_R=64's (both described then as "an int, not a
    multiple of 16" and "an int, a multiple of 16"), and likewise one of lora_grad_x's."""
    from triton.runtime.jit import JITFunction, MockTensor

    from fastlora.kernels import _lora_blocks

    kernel = _lora_blocks._lora_down_kernel
    names = ["X", "A", "XA", "SEED", "B1", "B2", "M", "K", "R", "stride_x", "stride_a",
             "stride_xa", "split_stride", "k_per_split", "threshold", "inv_keep"]
    assert kernel.arg_names[:len(names)] == names

    def spec(of=kernel, **change):
        bf16, fp32 = MockTensor(torch.bfloat16), MockTensor(torch.float32)
        values = dict(X=bf16, A=bf16, XA=fp32, SEED=fp32, B1=16, B2=32, M=192, K=128, R=32,
                      stride_x=128, stride_a=128, stride_xa=32, split_stride=192 * 32,
                      k_per_split=64, threshold=0, inv_keep=1.0, G=2, DROPOUT=False, MODE=0,
                      BLOCK_M=64, BLOCK_K=64, BLOCK_R=32, num_warps=4) | change
        return warmup.specialization(of, tuple(values.pop(n) for n in names), values)

    base = spec()
    assert spec(G=3, BLOCK_R=64) != base  # the H100 run's lost compile
    assert spec(MODE=3) != base and spec(DROPOUT=True) != base and spec(num_warps=8) != base
    assert spec(K=256, stride_x=256, stride_a=256, k_per_split=128) == base  # all multiples of 16
    assert spec(M=17, split_stride=17 * 32) == base  # do_not_specialize: one compile, any length
    assert len({spec(K=1), spec(K=16), spec(K=17), spec(K=2**31)}) == 4
    assert spec(X=MockTensor(torch.float32)) != base
    unaligned = warmup.mock_arguments((torch.empty(9, dtype=torch.bfloat16)[1:],), {})[1][0]
    assert spec(X=unaligned) != base
    if not isinstance(kernel, JITFunction):  # the interpreter's kernel, read as Triton reads
        assert spec(JITFunction(kernel.fn, **kernel.kwargs)) == base  # the compiled one


def test_a_table_in_host_memory_is_warmed_for_the_ids_gpu():
    """offload_embeddings: the table is in pinned host memory, the ids and the rows on the GPU.
    Its gather is compiled for that GPU, with the table's pointer as Triton sees it (the H100
    run compiled _gather_rows in the first step: a launch on two devices was left out). Fake
    CUDA tensors: no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    with mode:
        ids = torch.empty(2, 96, dtype=torch.int64, device="cuda")
    table = mode.from_tensor(torch.zeros(256, 128, dtype=torch.bfloat16))
    with mode:
        gm = make_fx(lambda i, t: torch.ops.fastlora.embedding_from_host(i, t))(ids, table)
    launches = warmup.plan(gm)
    jobs = warmup.compile_jobs(launches)
    assert [(kernel.fn.__name__, device) for kernel, device, *_ in jobs] == [("_gather_rows", 0)]
    pointers = [(a.dtype, a.data_ptr() % 16) for a in jobs[0][3] if hasattr(a, "data_ptr")]
    assert pointers == [(torch.int64, 0), (torch.bfloat16, 0), (torch.bfloat16, 0)]
    assert warmup.compile_jobs(launches, device_type="cpu") == []  # not a host kernel


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
