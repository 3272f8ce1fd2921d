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
the first programs take rows of q, the rest rows of k. Inputs may be strided views (HF passes
transposes of the projection outputs, Phi-3 slices of the fused qkv output); cos/sin broadcast
over heads with stride 0, so they are never expanded in memory.

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

from ._common import HAVE_TRITON, check_float, check_same_device, require, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_rows(X, O, CS, SN, pid, n_rows, D1, D2, sx0, sx1, sx2, so0, so1, so2,
                     sc0, sc1, sc2, HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        # Rows are the head vectors of a 4-D view [D0, D1, D2, D]; row r sits at (i0, i1, i2).
        rows = tl.cast(pid, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        i2 = rows % D2
        i1 = (rows // D2) % D1
        i0 = rows // (D2 * D1)
        xrow = i0 * sx0 + i1 * sx1 + i2 * sx2
        orow = i0 * so0 + i1 * so1 + i2 * so2
        crow = i0 * sc0 + i1 * sc1 + i2 * sc2
        pair = tl.arange(0, BLOCK_H)
        mask = row_ok[:, None] & (pair < HALF)[None, :]
        if INTERLEAVED:  # pairs (2i, 2i + 1)
            c_a = (2 * pair)[None, :]
            c_b = c_a + 1
        else:  # pairs (i, i + h)
            c_a = pair[None, :]
            c_b = c_a + HALF
        x1 = tl.load(X + xrow[:, None] + c_a, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + xrow[:, None] + c_b, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(CS + crow[:, None] + c_a, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(CS + crow[:, None] + c_b, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SN + crow[:, None] + c_a, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SN + crow[:, None] + c_b, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        out_ty = O.dtype.element_ty
        tl.store(O + orow[:, None] + c_a, y1.to(out_ty), mask=mask)
        tl.store(O + orow[:, None] + c_b, y2.to(out_ty), mask=mask)
        if ROT < D:  # partial rotary: the remaining features pass through
            pcols = tl.arange(0, BLOCK_P)
            pmask = row_ok[:, None] & (pcols < D - ROT)[None, :]
            xp = tl.load(X + xrow[:, None] + ROT + pcols[None, :], mask=pmask, other=0.0)
            tl.store(O + orow[:, None] + ROT + pcols[None, :], xp.to(out_ty), mask=pmask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, CQ, SQ, CK, SK, q_rows, k_rows, q_programs,
                     QD1, QD2, KD1, KD2,
                     sq0, sq1, sq2, sqo0, sqo1, sqo2, scq0, scq1, scq2,
                     sk0, sk1, sk2, sko0, sko1, sko2, sck0, sck1, sck2,
                     HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                     INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0)
        if pid < q_programs:
            _rotate_rows(Q, QO, CQ, SQ, pid, q_rows, QD1, QD2, sq0, sq1, sq2, sqo0, sqo1, sqo2,
                         scq0, scq1, scq2, HALF, ROT, D, INTERLEAVED, BACKWARD, BLOCK_R, BLOCK_H,
                         BLOCK_P)
        else:
            _rotate_rows(K, KO, CK, SK, pid - q_programs, k_rows, KD1, KD2, sk0, sk1, sk2,
                         sko0, sko1, sko2, sck0, sck1, sck2, HALF, ROT, D, INTERLEAVED, BACKWARD,
                         BLOCK_R, BLOCK_H, BLOCK_P)


def block_config(rot_dim: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_H, BLOCK_P, num_warps): about 4096 rotated elements per program."""
    block_h = triton.next_power_of_2(max(1, rot_dim // 2))
    block_p = triton.next_power_of_2(max(1, d - rot_dim))
    block_r = max(1, min(64, 2048 // block_h))
    warps = 4 if block_r * block_h >= 1024 else 2
    return block_r, block_h, block_p, warps


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
        try:
            ok = torch.broadcast_shapes(rotated, cos.shape) == torch.Size(rotated)
        except RuntimeError:
            ok = False
        require(ok, f"fastlora.rope: cos/sin of shape {tuple(cos.shape)} do not broadcast to "
                    f"{name}'s rotated part {rotated}")


def _trig_view(t: Tensor, x4: Tensor, rot_dim: int) -> Tensor:
    """cos/sin as a 4-D view over x's rows (stride 0 where broadcast), last stride 1."""
    t = _as_4d(t)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.expand(*x4.shape[:-1], rot_dim)


def _rows_last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- launchers


def _launch(xq, xk, cos, sin, rot_dim, interleaved, oq, ok_, backward):
    q4, k4 = _as_4d(_rows_last_contiguous(xq)), _as_4d(_rows_last_contiguous(xk))
    oq4, ok4 = _as_4d(oq), _as_4d(ok_)
    require(oq4.stride(-1) == 1 and ok4.stride(-1) == 1,
            "fastlora.rope: output buffers must be contiguous in the last dimension")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    cq, sq = _trig_view(cos, q4, rot_dim), _trig_view(sin, q4, rot_dim)
    ck, sk = _trig_view(cos, k4, rot_dim), _trig_view(sin, k4, rot_dim)
    d = q4.shape[-1]
    block_r, block_h, block_p, warps = block_config(rot_dim, d)
    q_rows, k_rows = q4.numel() // d, k4.numel() // d
    q_programs = triton.cdiv(q_rows, block_r)
    grid = (q_programs + triton.cdiv(k_rows, block_r),)
    if grid[0] == 0:
        return
    _rope_kernel[grid](
        q4, k4, oq4, ok4, cq, sq, ck, sk, q_rows, k_rows, q_programs,
        q4.shape[1], q4.shape[2], k4.shape[1], k4.shape[2],
        *q4.stride()[:3], *oq4.stride()[:3], *cq.stride()[:3],
        *k4.stride()[:3], *ok4.stride()[:3], *ck.stride()[:3],
        HALF=rot_dim // 2, ROT=rot_dim, D=d, INTERLEAVED=interleaved, BACKWARD=backward,
        BLOCK_R=block_r,
        BLOCK_H=block_h, BLOCK_P=block_p, num_warps=warps)


def rope_forward_triton(q, k, cos, sin, rot_dim, interleaved=False, q_out=None, k_out=None):
    """Rotate q and k; ``q_out``/``k_out`` may be given (tests poison them; may alias q/k)."""
    if q_out is None:
        q_out = torch.empty_like(q, dtype=_out_dtype(q, cos, sin))
    if k_out is None:
        k_out = torch.empty_like(k, dtype=_out_dtype(k, cos, sin))
    _launch(q, k, cos, sin, rot_dim, interleaved, q_out, k_out, backward=False)
    return q_out, k_out


def rope_backward_triton(dq_out, dk_out, cos, sin, rot_dim, interleaved, q_dtype, k_dtype,
                         dq=None, dk=None):
    if dq is None:
        dq = torch.empty_like(dq_out, dtype=q_dtype)
    if dk is None:
        dk = torch.empty_like(dk_out, dtype=k_dtype)
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


@torch.library.custom_op("fastlora::rope", mutates_args=())
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


@torch.library.custom_op("fastlora::rope_backward", mutates_args=())
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
    dcos = torch.zeros(cos.shape, dtype=torch.float32, device=cos.device)
    dsin = torch.zeros(sin.shape, dtype=torch.float32, device=sin.device)
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
