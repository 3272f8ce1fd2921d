"""FASTLORA_LAUNCH (kernels/_launch.py): the setting, the layout check of traced kernel
arguments, launch choices on symbolic lengths without guards, and CPU ops staying opaque under
torch.compile. The inductor route itself runs on CUDA only: tests/test_launch_gpu.py."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fastlora.kernels import _launch
from fastlora.kernels._common import cdiv, next_power_of_2, persistent_programs, size_hint
from fastlora.kernels._lora_blocks import split_extent


def test_parse_routes_and_per_op_exceptions():
    assert _launch.parse("inductor") == ("inductor", {})
    assert _launch.parse("python") == ("python", {})
    assert _launch.parse("") == ("inductor", {})
    assert _launch.parse("inductor, rope=python,rms_norm=python") == (
        "inductor", {"rope": "python", "rms_norm": "python"})
    for bad in ("cuda", "inductor,rope=triton", "python,rope"):
        with pytest.raises(ValueError, match="FASTLORA_LAUNCH"):
            _launch.parse(bad)


def test_backward_follows_its_forward(monkeypatch):
    monkeypatch.setattr(_launch, "LAUNCH", "inductor")
    monkeypatch.setattr(_launch, "PER_OP", {"rope": "python"})
    assert _launch.route("fastlora::rope") == _launch.route("fastlora::rope_backward") == "python"
    assert _launch.route("fastlora::lora_qkv_backward") == "inductor"


@pytest.mark.parametrize("setting,expect", [("python", "python"),
                                            ("inductor,rope=python", "inductor")])
def test_environment_variable_is_read_at_import(setting, expect):
    code = "from fastlora.kernels import _launch; print(_launch.LAUNCH, _launch.PER_OP)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTLORA_LAUNCH": setting}, check=True).stdout
    assert out.split()[0] == expect


def test_bad_environment_variable_fails_at_import():
    p = subprocess.run([sys.executable, "-c", "import fastlora.kernels"], capture_output=True, text=True,
                       env={**os.environ, "FASTLORA_LAUNCH": "fast"})
    assert p.returncode != 0 and "FASTLORA_LAUNCH" in p.stderr


def test_unknown_op_in_an_exception_fails_at_import():
    p = subprocess.run([sys.executable, "-c", "import fastlora.kernels"], capture_output=True,
                       text=True, env={**os.environ, "FASTLORA_LAUNCH": "inductor,rop=python"})
    assert p.returncode != 0 and "unknown op(s) ['rop']" in p.stderr


def _symbolic(value, name="s0"):
    env = ShapeEnv()
    sym = env.create_symintnode(env.create_symbol(value, ConstantSource(name)), hint=value)
    return env, sym


def test_dense_arguments():
    x = torch.empty(6, 8)
    assert _launch.dense(x) and _launch.dense(x.t()) and _launch.dense(x[2:4])
    assert _launch.dense(x.view(6, 1, 8)) and _launch.dense(torch.empty(0, 3))
    assert _launch.dense(x.unsqueeze(0).expand(1, 6, 8))  # a size-1 broadcast moves nothing
    assert not _launch.dense(x[:, :5])  # a column slice: rows with gaps
    assert not _launch.dense(x[::2])
    assert not _launch.dense(torch.empty(1, 8).expand(6, 8))  # stride 0: overlapping rows


def test_dense_on_symbolic_sizes_adds_no_guard():
    env, m = _symbolic(300)
    with FakeTensorMode(shape_env=env):
        x = torch.empty(m, 72)
        assert _launch.dense(x) and _launch.dense(x.view(m, 2, 36).transpose(0, 1))
        assert not _launch.dense(x[:, :5])
        assert not _launch.dense(torch.empty(72).expand(m, 72))
    assert env.guards == []


def test_dense_on_a_difference_of_symbolic_sizes_adds_no_guard():
    """A width of s1 - s0 (a slice's extent made contiguous) has strides (Max(1, s1 - s0), 1):
    dense, and proven so without a guard on the width being positive."""
    env, m = _symbolic(300)
    lo = env.create_symintnode(env.create_symbol(8, ConstantSource("lo")), hint=8)
    hi = env.create_symintnode(env.create_symbol(24, ConstantSource("hi")), hint=24)
    with FakeTensorMode(shape_env=env):
        x = torch.empty(m, hi - lo)
        slices = torch.empty(m, hi)[:, lo:], torch.empty(m, 2 * (hi - lo))[:, : hi - lo]
        made = len(env.guards)  # making the tensors guards the sizes (hi - lo >= 0, ...)
        assert "Max" in str(x.stride(0))
        assert _launch.dense(x) and _launch.dense(x.t())
        assert not any(_launch.dense(t) for t in slices)
        # the H100's case (2026-12-07): the gradient kernel's per-split partial sums, [splits,
        # M, width], strides (M * Max(1, w), Max(1, w), 1): the max sits inside the product
        parts = torch.empty(9, m, hi - lo)
        assert "Max" in str(parts.stride(0)) and _launch.dense(parts)
        assert not _launch.dense(torch.empty(9, m, 2 * (hi - lo))[:, :, : hi - lo])
        assert not _launch.dense(parts[::2])
    assert len(env.guards) == made


def test_launch_choices_on_a_symbolic_length_add_no_guard():
    """Splits and programs come from the length's example value; the rows per split stay
    symbolic, so one compiled graph serves every length."""
    env, m = _symbolic(3000)
    t = torch.empty(1)
    splits, per = split_extent(m, 64, 3, 8, t)
    assert isinstance(splits, int) and not isinstance(per, int)
    assert (splits, size_hint(per)) == split_extent(3000, 64, 3, 8, t)
    assert persistent_programs(t, m, 4) == persistent_programs(t, 3000, 4) == 4
    assert size_hint(m) == 3000
    assert env.guards == []


@pytest.mark.skipif(not _launch.HAVE_TRITON, reason="compares with Triton's own helpers")
def test_host_size_helpers_equal_tritons():
    """The launchers' cdiv and next_power_of_2 (Triton's cost 1.7 us a host call in 3.9) give
    Triton's values, and on a symbolic length both stay symbolic without a guard."""
    import triton
    for a in range(0, 300):
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(-3, 1100)) + [2 ** 20 - 1, 2 ** 20, 2 ** 20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    env, m = _symbolic(3000)
    blocks, width = cdiv(m, 64), next_power_of_2(m)
    assert not isinstance(blocks, int) and size_hint(blocks) == 47
    assert not isinstance(width, int) and size_hint(width) == 4096 and env.guards == []


def test_cpu_ops_stay_opaque_under_compile():
    """On CPU tensors a fused op is one node of the graph AOTAutograd hands the compiler,
    launched by its Python code (the PyTorch reference, or the interpreter in these tests)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, example_inputs):
        def keep(g, _inputs):
            graphs.append(g)
            return g.forward
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    x = torch.randn(2, 5, 8, requires_grad=True)
    w, a, b = torch.randn(6, 8), torch.randn(3, 8, requires_grad=True), torch.randn(6, 3)

    def f(x):
        return torch.ops.fastlora.lora_linear(x, w, None, None, a, b, None, 2.0, 0.0,
                                              x.dtype)[0].sum()

    torch.compile(f, backend=backend)(x).backward()
    targets = [{str(n.target) for n in g.graph.nodes} for g in graphs]
    assert "fastlora.lora_linear.default" in targets[0]
    assert "fastlora.lora_linear_backward.default" in targets[1]
    assert not any("triton_kernel_wrapper" in t for ts in targets for t in ts)


if _launch.HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_rows(X, Y, M, stride_x, N: tl.constexpr):
        cols = tl.arange(0, N)
        for i in range(M):
            tl.store(Y + i * N + cols, tl.load(X + i * stride_x + cols))

    @_launch.fused_op("fastlora_test::first_two_columns")
    def first_two_columns(x: torch.Tensor) -> torch.Tensor:
        """x[:, :2] copied by a kernel that reads the slice through its row stride."""
        y = torch.empty((x.shape[0], 2), dtype=x.dtype, device=x.device)
        cols = x[:, :2]  # rows with gaps: not dense
        _launch.launch(_copy_rows)[(1,)](cols, y, x.shape[0], cols.stride(0), N=2)
        return y

    @first_two_columns.register_fake
    def _(x):
        return x.new_empty((x.shape[0], 2))


@pytest.mark.skipif(not _launch.HAVE_TRITON or _launch.LAUNCH != "inductor",
                    reason="needs Triton and the inductor route")
def test_an_argument_with_gaps_keeps_the_op_opaque(monkeypatch):
    """Traced for inductor (the CUDA decomposition, forced here on CPU tensors), an op whose
    kernel would get a view with gaps is not decomposed: it stays one opaque node, launched by
    its Python code, and says why on the fastlora logger."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from functorch.compile import make_boxed_func

    monkeypatch.setattr(_launch, "_decomposes", lambda args: True)
    graphs = []

    def backend(gm, example_inputs):
        def keep(g, _inputs):
            graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep)

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("fastlora")
    # setLevel, not the attribute: the logger caches isEnabledFor per level, and an earlier
    # test's log.info at the default level left INFO cached as off (the test failed after
    # test_compile_cache.py in one process)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        x = torch.randn(4, 5)
        y = torch.compile(lambda t: first_two_columns(t) * 2, backend=backend)(x)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert torch.equal(y, x[:, :2] * 2)
    assert "fastlora_test.first_two_columns.default" in {str(n.target)
                                                        for n in graphs[0].graph.nodes}
    said = "\n".join(records)
    assert "stays opaque" in said and "sizes (4, 2), strides (5, 1)" in said, said
