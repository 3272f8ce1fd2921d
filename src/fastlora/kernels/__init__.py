"""Fused ops, one file each: Triton kernels (CUDA, and CPU under TRITON_INTERPRET=1), a PyTorch
reference that is the CPU kernel, and the ``torch.ops.fastlora.*`` registration with its fake
kernel and autograd formula; each file is named by the op it holds. Every public module here is
imported, so adding an op is adding a file. Private modules (``_*.py``) hold what several op
files share (tiles, blocks, launch helpers, references); ``tuning.py`` is the registry of every
op's launch configuration, each entry registered by its op's file."""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from . import _launch  # noqa: E402

_launch.check_op_names({name.split("::")[1] for name in _launch.OPS})


def triton_kernels():
    """``(module, name, kernel)`` for every Triton function (``@triton.jit``: compiled, or the
    interpreter's under ``TRITON_INTERPRET=1``) bound at the top of a module of this package:
    once per binding, so a kernel one module imports from another comes once for each (a
    launch reads the kernel from its own module's globals). Tests and benchmarks replace them
    through ``module`` (recorders, stubs)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, value in list(vars(module).items()):
            if isinstance(value, (JITFunction, InterpretedFunction)):
                yield module, name, value
