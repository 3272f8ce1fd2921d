"""The cache of PyTorch's Triton access analysis (kernels/_access_cache.py): one answer per key,
the key holding everything the analysis reads, nothing cached that it cannot key."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fastlora.kernels import _access_cache


def _counting():
    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append((kernel, dict(kwargs), tma))
        return {"writes": [name for name in kwargs if name.startswith("out")]}
    return calls, _access_cache.cached(analysis)


def test_same_kind_of_call_is_analysed_once_and_answers_copies():
    calls, analysis = _counting()
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        a, b = torch.empty(4, 8), torch.empty(16, 8)
    kernel = object()
    first = analysis(kernel, {"x": a, "out": a, "n": 8, "BLOCK": 64}, {})
    first["writes"].append("edited")  # a caller editing its answer does not edit the cache
    again = analysis(kernel, {"x": b, "out": b, "n": 8, "BLOCK": 64}, {})  # other sizes
    assert len(calls) == 1 and again == {"writes": ["out"]}


@pytest.mark.parametrize("change", ["dtype", "int", "constexpr", "kernel", "tma", "name"])
def test_what_the_analysis_reads_is_in_the_key(change):
    calls, analysis = _counting()
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        x = torch.empty(4, 8)
        half = torch.empty(4, 8, dtype=torch.bfloat16)
    kernel, other = object(), object()
    base = {"x": x, "out": x, "n": 8, "BLOCK": 64}
    analysis(kernel, base, {})
    changed = {"dtype": (kernel, {**base, "x": half}, {}),
               "int": (kernel, {**base, "n": 1}, {}),  # Triton specialises n == 1
               "constexpr": (kernel, {**base, "BLOCK": 128}, {}),
               "kernel": (other, base, {}),
               "tma": (kernel, base, {"x": ("stable", ([16, 16],))}),
               "name": (kernel, {**{k: v for k, v in base.items() if k != "out"}, "out2": x},
                        {})}[change]
    analysis(*changed)
    assert len(calls) == 2


def test_symbolic_sizes_share_one_answer():
    calls, analysis = _counting()
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    s0 = shape_env.create_unbacked_symint()
    kernel = object()
    with mode:
        x = torch.empty(4, 8)
    analysis(kernel, {"x": x, "n": s0}, {})
    analysis(kernel, {"x": x, "n": s0 * 2}, {})
    assert len(calls) == 1


def test_real_tensors_and_unknown_objects_are_not_cached():
    calls, analysis = _counting()
    kernel = object()
    for _ in range(2):
        analysis(kernel, {"x": torch.zeros(4)}, {})  # Triton specialises on its address
        analysis(kernel, {"x": object()}, {})
    assert len(calls) == 4


def test_install_wraps_the_analysis_once():
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    names = [n for n in _access_cache.ANALYSES if hasattr(wrap, n)]
    assert names, "torch renamed its Triton access analysis: teach _access_cache the new name"
    saved = {n: getattr(wrap, n) for n in names}
    try:
        assert _access_cache.install()
        wrapped = {n: getattr(wrap, n) for n in names}
        assert all(getattr(f, "fastlora_cached", False) for f in wrapped.values())
        assert _access_cache.install()  # a second install leaves the wrappers as they are
        assert {n: getattr(wrap, n) for n in names} == wrapped
    finally:
        for n, f in saved.items():
            setattr(wrap, n, f)


def _autotuned(fn, first_config: dict, num_warps: int):
    """What PyTorch's triton_kernel_wrap makes of a launch given num_warps: the kernel wrapped
    in a new one-config Autotuner, at every call."""
    from triton import Config
    from triton.runtime.autotuner import autotune

    return autotune(configs=[Config(dict(first_config), num_warps=num_warps)], key=[])(fn)


def _jit_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x, out, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out + i, tl.load(x + i, mask=i < n), mask=i < n)
    return copy


def test_equal_autotune_wrappers_of_one_kernel_are_one_key():
    """A new Autotuner per launch (num_warps, num_stages given) is not a new kind of call: the
    analysis reads the wrapped kernel and its first config's constexprs only."""
    pytest.importorskip("triton")
    calls, analysis = _counting()
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        x = torch.empty(4, 8)
    fn = _jit_kernel()
    args = {"x": x, "out": x, "n": 8}
    analysis(_autotuned(fn, {"BLOCK": 64}, 4), args, {})
    analysis(_autotuned(fn, {"BLOCK": 64}, 8), args, {})  # another wrapper, another num_warps
    assert len(calls) == 1
    analysis(_autotuned(fn, {"BLOCK": 128}, 4), args, {})  # another constexpr: another key
    analysis(_autotuned(_jit_kernel(), {"BLOCK": 64}, 4), args, {})  # another kernel
    analysis(fn, {**args, "BLOCK": 64}, {})  # the bare kernel is a key of its own
    assert len(calls) == 4
