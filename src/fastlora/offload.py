"""Saved activations offloaded to CPU memory between forward and backward (experimental):
``torch.compile(model, backend="fastlora", options={"offload_activations": 16})``.

Under gradient checkpointing, what a training step keeps from forward to backward is mostly
each decoder layer's input, the residual stream: [tokens, hidden] per layer, 64 MiB for
Llama-3-8B at 8192 bf16 tokens, 2 GiB over its 32 layers. With this option those tensors are
copied to CPU memory when the forward has made them and copied back when the backward needs
them. The values are the same bits, so losses and gradients do not change.

The mechanism is PyTorch's own partitioner pass (``torch._functorch.config.
enable_activation_offloading``): it offloads the tensors the forward saves for backward that
a joint-graph pass has marked with ``meta["should_offload"]``. fastlora's pass marks every
tensor of at least ``offload_activations`` MiB; the partitioner then offloads those it saves
for backward and can move: not views, not the items of a multi-output op (a fused op's
outputs), not the graph's inputs, not non-contiguous tensors. Copies run on the compute
stream unless ``torch._functorch.config.activation_offload_separate_stream`` is set, which
PyTorch leaves to the user and fastlora does not change.

What was offloaded is recorded on the graph's report (``report.offloaded``) and logged when the
forward is compiled (after the report itself is published). Needs the inductor compiler: the
marking is an inductor joint-graph pass.
"""
from __future__ import annotations

import contextlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .report import log

# node-name prefixes of the partitioner's offload copies (torch 2.11: "cpu_offload_",
# torch 2.13's stream version: "async_cpu_offload_" with a "cpu_offload_" wait)
_OFFLOAD_PREFIXES = ("cpu_offload_", "async_cpu_offload_")


class MarkLargeActivations(CustomGraphPass):
    """Joint-graph pass: mark every op output of at least ``min_bytes`` as wanting offload."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.op == "call_function" and isinstance(value, torch.Tensor) \
                    and value.numel() * value.element_size() >= self.min_bytes:
                node.meta["should_offload"] = True

    def uuid(self) -> str:  # part of inductor's cache key
        return f"fastlora-mark-offload-{self.min_bytes}"


class RecordOffloads(CustomGraphPass):
    """Post-grad pass over the compiled forward: record the offload copies on the report."""

    def __init__(self, report):
        self.report = report

    def __call__(self, graph: torch.fx.Graph) -> None:
        copies = [n for n in graph.nodes if n.op == "call_function"
                  and n.name.startswith(_OFFLOAD_PREFIXES) and "val" in n.meta]
        if not copies:  # the backward graph, or nothing could be offloaded
            return
        mib = 0.0
        for node in copies:
            value, source = node.meta["val"], node.args[0] if node.args else None
            if getattr(source, "name", "").startswith("async_cpu_offload_"):
                continue  # torch 2.13: the wait on an async copy, counted at the copy
            mib += value.numel() * value.element_size() / 2**20
            self.report.offloaded.append(
                {"tensor": getattr(source, "name", str(source)), "shape": list(value.shape),
                 "dtype": str(value.dtype).replace("torch.", "")})
        log.info("fastlora: graph %d: %d saved activations (%.1f MiB) offloaded to CPU memory",
                 self.report.index, len(self.report.offloaded), mib)

    def uuid(self):  # None: a graph that records onto a report is never served from the cache
        return None


def offload_config(min_mib: float, report) -> tuple[dict, contextlib.AbstractContextManager]:
    """(inductor config patches, functorch config context) that turn the offload on."""
    from torch._inductor import config as inductor_config

    for name in ("joint_custom_post_pass", "post_grad_custom_pre_pass"):
        if getattr(inductor_config, name) is not None:
            raise ValueError(f"options['offload_activations'] needs inductor's {name}, which is "
                             f"already set ({getattr(inductor_config, name)!r})")
    patches = {"joint_custom_post_pass": MarkLargeActivations(int(min_mib * 2**20)),
               "post_grad_custom_pre_pass": RecordOffloads(report)}
    return patches, torch._functorch.config.patch(enable_activation_offloading=True)
