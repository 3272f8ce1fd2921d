"""Embedding lookup from a table in pinned host memory: ``torch.ops.fastlora.embedding_from_host``.

Math, for token ids of any shape and a table of V rows x D features:

    out[t, :] = table[ids[t], :]        (a gather: values are copied, none computed)

An id outside [0, V) gives a row of NaN: ``F.embedding`` raises there, a kernel cannot, and
reading outside the table is not an option; NaN makes the bad id show in the loss.

Memory: the table stays in pinned host memory (host_embeddings.py moves a frozen, untied input
embedding there). On CUDA each program reads its rows over the host link through the table's
device-mapped address (CUDA's unified addressing maps pinned host memory into the GPU's address
space), so the GPU holds only the gathered rows (tokens x D), never the table: Llama-3-8B's
128256 x 4096 bfloat16 table is 0.98 GiB of GPU memory freed, for 64 MiB read over the host
link per 4 x 2048 batch.

No backward: the table is frozen. The op refuses a table that requires grad.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import HAVE_TRITON, cdiv, check_float, next_power_of_2, require, use_triton
from ._host_weights import check_reachable
from ._launch import fused_op, launch

# (BLOCK_T, BLOCK_D, num_warps); None: the rule of tile_config (not yet tuned on the H200).
tuning.register("embedding_from_host", tile=None)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    # Each program copies BLOCK_T rows x BLOCK_D features: many rows per program keep enough
    # reads in flight to cover the host link's latency.

    @triton.jit(do_not_specialize=["n_tokens"])
    def _gather_rows(IDS, TABLE, OUT, n_tokens, vocab, dim, stride_table,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n_tokens
        col_ok = cols < dim
        ids = tl.load(IDS + rows, mask=row_ok, other=0).to(tl.int64)
        id_ok = (ids >= 0) & (ids < vocab)
        values = tl.load(TABLE + ids[:, None] * stride_table + cols[None, :],
                         mask=id_ok[:, None] & col_ok[None, :], other=float("nan"))
        tl.store(OUT + rows[:, None] * dim + cols[None, :], values,
                 mask=row_ok[:, None] & col_ok[None, :])


def tile_config(dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): tiles of about 4096 values, whole rows up to 1024
    features."""
    override = tuning.get("embedding_from_host")["tile"]
    if override is not None:
        return override
    block_d = min(next_power_of_2(max(1, dim)), 1024)
    return max(1, 4096 // block_d), block_d, 4


def _validate(ids: Tensor, table: Tensor, fake: bool = False) -> None:
    require(ids.dtype in (torch.int32, torch.int64),
            f"fastlora.embedding_from_host: ids must be int32 or int64, got {ids.dtype}",
            TypeError)
    check_float("table", table)
    require(table.dim() == 2, f"fastlora.embedding_from_host: the table must be 2-D (rows x "
            f"features), got shape {tuple(table.shape)}")
    require(not table.requires_grad, "fastlora.embedding_from_host: the table requires grad; "
            "only a frozen table is read from host memory (it has no backward)", RuntimeError)
    # (a fake tensor does not know whether its memory is pinned: the fake kernel, and the
    # launches warmup.py plans on fakes)
    check_reachable("embedding_from_host", "the table", table, ids.device, assume_pinned=fake)


# ---------------------------------------------------------------- launcher


def embedding_from_host_triton(ids: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
    """Launch the gather; ``out`` may be given (tests pass a poisoned buffer)."""
    flat = ids.reshape(-1).contiguous()
    vocab, dim = table.shape
    if out is None:
        out = _buffers.empty((flat.numel(), dim), table.dtype, ids.device)
    if table.stride(1) != 1:
        table = table.contiguous()
    block_t, block_d, warps = tile_config(dim)
    launch(_gather_rows)[(cdiv(flat.numel(), block_t), cdiv(dim, block_d))](
        flat, table, out, flat.numel(), vocab, dim, table.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out.view(*ids.shape, dim)


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def embedding_from_host_reference(ids: Tensor, table: Tensor) -> Tensor:
    """The same rows (NaN for an id outside the table), on the ids' device."""
    ok = (ids >= 0) & (ids < table.shape[0])
    rows = table[torch.where(ok, ids, 0).to(table.device)].to(ids.device)
    return torch.where(ok.unsqueeze(-1), rows, rows.new_full((), float("nan"))).contiguous()


# ---------------------------------------------------------------- the custom op


@fused_op("fastlora::embedding_from_host")
def embedding_from_host(ids: Tensor, table: Tensor) -> Tensor:
    """``table[ids]`` on the ids' device, with the table on that device or in pinned host
    memory (read in place by the kernel on CUDA)."""
    _validate(ids, table)
    if use_triton(ids):
        return embedding_from_host_triton(ids, table)
    return embedding_from_host_reference(ids, table)


@embedding_from_host.register_fake
def _(ids, table):
    _validate(ids, table, fake=True)
    return table.new_empty((*ids.shape, table.shape[1]), device=ids.device)
