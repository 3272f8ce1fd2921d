"""What a Triton kernel reads and writes, analysed once per kernel and argument kind.

When inductor launches our kernels (``FASTLORA_LAUNCH=inductor``, _launch.py), PyTorch asks
which tensors each traced kernel call writes: when AOTAutograd functionalizes the graph, when
inductor lowers the call, and when it schedules it. Each question compiles the kernel to Triton
IR and walks it (``torch._higher_order_ops.triton_kernel_wrap``), and PyTorch keeps no answer:
the 1B row's compile parsed kernels 3,956 times, the Triton front end taking ~40 s of a 134 s
first step (benchmarks/compile_profile.py under cProfile, H200).

The answer depends only on what that analysis feeds Triton: the kernel; each tensor argument's
dtype (a fake tensor becomes ``torch.empty(2, dtype)``); each symbolic size (it becomes 2);
every other argument's value (constexprs, specialised integers); the TMA metadata. That tuple is
the key here; an argument of any other kind (a real tensor, whose address Triton specialises on)
is not cached. A hit returns a copy of the stored answer, so a caller that edits its answer
edits only its own. The identical layers of a model repeat the same calls: all but the first
of each kind are hits. ``FASTLORA_ACCESS_CACHE=0`` leaves the analysis uncached (to compare).
"""
from __future__ import annotations

import copy
import functools
import logging
import os

import torch

log = logging.getLogger("fastlora")
# torch 2.13 names the analysis identify_accessed_tensors; earlier releases identify_mutated_tensors
ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
_answers: dict = {}
stats = {"hits": 0, "misses": 0, "uncached": 0}


class _Uncacheable(Exception):
    pass


def _kind(value):
    """What the analysis reads of one kernel argument."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbolic",)
    if isinstance(value, FakeTensor) or type(value).__name__ == "TensorBox":
        return ("tensor", str(value.dtype))
    if isinstance(value, torch.Tensor):  # real memory: Triton specialises on its address
        raise _Uncacheable
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    raise _Uncacheable


def _kernel_key(kernel):
    """What the analysis reads of the kernel. A launch given ``num_warps`` or ``num_stages``
    reaches it wrapped in a new one-config ``Autotuner`` at every call (PyTorch's
    triton_kernel_wrap): the analysis reads only the wrapped kernel and its first config's
    constexprs (launch options such as num_warps do not change what is read or written), so
    equal wrappers are one key, not one key per call."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        first = kernel.configs[0].kwargs if kernel.configs else {}
        try:
            constexprs = tuple(sorted(first.items()))
            hash(constexprs)
        except TypeError as exc:
            raise _Uncacheable from exc
        return ("autotuner", kernel.fn, constexprs)
    return kernel


def key(kernel, kwargs: dict, *rest):
    """The cache key of one analysis call (raises _Uncacheable)."""
    parts = tuple((name, _kind(value)) for name, value in sorted(kwargs.items()))
    try:
        extra = repr(rest)
    except Exception as exc:  # pragma: no cover - metadata without a repr
        raise _Uncacheable from exc
    return _kernel_key(kernel), parts, extra


def cached(analysis):
    """``analysis(kernel, kwargs, *rest)`` answered once per key."""
    @functools.wraps(analysis)
    def answer(kernel, kwargs, *rest):
        try:
            k = key(kernel, kwargs, *rest)
        except _Uncacheable:
            stats["uncached"] += 1
            return analysis(kernel, kwargs, *rest)
        if k not in _answers:
            stats["misses"] += 1
            _answers[k] = analysis(kernel, kwargs, *rest)
        else:
            stats["hits"] += 1
        return copy.deepcopy(_answers[k])
    answer.fastlora_cached = True
    return answer


def install() -> bool:
    """Cache PyTorch's kernel access analysis in this process (once); False where this torch
    has none of the functions known here (the analysis then runs as PyTorch ships it)."""
    if os.environ.get("FASTLORA_ACCESS_CACHE") == "0":
        return False
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:  # pragma: no cover - torch without user-kernel support
        return False
    found = False
    for name in ANALYSES:
        fn = getattr(wrap, name, None)
        if fn is not None:
            found = True
            if not getattr(fn, "fastlora_cached", False):
                setattr(wrap, name, cached(fn))
    if not found:
        log.info("fastlora: no Triton access analysis found in this torch; not cached")
    return found
