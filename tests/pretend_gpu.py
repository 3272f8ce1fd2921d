"""A pretend GPU for scripts that trace the inductor launch route on a machine without one
(tests/block_buffer_graph.py, tests/shared_body_backward.py; each runs in its own process).

The inductor route traces an op's body into its Triton kernel calls only for CUDA tensors
(kernels/_launch.py). After :func:`pretend_gpu`, Triton's driver reports an sm90 target
(PyTorch's analysis of what a kernel writes compiles it to Triton IR, which needs no GPU),
the launchers read the device properties given here, and fastlora's device checks take CPU
tensors for GPU ones. Tracing works; launching a kernel does not (there is no GPU)."""
from __future__ import annotations

import importlib
import pkgutil
import types

import torch
import triton
from triton.backends.compiler import GPUTarget


class _PretendDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def pretend_gpu() -> None:
    triton.runtime.driver.set_active(_PretendDriver())
    props = types.SimpleNamespace(multi_processor_count=132, major=9, minor=0,
                                  name="pretend sm90", total_memory=80 << 30,
                                  shared_memory_per_block_optin=232448)
    torch.cuda.get_device_properties = lambda *args, **kwargs: props
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    torch.cuda.current_device = lambda: 0
    import fastlora.kernels as kernels
    from fastlora.kernels import _launch

    _launch._decomposes = lambda args: True  # every op call is traced into its kernels
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fastlora.kernels.{info.name}")
        if hasattr(module, "use_triton"):
            module.use_triton = lambda t: True  # the Triton path, not the PyTorch reference
