"""DistributedDataParallel: fuse the whole graph first, split it at gradient buckets after.

Under DDP, Dynamo's DDPOptimizer (``torch._dynamo.config.optimize_ddp``, on by default) splits
each captured graph at the boundaries of DDP's gradient buckets, so that the all-reduce of one
bucket overlaps the backward of the next, and then calls the backend once per piece. The split
falls before whichever node filled a bucket, without regard for what the backend would fuse:
on a 3-layer Llama with LoRA and 1 MiB buckets (about one layer each) it cut layers 1 and 2
between q_proj's base matmul and its adapter, and left those pieces with the causal mask as an
input they cannot prove causal: two of three layers lost their attention fusion and their
grouped norm + q/k/v adapters (measured 2026-12-03; tests/test_distributed.py).

fastlora keeps every fusion by running DDPOptimizer itself, on the rewritten graph: each fused
region is one node there, which a split cannot cut, and the fused ops take their parameters as
direct inputs, so DDPOptimizer counts them into the same buckets as before. The pieces are then
compiled by the inner compiler (inductor / aot_eager). Overlap of communication and backward is
kept; only the boundaries move to the nearest fused-op edge.

This needs the whole graph, so Dynamo must not split it first. ``fuse_before_ddp_split()`` does
that around one call of a model compiled in place (``fastlora.compile_for_trainer`` wraps every
call in it): while a DDP forward is running and Dynamo would split, it turns Dynamo's split off
for that call and hands the bucket size to the backend. A model compiled with plain
``torch.compile(model, backend="fastlora")`` inside DDP is split by Dynamo first; each piece's
report then says so (``ddp_piece_note``).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

# DDP's bucket size in bytes while a call whose split fastlora does itself is being traced.
_deferred_bucket_cap: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fastlora_deferred_ddp_bucket_cap", default=None)


def active_ddp_module():
    """The ``DistributedDataParallel`` whose forward is running, or ``None`` (the hook DDP
    provides for Dynamo, ``DistributedDataParallel._get_active_ddp_module``)."""
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return get() if get is not None else None


def _dynamo_would_split() -> bool:
    from torch._dynamo.utils import get_optimize_ddp_mode

    return get_optimize_ddp_mode() == "ddp_optimizer"


@contextlib.contextmanager
def fuse_before_ddp_split():
    """Around one call of a fastlora-compiled model: if it runs inside a DDP forward and Dynamo
    would split its graphs at bucket boundaries, let the backend split them after fusing."""
    ddp = active_ddp_module()
    if ddp is None or not _dynamo_would_split():
        yield
        return
    token = _deferred_bucket_cap.set(int(ddp.bucket_bytes_cap))
    try:
        with torch._dynamo.config.patch(optimize_ddp=False):
            yield
    finally:
        _deferred_bucket_cap.reset(token)


def deferred_bucket_cap() -> int | None:
    """DDP's bucket size when the graph being compiled is to be split by fastlora after its
    rewrite; ``None`` when it is not (no DDP, or Dynamo split it already)."""
    if active_ddp_module() is None:
        return None
    return _deferred_bucket_cap.get()


def split_after_fusion(original, rewritten, example_inputs, bucket_bytes_cap: int,
                       compile_piece):
    """``rewritten`` split at DDP's gradient-bucket boundaries by torch's DDPOptimizer, each
    piece compiled by ``compile_piece(piece, example_inputs)``. Returns (the compiled callable,
    the number of pieces).

    DDPOptimizer hands each piece Dynamo's metadata about the graph's inputs (which input is
    which parameter), read from the graph it splits: ``rewritten`` (a copy of ``original``) gets
    it from ``original`` first."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    sources = {node.name: getattr(node, "_dynamo_source", None)
               for node in original.graph.find_nodes(op="placeholder")}
    for node in rewritten.graph.find_nodes(op="placeholder"):
        node._dynamo_source = sources.get(node.name)
    if hasattr(original, "_param_name_to_source"):
        rewritten._param_name_to_source = original._param_name_to_source
    optimizer = DDPOptimizer(bucket_bytes_cap=bucket_bytes_cap, backend_compile_fn=compile_piece)
    compiled = optimizer.compile_fn(rewritten, example_inputs)
    return compiled, len(optimizer.buckets)


def split_note(pieces: int, bucket_bytes_cap: int) -> str | None:
    if pieces == 1:  # its gradients fit one bucket
        return None
    return (f"DDP: fused as one graph, then split at gradient-bucket boundaries into {pieces} "
            f"graphs (bucket_cap_mb={bucket_bytes_cap / 2**20:g}); no fused op is cut")


def ddp_piece_note(gm) -> str | None:
    """A note for a graph that Dynamo's DDPOptimizer cut out of a larger one before fastlora saw
    it, or ``None``."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if "DDPOptimizer" not in str(getattr(reason, "reason", "")):
        return None
    return ("DDP: this graph is one piece of a graph that Dynamo's DDPOptimizer split at "
            "gradient-bucket boundaries before fastlora saw it; a fusion across a boundary (an "
            "attention mask built in an earlier piece, a norm or a q/k/v or gate/up group cut "
            "apart) is left unfused. Compile the model in place with "
            "fastlora.compile_for_trainer(model) to fuse first and split after "
            "(docs/multi_gpu.md)")


# ----------------------------------------------------------------------------- reports(model)
def graph_parameters(example_inputs) -> list:
    """The parameters a compiled graph belongs to, for ``fastlora.reports(model)``: the real
    parameters among its inputs; for a piece Dynamo's DDPOptimizer cut (its inputs are fake
    tensors), every parameter of the model DDP is running."""
    from torch._subclasses.fake_tensor import FakeTensor

    params = [t for t in example_inputs
              if isinstance(t, torch.nn.Parameter) and not isinstance(t, FakeTensor)]
    pieces_inputs = any(isinstance(t, FakeTensor) for t in example_inputs)
    ddp = active_ddp_module() if not params and pieces_inputs else None
    return list(ddp.module.parameters()) if ddp is not None else params


def unsharded_parameters(model: torch.nn.Module) -> list:
    """The unsharded parameters FSDP2 (``fully_shard``) all-gathers into for ``model`` and its
    submodules: the tensors its compiled graphs take, where ``model.parameters()`` holds the
    sharded DTensors between forwards. Read from FSDP2's private state (torch 2.11-2.13); an
    empty list where that is not there."""
    found = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                groups = [state._fsdp_param_group]
            for group in groups:
                for fsdp_param in getattr(group, "fsdp_params", ()):
                    param = getattr(fsdp_param, "_unsharded_param", None)
                    if param is not None:
                        found.append(param)
        except Exception:  # pragma: no cover - FSDP2 internals moved; reports() still lists all
            continue
    return found
