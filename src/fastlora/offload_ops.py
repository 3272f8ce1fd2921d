"""The copies behind ``offload_activations``: four ops that move a saved activation to pinned
host memory and back on a side stream, so the copies overlap the compute stream's kernels.

    forward:   host = offload(x)           issued right after x is made: the side stream waits
                                           for the compute stream, then copies x into pinned
                                           host memory
               offload_wait(host, x)        once the next offload is issued (the next layer's
                                           input is made): the compute stream waits for that
                                           copy, then x may be freed and its memory reused (x is
                                           an argument, so it lives to here)
    backward:  x = reload(host, device)     issued one reload ahead of its need (offload.py
                                           places it): x is allocated on the compute stream,
                                           the side stream copies into it
               reload_wait(x)              before x's first use: the compute stream waits for
                                           the copy (declared as a write to x, so everything
                                           that reads x is ordered after it)

One side stream per device carries every copy, in issue order. Pinned host memory comes from
PyTorch's caching host allocator, so after the first step the buffers are reused, not
allocated again. The values are copied bit for bit: losses and gradients do not change.

On the CPU (and any device without streams) the ops are plain copies and the waits do nothing,
which keeps the graph rewrite testable there; the overlap itself only exists on a GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

_side_streams: dict[torch.device, object] = {}
# copy in flight, keyed by its destination's data_ptr: (event, tensor kept alive until the wait)
_pending: dict[int, tuple[object, Tensor]] = {}


def _has_streams(device: torch.device) -> bool:
    return device.type == "cuda"


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _copy_on_side_stream(dst: Tensor, src: Tensor, device: torch.device) -> None:
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(compute)  # src is complete (and dst allocated) in compute-stream order
    event = torch.cuda.Event()
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)
        event.record(side)
    _pending[dst.data_ptr()] = (event, src)


def _wait_for(dst: Tensor, device: torch.device) -> None:
    entry = _pending.pop(dst.data_ptr(), None)
    if entry is not None:
        torch.cuda.current_stream(device).wait_event(entry[0])


@torch.library.custom_op("fastlora::offload", mutates_args=())
def offload(x: Tensor) -> Tensor:
    if not _has_streams(x.device):
        return x.to("cpu", copy=True)
    host = torch.empty_like(x, device="cpu", pin_memory=True)
    _copy_on_side_stream(host, x, x.device)
    return host


@offload.register_fake
def _(x):
    return torch.empty_like(x, device="cpu")


@torch.library.custom_op("fastlora::offload_wait", mutates_args=("host",))
def offload_wait(host: Tensor, keepalive: Tensor, issued: Tensor | None = None) -> None:
    """``host`` is complete once the compute stream passes this point; ``keepalive`` (the
    device tensor being copied) stays allocated until then. ``issued``: the next offload, an
    argument only so that no scheduler can move this wait before that copy is issued."""
    if _has_streams(keepalive.device):
        _wait_for(host, keepalive.device)


@offload_wait.register_fake
def _(host, keepalive, issued=None):
    return None


@torch.library.custom_op("fastlora::reload", mutates_args=())
def reload(host: Tensor, device: torch.device) -> Tensor:
    if not _has_streams(device):
        return host.to(device, copy=True)
    x = torch.empty_like(host, device=device)  # allocated on the compute stream
    _copy_on_side_stream(x, host, device)  # keeps host alive until the wait
    return x


@reload.register_fake
def _(host, device):
    return torch.empty_like(host, device=device)


@torch.library.custom_op("fastlora::reload_wait", mutates_args=("x",))
def reload_wait(x: Tensor, issued: Tensor | None = None) -> None:
    """``issued``: the next reload, an argument only so that no scheduler can move that
    reload after this point (it is issued one layer ahead of its own wait)."""
    if _has_streams(x.device):
        _wait_for(x, x.device)


@reload_wait.register_fake
def _(x, issued=None):
    return None
