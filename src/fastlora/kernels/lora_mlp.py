"""LoRA gate and up projections of one input, then SwiGLU / GeGLU: ``torch.ops.fastlora.lora_mlp``.

Math (each branch j is a LoRA linear of kernels/lora_linear.py; the A matrices of both branches
are stacked into one A_cat, so one pass over x computes both rank-r products, each with its own
dropout mask, slot j: kernels/_lora_grouped.py, shared with lora_qkv):

    xa  = dropout_j(x) @ A_cat^T / (1 - p)                      [M, r_g + r_u]
    y_j = cast(linear(x, W_j, b_j) + s_j * xa_j @ B_j^T)
    h   = act(y_gate) * y_up        act = silu | gelu (tanh) | gelu (erf)
    dx  = sum_j g_j @ W_j  +  dropout-backward(sum_j da_j @ A_j),   da_j = s_j g_j @ B_j

The op fuses the adapter up-products into the activation: the forward writes only h (reading
the two base outputs once) instead of gate, up and h; the backward recomputes gate and up from
the saved base outputs in the same pass that writes d gate / d up and accumulates both
da_j = s_j * d_j @ B_j, so d gate and d up are each read once more (for dB) instead of three
times. dx is one buffer: cuBLAS accumulates g_up @ W_up onto g_gate @ W_gate (beta = 1) and one
Triton pass adds every adapter's part, where the unfused graph makes one dx per projection and
adds them.

Memory saved for backward: x, the two [M, F] base outputs (the unfused graph keeps gate, up and
act(gate)), the float32 [M, r_g + r_u] xa and the seed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _buffers, tuning
from ._common import HAVE_TRITON, cdiv, check_float, require, rows2d, use_triton
from ._launch import fused_op, launch, may_write_over
from ._dot_precision import dot_mode, fix_bf16
from ._lora_blocks import (block_r, lora_grad_b, lora_grad_down_reference, lora_up_reference,
                           split_extent)
from ._lora_grouped import grouped_down, grouped_dx, split_ranks

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

# Launch configurations of the two GLU kernels, chosen like the LoRA blocks'
# (kernels/_lora_blocks.py: benchmarks/tune_lora.py on the H200, results_h200/tune_lora*.json).
# row_blocks: row blocks per forward program (its B tiles loaded once for all); one_b: the
# backward loads each B tile once and transposes it for the up-product; stages: Triton's
# num_stages (its default where 0).
tuning.register("lora_glu_fwd", block_m=32, block_n=128, warps=4, row_blocks=1, stages=0)
tuning.register("lora_glu_bwd", block_m=64, block_n=64, warps=4, per_sm=8, one_b=False,
                stages=0)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._dot_precision import dot, rne

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in float32; tanh and erf without libdevice."""
        if ACT == 0:
            s = 1.0 / (1.0 + tl.exp(-g))
            return g * s, s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            k = 0.7978845608028654  # sqrt(2 / pi)
            z = k * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(z < 0, -t, t)
            return 0.5 * g * (1.0 + t), \
                0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 0.134145 * g * g)
        else:
            c = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            return g * c, c + g * tl.exp(-0.5 * g * g) * 0.3989422804014327

    @triton.jit
    def _b_tile(B, cols, col_ok, stride_b, R, BLOCK_R: tl.constexpr):
        """B [N, R] rows ``cols`` as the [BLOCK_R, BLOCK_N] tile the up-product multiplies."""
        rr = tl.arange(0, BLOCK_R)
        return tl.load(B + cols[None, :] * stride_b + rr[:, None],
                       mask=(rr < R)[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _xa_tile(XA, rows, row_ok, stride_xa, R, BLOCK_R: tl.constexpr):
        """xa [M, R] (one branch's columns) rows ``rows``: a [BLOCK_M, BLOCK_R] tile."""
        rr = tl.arange(0, BLOCK_R)
        return tl.load(XA + rows[:, None] * stride_xa + rr[None, :],
                       mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)

    @triton.jit
    def _branch(BASE, xa, bt, rows, cols, row_ok, col_ok, stride_base, scale,
                MODE: tl.constexpr, FIX: tl.constexpr, OUT_TY: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """round(base + s * xa @ B^T) for one tile (xa and B^T loaded by the caller, which may
        keep them over several tiles), rounded to OUT_TY and returned in float32."""
        lora = dot(xa, bt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), MODE)
        base = tl.load(BASE + rows[:, None] * stride_base + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        return rne(base + scale * lora, FIX).to(OUT_TY).to(tl.float32)

    @triton.jit(do_not_specialize=["M"])
    def _lora_glu_fwd_kernel(BG, BU, XA, WBG, WBU, H, M, N, RG, RU, stride_bg, stride_bu,
                             stride_xa, stride_wbg, stride_wbu, stride_h, sg, su,
                             ACT: tl.constexpr, MODE: tl.constexpr, FIX: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr,
                             ROW_BLOCKS: tl.constexpr):
        """ROW_BLOCKS row blocks of one column block: the B tiles are loaded once for all."""
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ty = H.dtype.element_ty
        bt_g = _b_tile(WBG, cols, col_ok, stride_wbg, RG, BLOCK_RG)
        bt_u = _b_tile(WBU, cols, col_ok, stride_wbu, RU, BLOCK_RU)
        first = tl.program_id(0).to(tl.int64) * (ROW_BLOCKS * BLOCK_M)
        for i in range(ROW_BLOCKS):
            rows = first + i * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            gate = _branch(BG, _xa_tile(XA, rows, row_ok, stride_xa, RG, BLOCK_RG), bt_g, rows,
                           cols, row_ok, col_ok, stride_bg, sg, MODE, FIX, ty, BLOCK_M,
                           BLOCK_N)
            up = _branch(BU, _xa_tile(XA + RG, rows, row_ok, stride_xa, RU, BLOCK_RU), bt_u,
                         rows, cols, row_ok, col_ok, stride_bu, su, MODE, FIX, ty, BLOCK_M,
                         BLOCK_N)
            a, _ = _act(gate, ACT)
            tl.store(H + rows[:, None] * stride_h + cols[None, :], rne(a * up, FIX).to(ty),
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _lora_glu_bwd_kernel(DH, BG, BU, XA, WBG, WBU, DG, DU, DA_PART, M, N, RG, RU, stride_dh,
                             stride_bg, stride_bu, stride_xa, stride_wbg, stride_wbu, stride_d,
                             cols_per_split, sg, su, ACT: tl.constexpr, MODE: tl.constexpr,
                             FIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_RG: tl.constexpr, BLOCK_RU: tl.constexpr,
                             ONE_B: tl.constexpr):
        """One row block over one split of the columns: d gate, d up (stored) and the split's
        part of da = s * d @ B (both branches) into DA_PART[split] ([M, RG + RU] float32). The
        row block's xa is loaded once; each column block's B once (ONE_B: the up-product takes
        its transpose) or twice (in both layouts)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        row_ok = rows < M
        rg, ru = tl.arange(0, BLOCK_RG), tl.arange(0, BLOCK_RU)
        ty = DG.dtype.element_ty
        xa_g = _xa_tile(XA, rows, row_ok, stride_xa, RG, BLOCK_RG)
        xa_u = _xa_tile(XA + RG, rows, row_ok, stride_xa, RU, BLOCK_RU)
        acc_g = tl.zeros([BLOCK_M, BLOCK_RG], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_RU], dtype=tl.float32)
        col_start = split * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, N)
        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < col_end
            mask = row_ok[:, None] & col_ok[None, :]
            wg = tl.load(WBG + cols[:, None] * stride_wbg + rg[None, :],
                         mask=col_ok[:, None] & (rg < RG)[None, :], other=0.0)
            wu = tl.load(WBU + cols[:, None] * stride_wbu + ru[None, :],
                         mask=col_ok[:, None] & (ru < RU)[None, :], other=0.0)
            if ONE_B:
                bt_g, bt_u = tl.trans(wg), tl.trans(wu)
            else:
                bt_g = _b_tile(WBG, cols, col_ok, stride_wbg, RG, BLOCK_RG)
                bt_u = _b_tile(WBU, cols, col_ok, stride_wbu, RU, BLOCK_RU)
            gate = _branch(BG, xa_g, bt_g, rows, cols, row_ok, col_ok, stride_bg, sg, MODE, FIX,
                           ty, BLOCK_M, BLOCK_N)
            up = _branch(BU, xa_u, bt_u, rows, cols, row_ok, col_ok, stride_bu, su, MODE, FIX,
                         ty, BLOCK_M, BLOCK_N)
            dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            a, da = _act(gate, ACT)
            dg = rne(dh * up * da, FIX).to(ty)
            du = rne(dh * a, FIX).to(ty)
            tl.store(DG + rows[:, None] * stride_d + cols[None, :], dg, mask=mask)
            tl.store(DU + rows[:, None] * stride_d + cols[None, :], du, mask=mask)
            acc_g = dot(dg, wg, acc_g, MODE)
            acc_u = dot(du, wu, acc_u, MODE)
        part = DA_PART + (split * M + rows[:, None]) * (RG + RU)
        tl.store(part + rg[None, :], acc_g * sg, mask=row_ok[:, None] & (rg < RG)[None, :])
        tl.store(part + RG + ru[None, :], acc_u * su, mask=row_ok[:, None] & (ru < RU)[None, :])

    # each tile of d gate / d up is stored after the same tile of base gate / base up was loaded
    may_write_over(_lora_glu_bwd_kernel, {"DG": "BG", "DU": "BU"})


def _act_reference(g: Tensor, activation: str):
    """(act(g), act'(g)) in float32 (the derivative written out: no autograd inside an op)."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if activation == "gelu_tanh":
        k = (2 / torch.pi) ** 0.5
        t = torch.tanh(k * (g + 0.044715 * g ** 3))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 0.134145 * g * g)
    c = 0.5 * (1 + torch.erf(g * 0.5 ** 0.5))
    return g * c, c + g * torch.exp(-0.5 * g * g) * (2 * torch.pi) ** -0.5


def _warps_stages(cfg: dict) -> dict:
    """A tuning entry's warps and stages as launch keywords (no num_stages where 0)."""
    return {"num_warps": cfg["warps"], **({"num_stages": cfg["stages"]} if cfg["stages"] else {})}


def glu_forward_triton(base_g, base_u, xa, b_g, b_u, sg, su, activation, out_dtype, h=None):
    M, N = base_g.shape
    rg, ru = b_g.shape[1], b_u.shape[1]
    if h is None:
        h = _buffers.empty((M, N), out_dtype, base_g.device)
    cfg = tuning.get("lora_glu_fwd")
    bm, bn, blocks = cfg["block_m"], cfg["block_n"], cfg["row_blocks"]
    if M and N:
        launch(_lora_glu_fwd_kernel)[(cdiv(M, bm * blocks), cdiv(N, bn))](
            base_g, base_u, xa, b_g, b_u, h, M, N, rg, ru, base_g.stride(0), base_u.stride(0),
            xa.stride(0), b_g.stride(0), b_u.stride(0), h.stride(0), sg, su,
            ACT=ACTIVATIONS[activation], MODE=dot_mode(h.device, h.dtype),
            FIX=fix_bf16(h), BLOCK_M=bm, BLOCK_N=bn, BLOCK_RG=block_r(rg), BLOCK_RU=block_r(ru),
            ROW_BLOCKS=blocks, **_warps_stages(cfg))
    return h


def glu_backward_triton(dh, base_g, base_u, xa, b_g, b_u, sg, su, activation, dtype,
                        dg=None, du=None, da=None):
    """(d gate, d up, da [M, rg + ru] float32 = s * d @ B per branch). The columns are split
    over enough programs to fill the GPU; each split writes its float32 part of da and the
    parts are summed in a fixed order (deterministic, no atomics)."""
    M, N = base_g.shape
    rg, ru = b_g.shape[1], b_u.shape[1]
    dev = base_g.device
    dg = dg if dg is not None else _buffers.empty((M, N), dtype, dev)
    du = du if du is not None else _buffers.empty((M, N), dtype, dev)
    da = da if da is not None else _buffers.empty((M, rg + ru), torch.float32, dev)
    cfg = tuning.get("lora_glu_bwd")
    bm, bn = cfg["block_m"], cfg["block_n"]
    if M == 0:
        return dg, du, da
    splits, per = split_extent(N, bn, cdiv(M, bm), cfg["per_sm"], base_g)
    part = _buffers.empty((splits, M, rg + ru), torch.float32, dev)
    launch(_lora_glu_bwd_kernel)[(cdiv(M, bm), splits)](
        dh, base_g, base_u, xa, b_g, b_u, dg, du, part, M, N, rg, ru, dh.stride(0),
        base_g.stride(0), base_u.stride(0), xa.stride(0), b_g.stride(0), b_u.stride(0),
        dg.stride(0), per, sg, su, ACT=ACTIVATIONS[activation],
        MODE=dot_mode(dev, dg.dtype), FIX=fix_bf16(dg), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_RG=block_r(rg), BLOCK_RU=block_r(ru), ONE_B=bool(cfg["one_b"]),
        **_warps_stages(cfg))
    torch.sum(part, 0, out=da)
    return dg, du, da


def glu_forward_reference(base_g, base_u, xa, b_g, b_u, sg, su, activation, out_dtype):
    rg = b_g.shape[1]
    gate = lora_up_reference(base_g, xa[:, :rg], b_g, sg, out_dtype).float()
    up = lora_up_reference(base_u, xa[:, rg:], b_u, su, out_dtype).float()
    return (_act_reference(gate, activation)[0] * up).to(out_dtype)


def glu_backward_reference(dh, base_g, base_u, xa, b_g, b_u, sg, su, activation, dtype):
    rg = b_g.shape[1]
    gate = lora_up_reference(base_g, xa[:, :rg], b_g, sg, dtype).float()
    up = lora_up_reference(base_u, xa[:, rg:], b_u, su, dtype).float()
    a, da = _act_reference(gate, activation)
    dg, du = (dh.float() * up * da).to(dtype), (dh.float() * a).to(dtype)
    return dg, du, torch.cat([lora_grad_down_reference(dg, b_g, sg),
                              lora_grad_down_reference(du, b_u, su)], 1)


# ---------------------------------------------------------------- lora_mlp


def validate_mlp(x, weights, lora_As, lora_Bs, activation, dropout_p, seed):
    check_float("x", x)
    require(activation in ACTIVATIONS, f"fastlora.lora_mlp: activation must be one of "
                                       f"{sorted(ACTIVATIONS)}, got {activation!r}")
    K = x.shape[-1]
    for name, w, a, b in zip(("gate", "up"), weights, lora_As, lora_Bs):
        require(w.dim() == 2 and w.shape[1] == K and w.dtype == x.dtype,
                f"fastlora.lora_mlp: {name}_weight must be [F, {K}] in {x.dtype}")
        require(a.dim() == 2 and a.shape[1] == K and b.dim() == 2 and b.shape == (w.shape[0],
                                                                                 a.shape[0]),
                f"fastlora.lora_mlp: {name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} "
                f"do not fit {tuple(w.shape)}")
        require(a.dtype == b.dtype == lora_As[0].dtype,
                "fastlora.lora_mlp: all adapter weights must have one dtype")
    require(weights[0].shape == weights[1].shape, "fastlora.lora_mlp: gate and up differ")
    require(0.0 <= dropout_p < 1.0 and (dropout_p == 0 or seed is not None),
            "fastlora.lora_mlp: dropout_p must be in [0, 1) and needs a seed when > 0")


@fused_op("fastlora::lora_mlp")
def lora_mlp(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], gate_A: Tensor,
             gate_B: Tensor, up_weight: Tensor, up_bias: Optional[Tensor], up_A: Tensor,
             up_B: Tensor, seed: Optional[Tensor], gate_scale: float, up_scale: float,
             dropout_p: float, activation: str,
             out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h, base_gate, base_up, xa): h = act(gate) * up of two LoRA linears of x; the rest is
    what the backward needs."""
    validate_mlp(x, (gate_weight, up_weight), (gate_A, up_A), (gate_B, up_B), activation,
                  dropout_p, seed)
    x2 = rows2d(x)
    xa, _, _ = grouped_down(x2, [gate_A, up_A], seed, dropout_p)
    base_g, base_u = F.linear(x2, gate_weight, gate_bias), F.linear(x2, up_weight, up_bias)
    fn = glu_forward_triton if use_triton(x2) else glu_forward_reference
    h = fn(base_g, base_u, xa, gate_B, up_B, gate_scale, up_scale, activation, out_dtype)
    lead = x.shape[:-1]
    return (h.view(*lead, h.shape[-1]), base_g.view(*lead, -1), base_u.view(*lead, -1),
            xa.view(*lead, xa.shape[-1]))


@lora_mlp.register_fake
def _(x, gate_weight, gate_bias, gate_A, gate_B, up_weight, up_bias, up_A, up_B, seed,
      gate_scale, up_scale, dropout_p, activation, out_dtype):
    validate_mlp(x, (gate_weight, up_weight), (gate_A, up_A), (gate_B, up_B), activation,
                  dropout_p, seed)
    lead, n = x.shape[:-1], gate_weight.shape[0]
    return (x.new_empty((*lead, n), dtype=out_dtype), x.new_empty((*lead, n)),
            x.new_empty((*lead, n)),
            x.new_empty((*lead, gate_A.shape[0] + up_A.shape[0]), dtype=torch.float32))


def mlp_backward(dh, x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up,
                 xa, seed, gate_scale, up_scale, dropout_p, activation, needs_dx, needs_dbias,
                 dg=None, du=None):
    """lora_mlp's backward (the op below). ``dg`` / ``du``: [M, F] buffers, in dh's dtype, to
    write d gate / d up into on the Triton path; ``du`` may be ``dh`` itself (each tile of dh is
    read before the same tile of d up is written), which lora_mlp_block's backward uses to keep
    one [M, F] buffer fewer alive."""
    x2, dh2, bg, bu, xa2 = rows2d(x), rows2d(dh), rows2d(base_gate), rows2d(base_up), rows2d(xa)
    rg = gate_A.shape[0]
    triton_path = use_triton(x2)
    if triton_path:
        dg, du, da = glu_backward_triton(dh2, bg, bu, xa2, gate_B, up_B, gate_scale, up_scale,
                                         activation, dh.dtype, dg=dg, du=du)
    else:
        dg, du, da = glu_backward_reference(dh2, bg, bu, xa2, gate_B, up_B, gate_scale,
                                            up_scale, activation, dh.dtype)
    d_gate_B = lora_grad_b(dg, xa2[:, :rg].contiguous(), gate_scale, gate_B.dtype)  # dense:
    d_up_B = lora_grad_b(du, xa2[:, rg:].contiguous(), up_scale, up_B.dtype)  # kernels/_launch.py
    wd = gate_weight.dtype
    dx, da_cat = grouped_dx([dg.to(wd), du.to(wd)], x2, [gate_weight, up_weight], da,
                            torch.cat([gate_A, up_A], 0), [rg, up_A.shape[0]], seed, dropout_p,
                            needs_dx)
    d_gate_A, d_up_A = (t.to(gate_A.dtype, copy=True)
                        for t in split_ranks(da_cat, [rg, up_A.shape[0]], 0))
    e = x.new_empty(0)
    return (dx.view(x.shape) if dx is not None else e, d_gate_A, d_gate_B, d_up_A, d_up_B,
            dg.sum(0) if needs_dbias else x.new_empty(0),
            du.sum(0) if needs_dbias else x.new_empty(0))


@fused_op("fastlora::lora_mlp_backward")
def lora_mlp_backward(dh: Tensor, x: Tensor, gate_weight: Tensor, gate_A: Tensor, gate_B: Tensor,
                      up_weight: Tensor, up_A: Tensor, up_B: Tensor, base_gate: Tensor,
                      base_up: Tensor, xa: Tensor, seed: Optional[Tensor], gate_scale: float,
                      up_scale: float, dropout_p: float, activation: str, needs_dx: bool,
                      needs_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                  Tensor]:
    """(dx, d gate_A, d gate_B, d up_A, d up_B, d gate_bias, d up_bias); empty where unneeded."""
    return mlp_backward(dh, x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate,
                        base_up, xa, seed, gate_scale, up_scale, dropout_p, activation, needs_dx,
                        needs_dbias)


@lora_mlp_backward.register_fake
def _(dh, x, gate_weight, gate_A, gate_B, up_weight, up_A, up_B, base_gate, base_up, xa, seed,
      gate_scale, up_scale, dropout_p, activation, needs_dx, needs_dbias):
    n = gate_weight.shape[0]
    return (torch.empty_like(x) if needs_dx else x.new_empty(0), torch.empty_like(gate_A),
            torch.empty_like(gate_B), torch.empty_like(up_A), torch.empty_like(up_B),
            dh.new_empty(n) if needs_dbias else x.new_empty(0),
            dh.new_empty(n) if needs_dbias else x.new_empty(0))


def _mlp_setup_context(ctx, inputs, output):
    (x, gw, gb, ga, gB, uw, ub, ua, uB, seed, gs, us, p, activation, _out) = inputs
    ctx.save_for_backward(x, gw, ga, gB, uw, ua, uB, output[1], output[2], output[3], seed)
    ctx.args = (gs, us, p, activation)
    ctx.bias_dtypes = (gb.dtype if gb is not None else None, ub.dtype if ub is not None else None)


def _mlp_backward(ctx, dh, _dbg, _dbu, _dxa):
    x, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    require(not (n[1] or n[5]), "fastlora.lora_mlp: the base weights must be frozen",
            RuntimeError)
    needs_dbias = bool(n[2] or n[6])
    dx, dga, dgb, dua, dub, dbg, dbu = torch.ops.fastlora.lora_mlp_backward(
        dh, x, gw, ga, gB, uw, ua, uB, bg, bu, xa, seed, *ctx.args, n[0], needs_dbias)
    return (dx if n[0] else None, None, dbg.to(ctx.bias_dtypes[0]) if n[2] else None,
            dga if n[3] else None, dgb if n[4] else None, None,
            dbu.to(ctx.bias_dtypes[1]) if n[6] else None, dua if n[7] else None,
            dub if n[8] else None) + (None,) * 6


lora_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
