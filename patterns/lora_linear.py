"""LoRA linear: peft's ``lora.Linear`` forward, ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

Becomes ``torch.ops.fastlora.lora_linear`` (src/fastlora/kernels/lora_linear.py): the base GEMM
stays one cuBLAS call, the adapter runs on tensor cores at float32 accuracy without a float32
copy of x, and the backward computes dx, dA, dB only (dW and dbias only if they require grad).

Spellings, as peft writes them (transformers 5, peft 0.21):

    result = F.linear(x, W, bias)
    x = x.to(lora_A.weight.dtype)             # float32 adapters on a bf16 model
    result = result + lora_B(lora_A(dropout(x))) * scaling
    result = result.to(torch_result_dtype)

with or without the dropout node (peft uses nn.Identity for p = 0), and with or without the final
cast (under torch.autocast it is a no-op and gone). A second family matches the adapter on any
precomputed base output (a bitsandbytes 8-bit matmul, a second adapter on the same layer),
including peft's bitsandbytes spelling that rounds the adapter output before the add.
An adapter stored in a narrower dtype than x (bf16 adapters on float32 activations) reads x
rounded, which the base does not: it is fused on the base output, given the rounded x.
rsLoRA changes only the scaling literal. Under torch.autocast the fused op runs in the autocast
dtype, as the unfused linears do.
"""
import torch
import torch.nn.functional as F

from fastlora.canonicalize import example_value
from fastlora.report import module_path, per_graph
from fastlora.pattern import Pattern, Reject, register_pattern, spelling_variants

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def make_peft_lora(dropout: bool, final_cast: bool):
    """peft's ``lora.Linear``: the adapter on this layer's own base linear."""
    def spelling(x: torch.Tensor, weight: torch.Tensor, bias, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, p: float, training: bool):
        result = F.linear(x, weight, bias)
        h = x.to(lora_A.dtype)
        if dropout:
            h = F.dropout(h, p, training, False)
        out = result + F.linear(F.linear(h, lora_A), lora_B) * scale
        return out.to(weight.dtype) if final_cast else out
    return spelling


def make_adapter_on_base(dropout: bool, rounding: str):
    """The adapter on a base output computed elsewhere (a bitsandbytes 8-bit matmul, a second
    adapter on the same layer). ``rounding``: where the sum is cast back to the base dtype,
    ``"after"`` the add (peft's ``lora.Linear``), ``"before"`` it (peft's bitsandbytes layers
    round the adapter output first) or ``"none"`` (under autocast)."""
    def spelling(base: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, p: float, training: bool):
        h = x.to(lora_A.dtype)
        if dropout:
            h = F.dropout(h, p, training, False)
        lora = F.linear(F.linear(h, lora_A), lora_B) * scale
        if rounding == "before":
            return base + lora.to(base.dtype)
        return (base + lora).to(base.dtype) if rounding == "after" else base + lora
    return spelling


PEFT_LORA = spelling_variants(
    make_peft_lora, lambda dropout, final_cast: "peft_lora" + "_dropout" * dropout
    + "_autocast" * (not final_cast), dropout=(False, True), final_cast=(True, False))
ON_BASE = spelling_variants(
    make_adapter_on_base, lambda dropout, rounding: {
        "after": "adapter_on_base", "none": "adapter_on_base", "before": "adapter_cast_then_add"
    }[rounding] + "_dropout" * dropout + "_uncast" * (rounding == "none"),
    dropout=(False, True), rounding=("after", "none", "before"))
SPELLINGS = PEFT_LORA + ON_BASE


# ---------------------------------------------------------------- helpers shared by the LoRA files


def linear_of(m, weight_name: str, prefix: str = ""):
    """The matched graph ``F.linear`` node whose weight is the spelling input ``weight_name``."""
    for p, node in m.node_map.items():
        if getattr(p, "target", None) is F.linear and len(p.args) > 1 \
                and getattr(p.args[1], "target", None) == prefix + weight_name:
            return node
    raise Reject(f"internal: no linear of `{prefix + weight_name}` in the match")


def dropout_of(m, prefix: str = "") -> float:
    """The dropout probability the adapter applies (0 in eval mode); Reject if unsupported."""
    if prefix + "p" not in m.bindings:
        return 0.0
    p, training = m[prefix + "p"], m[prefix + "training"]
    if not training or p == 0:
        return 0.0
    if not 0.0 < p < 1.0:
        raise Reject(f"dropout probability {p} is not in (0, 1)")
    return float(p)


def adapter_dtypes(m, prefix: str = "", base_linear=None):
    """The torch.autocast dtype the linears ran in (None without autocast). Rejects dtype
    combinations whose rounding the fused op would not reproduce."""
    x, a, b = m.value("x"), m.value(prefix + "lora_A"), m.value(prefix + "lora_B")
    for name, v in (("x", x), ("lora_A", a), ("lora_B", b)):
        if not isinstance(v, torch.Tensor) or v.dtype not in FLOATS:
            raise Reject(f"{name} is not a float32/bfloat16/float16 tensor")
    lora_dtype = example_value(linear_of(m, "lora_A", prefix)).dtype
    dtypes = {lora_dtype}
    weight = None
    if base_linear is not None:
        weight = m.value(prefix + "weight")
        dtypes.add(example_value(base_linear).dtype)
    autocast = lora_dtype != a.dtype or (weight is not None and (
        example_value(base_linear).dtype != weight.dtype or weight.dtype != x.dtype))
    if autocast:
        if len(dtypes) != 1:
            raise Reject(f"under autocast the base and adapter linears ran in different dtypes "
                         f"{sorted(map(str, dtypes))}")
        return lora_dtype
    if a.dtype != b.dtype:
        raise Reject(f"lora_A is {a.dtype} but lora_B is {b.dtype}")
    if a.dtype != x.dtype and a.dtype != torch.float32:
        raise Reject(f"the adapter rounds its {x.dtype} input to {a.dtype} (adapter weights "
                     f"stored in lower precision than the activations); not fused")
    return None


def rounded_input(m):
    """The dtype the adapter rounded x to before its linears, when it ran in its weights'
    narrower dtype (None otherwise): TRL stores a quantized model's adapters in bfloat16 while
    peft's kbit preparation keeps activations float32, so peft casts x (or torch.autocast does).
    On a base output computed elsewhere the adapter alone reads x, and the op reproduces that
    rounding when it is given the cast x (its products then stay in float32)."""
    x, a, b = m.value("x"), m.value("lora_A"), m.value("lora_B")
    if not all(isinstance(v, torch.Tensor) and v.dtype in FLOATS for v in (x, a, b)):
        return None
    ran_in = example_value(linear_of(m, "lora_A")).dtype
    narrower = torch.finfo(a.dtype).bits <= torch.finfo(x.dtype).bits
    return a.dtype if a.dtype == b.dtype == ran_in != x.dtype and narrower else None


def autocast_inputs(m, cast_to, names) -> list:
    """The inputs (of ``names``) that torch.autocast would have cast to ``cast_to``."""
    if cast_to is None:
        return []
    return [n for n in names if isinstance(m.bindings.get(n), torch.fx.Node)
            and m.value(n).dtype != cast_to]


def tidy(params: dict) -> dict:
    """Drop the autocast entries when there was no autocast (they would only clutter the report)."""
    if params.get("cast_to") is None:
        params.pop("cast_to", None)
        params.pop("autocast_inputs", None)
    return params


def cast(t, dtype):
    """A dtype cast the rewriter can record (a function call, not a Tensor method)."""
    return torch.ops.aten._to_copy.default(t, dtype=dtype)


def make_seed(dropout: float, like: torch.Tensor):
    """One int64 seed per call, drawn by the graph itself from torch's generator for ``like``'s
    device (a graph value, so that the draw is traced as a random op, not frozen as a constant;
    the partitioner then saves it for backward instead of recomputing it)."""
    if dropout == 0:
        return None
    return torch.randint_like(torch.flatten(like)[:1], 0, 2 ** 31 - 1, dtype=torch.int64)


def explain_lora_near_miss(node, refusal):
    """Near misses are reported at the lora_A product of an adapter that stayed unfused."""
    path, classes = module_path(node)
    if ".lora_A." not in "." + path + ".":
        return None  # a linear that is not a LoRA adapter's A product
    layer = path.split(".lora_A")[0]
    dora_ops, lora_a_paths = per_graph(node.graph, "lora_adapters", _adapter_facts)
    if any("Dora" in c for c in classes) or dora_ops:
        return ("DoRA adapter (use_dora=True): its weight-norm and magnitude rescaling of the "
                "base output are not fused; this layer runs unfused (exact, only not faster)")
    siblings = {p for p in lora_a_paths if p.startswith(layer + ".lora_A.")}
    if len(siblings) > 1:
        return (f"{len(siblings)} adapters are active on `{layer}` at once; adapters after the "
                f"first are fused on their own only when they share no cast of x "
                f"({refusal.reason})")
    return refusal.reason


def _adapter_facts(graph) -> tuple[bool, frozenset[str]]:
    """(whether the graph computes DoRA's norms, the module paths of its lora_A products)."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    dora_ops = any(getattr(n.target, "__name__", "") in ("linalg_norm", "eye") for n in calls)
    return dora_ops, frozenset(p for p in (module_path(n)[0] for n in calls if n.target is F.linear)
                               if ".lora_A." in "." + p + ".")


# ---------------------------------------------------------------- the pattern


def check(m):
    x = m.value("x")
    a, b = m.value("lora_A"), m.value("lora_B")
    base_linear = linear_of(m, "weight") if "weight" in m.bindings else None
    rounded = rounded_input(m) if base_linear is None else None
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or b.shape[1] != a.shape[0]:
        raise Reject(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not form a rank-r "
                     f"adapter for inputs of width {x.shape[-1]}")
    if base_linear is not None:
        w = m.value("weight")
        if w.dim() != 2 or w.shape[0] != b.shape[0]:
            raise Reject(f"base weight {tuple(w.shape)} and lora_B {tuple(b.shape)} disagree")
    else:
        base = m.value("base")
        if base.dtype not in FLOATS:
            raise Reject(f"base output has dtype {base.dtype}")
        producer = m["base"]
        if producer.op == "call_function" and producer.target is F.linear \
                and producer.args[0] is m["x"] and rounded is None:
            # the adapter's own base linear: the peft_lora spellings fuse it with the adapter
            # (they are tried after this smaller spelling when the final cast is absent); not
            # when only the adapter rounds x, which one op over both cannot do
            raise Reject("the base is this adapter's own linear; left to the peft_lora spellings")
    devices = {v.device for v in (x, a, b)}
    if len(devices) != 1:
        raise Reject(f"inputs on several devices {sorted(map(str, devices))}")
    cast_to = rounded or adapter_dtypes(m, base_linear=base_linear)
    p = dropout_of(m)
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    return tidy({"out_dtype": m.output_value().dtype, "cast_to": cast_to, "dropout": p,
                 "autocast_inputs": autocast_inputs(m, cast_to, names)})


def replacement(x, lora_A, lora_B, scale, weight=None, bias=None, base=None, p=0.0,
                training=False, out_dtype=None, cast_to=None, dropout=0.0, autocast_inputs=()):
    # the linears ran in cast_to (torch.autocast, or the adapter's own cast of x on a base
    # computed elsewhere): cast what was cast
    x = cast(x, cast_to) if "x" in autocast_inputs else x
    weight = cast(weight, cast_to) if "weight" in autocast_inputs else weight
    bias = cast(bias, cast_to) if "bias" in autocast_inputs else bias
    lora_A = cast(lora_A, cast_to) if "lora_A" in autocast_inputs else lora_A
    lora_B = cast(lora_B, cast_to) if "lora_B" in autocast_inputs else lora_B
    seed = make_seed(dropout, lora_A)
    return torch.ops.fastlora.lora_linear(x, weight, bias, base, lora_A, lora_B, seed, scale,
                                          dropout, out_dtype)[0]


register_pattern(Pattern(
    name="lora_linear",
    spellings=SPELLINGS,
    check=check,
    replacement=replacement,
    anchor=F.linear,
    explain_near_miss=explain_lora_near_miss,
    stage="adapters",
    description="peft LoRA linear (dropout, bias, rsLoRA, autocast; adapter on any base output)",
    builtin=True,
))
