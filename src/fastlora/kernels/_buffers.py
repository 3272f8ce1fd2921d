"""The launchers' new buffers: ``torch.empty`` / ``zeros`` / ``empty_like``, allocated flat.

Why not ``torch.empty(shape)`` itself: on the inductor launch route (_launch.py) an op's body is
traced into the backward graph, and AOTAutograd's cache stores that graph as Python source.
Torch 2.11 rebuilds it with FX's symbolic tracer when it reads the cache entry (torch 2.13 waits
until compiled autograd asks for it). In that retrace a factory call without a tensor argument
gets its sizes as traced values, and PyTorch's argument parser looks for a traced value only at
the head of a size list: ``torch.ops.aten.empty.memory_format([12, mul_1045, 32], ...)`` (a
plain 12, then a token count) raises "Expected a value of type 'List[int]'". The entry is then
skipped and the whole graph is traced and compiled again, every run: on an H100 a Llama-3.2-1B
rerun with every cache full took 54.9 s against 68.5 s cold (2026-12-06, torch 2.11).

A size list of one element, the element count, always rebuilds (the count is a traced value
or a plain int); ``view`` / ``permute`` then take a tensor first, which the tracer sees. The
result is the same tensor as the factory call's: the same shape, dtype, device and strides.
Sizes that are all plain ints (every call of the Python launch route, static graphs) need no
detour and take the factory call itself (no extra view on the host's path).
Every buffer a launcher allocates goes through these functions
(tests/test_buffers.py checks the kernel files for direct calls).
"""
from __future__ import annotations

import torch


def _plain(shape) -> bool:
    return all(type(d) is int for d in shape)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, contiguous."""
    shape = tuple(shape)
    if _plain(shape):
        return torch.empty(shape, dtype=dtype, device=device)
    return _flat_empty(shape, dtype, device)


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``, contiguous."""
    shape = tuple(shape)
    if _plain(shape):
        return torch.zeros(shape, dtype=dtype, device=device)
    return _flat_empty(shape, dtype, device, torch.zeros)


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty_like(t, dtype=dtype)``: the same shape and dimension order in memory (a
    transposed ``t`` gives a transposed buffer)."""
    if _plain(t.shape):
        return torch.empty_like(t, dtype=dtype)
    return _permuted_empty_like(t, dtype)


def _flat_empty(shape: tuple, dtype: torch.dtype, device, factory=torch.empty) -> torch.Tensor:
    """``factory(shape)`` (torch.empty or torch.zeros) as one flat allocation, viewed."""
    return factory(_storage_length(shape), dtype=dtype, device=device).view(shape)


def _storage_length(shape: tuple):
    """The element count of a dense ``shape``, written as PyTorch writes a strided tensor's
    storage size: 1 + sum of (size - 1) * stride. The same number as the product of the sizes,
    but with symbolic sizes the same *expression* too (``64*s1*(s0 - 1) + 64*s1`` where the
    product is ``64*s0*s1``; sympy does not expand it). A tensor's storage size is part of the
    metadata that torch.compile compares: a layer body shared by nested_compile_region
    (reuse_layers) has its backward traced again for every distinct metadata of the gradients
    it receives, and one made in a buffer of ours met one made by PyTorch in the other form
    (tests/test_buffers.py). With a size 0 the sum is 0 too: it equals the product for every
    shape."""
    length, stride = 1, 1
    for size in reversed(shape):
        length = length + (size - 1) * stride
        stride = stride * size
    return length


def _permuted_empty_like(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """empty_like's layout as PyTorch's own decomposition computes it (the dimensions ordered
    by stride, dense), from a flat allocation."""
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

    perm = compute_elementwise_output_logical_to_physical_perm(t)
    if isinstance(perm, tuple):  # torch 2.13 also returns whether the order was ambiguous
        perm = perm[0]
    physical = _flat_empty(tuple(t.shape[d] for d in perm), dtype or t.dtype, t.device)
    inverse = [0] * len(perm)
    for position, d in enumerate(perm):
        inverse[d] = position
    return physical.permute(inverse)
