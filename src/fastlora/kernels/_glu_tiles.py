"""The elementwise tile scaffolding that SwiGLU (swiglu.py) and GeGLU (geglu.py) share.

One program per [BLOCK_M, BLOCK_N] tile of the [tokens, ffn] map (a 1-D grid, row-major); inputs
are read in place as row-strided views (e.g. the two halves of a packed gate_up output), the
math is float32 and the result is rounded once, at the store. A forward kernel has the signature
``(G, U, Y, stride_g, stride_u, stride_y, M, N, *constexprs)`` and a backward kernel ``(DY, G,
U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, M, N, *constexprs)``;
``launch_forward`` / ``launch_backward`` drive either op's pair.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import HAVE_TRITON, cdiv, next_power_of_2, require, rows2d
from ._launch import launch

# The launch of swiglu, swiglu_packed and geglu. tile: (elements per program, most columns,
# num_warps) of the [tokens, ffn] tiles; None: block_config's rule. flat: dense inputs run as
# one flat row-major stream at the (elements per program, num_warps) each op passes (its FLAT,
# measured beside it); a pair replaces every op's, False keeps the tiles for dense inputs too.
# benchmarks/tune_glu.py sweeps both (--layout: flat).
tuning.register("glu", tile=None, flat=None)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Row and column indices of this program's tile, and its in-bounds mask. Programs are
        numbered along the rows first (a 1-D grid), so consecutive programs read neighbouring
        memory, as a flat elementwise kernel does. Why: on the H200 a flat kernel over the same
        bytes ran at inductor's 4340 GB/s, where this tile numbered down the columns (a 2-D
        grid, row blocks first) reached 4110-4185 GB/s; in this order SwiGLU's forward runs at
        4283 GB/s and its backward at 4291 (benchmarks/tune_glu.py --layout)."""
        col_blocks = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        rows = (pid // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, cols, (rows < M)[:, None] & (cols < N)[None, :]

    @triton.jit
    def load_f32(P, stride, rows, cols, mask):
        return tl.load(P + rows[:, None] * stride + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)

    @triton.jit
    def store(P, stride, rows, cols, mask, value):
        tl.store(P + rows[:, None] * stride + cols[None, :], value.to(P.dtype.element_ty),
                 mask=mask)


def block_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an elementwise [M, n] map: 4096 elements a program,
    at most 1024 columns wide so that MLP widths (8192, 14336, 9216) waste no masked lanes."""
    tile = tuning.get("glu")["tile"]
    if tile is not None:
        elems, widest, warps = tile
        block_n = min(next_power_of_2(n), widest)
        return max(1, elems // block_n), block_n, warps
    block_n = min(next_power_of_2(n), 1024)
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, 8


def dense_shape(tensors, flat: tuple[int, int]) -> tuple[int, int] | None:
    """[rows, width] to run an elementwise map over ``tensors`` (2-D row views) as one flat
    stream of ``flat[0]`` elements a program, when all are dense [M, N] row-major tensors (the
    map is elementwise, so any common reshape of them is the same map); None when one is a
    row-strided view (the halves of a packed gate_up) or the size is not a whole number of
    programs."""
    elems = flat[0]
    M, N = tensors[0].shape
    whole = (M * N) % elems == 0 if isinstance(M, int) else N % elems == 0  # no guard on M
    if any(t.stride(0) != N for t in tensors) or not whole:
        return None
    return M * N // elems, elems


def config(tensors, flat: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(M, N, BLOCK_M, BLOCK_N, num_warps) of the launch over ``tensors`` (2-D row views):
    a flat stream (inductor's layout for an elementwise map) where dense_shape allows, else
    the [tokens, ffn] tiles of block_config."""
    override = tuning.get("glu")["flat"]
    if override is not None:
        flat = override
    shape = dense_shape(tensors, flat) if flat else None
    if shape is not None:
        return (*shape, 1, shape[1], flat[1])
    return (*tensors[0].shape, *block_config(tensors[0].shape[1]))


def grid(m: int, n: int, block_m: int, block_n: int):
    return (cdiv(m, block_m) * cdiv(n, block_n),)


def launch_forward(kernel, flat: tuple[int, int], gate: Tensor, up: Tensor,
                   y: Tensor | None = None, **constexprs):
    """y = kernel(gate, up), a new tensor unless ``y`` is given (tests poison it); ``flat`` is
    the op's (elements per program, num_warps) for dense inputs."""
    g2, u2 = rows2d(gate), rows2d(up)
    M, N = g2.shape
    if y is None:
        y = _buffers.empty(gate.shape, gate.dtype, gate.device)
    y2 = y.view(M, N)
    M, N, bm, bn, warps = config((g2, u2, y2), flat)
    if (M, N) != tuple(g2.shape):  # the flat stream: the same memory as [M * N / w, w]
        g2, u2, y2 = (t.view(M, N) for t in (g2, u2, y2))
    if M * N:
        launch(kernel)[grid(M, N, bm, bn)](g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0),
                                           M, N, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                           **constexprs)
    return y.view(gate.shape)


def launch_backward(kernel, flat: tuple[int, int], dy: Tensor, gate: Tensor, up: Tensor,
                    dgate: Tensor | None = None, dup: Tensor | None = None, **constexprs):
    """(d gate, d up); they may be two views of one buffer (the packed op passes its halves)."""
    g2, u2, dy2 = rows2d(gate), rows2d(up), rows2d(dy)
    M, N = g2.shape
    if dgate is None:
        dgate = _buffers.empty(gate.shape, gate.dtype, gate.device)
    if dup is None:
        dup = _buffers.empty(up.shape, up.dtype, up.device)
    dg2, du2 = dgate.view(M, N), dup.view(M, N)  # views: the kernel must write into them
    require(dg2.stride(-1) == 1 and du2.stride(-1) == 1,
            "fastlora: gradient buffers must be contiguous along the last dimension")
    M, N, bm, bn, warps = config((dy2, g2, u2, dg2, du2), flat)
    if (M, N) != tuple(g2.shape):  # the flat stream
        dy2, g2, u2, dg2, du2 = (t.view(M, N) for t in (dy2, g2, u2, dg2, du2))
    if M * N:
        launch(kernel)[grid(M, N, bm, bn)](dy2, g2, u2, dg2, du2, dy2.stride(0), g2.stride(0),
                                           u2.stride(0), dg2.stride(0), du2.stride(0), M, N,
                                           BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                           **constexprs)
    return dgate.view(gate.shape), dup.view(up.shape)
