"""Who launches the Triton kernels of a fused op: inductor's generated code or our Python.

Every fused op is a ``torch.library.custom_op``. Called as an opaque op, its Python body runs at
each call of the compiled step: shape checks, config choice, grid and the Triton launch itself,
about 2 ms of CPU for ``lora_qkv_backward`` (0.3 ms of GPU on an H200): a LoRA step is then
bound by the host, not the GPU.

``FASTLORA_LAUNCH=inductor`` (the default since 2026-12-05: on an H100 its steps were 1.6x
the Python route's on a variable-length Llama-3.2-1B run, at a longer first compile; see
docs/options.md) lets inductor see through the ops made with
:func:`fused_op` on CUDA tensors: when AOTAutograd functionalizes the graph, the op's body is
traced once, with fake tensors, into the aten ops and ``wrap_triton`` kernel calls it makes
(what ``torch.library.triton_op`` does), and inductor's generated code launches the kernels
itself with its own launcher (and can capture them in CUDA graphs). Every decision the body
takes on shapes and dtypes (block sizes, splits, the number of programs) is therefore taken
once, at trace time; sizes that follow the batch (token counts) stay symbolic: the launchers
read them through ``_common.size_hint`` where a choice only tunes speed, so that no guard on a
length is added (the kernels take those lengths as ``do_not_specialize`` arguments).

On CPU tensors (the PyTorch reference, or the Triton interpreter under ``TRITON_INTERPRET=1``)
the op stays opaque, exactly as with ``FASTLORA_LAUNCH=python``. A ``torch.library.triton_op``
whose body branches to plain PyTorch on CPU does run under torch.compile on a CPU-only machine
(checked 2026-12-03, torch 2.13: the branch is traced like any PyTorch code), but a traced body
cannot be our CPU path: the interpreter's kernels cannot be wrapped (``wrap_triton`` returns
them as they are, and they would be called with fake tensors) and the reference reads the
dropout seed with ``int()`` (a data-dependent value). So the decomposition below is
``triton_op``'s, with a device check: traced on CUDA, opaque elsewhere.
The autograd formula (backward = another fused op) and ``register_fake`` are unchanged: dynamo
uses the fake, AOTAutograd the formula, and only then is each op decomposed.

Traced launches lose what the Python launchers do at run time, so where a launcher adapts to
the GPU it checks at trace time instead: a tile that needs more shared memory than the GPU has
(large ranks with dropout) is halved by ``_common.halve_until_it_fits`` when Python launches
it, and is compiled and loaded once by Triton (:func:`fits`) and halved before inductor traces
it.

``FASTLORA_LAUNCH=python`` keeps every op opaque (each call runs its Python launcher), the
default before 2026-12-05: it compiles faster (a short run, or one that recompiles often, may
finish sooner), and serves to compare or where inductor fails on a kernel. It is read once, at
import. Per op: ``FASTLORA_LAUNCH=inductor,rope=python`` keeps rope (and
rope_backward) opaque and lets inductor launch the rest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

from . import _access_cache
from ._common import HAVE_TRITON, size_hint

ROUTES = ("inductor", "python")


def parse(setting: str) -> tuple[str, dict[str, str]]:
    """``"inductor"``, ``"python"``, or the default route then per-op exceptions:
    ``"inductor,rope=python,rms_norm=python"`` (an op's backward follows its forward)."""
    default, *rest = [part.strip() for part in setting.split(",") if part.strip()] or ["inductor"]
    per_op = dict(item.split("=", 1) if "=" in item else (item, "") for item in rest)
    for route in [default, *per_op.values()]:
        if route not in ROUTES:
            raise ValueError(f"FASTLORA_LAUNCH={setting!r}: a route is 'inductor' or 'python', "
                             f"got {route!r}")
    return default, per_op


LAUNCH, PER_OP = parse(os.environ.get("FASTLORA_LAUNCH", "inductor"))


def route(name: str) -> str:
    """The launch route of op ``name`` ("fastlora::rope" or "fastlora::rope_backward")."""
    op = name.split("::")[-1]
    op = op[:-len("_backward")] if op.endswith("_backward") else op
    return PER_OP.get(op, LAUNCH)


def check_op_names(ops) -> None:
    """Refuse per-op exceptions that name no fused op (``ops``: names without namespace)."""
    ops = {op for op in ops if not op.endswith("_backward")}
    unknown = sorted(set(PER_OP) - ops)
    if unknown:
        raise ValueError(f"FASTLORA_LAUNCH names unknown op(s) {unknown}; the ops are "
                         f"{', '.join(sorted(ops))}")


log = logging.getLogger("fastlora")
_state = threading.local()  # .tracing: inside a decomposition, kernels go through wrap_triton


# Inductor settings for graphs with fused ops: no padded strides. Inductor may pad the row
# stride of a buffer it allocates (comprehensive padding: rows over 1024 elements that are not
# a multiple of 128 bytes); a kernel traced with the dense stride would then read the wrong rows.
INDUCTOR_PATCHES = {"comprehensive_padding": False} if any(
    route_ == "inductor" for route_ in (LAUNCH, *PER_OP.values())) else {}


# FASTLORA_FAKE_METADATA=1 (an experiment, off by default): where nothing is being recorded (no
# proxy mode: AOTAutograd's metadata pass, which runs the graph once before the joint trace),
# an op is not traced into its kernels; its ``register_fake`` answers, as Dynamo's trace uses it.
# Pretend GPU, 16-layer tiny Llama: the metadata pass 4.8 -> 2.2 s (benchmarks/
# pretend_gpu_compile.py, 2026-12-06, before the access analyses were cached). Off until the
# GPU tests pass with it on a GPU: the metadata then comes from the fakes, which have to match
# what the traced bodies return.
FAKE_METADATA = os.environ.get("FASTLORA_FAKE_METADATA", "0") == "1"

OPS: set[str] = set()  # every op made by fused_op
INDUCTOR_LAUNCHED: set[str] = set()  # ops whose kernels inductor launches on CUDA ("fastlora::rope")


# kernel -> {output argument: input argument}: the kernel writes every element of the output and
# never reads it, and each program reads its tile of the input before it writes the same tile of
# the output; so the output may share the input's buffer where the input is dead after the
# kernel. fastlora/reuse_dead_inputs.py does that in inductor's graphs.
WRITES_OVER: dict = {}


def may_write_over(kernel, pairs: dict):
    """Declare ``kernel``'s outputs that may be written over its inputs (``WRITES_OVER``)."""
    WRITES_OVER[kernel] = dict(pairs)
    return kernel


def tracing() -> bool:
    """True while an op body is being traced for inductor (launches are recorded, not run)."""
    return bool(getattr(_state, "tracing", False))


@contextlib.contextmanager
def _this_thread(name: str, value):
    """``_state.<name>`` set to ``value`` in this thread, restored after."""
    before = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield value
    finally:
        setattr(_state, name, before)


def _traced():
    return _this_thread("tracing", True)


def launch(kernel):
    """``launch(kernel)[grid](...)``: the kernel itself, or while an op body is traced for
    inductor its ``wrap_triton`` wrapper (the launch becomes a node of the graph), or while a
    graph's launches are planned (warmup.py) a recorder: the launch is written down, not run."""
    recorded = getattr(_state, "recording", None)
    if recorded is not None:
        return _Recorded(kernel, recorded)
    if tracing():
        return _Traced(kernel)
    return kernel


def recording(launches: list):
    """Within it, every ``launch(kernel)[grid](*args, **kwargs)`` of this thread appends
    ``(kernel, grid, args, kwargs)`` to ``launches`` and runs nothing (warmup.py)."""
    return _this_thread("recording", launches)


def fits(launch_block, block: int) -> bool:
    """Whether every Triton kernel that ``launch_block(block)`` launches can be loaded on its
    GPU: each is recorded (not run), compiled by Triton's warm-up and loaded, which is where
    Triton checks shared memory, tensor memory and threads (OutOfResources). Used while an op
    body is traced for inductor, where a tile past those limits would otherwise fail only when
    inductor compiles the graph (``_common.halve_until_it_fits``). Anything else that goes
    wrong in this check answers True: the block is traced as before, unchecked."""
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction, MockTensor

    def mock(value):  # Triton specializes a pointer on its dtype; sizes by their example value
        if isinstance(value, torch.Tensor):
            return MockTensor(value.dtype)
        return size_hint(value) if isinstance(value, torch.SymInt) else value

    launches: list = []
    try:
        with recording(launches):
            launch_block(block)
        for kernel, grid, args, kwargs in launches:
            cuda = [a.device for a in (*args, *kwargs.values())
                    if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
            if not isinstance(kernel, JITFunction) or not cuda:
                continue
            with torch.cuda.device(cuda[0]):
                compiled = kernel.run(*map(mock, args), grid=grid, warmup=True,
                                      **{k: mock(v) for k, v in kwargs.items()})
                if compiled is not None:
                    compiled._init_handles()  # what Triton's first launch does: the check
    except OutOfResources as e:
        log.info("fastlora: block %d does not fit (%s): halved before inductor traces it",
                 block, e)
        return False
    except Exception as e:  # noqa: BLE001 - unchecked, traced as it was before this check
        log.debug("fastlora: block %d not checked (%s: %s)", block, type(e).__name__, e)
    return True


class _Recorded:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.kernel, grid, args, kwargs))
        return record


class NotDense(Exception):
    """A kernel argument whose layout inductor could change, or with a size inductor fails on
    (``UNPROVEN_SIZE``): the op stays opaque."""


# A size the shape environment cannot prove >= 1 (a difference of sizes, s1 - s0, as every
# size dynamic makes of a width; never a parameter's, which Dynamo keeps static) keeps the op
# opaque. Traced into its kernels, such a graph failed inside inductor (torch 2.11, H100,
# 2026-12-07: lora_mlp_block_backward under torch.compile(dynamic=True), an AssertionError in
# inductor's tiling analysis, tiling_utils.py, comparing size hints), where the opaque op
# compiles and runs (benchmarks/RESULTS.md, "Thirty-second run").
UNPROVEN_SIZE = "inductor's tiling analysis fails on such a traced graph (torch 2.11)"


def _at_least_one(size) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return not isinstance(size, torch.SymInt) or statically_known_true(size >= 1)


class _Traced:
    """``wrap_triton(kernel)[grid](...)`` after checking that every tensor argument is dense.

    The launchers pass strides as numbers taken at trace time. Inductor keeps a dense tensor's
    layout exactly (its stride order is kept, and a dense layout of one order is unique), but a
    view with gaps (a column slice, a broadcast) may reach the kernel as a compact copy
    (torch 2.11 constrains only the stride order of a user kernel's arguments), and the kernel
    would then read with the wrong strides. Such an argument makes the op opaque instead, as
    does one with a size not provably >= 1 (``UNPROVEN_SIZE``)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def _where(self, argument) -> str:
        return f"{getattr(self.kernel, '__name__', self.kernel)} argument {argument}"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            for name, value in list(enumerate(args)) + list(kwargs.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                if not all(_at_least_one(size) for size in value.shape):
                    raise NotDense(f"{self._where(name)}: sizes {tuple(value.shape)}: "
                                   f"{UNPROVEN_SIZE}")
                if not dense(value):
                    raise NotDense(f"{self._where(name)}: sizes {tuple(value.shape)}, strides "
                                   f"{tuple(value.stride())}")
            return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)
        return run


def dense(t: torch.Tensor) -> bool:
    """Whether ``t`` provably covers its memory without gaps or overlaps (in some dimension
    order), with no guard on symbolic sizes: unprovable counts as not dense."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(t.numel() == 0):
        return True
    dims = sorted(((t.stride(i), t.shape[i]) for i in range(t.dim())
                   if not statically_known_true(t.shape[i] == 1)),
                  key=lambda d: size_hint(d[0]))
    # Two spellings of one number: the product of the smaller dimensions' sizes, and PyTorch's
    # contiguous strides, a product of max(size, 1) (torch._prims_common.
    # make_contiguous_strides_for): a width it cannot prove positive (s1 - s0) keeps its max,
    # also inside a product (M * Max(1, s1 - s0)). Both are equal whenever every size is at
    # least 1, and with a size 0 there is no element to read: either proves the layout.
    plain, maxed = 1, 1
    for stride, size in dims:
        if not any(statically_known_true(stride == e) for e in (plain, maxed)):
            return False
        plain, maxed = plain * size, maxed * torch.sym_max(size, 1)
    return True


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _decomposes(args) -> bool:
    tensors = list(_tensors(args))
    return HAVE_TRITON and bool(tensors) and all(t.is_cuda for t in tensors)


def _not_traced(types, args, kwargs):
    """Why an op call seen by FunctionalTensorMode is left to the op's fake (opaque), or None
    where its body is traced into its kernels."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if FAKE_METADATA and get_proxy_mode() is None:
        return "metadata pass (FASTLORA_FAKE_METADATA)"
    if not _decomposes(list(args) + list(kwargs.values())):
        return "not every tensor argument on CUDA"
    if any(not issubclass(t, (torch.Tensor, FunctionalTensor, FakeTensor)) for t in types):
        return f"tensor types {sorted(t.__name__ for t in types)}"
    return None


def fused_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` whose body inductor traces into its
    kernels on CUDA (see the module's docstring); use :func:`launch` for every kernel call in
    the body. Returns the ``CustomOpDef``: register the fake and the autograd formula on it as
    usual."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        OPS.add(name)
        if route(name) == "inductor" and HAVE_TRITON:
            INDUCTOR_LAUNCHED.add(name)
            _access_cache.install()  # the kernels' access analysis, once per kind of call
            from torch._subclasses.functional_tensor import FunctionalTensorMode

            def decompose(mode, func, types, args, kwargs):
                why = _not_traced(types, args, kwargs)
                if why is not None:
                    log.debug("fastlora: %s not traced into its kernels here: %s", name, why)
                    return mode.__torch_dispatch__(func, types, args, kwargs)
                try:
                    with mode, _traced():
                        return fn(*args, **kwargs)
                except NotDense as e:  # what was traced is unused: dead code, removed
                    log.info("fastlora: %s stays opaque (launched by its Python code): %s",
                             name, e)
                    return mode.__torch_dispatch__(func, types, args, kwargs)

            op.register_torch_dispatch(FunctionalTensorMode, decompose)
        return op
    return wrap
