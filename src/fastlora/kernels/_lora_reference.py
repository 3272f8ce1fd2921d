"""The PyTorch side of the LoRA blocks of kernels/_lora_blocks.py: the dropout keep-mask spec
(Philox4x32-10 written with int64 tensors, the same words the Triton kernels draw) and the
reference of every block, which is also the CPU kernel of the LoRA ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------- dropout mask (shared spec)


def threshold_of(p: float) -> int:
    """Keep an element when the top 24 bits of its random word are >= this."""
    return min(1 << 24, int(round(p * (1 << 24))))


def inv_keep_of(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0 else 1.0


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for int64 tensors holding uint32 values."""
    t1, t2 = a * (b >> 16), a * (b & 0xFFFF)
    low = ((t1 & 0xFFFF) << 16) + t2
    return ((t1 >> 16) + (low >> 32)) & _MASK32, low & _MASK32


def philox_reference(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: int):
    """Philox4x32-10 in PyTorch (int64 tensors holding uint32), the same words as ``_philox``."""
    k0, k1 = key & _MASK32, 0
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def keep_mask_reference(seed: int, rows: int, cols: int, slot: int, p: float,
                        device=None) -> Tensor:
    """The dropout keep-mask (bool [rows, cols]) the kernels use for ``seed`` and adapter slot."""
    q = torch.arange((cols + 3) // 4, dtype=torch.int64, device=device)
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c0 = q[None, :].expand(rows, -1)
    c1 = (r[:, None] & _MASK32).expand(-1, q.numel())
    words = philox_reference(c0, c1, torch.full_like(c0, slot), torch.zeros_like(c0), seed)
    u = torch.stack(words, dim=-1).reshape(rows, -1)[:, :cols]
    return (u >> 8) >= threshold_of(p)


# ---------------------------------------------------------------- PyTorch reference (CPU kernel)


def lora_down_reference(x2, a_cat, seed, p, ranks=None):
    xf, af = x2.float(), a_cat.float()
    if p == 0:
        return xf @ af.T
    M, K = x2.shape
    parts, lo = [], 0
    for j, r in enumerate(ranks or [a_cat.shape[0]]):
        keep = keep_mask_reference(int(seed.reshape(-1)[0]), M, K, j, p, x2.device)
        parts.append((xf * keep) @ af[lo:lo + r].T * inv_keep_of(p))
        lo += r
    return torch.cat(parts, 1)


def lora_up_reference(base2, xa, b, scale, out_dtype):
    return (base2.float() + scale * (xa @ b.float().T)).to(out_dtype)


def lora_grad_down_reference(g2, b, scale):
    return scale * (g2.float() @ b.float())


def lora_grad_b_reference(g2, xa, scale, out_dtype):
    return (scale * (g2.float().T @ xa)).to(out_dtype)


def lora_grad_x_reference(x2, da, a_cat, seed, p, dx=None, accumulate=False, need_da=True,
                          ranks=None):
    """Returns (dx or None, dA_cat float32 or None); dx, when given, is replaced, not written."""
    M, K = x2.shape
    xf, af = x2.float(), a_cat.float()
    dxl, da_parts, lo = torch.zeros(M, K, device=x2.device), [], 0
    for j, r in enumerate(ranks or [a_cat.shape[0]]):
        keep = (keep_mask_reference(int(seed.reshape(-1)[0]), M, K, j, p, x2.device) if p > 0
                else torch.ones(M, K, dtype=torch.bool, device=x2.device))
        dxl += (da[:, lo:lo + r] @ af[lo:lo + r]) * keep
        da_parts.append(da[:, lo:lo + r].T @ (xf * keep))
        lo += r
    out = None
    if dx is not None:
        out = (dxl * inv_keep_of(p) + (dx.float() if accumulate else 0)).to(dx.dtype)
    return out, (torch.cat(da_parts, 0) * inv_keep_of(p) if need_da else None)
