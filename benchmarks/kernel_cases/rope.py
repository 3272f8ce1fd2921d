"""RoPE (HF rotate_half, and partial rotary) on Llama-3-8B / 1B / Phi-4-mini-like attention.

The timed case rotates q and k as one tensor of Hq + Hk heads ([B, T, H, D] projections viewed
as [B, H, T, D], as HF passes them): the eager function is HF's formula on that tensor, the
fused call passes it as q with an empty k. Same bytes as rotating q and k separately, and one
launch either way; eager and inductor get the single-tensor form, a little kinder to them than
HF's two separate rotations. A forward-only case times the real two-output call.
"""
import torch

from . import Case


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def eager(qk, cos, sin):
    rot = cos.shape[-1]
    if rot == qk.shape[-1]:
        return qk * cos + rotate_half(qk) * sin
    x, rest = qk[..., :rot], qk[..., rot:]
    return torch.cat((x * cos + rotate_half(x) * sin, rest), -1)


def fused(qk, cos, sin):
    return torch.ops.fastlora.rope(qk, qk[:, :0], cos, sin, cos.shape[-1], False)[0]


def eager_q_k(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fused_q_k(q, k, cos, sin):
    return torch.ops.fastlora.rope(q, k, cos, sin, cos.shape[-1], False)


def _tables(B, T, rot, dtype):
    pos = torch.arange(T, device="cuda").expand(B, T)
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def cases(dtype=torch.bfloat16):
    e = torch.tensor([], dtype=dtype).element_size()
    out = []
    for name, B, T, Hq, Hk, D, rot in (("8B", 4, 2048, 32, 8, 128, 128),
                                       ("1B", 4, 2048, 32, 8, 64, 64),
                                       ("partial", 4, 2048, 24, 8, 128, 96)):
        def make(B=B, T=T, H=Hq + Hk, D=D, rot=rot):
            base = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
            cos, sin = _tables(B, T, rot, dtype)
            return {"qk": base.transpose(1, 2), "cos": cos, "sin": sin}

        n = B * (Hq + Hk) * T * D
        trig = 2 * B * T * rot * e
        out.append(Case("rope", f"{name} {B}x{T} {Hq}+{Hk}h d{D} r{rot} {str(dtype)[6:]}",
                        make, eager, fused, bytes_fwd=2 * n * e + trig,
                        bytes_bwd=2 * n * e + trig))

    def make_q_k(B=4, T=2048, D=128):
        q = torch.randn(B, T, 32, D, device="cuda", dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, 8, D, device="cuda", dtype=dtype).transpose(1, 2)
        cos, sin = _tables(B, T, D, dtype)
        return {"q": q, "k": k, "cos": cos, "sin": sin}

    n = 4 * 40 * 2048 * 128
    out.append(Case("rope", f"8B q,k two outputs {str(dtype)[6:]}", make_q_k, eager_q_k,
                    fused_q_k, bytes_fwd=2 * n * e + 2 * 4 * 2048 * 128 * e, backward=False))
    return out
