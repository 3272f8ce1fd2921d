"""Checkpointed layer inputs offloaded to pinned host memory between forward and backward:
``options={"offload_activations": ...}``, on by default under gradient checkpointing.

Under gradient checkpointing, what a training step keeps from forward to backward is mostly
each decoder layer's input, the residual stream: [tokens, hidden] per layer, 64 MiB for
Llama-3-8B at 8192 bf16 tokens, 2 GiB over its 32 layers. Those tensors go to pinned host
memory while the forward runs and come back one layer ahead of the backward's need:

    forward   layer k's input x_k  ->  copy to host starts as soon as x_k is made (side stream)
                                       the compute stream waits for it when x_k+1's copy starts
    backward  x_k's reload starts when the backward of layer k+1 starts (side stream)
                                       the compute stream waits for it before x_k's first use

so at most two layer inputs are on the device at once in the backward, and the copies overlap
a whole layer's compute each way. The last layer's input is not offloaded: the backward needs it
first, with nothing to overlap its reload. Copies only: losses and gradients do not change.

How, in three steps:
1. ``MarkLayerInputs`` (an inductor joint-graph pass) marks ``meta["should_offload"]`` on the
   inputs of the checkpointed regions (the nodes ``tag_activation_checkpoint`` tagged with an
   ``ac_graph_id``), all but the last region's. ``offload_activations=<MiB>`` marks every
   tensor of at least that size instead (``MarkLargeActivations``).
2. PyTorch's partitioner (``torch._functorch.config.enable_activation_offloading``, in torch
   2.11 and 2.13) offloads the marked tensors it saves for backward and can move: not views,
   not the items of a multi-output op, not the graph's inputs, not non-contiguous tensors. It
   places synchronous ``prims.device_put`` copies on the compute stream, a copy after the
   tensor's last forward use and a reload before its first backward use. (Its own
   separate-stream variants differ between 2.11 and 2.13, and in 2.13 either wait for each
   copy at once or keep every offloaded tensor until the forward ends, so fastlora uses the
   synchronous form and replaces it.)
3. ``OverlapCopies`` (an inductor post-grad pass) replaces those copies by the side-stream ops
   of ``offload_ops`` placed as drawn above, and records on the graph's report what moved
   (``report.offloaded``).

Needs the inductor compiler (the passes are inductor's).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import offload_ops  # noqa: F401  (registers torch.ops.fastlora.offload and the rest)
from .report import log

# The default of options["offload_activations"] ("auto"): whether a graph with checkpointed
# regions, compiled by inductor, offloads its layer inputs. Flip to False to make the offload
# opt-in (offload_activations=True) if a GPU measurement shows a cost.
OFFLOAD_WHEN_CHECKPOINTING = True

_INDUCTOR_PASSES = ("joint_custom_post_pass", "post_grad_custom_pre_pass")


def has_checkpoint_regions(gm: fx.GraphModule) -> bool:
    """Whether Dynamo's graph calls a checkpointed body (``torch.utils.checkpoint``, as
    ``model.gradient_checkpointing_enable()`` makes every decoder layer)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return hop is not None and any(
        node.op == "call_function" and node.target is hop
        for module in gm.modules() if isinstance(module, fx.GraphModule)
        for node in module.graph.nodes)


class MarkLayerInputs(CustomGraphPass):
    """Joint-graph pass: mark the input of every checkpointed region but the last one.

    A region's input is a forward value whose only checkpointed users are in that one region
    and which is not itself part of it: the previous layer's output (the residual stream), or
    for the first layer the embedding. Values every layer reads (rotary cos/sin) are left."""

    def __call__(self, graph: fx.Graph) -> None:
        region_of = {n: n.meta.get("ac_graph_id") for n in graph.nodes
                     if n.meta.get("recompute") is not None}
        last = max((r for r in region_of.values() if r is not None), default=None)
        if last is None:
            return
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.op != "call_function" or not isinstance(value, torch.Tensor):
                continue
            regions = {region_of[u] for u in node.users if u in region_of} - {region_of.get(node)}
            if len(regions) == 1 and regions != {last}:
                node.meta["should_offload"] = True

    def uuid(self) -> str:  # part of inductor's cache key
        return "fastlora-mark-layer-inputs-1"


class MarkLargeActivations(CustomGraphPass):
    """Joint-graph pass: mark every op output of at least ``min_bytes`` as wanting offload."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes

    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.op == "call_function" and isinstance(value, torch.Tensor) \
                    and value.numel() * value.element_size() >= self.min_bytes:
                node.meta["should_offload"] = True

    def uuid(self) -> str:
        return f"fastlora-mark-offload-{self.min_bytes}"


def offload_mode(opts, gm: fx.GraphModule, mode: str | None = None):
    """What ``options["offload_activations"]`` means for this graph: ``"layers"`` (offload the
    checkpointed layers' inputs), a size in MiB, or ``None`` (off); see the module docstring.
    "auto" is off under CUDA graphs (``mode="reduce-overhead"``): a graph with host tensors is
    not captured."""
    wanted = _wanted(opts, mode)
    if wanted == "layers":
        return "layers" if has_checkpoint_regions(gm) else None
    return wanted


def _wanted(opts, mode: str | None):
    """``offload_mode`` for a graph with checkpointed regions (``opts.compiler`` resolved)."""
    value = opts.offload_activations
    if value in (False, None):
        return None
    if value not in ("auto", True):
        return float(value)
    if value == "auto" and not (OFFLOAD_WHEN_CHECKPOINTING and opts.compiler == "inductor"
                                and mode != "reduce-overhead"):
        return None
    return "layers"


def offloads_by_size(opts) -> bool:
    """Whether ``offload_activations`` is a size (every saved activation of at least N MiB)."""
    return isinstance(_wanted(opts, opts.mode), float)


def offloads_layer_inputs(opts, on_gpu: bool) -> bool:
    """Whether a checkpointed graph compiled under the backend options ``opts`` offloads its
    layers' inputs (``offload_mode``'s ``"layers"``), for a graph on a GPU or on the CPU
    (``compiler="auto"`` resolved as the backend will). Known before Dynamo traces:
    compile_for_trainer runs such layers unmarked, since a layer compiled once keeps its input
    inside a shared body, where it cannot be offloaded (regions.Rules)."""
    from .options import auto_compiler

    if opts.compiler == "auto":
        opts = dataclasses.replace(opts, compiler=auto_compiler(opts, mode=opts.mode,
                                                                on_gpu=on_gpu))
    return _wanted(opts, opts.mode) == "layers"


def _hint(n) -> int:
    """An int, or a symbolic size's example value (dynamic shapes), without adding a guard."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)  # SymNode.hint (torch 2.11 - 2.13)
    return int(hint) if isinstance(hint, int) else 0


def _copies(graph: fx.Graph, prefix: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"
            and n.target is torch.ops.prims.device_put.default and n.name.startswith(prefix)]


class OverlapCopies(CustomGraphPass):
    """Post-grad pass over the forward and the backward graph: the partitioner's synchronous
    copies become side-stream copies with their waits; the forward's are recorded on the
    report."""

    def __init__(self, report):
        self.report, self.ran = report, False

    def __call__(self, graph: fx.Graph) -> None:
        offloads = _copies(graph, "cpu_offload_")
        reloads = [n for n in _copies(graph, "gpu_reload_") if n.args[0].op == "placeholder"]
        # the forward ran through here (a backward has reloads): False after the compile means
        # its code came from a compile cache; with no copy at all, nothing was offloaded either way
        self.ran = self.ran or bool(offloads) or not reloads
        if offloads:
            self._forward(graph, offloads)
        if reloads:
            self._backward(graph, reloads)

    def _forward(self, graph: fx.Graph, copies: list[fx.Node]) -> None:
        mib, waits = 0.0, []
        order = {n: i for i, n in enumerate(graph.nodes)}
        for put in sorted(copies, key=lambda n: order[n.args[0]]):
            x = put.args[0]
            with graph.inserting_after(x):  # the copy starts as soon as x exists
                host = graph.call_function(torch.ops.fastlora.offload.default, (x,))
            host.meta.update(put.meta)
            put.replace_all_uses_with(host)
            with graph.inserting_before(put):  # after x's last use: wait, then x may go
                wait = graph.call_function(torch.ops.fastlora.offload_wait.default, (host, x))
            wait.meta["val"] = None
            graph.erase_node(put)
            if waits:  # the previous copy had until this one is issued (a whole layer)
                waits[-1].args = (*waits[-1].args[:2], host)
                host.append(waits[-1])
            waits.append(wait)
            value = host.meta["val"]
            mib += _hint(value.numel()) * value.element_size() / 2**20
            self.report.offloaded.append({
                "tensor": x.name, "dtype": str(value.dtype).replace("torch.", ""),
                "shape": [d if isinstance(d, int) else str(d) for d in value.shape]})
        log.info("fastlora: graph %d: %d saved activations (%.1f MiB) offloaded to host memory",
                 self.report.index, len(copies), mib)

    @staticmethod
    def _backward(graph: fx.Graph, copies: list[fx.Node]) -> None:
        # copies come in the order the backward needs them; each reload is issued where the
        # previous one is waited for (the start of the layer before), the first at the start
        anchor = next(n for n in graph.nodes if n.op != "placeholder")
        waits = []
        for put in copies:
            host, device = put.args[0], put.args[1]
            with graph.inserting_before(anchor):
                x = graph.call_function(torch.ops.fastlora.reload.default, (host, device))
            x.meta.update(put.meta)
            put.replace_all_uses_with(x)
            with graph.inserting_before(put):
                wait = graph.call_function(torch.ops.fastlora.reload_wait.default, (x,))
            wait.meta["val"] = None
            graph.erase_node(put)
            if waits:  # the previous wait reads this reload: nothing can move it later
                waits[-1].args = (waits[-1].args[0], x)
            waits.append(wait)
            anchor = wait

    def uuid(self) -> str:  # what it records on the report is kept beside the cache (below)
        return "fastlora-overlap-copies-1"


# A graph served from PyTorch's compile caches skips the passes above, so the report of a rerun
# would not say what moved. What OverlapCopies recorded is kept beside inductor's cache
# (compile_cache.graph_record) and read back when the pass did not run.
CACHED_NOTE = ("offload: this graph's code came from PyTorch's compile cache without fastlora's "
               "record of what it offloads (a bundle copied alone?); the offload runs as "
               "compiled, the list above is empty")


def account(overlap: OverlapCopies, gm: fx.GraphModule, mode) -> None:
    """After a compile with the offload: keep what the pass recorded, or, when the compiled code
    came from a cache (the pass did not run), put the kept record on the report."""
    from . import compile_cache

    record = compile_cache.graph_record(gm, "offload", mode)
    report = overlap.report
    if overlap.ran:
        if record is not None:
            record.write(report.offloaded)
        return
    kept = record.read() if record is not None else None
    if kept is not None:
        report.offloaded.extend(kept)
        log.info("fastlora: graph %d: served from the compile cache; %d saved activations "
                 "offloaded to host memory", report.index, len(report.offloaded))
    else:
        report.notes.append(CACHED_NOTE)


def offload_config(mode, report) -> tuple[dict, contextlib.AbstractContextManager]:
    """(inductor config patches, functorch config context) that turn the offload on.
    ``mode``: ``"layers"`` (checkpointed layer inputs) or a size in MiB."""
    from torch._inductor import config as inductor_config

    for name in _INDUCTOR_PASSES:
        if getattr(inductor_config, name) is not None:
            raise ValueError(f"options['offload_activations'] needs inductor's {name}, which is "
                             f"already set ({getattr(inductor_config, name)!r})")
    mark = MarkLayerInputs() if mode == "layers" else MarkLargeActivations(int(mode * 2**20))
    patches = {"joint_custom_post_pass": mark, "post_grad_custom_pre_pass": OverlapCopies(report)}
    functorch = {"enable_activation_offloading": True}
    if hasattr(torch._functorch.config, "activation_offload_separate_stream"):
        functorch["activation_offload_separate_stream"] = False  # the form OverlapCopies replaces
    return patches, torch._functorch.config.patch(**functorch)
