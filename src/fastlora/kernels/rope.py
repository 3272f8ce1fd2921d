"""Rotary position embedding (RoPE) of q and k in one launch: ``torch.ops.fastlora.rope``.

Math, per head vector x of D features, the first R = rot_dim of them rotated (R = D unless the
model uses partial rotary, Phi-3's ``partial_rotary_factor``), h = R / 2, and cos/sin of R
features read at the vector's own (batch, token), so position ids that restart inside a row
(packed sequences) need nothing special:

    forward   y[:h]  = x[:h] * cos[:h] - x[h:R] * sin[:h]        (HF: x * cos + rotate_half(x) * sin,
              y[h:R] = x[h:R] * cos[h:] + x[:h] * sin[h:]          rotate_half(x) = cat(-x[h:], x[:h]))
              y[R:]  = x[R:]                                      (the features partial rotary passes)
    backward  dx[:h]  = dy[:h] * cos[:h] + dy[h:R] * sin[h:]      (the transpose: the inverse rotation,
              dx[h:R] = dy[h:R] * cos[h:] - dy[:h] * sin[:h]       i.e. the forward with -sin when the
              dx[R:]  = dy[R:]                                     two halves of sin are equal, as in HF)

With ``interleaved`` (GPT-J style, Cohere) the pairs are (2i, 2i + 1) instead of (i, i + h),
with the same formulas. Everything is computed in float32 and rounded once to the output dtype
(the promotion of x's and cos's dtypes, as in eager). q and k are rotated by one kernel launch:
the first programs take tiles of q, the rest tiles of k (the tiling: see the kernel). Inputs may
be strided views (HF passes transposes of the projection outputs, Phi-3 slices of the fused qkv
output); cos/sin broadcast over heads with stride 0, so they are never expanded in memory.

Memory and traffic: per tensor the unfused graph writes and re-reads the negated half, the
concatenated rotate_half, two products and their sum (plus the final cat for partial rotary),
about 5 full-size temporaries where the fused op reads x once and writes y once, forward and
backward. Saved for backward: only cos and sin (as in eager, where they are also all that the
products keep), plus q and k only if cos/sin require grad. The op writes only into buffers it
allocates; its inputs are never modified, so autograd never sees a value change under it (each
program loads both members of a pair before storing either, so the launchers also accept an
``out`` that aliases the input, for a caller that owns that buffer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _buffers, tuning
from ._common import (HAVE_TRITON, cdiv, check_float, check_same_device, next_power_of_2, require,
                      use_triton)

from ._launch import fused_op, launch as launch_kernel
if HAVE_TRITON:
    import triton
    import triton.language as tl

    # Tiling. A program takes BLOCK_T tokens x BLOCK_HD heads of one tensor: a 3-D tile
    # [BLOCK_T, BLOCK_HD, features] of about 8K elements, so enough bytes are in flight. cos/sin
    # are the same for every head of a token: the program's heads read the same cos/sin rows
    # (pointer stride 0 over heads), so L2/HBM see them once per program instead of once per
    # head vector (40 times per token on Llama-8B q+k: twice the bytes of q and k). HF's
    # [B, T, H, D] projections keep the heads of a token contiguous, so a tile is one contiguous
    # block; each half of a row is a contiguous run of features, so loads vectorise (16 bytes).

    @triton.jit
    def _pairs_of(P, off, tmask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                  BLOCK_H: tl.constexpr):
        """The two members of every rotated pair in a tile, as float32 [.., .., BLOCK_H]."""
        if INTERLEAVED:  # (2i, 2i + 1): load the contiguous run, then de-interleave in registers
            cols = tl.arange(0, 2 * BLOCK_H)[None, None, :]
            v = tl.load(P + off + cols, mask=tmask & (cols < 2 * HALF), other=0.0)
            a, b = tl.split(tl.reshape(v.to(tl.float32), [v.shape[0], v.shape[1], BLOCK_H, 2]))
        else:  # (i, i + h): two contiguous runs
            cols = tl.arange(0, BLOCK_H)[None, None, :]
            m = tmask & (cols < HALF)
            a = tl.load(P + off + cols, mask=m, other=0.0).to(tl.float32)
            b = tl.load(P + off + HALF + cols, mask=m, other=0.0).to(tl.float32)
        return a, b

    @triton.jit
    def _rotate_tile(X, O, CS, SN, pid, n_tok, T, H, h_blocks, sxa, sxt, sxh, soa, sot, soh,
                     sca, sct, sch, HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_HD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        # The tensor is a view [A, H, T, D] (strides s*a, s*h, s*t); tokens are the (a, t) pairs.
        # (token and head numbers fit in int32; the offsets built from them need int64)
        tok = (pid // h_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        head = (pid % h_blocks) * BLOCK_HD + tl.arange(0, BLOCK_HD)
        mask = (tok < n_tok)[:, None, None] & (head < H)[None, :, None]
        a, t, head = (tok // T).to(tl.int64), (tok % T).to(tl.int64), head.to(tl.int64)
        xoff = (a * sxa + t * sxt)[:, None, None] + (head * sxh)[None, :, None]
        ooff = (a * soa + t * sot)[:, None, None] + (head * soh)[None, :, None]
        # sch is 0 where cos/sin broadcast over the heads (HF): the heads of a token then read
        # the same addresses, served once by the cache (a [BLOCK_T, 1, ..] load instead would
        # get its own register layout, and converting between layouts goes through shared memory)
        coff = (a * sca + t * sct)[:, None, None] + (head * sch)[None, :, None]
        x1, x2 = _pairs_of(X, xoff, mask, HALF, INTERLEAVED, BLOCK_H)
        c1, c2 = _pairs_of(CS, coff, mask, HALF, INTERLEAVED, BLOCK_H)
        s1, s2 = _pairs_of(SN, coff, mask, HALF, INTERLEAVED, BLOCK_H)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        out_ty = O.dtype.element_ty
        if INTERLEAVED:
            cols = tl.arange(0, 2 * BLOCK_H)[None, None, :]
            y = tl.reshape(tl.join(y1, y2), [BLOCK_T, BLOCK_HD, 2 * BLOCK_H])
            tl.store(O + ooff + cols, y.to(out_ty), mask=mask & (cols < ROT))
        else:
            cols = tl.arange(0, BLOCK_H)[None, None, :]
            tl.store(O + ooff + cols, y1.to(out_ty), mask=mask & (cols < HALF))
            tl.store(O + ooff + HALF + cols, y2.to(out_ty), mask=mask & (cols < HALF))
        if ROT < D:  # partial rotary: the remaining features pass through
            pcols = tl.arange(0, BLOCK_P)[None, None, :]
            pmask = mask & (pcols < D - ROT)
            xp = tl.load(X + xoff + ROT + pcols, mask=pmask, other=0.0)
            tl.store(O + ooff + ROT + pcols, xp.to(out_ty), mask=pmask)

    @triton.jit(do_not_specialize=["q_programs", "q_tok", "q_t", "k_tok", "k_t"])
    def _rope_kernel(Q, K, QO, KO, CQ, SQ, CK, SK, q_programs,
                     q_tok, q_t, q_h, q_hb, sqa, sqt, sqh, sqoa, sqot, sqoh, scqa, scqt, scqh,
                     k_tok, k_t, k_h, k_hb, ska, skt, skh, skoa, skot, skoh, scka, sckt, sckh,
                     HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
                     Q_BLOCK_T: tl.constexpr, Q_BLOCK_HD: tl.constexpr,
                     K_BLOCK_T: tl.constexpr, K_BLOCK_HD: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0)
        if pid < q_programs:  # the first programs rotate q, the rest k
            _rotate_tile(Q, QO, CQ, SQ, pid, q_tok, q_t, q_h, q_hb, sqa, sqt, sqh, sqoa, sqot,
                         sqoh, scqa, scqt, scqh, HALF, ROT, D, INTERLEAVED, BACKWARD,
                         Q_BLOCK_T, Q_BLOCK_HD, BLOCK_H, BLOCK_P)
        else:
            _rotate_tile(K, KO, CK, SK, pid - q_programs, k_tok, k_t, k_h, k_hb, ska, skt, skh,
                         skoa, skot, skoh, scka, sckt, sckh, HALF, ROT, D, INTERLEAVED, BACKWARD,
                         K_BLOCK_T, K_BLOCK_HD, BLOCK_H, BLOCK_P)


# The launch configuration: (rotated elements per program, most heads per program, num_warps),
# the "tile" of tuning entry "rope" (benchmarks/tune_rope_ln.py sweeps it).
DEFAULT_TILE = (2048, 32, 4)  # H200 sweep (tune_rope_ln.py): 85-93% of the copy rate
tuning.register("rope", tile=DEFAULT_TILE)


def block_config(rot_dim: int, heads: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_HD, num_warps) for a tensor of ``heads`` heads: all heads of a token in
    one program (up to 32), and enough tokens for about 8192 rotated elements (16 KB of bf16
    read) in flight per program. The same tile size for q and k, so one num_warps fits both."""
    elems, max_heads, warps = tuning.get("rope")["tile"] or DEFAULT_TILE
    block_rot = 2 * next_power_of_2(max(1, rot_dim // 2))
    block_hd = min(next_power_of_2(max(1, heads)), next_power_of_2(max_heads))
    block_t = max(1, elems // (block_hd * block_rot))
    return 1 << (block_t.bit_length() - 1), block_hd, warps  # a power of two


# ---------------------------------------------------------------- shapes and validation


def _as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _out_dtype(x: Tensor, cos: Tensor, sin: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _validate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rot_dim: int) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    require(2 <= q.dim() <= 4 and k.dim() == q.dim(),
            f"fastlora.rope: q and k must have the same number of dimensions (2 to 4), got "
            f"{tuple(q.shape)} and {tuple(k.shape)}")
    d = q.shape[-1]
    require(k.shape[-1] == d, f"fastlora.rope: q and k head sizes differ ({d} vs {k.shape[-1]})")
    require(rot_dim > 0 and rot_dim % 2 == 0 and rot_dim <= d,
            f"fastlora.rope: rot_dim must be even and in 2..{d}, got {rot_dim}")
    require(cos.shape == sin.shape and cos.shape[-1] == rot_dim,
            f"fastlora.rope: cos and sin must have the same shape ending in rot_dim={rot_dim}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, x in (("q", q), ("k", k)):
        rotated = (*x.shape[:-1], rot_dim)
        require(_broadcasts_to(cos.shape, rotated),
                f"fastlora.rope: cos/sin of shape {tuple(cos.shape)} do not broadcast to "
                f"{name}'s rotated part {rotated}")


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (torch.broadcast_shapes(target, shape)
    == target, at a fraction of its host cost: this runs at every call)."""
    return len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _trig_4d(t: Tensor) -> Tensor:
    """cos/sin as 4-D, last stride 1: the tensor the kernel gets (not its broadcast over x's
    rows, whose stride-0 axes only give the strides: an argument inductor launches must be
    dense, kernels/_launch.py)."""
    t = _as_4d(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows_last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- launchers


def _tile_plan(x4: Tensor, o4: Tensor, c4: Tensor, rot_dim: int) -> tuple:
    """Views x, out and cos as [A, H, T, D]: H (the heads) is the axis cos/sin broadcast over
    (stride 0), so that a program reuses one cos/sin row for all its heads. Returns the sizes,
    strides and tile of _rotate_tile's arguments."""
    sizes, cst = x4.shape[:3], c4.stride()[:3]
    bcast = [ax for ax in (1, 0, 2) if cst[ax] == 0 and sizes[ax] > 1]
    h_ax = bcast[0] if bcast else 1
    a_ax, t_ax = (ax for ax in range(3) if ax != h_ax)
    H, T = sizes[h_ax], sizes[t_ax]
    block_t, block_hd, warps = block_config(rot_dim, H)
    n_tok = sizes[a_ax] * T
    h_blocks = cdiv(H, block_hd)
    pick = lambda t: (t.stride(a_ax), t.stride(t_ax), t.stride(h_ax))
    args = (n_tok, T, H, h_blocks, *pick(x4), *pick(o4), *pick(c4))
    return args, cdiv(n_tok, block_t) * h_blocks, block_t, block_hd, warps


def _launch(xq, xk, cos, sin, rot_dim, interleaved, oq, ok_, backward):
    q4, k4 = _as_4d(_rows_last_contiguous(xq)), _as_4d(_rows_last_contiguous(xk))
    oq4, ok4 = _as_4d(oq), _as_4d(ok_)
    require(oq4.stride(-1) == 1 and ok4.stride(-1) == 1,
            "fastlora.rope: output buffers must be contiguous in the last dimension")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    cos4, sin4 = _trig_4d(cos), _trig_4d(sin)  # the kernel's pointers; strides of the views
    cq, ck = cos4.expand(*q4.shape[:-1], rot_dim), cos4.expand(*k4.shape[:-1], rot_dim)
    d = q4.shape[-1]
    q_args, q_programs, q_bt, q_bhd, warps = _tile_plan(q4, oq4, cq, rot_dim)
    k_args, k_programs, k_bt, k_bhd, _ = _tile_plan(k4, ok4, ck, rot_dim)
    grid = (q_programs + k_programs,)
    if grid[0] == 0:
        return
    launch_kernel(_rope_kernel)[grid](
        q4, k4, oq4, ok4, cos4, sin4, cos4, sin4, q_programs, *q_args, *k_args,
        HALF=rot_dim // 2, ROT=rot_dim, D=d, INTERLEAVED=interleaved, BACKWARD=backward,
        Q_BLOCK_T=q_bt, Q_BLOCK_HD=q_bhd,
        K_BLOCK_T=k_bt, K_BLOCK_HD=k_bhd, BLOCK_H=next_power_of_2(max(1, rot_dim // 2)),
        BLOCK_P=next_power_of_2(max(1, d - rot_dim)), num_warps=warps)


def rope_forward_triton(q, k, cos, sin, rot_dim, interleaved=False, q_out=None, k_out=None):
    """Rotate q and k; ``q_out``/``k_out`` may be given (tests poison them; may alias q/k)."""
    if q_out is None:
        q_out = _buffers.empty_like(q, _out_dtype(q, cos, sin))
    if k_out is None:
        k_out = _buffers.empty_like(k, _out_dtype(k, cos, sin))
    _launch(q, k, cos, sin, rot_dim, interleaved, q_out, k_out, backward=False)
    return q_out, k_out


def rope_backward_triton(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype, k_dtype,
                         dq=None, dk=None):
    if dq is None:
        dq = _buffers.empty_like(dq_out, q_dtype)
    if dk is None:
        dk = _buffers.empty_like(dk_out, k_dtype)
    _launch(dq_out, dk_out, cos, sin, rot_dim, interleaved, dq, dk, backward=True)
    return dq, dk


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def _pairs(t: Tensor, rot_dim: int, interleaved: bool):
    """The two members of each rotated pair: (t[..., i], t[..., i + h]) or (t[2i], t[2i + 1])."""
    if interleaved:
        return t[..., 0:rot_dim:2], t[..., 1:rot_dim:2]
    return t[..., :rot_dim // 2], t[..., rot_dim // 2:rot_dim]


def _unpair(a: Tensor, b: Tensor, interleaved: bool) -> Tensor:
    return torch.stack((a, b), -1).flatten(-2) if interleaved else torch.cat((a, b), -1)


def _rotate_reference(x, cos, sin, rot_dim, interleaved, backward, out):
    xf = x.float()
    (x1, x2), (c1, c2), (s1, s2) = (_pairs(t, rot_dim, interleaved)
                                    for t in (xf, cos.float(), sin.float()))
    if backward:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    out.copy_(torch.cat([_unpair(y1, y2, interleaved), xf[..., rot_dim:]], -1))
    return out


def rope_forward_reference(q, k, cos, sin, rot_dim, interleaved=False):
    q_out = torch.empty_like(q, dtype=_out_dtype(q, cos, sin))
    k_out = torch.empty_like(k, dtype=_out_dtype(k, cos, sin))
    return (_rotate_reference(q, cos, sin, rot_dim, interleaved, False, q_out),
            _rotate_reference(k, cos, sin, rot_dim, interleaved, False, k_out))


def rope_backward_reference(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype, k_dtype):
    dq = torch.empty_like(dq_out, dtype=q_dtype)
    dk = torch.empty_like(dk_out, dtype=k_dtype)
    return (_rotate_reference(dq_out, cos, sin, rot_dim, interleaved, True, dq),
            _rotate_reference(dk_out, cos, sin, rot_dim, interleaved, True, dk))


# ---------------------------------------------------------------- the custom ops


@fused_op("fastlora::rope")
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rot_dim: int,
         interleaved: bool) -> tuple[Tensor, Tensor]:
    """Returns (q rotated, k rotated); the first ``rot_dim`` features rotate, the rest pass.
    Pairs are (i, i + rot_dim / 2) (HF rotate_half) or, ``interleaved``, (2i, 2i + 1)."""
    _validate(q, k, cos, sin, rot_dim)
    if use_triton(q):
        return rope_forward_triton(q, k, cos, sin, rot_dim, interleaved)
    return rope_forward_reference(q, k, cos, sin, rot_dim, interleaved)


@rope.register_fake
def _(q, k, cos, sin, rot_dim, interleaved):
    _validate(q, k, cos, sin, rot_dim)
    return (torch.empty_like(q, dtype=_out_dtype(q, cos, sin)),
            torch.empty_like(k, dtype=_out_dtype(k, cos, sin)))


@fused_op("fastlora::rope_backward")
def rope_backward(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, rot_dim: int,
                  interleaved: bool, q_dtype: torch.dtype,
                  k_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if use_triton(dq_out):
        return rope_backward_triton(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype,
                                    k_dtype)
    return rope_backward_reference(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype,
                                   k_dtype)


@rope_backward.register_fake
def _(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype, k_dtype):
    return torch.empty_like(dq_out, dtype=q_dtype), torch.empty_like(dk_out, dtype=k_dtype)


def _trig_grads(dq_out, dk_out, q, k, cos, sin, rot_dim, interleaved):
    """d cos, d sin (only when they require grad, e.g. a learned rotary table): plain PyTorch."""
    dcos = _buffers.zeros(cos.shape, torch.float32, cos.device)
    dsin = _buffers.zeros(sin.shape, torch.float32, sin.device)
    for dy, x in ((dq_out, q), (dk_out, k)):
        dy, x = dy[..., :rot_dim].float(), x[..., :rot_dim].float()
        x1, x2 = _pairs(x, rot_dim, interleaved)
        rotated = _unpair(-x2, x1, interleaved)
        dcos = dcos + (dy * x).sum_to_size(cos.shape)
        dsin = dsin + (dy * rotated).sum_to_size(sin.shape)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, rot_dim, interleaved = inputs
    ctx.rot_dim, ctx.interleaved, ctx.dtypes = rot_dim, interleaved, (q.dtype, k.dtype)
    ctx.trig_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.trig_grad else ()))


def _backward(ctx, dq_out, dk_out):
    cos, sin, *qk = ctx.saved_tensors
    dq, dk = torch.ops.fastlora.rope_backward(dq_out, dk_out, cos, sin, ctx.rot_dim,
                                              ctx.interleaved, *ctx.dtypes)
    dcos = dsin = None
    if ctx.trig_grad:
        dcos, dsin = _trig_grads(dq_out, dk_out, qk[0], qk[1], cos, sin, ctx.rot_dim,
                                 ctx.interleaved)
    return dq, dk, dcos, dsin, None, None


rope.register_autograd(_backward, setup_context=_setup_context)
