"""Rotary position embedding of q and k, as HF models write it (``apply_rotary_pos_emb``).

    rotate_half(x) = cat((-x[..., h:], x[..., :h]), -1)
    q_embed = q * cos + rotate_half(q) * sin          k_embed likewise, with the same cos/sin

Spellings: the full rotation (Llama, Mistral, Qwen, Gemma, OLMo, ...); partial rotary (Phi-3,
Phi, StableLM, GPT-NeoX), where only the first ``rot`` features rotate and the rest are
concatenated back; Cohere's interleaved rotation of pairs (2i, 2i + 1), computed in float32;
GLM's interleaved partial rotation, in the model's dtype; Helium's full interleaved rotation in
the model's dtype; ERNIE 4.5's, whose pairs are swapped in the model's dtype and multiplied in
float32 by float32 cos/sin; GPT-OSS's rotation of the two halves with cos/sin of one half
(``rope_halves``: rotate_half written out, the replacement repeats cos/sin for the kernel).
q and k become one call of ``torch.ops.fastlora.rope`` (src/fastlora/kernels/rope.py). cos/sin
(already unsqueezed to [B, 1, T, R]) are read per (batch, token), so packed sequences (position
ids restarting inside a row) are handled as they come.

Near misses: a q rotated without a k beside it (one-output rotations are left alone), cos/sin
that would broadcast q to a larger shape, and other rotation spellings.
"""
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.pattern import Pattern, Reject, register_pattern

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def rope_rotate_half(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     half: int):
    q_embed = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
    k_embed = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
    return q_embed, k_embed


def rope_partial_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        rot: int, half: int):
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = q_rot * cos + torch.cat((-q_rot[..., half:], q_rot[..., :half]), -1) * sin
    k_embed = k_rot * cos + torch.cat((-k_rot[..., half:], k_rot[..., :half]), -1) * sin
    return torch.cat((q_embed, q_pass), -1), torch.cat((k_embed, k_pass), -1)


def rope_interleaved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    qf, kf = q.to(torch.float32), k.to(torch.float32)
    q_rotated = torch.stack([-qf[..., 1::2], qf[..., ::2]], dim=-1).flatten(-2)
    k_rotated = torch.stack([-kf[..., 1::2], kf[..., ::2]], dim=-1).flatten(-2)
    return (qf * cos + q_rotated * sin).to(q.dtype), (kf * cos + k_rotated * sin).to(k.dtype)


def rope_interleaved_partial(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, rot: int):
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rotated = torch.stack((-q_rot[..., 1::2], q_rot[..., ::2]), dim=-1).flatten(-2)
    k_rotated = torch.stack((-k_rot[..., 1::2], k_rot[..., ::2]), dim=-1).flatten(-2)
    q_embed, k_embed = q_rot * cos + q_rotated * sin, k_rot * cos + k_rotated * sin
    return torch.cat((q_embed, q_pass), -1), torch.cat((k_embed, k_pass), -1)


def rope_interleaved_model_dtype(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                                 sin: torch.Tensor):
    q_rotated = torch.stack([-q[..., 1::2], q[..., ::2]], dim=-1).flatten(-2)
    k_rotated = torch.stack([-k[..., 1::2], k[..., ::2]], dim=-1).flatten(-2)
    return q * cos + q_rotated * sin, k * cos + k_rotated * sin


def rope_interleaved_rotated_first(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                                   sin: torch.Tensor):
    q_rotated = torch.stack([-q[..., 1::2], q[..., ::2]], dim=-1).flatten(-2)
    k_rotated = torch.stack([-k[..., 1::2], k[..., ::2]], dim=-1).flatten(-2)
    return ((q.float() * cos + q_rotated.float() * sin).to(q.dtype),
            (k.float() * cos + k_rotated.float() * sin).to(k.dtype))


def rope_halves(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    q1, q2 = torch.chunk(q, 2, dim=-1)
    k1, k2 = torch.chunk(k, 2, dim=-1)
    return (torch.cat((q1 * cos - q2 * sin, q2 * cos + q1 * sin), dim=-1),
            torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1))


INTERLEAVED = ("rope_interleaved", "rope_interleaved_partial", "rope_interleaved_model_dtype",
               "rope_interleaved_rotated_first")
# Spellings that compute in float32 and cast back to q's and k's dtypes, whatever cos/sin's dtype
# (ERNIE 4.5 keeps cos/sin in float32); the op returns the promoted dtype, so the replacement
# casts back as the model does (after one float32 rounding, where the model rounds the same way).
CAST_BACK = ("rope_interleaved", "rope_interleaved_rotated_first")


def _known(cond) -> bool:
    return statically_known_true(cond)


def check(m):
    q, k, cos, sin = (m.value(n) for n in ("q", "k", "cos", "sin"))
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in FLOATS:
            raise Reject(f"{name} has dtype {t.dtype}, not float32, bfloat16 or float16")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise Reject("q, k, cos and sin are not all on one device")
    if not (2 <= q.dim() <= 4 and k.dim() == q.dim()):
        raise Reject(f"q and k have {q.dim()} and {k.dim()} dimensions; the kernel takes 2 to 4")
    d = q.shape[-1]
    rot = m["rot"] if "rot" in m.bindings else d
    if not _known(k.shape[-1] == d):
        raise Reject(f"q and k head sizes differ ({d} vs {k.shape[-1]})")
    per_half = m.spelling == "rope_halves"  # cos/sin of one half, the same for both halves
    features = rot // 2 if per_half else rot
    if not (_known(cos.shape[-1] == features) and _known(sin.shape[-1] == features)):
        raise Reject(f"cos/sin have {cos.shape[-1]}/{sin.shape[-1]} features where {rot} rotate")
    if not (isinstance(rot, int) and 0 < rot <= d and rot % 2 == 0):
        raise Reject(f"{rot} rotated features of {d}: not an even count")
    if "half" in m.bindings and 2 * m["half"] != rot:
        raise Reject(f"the halves are split at {m['half']} but {rot} features rotate: "
                     f"not rotate_half")
    if cos.dim() > q.dim() or tuple(cos.shape) != tuple(sin.shape):
        raise Reject(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape or "
                     f"have more dimensions than q")
    for name, x in (("q", q), ("k", k)):
        for c, size in zip(reversed(cos.shape[:-1]), reversed(x.shape[:-1])):
            if not (_known(c == 1) or _known(c == size)):
                raise Reject(f"cos/sin of shape {tuple(cos.shape)} would broadcast {name} of "
                             f"shape {tuple(x.shape)}; the kernel rotates each {name} vector once")
    # cos/sin that require grad are fine: the op's backward then returns their gradients too.
    promoted = torch.promote_types(cos.dtype, sin.dtype)  # what the op returns, for q and k
    cast_back = m.spelling in CAST_BACK and (torch.promote_types(q.dtype, promoted) != q.dtype or
                                             torch.promote_types(k.dtype, promoted) != k.dtype)
    return {"rot_dim": int(rot), "interleaved": m.spelling in INTERLEAVED,
            "out_dtypes": (q.dtype, k.dtype) if cast_back else None, "per_half": per_half}


def replacement(q, k, cos, sin, rot_dim, interleaved, out_dtypes=None, per_half=False,
                half=None, rot=None):
    if per_half:  # the kernel's cos/sin cover both halves (rotate_half's layout)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    out = torch.ops.fastlora.rope(q, k, cos, sin, rot_dim, interleaved)
    if out_dtypes is not None:
        cast = torch.ops.aten._to_copy.default  # a call_function node, as the rewriter records
        return cast(out[0], dtype=out_dtypes[0]), cast(out[1], dtype=out_dtypes[1])
    return out[0], out[1]  # indexed, so that a traced call gives one graph value per output


register_pattern(Pattern(
    name="rope",
    # GLM's partial rotation also contains a full interleaved one (of the rotated slice, float32
    # casts absent in an fp32 model), of the same size: listed first, it wins that tie.
    spellings=[rope_rotate_half, rope_partial_rotary, rope_interleaved_partial,
               rope_interleaved, rope_interleaved_model_dtype, rope_interleaved_rotated_first,
               rope_halves],
    check=check,
    replacement=replacement,
    anchor=torch.neg,
    description="rotary position embedding of q and k (HF rotate_half, partial rotary, "
                "interleaved pairs, also partial)",
    builtin=True,
))
