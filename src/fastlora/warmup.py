"""Compile a graph's Triton kernels in parallel, before its first step (``warm_kernels``).

Where the fused ops' Python launchers run the kernels (``FASTLORA_LAUNCH=python``,
and every op inductor does not launch), Triton compiles each kernel specialization at its first
launch: inside the first training step, one after another. On the H200 that was about 17 s of
a 51 s cold first step (Llama-3.2-1B cut to 4 layers, 20 kernels: RESULTS.md, "Fifteenth
run"). Triton leaves the GIL while it compiles (``benchmarks/triton_compile_time.py``: four
attention compiles on two threads ran 2.6x faster than on one), so compiles started together
overlap.

So, when the backend compiles a graph (the forward and the backward AOTAutograd made of it),
``plan`` runs the launcher of each fused op the graph calls on fake tensors of the graph's
example sizes, with ``launch()`` recording instead of launching (kernels/_launch.py): that
gives each launch's kernel, constexprs, integers and pointer dtypes, what Triton specializes
on, as the first step will ask for them. ``start`` hands one launch per distinct
specialization (``compile_jobs``: constexprs by value, integers and pointers by what Triton
specializes on) to Triton's ``run(..., warmup=True)`` (compile, no launch) on a thread pool,
and to Triton's C launcher builder. The training step is not held back: a launch finds its
kernel compiled, or compiles it itself as before.

Exact by construction: this only fills Triton's caches (in memory and on disk). The fakes are
made in a fake mode of their own with concrete sizes (a symbolic length's example value), so
planning adds no guard to the graph. A launch the plan misses costs what it cost before.
"""
from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import os
import threading

import torch
import torch.utils._python_dispatch
from torch import fx

from .kernels import _launch
from .kernels._common import size_hint

log = logging.getLogger("fastlora")

# What ``warm_kernels="auto"`` does on a GPU: on. The first step from empty caches measured
# 22.7-23.2 s with it against 39.6-45.3 s without (Llama-3.2-1B cut to 4 layers, one H100,
# benchmarks/cold_first_step.py, 2 runs each; docs/options.md).
WARM_BY_DEFAULT = True
ALIGN = 16  # bytes: Triton specializes a pointer on whether it is a multiple of this
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def wanted(option, example_inputs) -> bool:
    """Whether a graph warms its kernels: the ``warm_kernels`` option, ``"auto"`` resolved
    for the graph (``WARM_BY_DEFAULT`` where a tensor of the graph is on a GPU)."""
    if option != "auto":
        return bool(option)
    return WARM_BY_DEFAULT and any(isinstance(t, torch.Tensor) and t.is_cuda
                                   for t in example_inputs)


def warming(compile_graph, report=None):
    """``compile_graph`` (an AOTAutograd forward or backward compiler) that first plans the
    graph's launches and starts their compiles; the report gets a note of what started."""
    @functools.wraps(compile_graph)
    def plan_start_compile(gm, example_inputs, *args, **kwargs):
        launches = plan(gm)
        started = len(start(launches))
        if report is not None and launches:
            side = {True: "backward", False: "forward"}.get(kwargs.get("is_backward"), "graph")
            report.notes.append(f"warm_kernels: {started} Triton kernel compile(s) started on "
                                f"a thread pool for {len(launches)} planned launch(es) "
                                f"({side})")
        return compile_graph(gm, example_inputs, *args, **kwargs)
    return plan_start_compile


def takes_compilers(aot_backend) -> bool:
    """Whether this torch's ``aot_eager`` takes ``fw_compiler``/``bw_compiler`` (2.13 does)."""
    try:
        return "bw_compiler" in inspect.signature(aot_backend).parameters
    except (TypeError, ValueError):
        return False


def plan(gm: fx.GraphModule) -> list[tuple]:
    """The Triton launches the fused ops of ``gm`` (and of the bodies it calls) make at the
    sizes of its example values: ``(kernel, grid, args, kwargs)``, tensors as fakes. Each
    distinct call is planned once (the layers of a model repeat the same calls); a call whose
    launcher cannot run on fakes (it reads a value) is left to its first launch."""
    launches, seen = [], set()
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            body = _body(node.target) if node.op == "call_function" else None
            if body is None:
                continue
            values = [n.meta.get("val") if isinstance(n, fx.Node) else n for n in node.args]
            kwargs = {k: n.meta.get("val") if isinstance(n, fx.Node) else n
                      for k, n in node.kwargs.items()}
            key = (str(node.target), _describe(values), _describe(kwargs))
            if key in seen:
                continue
            seen.add(key)
            try:
                launches += _record(body, values, kwargs)
            except Exception as e:  # noqa: BLE001 - a plan is an optimization, never an error
                log.debug("fastlora: warm_kernels: %s not planned (%s: %s)", node.target,
                          type(e).__name__, e)
    return launches


def start(launches: list[tuple]) -> list[concurrent.futures.Future]:
    """Compile the planned launches' kernels for their GPU on a thread pool, one compile per
    specialization (``compile_jobs``); returns the compiles' futures (nothing waits for them:
    a launch that comes first compiles its kernel itself, as without warm-up). Only real Triton
    kernels are compiled, not the interpreter's."""
    jobs = [job for job in compile_jobs(launches) if _compilable(job[0])]
    if not jobs:
        return []
    pool = _executor()
    futures = []
    for kernel, device, grid, args, kwargs in jobs:
        kernel.device_caches[device]  # noqa: B018 - the per-device cache, made in this thread
        futures.append(pool.submit(_compile, kernel, device, grid, args, kwargs))
    return futures


def compile_jobs(launches: list[tuple], device_type: str = "cuda") -> list[tuple]:
    """``(kernel, device index, grid, args, kwargs)``, arguments mocked (``mock_arguments``),
    for each distinct specialization (``specialization``) among the planned launches: what
    ``start`` compiles. A launch is compiled for the one ``device_type`` device its tensors are
    on; a tensor may also be in host memory (pinned, read by the kernel through its device
    address: the embedding table of ``offload_embeddings``). A launch on no such device, or on
    several, is left to its first launch."""
    jobs = {}
    for kernel, grid, args, kwargs in launches:
        devices, args, kwargs = mock_arguments(args, kwargs)
        on = {d.index or 0 for d in devices if d.type == device_type}
        if len(on) != 1 or any(d.type not in (device_type, "cpu") for d in devices):
            continue
        device = on.pop()
        jobs.setdefault((id(kernel), device, specialization(kernel, args, kwargs)),
                        (kernel, device, grid, args, kwargs))
    return list(jobs.values())


def _body(target):
    """The Python implementation of a ``fastlora::`` op of fastlora.kernels (the ops that launch
    Triton kernels), or None for any other target (the offload ops move memory: not run)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "fastlora":
        return None
    from torch._library.custom_ops import OPDEFS

    body = getattr(OPDEFS.get(target._schema.name), "_init_fn", None)
    return body if getattr(body, "__module__", "").startswith(_KERNELS) else None


_KERNELS = _launch.__name__.rsplit(".", 1)[0] + "."  # "fastlora.kernels."


def _describe(value):
    """A hashable summary of an argument: what decides the launches of a call."""
    if isinstance(value, torch.Tensor):
        return ("T", str(value.dtype), str(value.device), tuple(map(str, value.shape)),
                tuple(map(str, value.stride())), str(value.storage_offset()))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v)) for k, v in value.items())
    return str(value)


def _record(body, args, kwargs) -> list[tuple]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()  # its own: concrete sizes, no shape environment, no guard
    args, kwargs = _concrete(args, mode), _concrete(kwargs, mode)
    launches: list[tuple] = []
    with mode, _NestedBodies(), _launch.recording(launches), torch.no_grad():
        body(*args, **kwargs)
    return launches


def _concrete(value, mode):
    """``value`` with symbolic sizes replaced by their example values, tensors as fakes of
    ``mode`` with the same sizes, strides, storage offset, dtype and device."""
    if isinstance(value, torch.Tensor):
        size = [size_hint(s) for s in value.shape]
        stride = [size_hint(s) for s in value.stride()]
        offset = size_hint(value.storage_offset())
        extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
        with mode:
            base = torch.empty(extent, dtype=value.dtype, device=value.device)
            return base.as_strided(size, stride, offset)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise ValueError("a value with no example")
        return type(hint)(hint)
    if isinstance(value, (list, tuple)):
        return type(value)(_concrete(v, mode) for v in value)
    if isinstance(value, dict):
        return {k: _concrete(v, mode) for k, v in value.items()}
    return value


class _NestedBodies(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs a fused op called inside another op's body through its Python implementation (a
    fake tensor would otherwise take the op's fake, which launches nothing)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _body(func)
        if body is None:
            return func(*args, **(kwargs or {}))
        with self:
            return body(*args, **(kwargs or {}))


def _compilable(kernel) -> bool:
    """Whether ``kernel`` is a Triton kernel compiled for a GPU (not the interpreter's)."""
    from triton.runtime.jit import JITFunction

    return isinstance(kernel, JITFunction) and os.environ.get("TRITON_INTERPRET") != "1"


def mock_arguments(args, kwargs):
    """The devices of a planned launch's tensors, and its arguments with each tensor replaced
    by Triton's ``MockTensor`` of its dtype: what a warm-up passes, since Triton specializes a
    pointer on its dtype and on whether it is a multiple of ``ALIGN``. A view whose offset
    makes it unaligned gets a mock pointer that is too (a storage is allocated aligned)."""
    from triton.runtime.jit import MockTensor

    devices = []

    def mock(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.device not in devices:
            devices.append(value.device)
        pointer = MockTensor(value.dtype)
        if value.storage_offset() * value.element_size() % ALIGN:
            pointer.data_ptr = _unaligned_address
        return pointer
    return devices, tuple(mock(a) for a in args), {k: mock(v) for k, v in kwargs.items()}


def _unaligned_address() -> int:
    return ALIGN // 2


def specialization(kernel, args, kwargs) -> tuple:
    """What Triton compiles ``kernel`` once for, from a launch's mocked arguments (as Triton's
    launch keys its cache): a constexpr's value; an integer's type and whether it equals 1 or
    is a multiple of 16 (only its type where the kernel lists it in ``do_not_specialize``); a
    float's and a bool's type; a pointer's dtype and alignment; the launch options
    (``num_warps``) by value. Launches with the same specialization share one compile; a
    constexpr described by its class alone made ``G=2, BLOCK_R=32`` and ``G=3, BLOCK_R=64``
    one job, and the step compiled the other (lora_down's and lora_grad_x's on the H100)."""
    params = _parameters(kernel)
    if params is None:  # not a Triton kernel: every argument by value
        params = [(i, True, True) for i in range(len(args))]
    kinds = {name: (constexpr, specialized) for name, constexpr, specialized in params}
    named = [(name, value) for (name, _, _), value in zip(params, args)]
    return tuple((name, _specialized_as(value, *kinds.get(name, (True, True))))
                 for name, value in named + sorted(kwargs.items()))


def _specialized_as(value, constexpr: bool, specialized: bool):
    if type(value).__name__ == "MockTensor":
        return ("ptr", str(value.dtype), value.data_ptr() % ALIGN == 0)
    if constexpr or not isinstance(value, (int, float)):  # a constexpr, an option, None
        return ("value", type(value).__name__, repr(value))
    if isinstance(value, bool):
        return ("u1",)
    if isinstance(value, float):
        return ("fp32",)
    width = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    if not specialized:
        return (width,)
    return (width, "1" if value == 1 else "D" if value % ALIGN == 0 else "")


def _parameters(kernel) -> list[tuple] | None:
    """``(name, constexpr, specialized)`` for each parameter of Triton kernel ``kernel``, as
    ``@triton.jit`` reads them (a constexpr is annotated ``tl.constexpr``; an integer is
    specialized unless named in ``do_not_specialize``); None for anything else."""
    params = getattr(kernel, "params", None)
    if params is not None:  # a JITFunction
        return [(p.name, bool(p.is_constexpr), not p.do_not_specialize) for p in params]
    fn = getattr(kernel, "fn", None)  # the interpreter's kernels (and the tests' recorders)
    if fn is None:
        return None
    unspecialized = set(getattr(kernel, "kwargs", {}).get("do_not_specialize") or ())
    return [(p.name, "constexpr" in str(p.annotation),
             i not in unspecialized and p.name not in unspecialized)
            for i, p in enumerate(inspect.signature(fn).parameters.values())]


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(8, (os.cpu_count() or 2) - 1))
            _pool = concurrent.futures.ThreadPoolExecutor(workers, "fastlora-warm")
        return _pool


def _compile(kernel, device, grid, args, kwargs) -> None:
    """Triton's own warm-up of one specialization (compile, no launch), then the build of its
    C launcher (cached on disk by Triton; the kernel object itself is not touched, so a launch
    in the main thread never sees it half loaded)."""
    try:
        with torch.cuda.device(device):
            compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
            if compiled is not None:
                from triton.runtime.driver import driver

                driver.active.launcher_cls(compiled.src, compiled.metadata)
    except Exception as e:  # noqa: BLE001 - the first launch compiles it, as without warm-up
        log.debug("fastlora: warm_kernels: %s not compiled ahead (%s: %s)",
                  getattr(kernel, "__name__", kernel), type(e).__name__, e)
