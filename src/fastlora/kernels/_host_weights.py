"""GPU copies of frozen weights kept in pinned host memory (``offload_lm_head``).

A weight in pinned host memory is brought to the GPU only for the op that reads it, and the
copy is freed when that op is done with it. :func:`prefetch` starts the copy early, on a side
stream, so it overlaps the compute queued before the op (host_lm_head.py calls it before each
call of the compiled model: the copy of an lm_head then runs beside the decoder layers'
forward); :func:`on_device` hands the copy over to the op: the current stream waits for it, and
this module keeps no reference, so the memory goes back to the allocator with the op's last
use. Without a prefetched copy :func:`on_device` copies on the current stream (non-blocking
from pinned memory). Values are copied, never computed: an op reads the same numbers as from a
weight on the GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers

_STAGED: dict[tuple, tuple[Tensor, "torch.cuda.Event"]] = {}
_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _key(weight: Tensor, device: torch.device) -> tuple:
    """The host weight's memory, shape and dtype and the target device: the same parameter
    whatever Python object holds it."""
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape),
            tuple(weight.stride()), weight.dtype, device)


def is_on_host(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.is_pinned()


def prefetch(weight: Tensor, device: torch.device | str) -> None:
    """Start copying a pinned host ``weight`` to ``device`` (a GPU) on a side stream; the copy
    waits in this module until :func:`on_device` takes it. A second prefetch of the same weight
    replaces the first (its copy is freed once done). Nothing happens for a weight that is not
    in pinned host memory."""
    device = torch.device(device)
    if not is_on_host(weight) or device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    # Allocated on the current stream, which frees it: the side stream first waits for the
    # work queued there, which may still be using the memory the allocator hands out.
    copy = _buffers.empty(weight.shape, weight.dtype, device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        copy.copy_(weight, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    _STAGED[_key(weight, device)] = (copy, done)


def on_device(weight: Tensor, device: torch.device) -> Tensor:
    """``weight`` on ``device``: itself if it is there; the prefetched copy (the current stream
    waits for it, and this module lets go of it); otherwise a copy made now."""
    if weight.device == device:
        return weight
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    staged = _STAGED.pop(_key(weight, device), None) if is_on_host(weight) else None
    if staged is not None:
        copy, done = staged
        torch.cuda.current_stream(device).wait_event(done)
        return copy
    return weight.to(device, non_blocking=is_on_host(weight))


def staged() -> int:
    """How many prefetched copies wait to be taken (tests)."""
    return len(_STAGED)


def check_reachable(op: str, name: str, weight: Tensor, device: torch.device,
                    assume_pinned: bool = False) -> None:
    """Raise unless ``weight`` is on ``device`` or in pinned host memory (a fake tensor cannot
    say whether its memory is pinned: a CPU fake passes, as any CPU tensor with
    ``assume_pinned``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if weight.device == device or (weight.device.type == "cpu" and (
            assume_pinned or isinstance(weight, FakeTensor) or weight.is_pinned())):
        return
    raise RuntimeError(f"fastlora.{op}: {name} must be on {device} or in pinned host memory, got "
                       f"{weight.device} (not pinned)")
