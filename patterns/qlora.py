"""QLoRA: a LoRA adapter on a bitsandbytes 4-bit base layer (``Linear4bit``, NF4 or FP4, with or
without double quantization), the base matmul and the adapter fused into one op.

Becomes ``torch.ops.fastlora.lora_linear_4bit`` (src/fastlora/kernels/lora_linear_4bit.py), which
dequantizes W in Triton into a buffer that lives only during the call, in forward and again in
backward (for dx), and never computes a gradient for it.

The base matmul appears in the Dynamo graph in one of two forms (bitsandbytes 0.50):
- ``torch.ops.bitsandbytes.gemm_4bit.default(x, W.view(-1, 1), shape, absmax, blocksize,
  quant_type, bias=..., absmax_8bit=..., absmax_code=..., absmax_offset=...)`` when x does not
  require grad (bitsandbytes' no-autograd path);
- ``higher_order.autograd_function_apply(fwd_body, bwd_body, *operands)[0]`` (bitsandbytes'
  ``MatMul4Bit``) otherwise; its forward body makes that same ``gemm_4bit`` call on its
  placeholders, which map in order to the operands. The quant-state tensors are placeholders.

After peft's ``prepare_model_for_kbit_training`` (float32 norms and embeddings, so float32
activations), ``Linear4bit`` casts x to its compute dtype and the result back:
``gemm(x.to(bfloat16), ...).to(float32)``; both casts belong to the match, and the fused op
runs its base matmul in the compute dtype the same way. TRL's SFTTrainer also casts a quantized
model's adapters to bfloat16; base and adapter then both read ``x.to(bfloat16)``, and so does
the op (its float32 output is the model's).

The adapter around it is peft's: either ``lora.Linear``'s spelling (``(base + lora * s).to(dtype)``)
or ``lora.bnb.Linear4bit``'s (``base.clone() + (lora * s).to(dtype)``), with optional dropout.
bitsandbytes 8-bit (``Linear8bitLt``) is not fused here: its int8 matmul stays bitsandbytes',
and the ``lora_linear`` pattern fuses the adapter on its output.
"""
import operator

import torch
import torch.nn.functional as F

from fastlora.canonicalize import CAST, example_value
from fastlora.kernels.lora_linear_4bit import code_table
from fastlora.matcher import describe
from fastlora.pattern import Pattern, Reject, register_pattern, spelling_variants
from fastlora.patterns.lora_linear import (FLOATS, ON_BASE, adapter_dtypes, cast, dropout_of,
                                           explain_lora_near_miss, linear_of, make_seed,
                                           rounded_input)
from fastlora.report import module_path, per_graph

try:
    GEMM_4BIT = torch.ops.bitsandbytes.gemm_4bit.default
except (AttributeError, RuntimeError):  # bitsandbytes not imported: the op is not registered
    GEMM_4BIT = None
HOP = getattr(torch.ops.higher_order, "autograd_function_apply", None)


def make_peft_bnb_4bit(dropout: bool, autocast: bool):
    """peft's ``lora.bnb.Linear4bit``: the adapter output rounded to the base dtype and added to
    a clone of the 4-bit matmul's output. Under CUDA's torch.autocast (a Trainer with bf16=True)
    peft casts neither x nor the adapter output: autocast runs both adapter linears in its
    dtype and the sum promotes (``autocast``)."""
    def spelling(base: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, p: float, training: bool):
        h = x if autocast else x.to(lora_A.dtype)
        if dropout:
            h = F.dropout(h, p, training, False)
        lora = F.linear(F.linear(h, lora_A), lora_B) * scale
        return base.clone() + (lora if autocast else lora.to(base.dtype))
    return spelling


# peft's lora.Linear spelling on the same base: adapter_on_base and adapter_on_base_dropout
SPELLINGS = spelling_variants(
    make_peft_bnb_4bit,
    lambda dropout, autocast: "peft_bnb_4bit" + "_dropout" * dropout + "_autocast" * autocast,
    dropout=(False, True), autocast=(False, True)) + ON_BASE[:2]


def _gemm_4bit():
    global GEMM_4BIT
    if GEMM_4BIT is None:
        try:
            GEMM_4BIT = torch.ops.bitsandbytes.gemm_4bit.default
        except (AttributeError, RuntimeError):
            return None
    return GEMM_4BIT


def _is_cast(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is CAST


def _quantized_base(base: torch.fx.Node):
    """(gemm call, {gemm placeholder or arg -> outer graph value}, extra region nodes) for the
    node that computes the base output, or a Reject saying what it is instead. A cast of the
    matmul's output (Linear4bit's ``.to(x.dtype)``) is part of the base."""
    if _is_cast(base) and isinstance(base.args[0], torch.fx.Node) \
            and len(base.args[0].users) == 1:
        gemm, outer, extra = _quantized_base(base.args[0])
        return gemm, outer, extra + [base]
    gemm_op = _gemm_4bit()
    if base.op == "call_function" and gemm_op is not None and base.target is gemm_op:
        return base, (lambda v: v), [base]
    if not (base.op == "call_function" and base.target is operator.getitem
            and base.args[1] == 0 and isinstance(base.args[0], torch.fx.Node)
            and base.args[0].target is HOP):
        raise Reject("the base output is not a bitsandbytes 4-bit matmul")
    hop = base.args[0]
    owner = base.graph.owning_module
    fwd_body = getattr(owner, hop.args[0].target, None)
    calls = [n for n in fwd_body.graph.nodes if n.op == "call_function"] if fwd_body else []
    gemm = [n for n in calls if gemm_op is not None and n.target is gemm_op]
    if len(gemm) != 1:
        names = " ".join(str(n.target) for n in calls)
        if "int8" in names or "8bit" in names:
            raise Reject("the base layer is bitsandbytes 8-bit (Linear8bitLt): its int8 matmul "
                         "stays bitsandbytes'; lora_linear fuses the adapter on its output")
        raise Reject("the base is an autograd.Function that is not bitsandbytes' MatMul4Bit")
    out_node = next(n for n in fwd_body.graph.nodes if n.op == "output")
    if not (isinstance(out_node.args[0], (tuple, list)) and out_node.args[0]
            and isinstance(out_node.args[0][0], (tuple, list))
            and out_node.args[0][0][0] is gemm[0]):
        raise Reject("the 4-bit autograd.Function does not return its gemm_4bit result first")
    placeholders = [n for n in fwd_body.graph.nodes if n.op == "placeholder"]
    operands = dict(zip(placeholders, hop.args[2:]))

    def outer(v):
        if isinstance(v, torch.fx.Node) and v.op == "call_function" \
                and v.target is torch.Tensor.view and v.args[0] in operands:
            v = v.args[0]  # B.view(-1, 1) inside the body: the operand itself
        if isinstance(v, torch.fx.Node):
            if v not in operands:
                raise Reject("the 4-bit matmul's inputs are computed inside its autograd body")
            return operands[v]
        return v
    # Unread outputs join the region and go with it: torch 2.11's Dynamo leaves an unread
    # getitem(hop, 1) beside the read [0] (a from_pretrained 4-bit model, CPU and GPU alike).
    dead = [u for u in hop.users if u is not base and not u.users]
    others = [u for u in hop.users if u is not base and u.users]
    if others:
        uses = [f"{describe(u)}, read by " + ", ".join(describe(v) for v in list(u.users)[:3])
                for u in others[:3]]
        raise Reject("other outputs of the 4-bit autograd.Function are used: " + "; ".join(uses))
    extra = [hop] + [a for a in hop.args[:2] if isinstance(a, torch.fx.Node)] + [base] + dead
    return gemm[0], outer, extra


def _arg(gemm, name, index):
    return gemm.kwargs[name] if name in gemm.kwargs else (
        gemm.args[index] if len(gemm.args) > index else None)


def _input_casts(m, x, a, b, compute_dtype, cast_in: bool):
    """(cast_x, cast_adapters): the dtypes the op casts x and the adapter weights to before it
    runs (None: as they are), so that it computes what the unfused layer did; or a Reject for
    the dtype combinations it would not reproduce. ``cast_in``: the 4-bit matmul reads
    ``x.to(compute_dtype)`` (Linear4bit's own cast)."""
    lora_dtype = example_value(linear_of(m, "lora_A")).dtype  # what the adapter linear ran in
    if cast_in and a.dtype == b.dtype == compute_dtype != x.dtype and lora_dtype == a.dtype:
        # TRL's SFTTrainer casts a quantized model's adapters to bfloat16 (the QLoRA paper's
        # recipe); with peft's float32 activations, base and adapter then both read
        # x.to(bfloat16): the op takes that cast x (its adapter products stay in float32, not
        # rounded to bfloat16).
        return compute_dtype, None
    if rounded_input(m) not in (None, compute_dtype):
        # TRL's recipe on float32 compute (the CPU default): base and adapter read x in two
        # different dtypes, and the adapter's is narrower (x rounded), which the one op does not
        # do (lora_linear fuses the adapter alone on the 4-bit output). A wider adapter (bf16 x
        # into float32 adapters, peft's default) is an exact cast.
        raise Reject(f"the adapter weights are {a.dtype} but the 4-bit matmul computes in "
                     f"{compute_dtype}, so the adapter alone rounds its {x.dtype} input to "
                     f"{a.dtype} (TRL's SFTTrainer stores a 4-bit model's adapters in bfloat16); "
                     f"fused when the two agree: bnb_4bit_compute_dtype={a.dtype}, or the "
                     f"adapters cast to {compute_dtype} (fastlora train does that for --dtype "
                     f"fp32)")
    autocast = adapter_dtypes(m)
    if autocast is None:
        return None, None
    # float32 adapters under autocast (a Trainer with bf16=True without TRL's cast): the adapter
    # linears ran in the autocast dtype, x and the adapter weights cast to it; the op gets them
    # cast the same way (the casts' backward returns float32 gradients).
    if not (autocast == compute_dtype and (cast_in or x.dtype == compute_dtype)
            and a.dtype == b.dtype == torch.float32):
        raise Reject(f"QLoRA under torch.autocast is not fused here: the adapter linears ran in "
                     f"{autocast}, the 4-bit matmul in {compute_dtype} on {x.dtype} x, adapters "
                     f"{a.dtype}")
    return (autocast if x.dtype != autocast else None), autocast


def check(m):
    x = m.value("x")
    base_node = m["base"]
    gemm, outer, extra = _quantized_base(base_node)
    gemm_x = outer(gemm.args[0])
    cast_in = _is_cast(gemm_x) and gemm_x.args[0] is m["x"]
    if cast_in:
        gemm_x = gemm_x.args[0]  # Linear4bit's x.to(compute_dtype); left to the graph's DCE
    if gemm_x is not m["x"]:
        raise Reject("the 4-bit matmul and the adapter read different inputs")
    if set(base_node.users) - m.region:
        raise Reject("the 4-bit matmul's output is also used outside the LoRA layer")
    shape = list(_arg(gemm, "shapeB", 2))
    blocksize, quant_type = _arg(gemm, "blocksize", 4), _arg(gemm, "quant_type", 5)
    if len(shape) != 2 or not all(isinstance(s, int) for s in shape):
        raise Reject(f"the 4-bit weight shape {shape} is not a static [N, K]")
    absmax8 = outer(_arg(gemm, "absmax_8bit", 7))
    tensors = {"qweight": outer(gemm.args[1]), "absmax": outer(gemm.args[3]),
               "bias": outer(_arg(gemm, "bias", 6))}
    if absmax8 is not None:  # double quantization: args[3] is the nested absmax
        tensors.update(absmax=absmax8, absmax2=outer(gemm.args[3]),
                       code2=outer(_arg(gemm, "absmax_code", 8)),
                       offset=outer(_arg(gemm, "absmax_offset", 9)))
    qweight = tensors["qweight"]
    if isinstance(qweight, torch.fx.Node) and qweight.op == "call_function" \
            and qweight.target is torch.Tensor.view and len(qweight.users) == 1:
        extra.append(qweight)  # the W.view(-1, 1) feeding the matmul
        tensors["qweight"] = qweight.args[0]
    base_dtype, compute_dtype = example_value(base_node).dtype, example_value(gemm).dtype
    if base_dtype != x.dtype or base_dtype not in FLOATS or compute_dtype not in FLOATS:
        raise Reject(f"the 4-bit matmul returns {base_dtype} for {x.dtype} inputs")
    a, b = m.value("lora_A"), m.value("lora_B")
    cast_x, cast_adapters = _input_casts(m, x, a, b, compute_dtype, cast_in)
    if a.shape[1] != shape[1] or b.shape[0] != shape[0]:
        raise Reject(f"adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit the "
                     f"{shape} base")
    # The op reads a 16-entry code table it caches per device. Build it now, at compile time:
    # built on the first call instead, it could land in a CUDA-graph warm-up's memory pool
    # (mode="reduce-overhead") and outlive it untracked.
    code_table(quant_type, example_value(tensors["qweight"]).device)
    # The match covers the matmul too: its inputs replace `base` (the rewriter proves that no
    # value of the grown region is read outside it before rewriting).
    m.absorb(*extra)
    m.drop_input("base")
    for name, value in tensors.items():
        if value is not None:
            m.add_input(name, value)
    return {"out_features": shape[0], "in_features": shape[1], "blocksize": blocksize,
            "quant_type": quant_type, "double_quant": absmax8 is not None,
            "out_dtype": m.output_value().dtype, "compute_dtype": compute_dtype,
            "cast_x": cast_x, "cast_adapters": cast_adapters,
            "dropout": dropout_of(m),
            "bnb_call": "gemm_4bit" if gemm.graph is base_node.graph else "MatMul4Bit"}


def replacement(x, lora_A, lora_B, scale, qweight, absmax, out_features, in_features, blocksize,
                quant_type, out_dtype, compute_dtype, dropout, double_quant=False, absmax2=None,
                code2=None, offset=None, bias=None, p=0.0, training=False, bnb_call=None,
                cast_x=None, cast_adapters=None):
    if cast_adapters is not None:  # torch.autocast's casts of the adapter weights
        lora_A, lora_B = cast(lora_A, cast_adapters), cast(lora_B, cast_adapters)
    seed = make_seed(dropout, lora_A)
    if cast_x is not None:
        x = cast(x, cast_x)
    return torch.ops.fastlora.lora_linear_4bit(
        x, qweight, absmax, absmax2, code2, offset, bias, lora_A, lora_B, seed, out_features,
        in_features, blocksize, quant_type, scale, dropout, out_dtype, compute_dtype)[0]


def explain(node, refusal):
    """Report only adapters whose base layer is a bitsandbytes 4-bit one."""
    path, _ = module_path(node)
    if path.split(".lora_A")[0] in per_graph(node.graph, "four_bit_layers", _four_bit_layers):
        return explain_lora_near_miss(node, refusal)
    return None


def _four_bit_layers(graph) -> frozenset[str]:
    """The module paths of the layers whose base_layer is a bitsandbytes 4-bit one."""
    found = set()
    for n in graph.nodes:
        path, classes = module_path(n)
        if path.endswith(".base_layer") and classes and classes[-1].endswith("Linear4bit"):
            found.add(path[:-len(".base_layer")])
    return frozenset(found)


register_pattern(Pattern(
    name="lora_linear_4bit",
    spellings=SPELLINGS,
    check=check,
    replacement=replacement,
    anchor=F.linear,
    explain_near_miss=explain,
    stage="adapters",
    description="QLoRA: LoRA on a bitsandbytes 4-bit (NF4/FP4, double quant) base, dequantized "
                "in Triton",
    builtin=True,
))
