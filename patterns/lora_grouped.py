"""Grouped LoRA projections that share one input.

``lora_qkv``: the q, k and v projections of attention, all three LoRA'd, reading the same
hidden states. Becomes ``torch.ops.fastlora.lora_qkv``: one pass over x for the three adapters'
rank-r products, and one dx buffer (cuBLAS accumulates the three g @ W, one Triton pass adds the
adapters' part and computes the three dA) where the unfused graph makes three and adds them.

``lora_mlp``: the gated MLP of Llama/Mistral/Qwen (SwiGLU) and Gemma (GeGLU, tanh or exact GELU)
with LoRA on both gate_proj and up_proj, ``act(gate_proj(x)) * up_proj(x)`` with each projection
spelled as peft writes it (patterns/lora_linear.py). Becomes ``torch.ops.fastlora.lora_mlp``
(src/fastlora/kernels/lora_mlp.py): one pass over x for both adapters, the adapter
up-products fused into the activation, one dx buffer. down_proj stays a ``lora_linear``.

It runs before ``lora_linear`` (src/fastlora/stages.py) and before the plain ``swiglu`` /
``geglu`` patterns, which take over (with two ``lora_linear`` matches) wherever it does not
fit: different dropout probabilities on gate and up, trainable base weights, rounding it would
not reproduce. The spellings are generated from their axes (dropout, final cast, activation).
"""
import torch
import torch.nn.functional as F

from fastlora.pattern import Pattern, Reject, register_pattern, spelling_variants
from fastlora.patterns.lora_linear import (adapter_dtypes, autocast_inputs, cast, dropout_of,
                                           linear_of, make_seed, tidy)


def _branch(x, weight, bias, lora_A, lora_B, scale, p=None, training=None, cast=True):
    """One peft LoRA linear (helpers are inlined when a spelling is traced)."""
    result = F.linear(x, weight, bias)
    h = x.to(lora_A.dtype)
    if p is not None:
        h = F.dropout(h, p, training, False)
    out = result + F.linear(F.linear(h, lora_A), lora_B) * scale
    return out.to(weight.dtype) if cast else out


T = torch.Tensor


def make_gated_mlp(dropout: bool, final_cast: bool, activation: str):
    """``act(gate_proj(x)) * up_proj(x)``, both projections peft LoRA linears; ``activation`` is
    ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, its ``approximate`` captured)."""
    def spelling(x: T, g_weight: T, g_bias, g_lora_A: T, g_lora_B: T, g_scale: float,
                 u_weight: T, u_bias, u_lora_A: T, u_lora_B: T, u_scale: float,
                 approximate: str, g_p: float, g_training: bool, u_p: float, u_training: bool):
        g_drop, u_drop = ((g_p, g_training), (u_p, u_training)) if dropout else ((None, None),) * 2
        gate = _branch(x, g_weight, g_bias, g_lora_A, g_lora_B, g_scale, *g_drop, final_cast)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate=approximate)
        return act * _branch(x, u_weight, u_bias, u_lora_A, u_lora_B, u_scale, *u_drop, final_cast)
    return spelling


def _variant_name(prefix):
    return lambda dropout, final_cast: prefix + "_lora" + "_dropout" * dropout \
        + "_autocast" * (not final_cast)


MLP_SPELLINGS = spelling_variants(
    make_gated_mlp, lambda activation, **axes: _variant_name(
        {"silu": "swiglu", "gelu": "geglu"}[activation])(**axes),
    dropout=(False, True), final_cast=(True, False), activation=("silu", "gelu"))


NAMES = ("x", "g_weight", "g_bias", "g_lora_A", "g_lora_B", "u_weight", "u_bias", "u_lora_A",
         "u_lora_B")


def _check_branches(m, branches):
    """Shapes, frozen base weights, adapter casts and dropout of each branch sharing x; returns
    the sets of adapter cast settings and of dropout settings met (one of each is required)."""
    x = m.value("x")
    casts, drops = set(), set()
    for br in branches:
        w, a, b = m.value(br + "weight"), m.value(br + "lora_A"), m.value(br + "lora_B")
        if w.dim() != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] \
                or b.shape != (w.shape[0], a.shape[0]) or w.shape[1] != x.shape[-1]:
            raise Reject(f"{br}adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                         f"the base weight {tuple(w.shape)}")
        if w.requires_grad:
            raise Reject("a base weight is trainable; the grouped op keeps them frozen")
        casts.add(adapter_dtypes(m, br, linear_of(m, "weight", br)))
        drops.add(dropout_of(m, br))
    return casts, drops


def check_mlp(m):
    casts, drops = _check_branches(m, ("g_", "u_"))
    if m.value("g_weight").shape != m.value("u_weight").shape:
        raise Reject("gate_proj and up_proj have different shapes")
    if len(drops) != 1:
        raise Reject(f"gate and up adapters have different dropout {sorted(drops)}")
    if len(casts) != 1:
        raise Reject("gate and up ran in different autocast dtypes")
    if m.value("g_lora_A").dtype != m.value("u_lora_A").dtype:
        raise Reject("gate and up adapters are stored in different dtypes")
    mul = m.outputs[0]
    gate_node = next(a for a in mul.args if a.target in (F.silu, F.gelu))
    up_node = next(a for a in mul.args if a is not gate_node)
    dtypes = {m.output_value().dtype, gate_node.args[0].meta["example_value"].dtype,
              up_node.meta["example_value"].dtype}
    if len(dtypes) != 1:
        raise Reject(f"gate, up and the activation product have different dtypes "
                     f"{sorted(map(str, dtypes))}")
    if "approximate" in m.bindings:
        if m["approximate"] not in ("tanh", "none"):
            raise Reject(f"GELU approximation {m['approximate']!r} is not 'tanh' or 'none'")
        activation = "gelu_tanh" if m["approximate"] == "tanh" else "gelu"
    else:
        activation = "silu"
    cast_to = casts.pop()
    return tidy({"activation": activation, "out_dtype": m.output_value().dtype,
                 "cast_to": cast_to, "dropout": drops.pop(),
                 "autocast_inputs": autocast_inputs(m, cast_to, NAMES)})


def replacement_mlp(x, g_weight, g_bias, g_lora_A, g_lora_B, g_scale, u_weight, u_bias, u_lora_A,
                    u_lora_B, u_scale, activation, out_dtype, cast_to=None, dropout=0.0,
                    autocast_inputs=(), approximate=None, g_p=None, g_training=None, u_p=None,
                    u_training=None):
    t = dict(x=x, g_weight=g_weight, g_bias=g_bias, g_lora_A=g_lora_A, g_lora_B=g_lora_B,
             u_weight=u_weight, u_bias=u_bias, u_lora_A=u_lora_A, u_lora_B=u_lora_B)
    t = {k: cast(v, cast_to) if k in autocast_inputs else v for k, v in t.items()}
    seed = make_seed(dropout, t["g_lora_A"])
    return torch.ops.fastlora.lora_mlp(
        t["x"], t["g_weight"], t["g_bias"], t["g_lora_A"], t["g_lora_B"], t["u_weight"],
        t["u_bias"], t["u_lora_A"], t["u_lora_B"], seed, g_scale, u_scale, dropout, activation,
        out_dtype)[0]


register_pattern(Pattern(
    name="lora_mlp",
    spellings=MLP_SPELLINGS,
    check=check_mlp,
    replacement=replacement_mlp,
    stage="adapters",
    description="gated MLP (SwiGLU / GeGLU) with LoRA on gate_proj and up_proj, one fused op",
    builtin=True,
))


# ---------------------------------------------------------------- lora_qkv


def make_qkv(dropout: bool, final_cast: bool):
    """q_proj, k_proj and v_proj of one x, each a peft LoRA linear."""
    def spelling(x: T, q_weight: T, q_bias, q_lora_A: T, q_lora_B: T, q_scale: float,
                 k_weight: T, k_bias, k_lora_A: T, k_lora_B: T, k_scale: float, v_weight: T,
                 v_bias, v_lora_A: T, v_lora_B: T, v_scale: float, q_p: float,
                 q_training: bool, k_p: float, k_training: bool, v_p: float, v_training: bool):
        drops = ((q_p, q_training), (k_p, k_training), (v_p, v_training)) if dropout \
            else ((None, None),) * 3
        return (_branch(x, q_weight, q_bias, q_lora_A, q_lora_B, q_scale, *drops[0], final_cast),
                _branch(x, k_weight, k_bias, k_lora_A, k_lora_B, k_scale, *drops[1], final_cast),
                _branch(x, v_weight, v_bias, v_lora_A, v_lora_B, v_scale, *drops[2], final_cast))
    return spelling


QKV_SPELLINGS = spelling_variants(make_qkv, _variant_name("qkv"), dropout=(False, True),
                                  final_cast=(True, False))
QKV_NAMES = ("x",) + tuple(f"{b}_{n}" for b in "qkv"
                           for n in ("weight", "bias", "lora_A", "lora_B"))


def check_qkv(m):
    casts, drops = _check_branches(m, ("q_", "k_", "v_"))
    bases = [linear_of(m, "weight", br) for br in ("q_", "k_", "v_")]
    order = {n: i for i, n in enumerate(bases[0].graph.nodes)}
    if not order[bases[0]] < order[bases[1]] < order[bases[2]]:
        # the partner search may pair the branches in any order; take them in program order
        # so that dropout slot j is always the j-th projection the model computes
        raise Reject("branches matched out of program order (another pairing is tried)")
    if len(drops) != 1:
        raise Reject(f"the q, k, v adapters have different dropout {sorted(drops)}")
    if len(casts) != 1:
        raise Reject("q, k and v ran in different autocast dtypes")
    if len({m.value(f"{br}_lora_A").dtype for br in "qkv"}) != 1:
        raise Reject("the q, k, v adapters are stored in different dtypes")
    dtypes = {m.output_value(i).dtype for i in range(3)}
    if len(dtypes) != 1:
        raise Reject(f"q, k and v come out in different dtypes {sorted(map(str, dtypes))}")
    cast_to = casts.pop()
    return tidy({"out_dtype": dtypes.pop(), "cast_to": cast_to, "dropout": drops.pop(),
                 "autocast_inputs": autocast_inputs(m, cast_to, QKV_NAMES)})


def replacement_qkv(x, q_weight, q_bias, q_lora_A, q_lora_B, q_scale, k_weight, k_bias,
                    k_lora_A, k_lora_B, k_scale, v_weight, v_bias, v_lora_A, v_lora_B, v_scale,
                    out_dtype, cast_to=None, dropout=0.0, autocast_inputs=(), **_dropout_literals):
    t = dict(x=x, q_weight=q_weight, q_bias=q_bias, q_lora_A=q_lora_A, q_lora_B=q_lora_B,
             k_weight=k_weight, k_bias=k_bias, k_lora_A=k_lora_A, k_lora_B=k_lora_B,
             v_weight=v_weight, v_bias=v_bias, v_lora_A=v_lora_A, v_lora_B=v_lora_B)
    t = {k: cast(v, cast_to) if k in autocast_inputs else v for k, v in t.items()}
    seed = make_seed(dropout, t["q_lora_A"])
    out = torch.ops.fastlora.lora_qkv(*(t[n] for n in QKV_NAMES), seed, q_scale, k_scale,
                                      v_scale, dropout, out_dtype)
    return out[0], out[1], out[2]


register_pattern(Pattern(
    name="lora_qkv",
    spellings=QKV_SPELLINGS,
    check=check_qkv,
    replacement=replacement_qkv,
    stage="adapters",
    description="q, k, v projections all LoRA'd on one input, one fused op",
    builtin=True,
))
