"""Inductor post-grad pass: a kernel's output written over one of its inputs that is dead after it.

Some of fastlora's kernels compute an output element from the same element of an input and may
be given that input's buffer as the output: the GLU backward reads base gate's tile, then writes
d gate's tile at the same place (kernels/lora_mlp.py declares it with
``_launch.may_write_over``). Whether that is allowed depends on the graph, not on the op: base
gate must have no reader after the kernel. In a checkpointed layer it is recomputed for the
backward and dead after it; without checkpointing it is a tensor saved by the forward, an input
of the backward graph. Only the partitioned graph tells, so this runs on it, before inductor's
reinplacing:

    dg = empty(...)                                   dg = <removed>
    out = triton_kernel_wrapper_functional(     ->    out = triton_kernel_wrapper_functional(
        BG=bg, ..., DG=dg, tensors_to_clone=[DG])         BG=bg, ..., DG=bg, tensors_to_clone=[DG])

The functional graph stays exact whatever happens next: the declared output is written in full
and never read, so its input value does not matter. Inductor's reinplacing then writes in place
(bg has no later reader, by this pass's check) and the fresh [M, F] buffer is gone: the MLP
block's backward holds 3 [M, F] buffers instead of 4 in a checkpointed layer
(tests/test_block_buffers.py; Llama-3-8B at 8192 tokens: 224 MiB).

An output is moved only onto an input that is not a graph input, whose every reader (views
included) comes before or at the kernel, with the output's dtype, shape, strides and offset,
and only from a fresh allocation used by nothing but the kernel.
"""
from __future__ import annotations

import hashlib
import logging
import pathlib
from collections import defaultdict

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .kernels._launch import WRITES_OVER

log = logging.getLogger("fastlora")
aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default}


def _storage(node: fx.Node):
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    from torch.multiprocessing.reductions import StorageWeakRef
    return StorageWeakRef(value.untyped_storage())


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    x, y = a.meta["val"], b.meta["val"]
    pairs = [(x.storage_offset(), y.storage_offset()), (x.dim(), y.dim())]
    pairs += list(zip(x.shape, y.shape)) + list(zip(x.stride(), y.stride()))
    return x.dtype == y.dtype and x.dim() == y.dim() and all(
        statically_known_true(p == q) for p, q in pairs)


def _declared(node: fx.Node) -> dict:
    """The kernel's ``WRITES_OVER`` pairs; the kernel as launched may wrap the declared one
    (an ``Autotuner``, ``heuristics``: each keeps the kernel it wraps as ``fn``)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    for _ in range(4):
        if kernel in WRITES_OVER:
            return WRITES_OVER[kernel]
        kernel = getattr(kernel, "fn", None)
    return {}


class ReuseDeadInputs(CustomGraphPass):
    """``post_grad_custom_post_pass``: see the module's docstring. ``then``: a pass already set
    there (the user's, or a test's), run after this one."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        try:
            self._reuse(graph)
        except Exception as e:  # noqa: BLE001 - each move leaves a valid graph: keep what is done
            log.warning("fastlora: reuse_dead_inputs stopped (%s: %s); the graph keeps its "
                        "buffers from there on", type(e).__name__, e)
        if self.then is not None:
            self.then(graph)

    def _reuse(self, graph: fx.Graph) -> None:
        from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

        order = {n: i for i, n in enumerate(graph.nodes)}
        sharing = defaultdict(list)  # storage -> the nodes that are views of it
        for n in graph.nodes:
            storage = _storage(n)
            if storage is not None:
                sharing[storage].append(n)
        for node in graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional):
            pairs = _declared(node)
            if not pairs:
                continue
            args = dict(node.kwargs["kwargs"])
            for out_name, in_name in pairs.items():
                out, inp = args.get(out_name), args.get(in_name)
                if isinstance(out, fx.Node) and isinstance(inp, fx.Node) \
                        and out_name in node.kwargs["tensors_to_clone"] \
                        and list(args.values()).count(inp) == 1 \
                        and self._fresh(out, node, sharing) \
                        and self._dead_after(inp, node, sharing, order) \
                        and _same_layout(out, inp):
                    args[out_name] = inp
                    node.update_kwarg("kwargs", args)
                    self._erase_unused(out)

    @staticmethod
    def _fresh(out: fx.Node, kernel: fx.Node, sharing) -> bool:
        """``out`` is (a view of) an allocation that nothing but ``kernel`` reads."""
        group = sharing.get(_storage(out), [])
        roots = [n for n in group if n.op == "call_function" and n.target in ALLOCATIONS]
        return len(roots) == 1 and list(kernel.kwargs["kwargs"].values()).count(out) == 1 and \
            all(u in group or u is kernel for n in group for u in n.users) and \
            all(n.op == "call_function" for n in group)

    @staticmethod
    def _dead_after(inp: fx.Node, kernel: fx.Node, sharing, order) -> bool:
        """Nothing reads ``inp``'s buffer after ``kernel``, and it is no graph input."""
        group = sharing.get(_storage(inp), [])
        return bool(group) and all(n.op == "call_function" for n in group) and all(
            order[u] <= order[kernel] for n in group for u in n.users)

    @staticmethod
    def _erase_unused(node: fx.Node) -> None:
        while node is not None and node.op == "call_function" and not node.users:
            parent = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            node.graph.erase_node(node)
            node = parent

    def uuid(self) -> str:  # part of inductor's cache key: this file and the declarations
        declared = sorted(f"{getattr(k, '__name__', k)}:{v}" for k, v in WRITES_OVER.items())
        text = pathlib.Path(__file__).read_bytes() + repr(declared).encode()
        own = "fastlora-reuse-dead-inputs-" + hashlib.sha256(text).hexdigest()[:16]
        if self.then is None:
            return own
        then = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if then is None else f"{own}+{then}"  # None: inductor caches nothing
