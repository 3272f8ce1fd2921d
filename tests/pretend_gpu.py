"""A pretend GPU for scripts that trace the inductor launch route on a machine without one
(tests/block_buffer_graph.py, tests/shared_body_backward.py; each runs in its own process).

The inductor route traces an op's body into its Triton kernel calls only for CUDA tensors
(kernels/_launch.py). After :func:`pretend_gpu`, Triton's driver reports an sm90 target
(PyTorch's analysis of what a kernel writes compiles it to Triton IR, which needs no GPU),
the launchers read the device properties given here, and fastlora's device checks take CPU
tensors for GPU ones. Tracing works; launching a kernel does not (there is no GPU), so
:func:`capture_instead_of_codegen` stops a compile where inductor would generate code.
:func:`run_script` runs such a script from a test, in a process of its own."""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
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


NOT_COMPILED = "captured, not compiled"


def capture_instead_of_codegen() -> list:
    """Inductor's compile of each graph (``compile_fx_inner``) replaced by a capture: the graphs
    AOTAutograd hands it go into the returned list, and calling what it returns raises."""
    import torch._inductor.compile_fx as compile_fx

    graphs = []

    def capture(gm, example_inputs, **kwargs):
        graphs.append(gm)

        def not_run(*inputs):
            raise RuntimeError(NOT_COMPILED)
        return not_run
    compile_fx.compile_fx_inner = capture
    return graphs


def step_until_captured(step) -> None:
    """``step()`` (a forward and backward of a compiled model), which stops at the first graph
    call after the capture (any other error is raised)."""
    try:
        step()
    except RuntimeError as e:
        if NOT_COMPILED not in str(e):
            raise


def count_backward_variants() -> dict:
    """{shared body: how many backward variants torch.compile traced for it}, filled while it
    traces (invoke_subgraph traces a body's backward once per kind of incoming gradient)."""
    variants: dict = {}
    hop = importlib.import_module("torch._higher_order_ops.invoke_subgraph")
    record = hop.warn_and_trace_duplicate_backward

    def count(identifier, suffix, *rest):
        variants[identifier] = max(variants.get(identifier, 0), suffix + 1)
        return record(identifier, suffix, *rest)
    hop.warn_and_trace_duplicate_backward = count
    return variants


def run_script(name: str, *args: str, env: dict | None = None) -> dict:
    """Run tests/<name> in a process of its own (no Triton interpreter: the real kernels are
    traced; the default launch route; ``env`` added to the environment) and return the JSON
    object of its last line."""
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("TRITON_INTERPRET", "FASTLORA_LAUNCH", "FASTLORA_FAKE_METADATA")},
           **(env or {})}
    script = pathlib.Path(__file__).with_name(name)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
