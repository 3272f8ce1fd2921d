"""LoRA on MoE expert weights (peft ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])``): the grouped expert product with the merged weight.

What the graph holds (transformers 5 ``grouped_mm`` experts forward, peft 0.21 ``ParamWrapper``
with one adapter; docs/lora.md, "LoRA on MoE experts"): peft's parametrization merges the
adapter into the 3-D weight, and the experts forward multiplies the expert-sorted rows with it:

    merged = torch.baddbmm(W, lhs, rhs, alpha=s)       # W + s * lhs @ rhs, [E, P, Q]
    y = grouped_mm(x, merged.transpose(-2, -1), offs)  # W stored [E, out, in] (Qwen3-MoE, Mixtral)
    y = grouped_mm(x, merged, offs)                    # W stored [E, in, out] (gpt-oss)

where grouped_mm is ``torch._grouped_mm`` (bfloat16 under torch.compile) or transformers' own
``torch.ops.transformers.grouped_mm_fallback`` (other dtypes). Both become
``torch.ops.fastlora.lora_moe_experts`` (src/fastlora/kernels/lora_moe_experts.py), which never
forms the merged weight for the product, nor its E x out x in gradient.

peft computes ``merged`` inside ``nn.utils.parametrize.cached()``, so Dynamo returns it from the
graph to fill that cache: the spellings ending in ``_cached`` have it as a second output, and the
replacement still computes it for that reader (the product and the backward do not use it).
"""
import torch

import fastlora.kernels  # noqa: F401  (registers the ops named below)
from fastlora.matcher import describe
from fastlora.pattern import Pattern, Reject, register_pattern

try:  # registers torch.ops.transformers.grouped_mm_fallback
    import transformers.integrations.moe  # noqa: F401
    HAVE_FALLBACK = hasattr(torch.ops.transformers, "grouped_mm_fallback")
except ImportError:  # an older transformers: only torch._grouped_mm
    HAVE_FALLBACK = False

T = torch.Tensor
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _fallback_mm(x, weight, offs):
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offs=offs)


def _grouped_mm(x, weight, offs):  # torch.nn.functional.grouped_mm's call
    return torch._grouped_mm(x, weight, offs=offs, bias=None, out_dtype=None)


def _grouped_mm_plain(x, weight, offs):  # transformers' call where F.grouped_mm is missing
    return torch._grouped_mm(x, weight, offs=offs)


def _spelling(mm, transposed: bool, cached: bool):
    """One spelling per product op x weight orientation x whether ``merged`` is also read
    elsewhere (the parametrization cache)."""
    def spelling(x: T, weight: T, lhs: T, rhs: T, offs: T, scale: float):
        merged = torch.baddbmm(weight, lhs, rhs, alpha=scale)
        y = mm(x, merged.transpose(-2, -1) if transposed else merged, offs)
        return (y, merged) if cached else y
    orientation = "out_in" if transposed else "in_out"
    spelling.__name__ = f"{mm.__name__.strip('_')}_{orientation}{'_cached' if cached else ''}"
    return spelling


_MMS = [_grouped_mm, _grouped_mm_plain] + ([_fallback_mm] if HAVE_FALLBACK else [])
# Cached spellings first (their refusals are the ones the report shows); where merged has no
# other reader, check refuses them last and the uncached one, which does not recompute it, fits.
SPELLINGS = [_spelling(mm, transposed, cached) for cached in (True, False)
             for mm in _MMS for transposed in (True, False)]


def check(m):
    x, weight, lhs, rhs, offs = (m.value(n) for n in ("x", "weight", "lhs", "rhs", "offs"))
    if weight.requires_grad:
        raise Reject("the expert weight itself is trainable (not only its LoRA adapter); the "
                     "fused op keeps it frozen")
    dtypes = {x.dtype, weight.dtype, lhs.dtype, rhs.dtype}
    if len(dtypes) != 1 or x.dtype not in FLOATS:
        raise Reject(f"x ({x.dtype}), the expert weight ({weight.dtype}) and the LoRA factors "
                     f"({lhs.dtype}, {rhs.dtype}) do not share one float dtype")
    if x.dim() != 2 or weight.dim() != 3 or offs.dim() != 1 or offs.shape[0] != weight.shape[0] \
            or offs.dtype not in (torch.int32, torch.int64):
        raise Reject(f"not a grouped expert product: x {tuple(x.shape)}, weight "
                     f"{tuple(weight.shape)}, offs {offs.dtype} {tuple(offs.shape)}")
    cached = m.spelling.endswith("_cached")
    if cached and all(u in m.region for u in m.outputs[1].users):
        raise Reject("the merged weight has no reader outside the product")
    return {"transposed": "_out_in" in m.spelling, "cached": cached}


def replacement(x, weight, lhs, rhs, offs, scale, transposed, cached):
    y = torch.ops.fastlora.lora_moe_experts(x, weight, lhs, rhs, offs, float(scale),
                                            transposed)[0]
    if not cached:
        return y
    # For the parametrization cache. peft merges with autocast off, and the graph says so
    # around its baddbmm, where this one is inserted (before the first output, after every
    # input); the context here only makes the replacement check see the dtype the run gets.
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return y, torch.baddbmm(weight, lhs, rhs, alpha=scale)


_PRODUCTS = (torch._grouped_mm,) + ((torch.ops.transformers.grouped_mm_fallback,)
                                    if HAVE_FALLBACK else ())


def _readers(node):
    """What reads the merged weight, through a transpose; the graph output (the parametrization
    cache) left out."""
    readers = [u for u in node.users if u.op != "output"]
    return [v for u in readers for v in (u.users if u.target is torch.transpose else [u])
            if v.op != "output"]


def _is_peft_merge(node) -> bool:
    """The baddbmm of peft's parametrization (``_LoraFactorsProxy``), not one of model code."""
    stack = node.meta.get("nn_module_stack") or {}
    return any("LoraFactorsProxy" in str(entry) for entry in stack.values()) \
        or "peft/tuners/lora" in (node.meta.get("stack_trace") or "")


def explain_near_miss(node, refusal):
    """Only peft's merge is a near miss, and only where something reads it: a baddbmm read by
    nothing but the graph output is peft evaluating the parametrization once more when it
    registers it, in a graph of its own."""
    readers = _readers(node)
    if not readers or not _is_peft_merge(node):
        return None
    if not any(r.target in _PRODUCTS for r in readers):
        return (f"peft's merged expert weight {describe(node)} is read by "
                f"{describe(readers[0])}, not by a grouped expert product: only transformers' "
                f"experts_implementation='grouped_mm' (the default) is fused")
    return f"peft's merged expert weight {describe(node)} stays: {refusal.reason}"


register_pattern(Pattern(
    name="lora_moe_experts",
    spellings=SPELLINGS,
    check=check,
    replacement=replacement,
    anchor=torch.baddbmm,
    explain_near_miss=explain_near_miss,
    stage="adapters",
    description="LoRA on 3-D MoE expert weights (peft target_parameters) in the grouped expert "
                "product, without the merged weight",
    builtin=True,
))
