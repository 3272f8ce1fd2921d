"""Attention: ``F.scaled_dot_product_attention`` as HF's sdpa integration calls it, and HF's eager
attention (``matmul -> * scale -> [c * tanh(/c)] -> [+ mask] -> softmax(float32) -> cast ->
dropout -> matmul``), with k/v given per kv head (``enable_gqa``) or repeated (``repeat_kv``).

Becomes ``torch.ops.fastlora.flash_attention`` (src/fastlora/kernels/flash_attention.py) for
sliding windows, softcapping, packed documents and padding masks, and PyTorch's own SDPA on the
un-repeated k/v (``is_causal``, no mask) for plain causal or full attention, where cuDNN / flash
are faster: ``choose_kernel`` holds the rule, benchmarks/kernel_cases/attention.py measures it.

A mask is replaced only when it is proven to be what the kernel computes: ``prove_mask``
(patterns/_attention_masks.py) evaluates the graph that built it symbolically: aranges become
query / key indices, comparisons become linear constraints, and reads of position ids, document
ids (HF's ``packed_sequence_mask``) or the boolean padding mask (HF's ``attention_mask[b, kv]``)
stay symbolic. Causal, sliding-window, document and key-padding constraints are recognised;
anything else (a mask from the inputs, an op the prover does not know) leaves the attention
alone, with the reason in the report. A padding mask's values arrive at run time: the kernel
reads the 2-D ``attention_mask`` itself (see the kernel's docstring for rows that see no key).
"""
from __future__ import annotations

import math
import operator
import os

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.functional import softmax

from fastlora.canonicalize import example_value
from fastlora.pattern import Pattern, RefusalKind, Reject, register_pattern, spelling_variants
from fastlora.patterns._attention_masks import prove_mask

# Dynamo records ``F.softmax(x, dim=-1, dtype=...)`` as called; tracing F.softmax itself would add
# its private ``_stacklevel`` argument. Wrapping records the call exactly as the model makes it.
torch.fx.wrap("softmax")

KERNEL_ENV = "FASTLORA_ATTENTION"  # auto (default) | triton | sdpa


# ---------------------------------------------------------------- spellings


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask,
         dropout_p: float, is_causal: bool, scale, enable_gqa: bool):
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def _probs_times_value(w, query, value, p, training):
    w = softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = F.dropout(w, p=p, training=training)
    return torch.matmul(w, value)


def make_eager(capped: bool, masked: bool):
    """HF's ``eager_attention_forward``: scores, optionally softcapped (Gemma 2) and masked
    (an additive mask), softmax in float32, dropout, times v."""
    def spelling(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 scaling: float, softcap: float, d1: int, d2: int, p: float, training: bool):
        w = torch.matmul(query, key.transpose(d1, d2)) * scaling
        if capped:
            w = torch.tanh(w / softcap) * softcap
        return _probs_times_value(w + mask if masked else w, query, value, p, training)
    return spelling


EAGER = spelling_variants(make_eager, lambda capped, masked: "eager" + "_softcap" * capped
                          + "_masked" * masked, capped=(True, False), masked=(True, False))


def make_eager_sinks(masked: bool):
    """GPT-OSS's eager attention: the (masked) scores and one learned logit per head
    (``sinks``) in one softmax, taken after subtracting the row max, in the softmax dtype the
    model asks for; the sinks' column dropped, dropout, a cast to v's dtype, times v."""
    def spelling(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 sinks: torch.Tensor, scaling: float, d1: int, d2: int, rows, cols, sm_dtype,
                 p: float, training: bool):
        w = torch.matmul(query, key.transpose(d1, d2)) * scaling
        if masked:
            w = w + mask
        logits = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(rows, -1, cols, -1)], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True)[0]
        probs = softmax(logits, dim=-1, dtype=sm_dtype)
        w = F.dropout(probs[..., :-1], p=p, training=training).to(value.dtype)
        return torch.matmul(w, value)
    return spelling


EAGER_SINKS = spelling_variants(make_eager_sinks, lambda masked: "eager_sinks" + "_masked" *
                                masked, masked=(True, False))


# ---------------------------------------------------------------- dispatch


def choose_kernel(causal: bool, window: int, softcap: float, documents: bool,
                  padding: bool = False, sinks: bool = False) -> tuple[str, str]:
    """Which kernel runs a proven attention: ("sdpa" | "triton" | "none", why).

    The rule, from the H200 measurements in docs/attention.md (GQA 32/8, head dim 128; rerun
    with ``python benchmarks/kernels.py --ops attention``):
    - no window inside the sequence, no softcap, no documents, no padding: PyTorch SDPA with
      ``is_causal`` (cuDNN / flash: 531 / 383 TFLOP/s fwd / bwd at seq 2k), above what a Triton
      FA2 kernel reaches on Hopper;
    - sliding window, softcap, packed documents or a padding mask: the Triton kernel. SDPA can
      express them only with an explicit S x S mask (3.0x / 2.7x slower than causal at 2k,
      measured), computes the blocks outside the window, document or padding anyway, and cannot
      softcap at all;
    - sinks (GPT-OSS): the Triton kernel, SDPA has none.
    Causal + right padding would be exact for the real tokens under SDPA's ``is_causal`` alone,
    but only the pad rows differ and nothing in the graph proves they are ignored: the mask and
    the labels are run-time values (proving it on the device and branching would need a host
    sync per step). The Triton kernel computes every row exactly and skips the pad keys.
    ``FASTLORA_ATTENTION=triton`` sends every proven attention to the Triton kernel (tests,
    benchmarks); ``=sdpa`` keeps SDPA where it needs no mask and leaves the rest unfused.
    """
    forced = os.environ.get(KERNEL_ENV, "auto")
    if forced not in ("auto", "triton", "sdpa"):
        raise Reject(f"{KERNEL_ENV}={forced!r} is not one of auto, triton, sdpa")
    plain = not (window or softcap or documents or padding or sinks)
    if forced == "triton":
        return "triton", f"{KERNEL_ENV}=triton"
    if plain:
        return "sdpa", ("plain causal attention" if causal else "full attention") + \
            ": PyTorch SDPA (cuDNN / flash) is faster here"
    if forced == "sdpa":
        return "none", f"{KERNEL_ENV}=sdpa keeps masked attention as the model wrote it"
    needs = [n for n, on in (("sliding window", window), ("packed documents", documents),
                             ("padding mask", padding), ("softcap", softcap), ("sinks", sinks))
             if on]
    why = ": SDPA cannot softcap" if softcap else ": SDPA has no sinks" if sinks else \
        ": SDPA would need an S x S mask"
    if padding:
        why += ("; the kernel skips the padded keys (SDPA's is_causal alone would be exact only "
                "for real tokens of right-padded rows, which the graph cannot prove)"
                if causal else "; the kernel skips the padded keys")
    return "triton", " + ".join(needs) + why


FLASH_WHY = ("; the sequence length varies (a dynamic graph): PyTorch's flash backend, which "
             "compiles nothing per length (cuDNN builds an execution graph for every new length: "
             "127 ms per new length against 0.7 ms per call at the Llama-1B shape on the H200, "
             "benchmarks/attention_lengths.py)")


def _flash_for_varying_lengths(q, cast_to) -> bool:
    """Plain causal/full attention in a graph whose sequence length is symbolic, on CUDA, in a
    dtype and head size the flash backend takes: run it on flash rather than letting SDPA pick
    cuDNN, whose per-shape graph build costs more than the attention itself at a new length."""
    dtype = cast_to or q.dtype
    return (q.device.type == "cuda" and not isinstance(q.shape[2], int)
            and dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256)


# ---------------------------------------------------------------- the check


def check(m):
    q, k, v = m.value("query"), m.value("key"), m.value("value")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Reject(f"query dtype {q.dtype} is not float32, bfloat16 or float16")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise Reject("query, key and value are not (batch, heads, seq, head_dim) tensors")
    if not (q.device == k.device == v.device):
        raise Reject("query, key and value are on different devices")
    cast_to, out_dtype = None, m.output_value().dtype
    if not (q.dtype == k.dtype == v.dtype == out_dtype):
        # Mixed dtypes only run under autocast, which casts all three to its low precision (the
        # output's dtype): RoPE leaves q and k in float32 there. The replacement casts the same.
        if out_dtype not in (torch.bfloat16, torch.float16) or not all(
                t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (k, v)):
            raise Reject(f"query, key, value and output dtypes ({q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {out_dtype}) are not one dtype nor autocast's")
        cast_to = out_dtype
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise Reject(f"key/value head dims ({k.shape[-1]}, {v.shape[-1]}) differ from the "
                     f"query's ({head_dim})")
    if m.spelling == "sdpa":
        if m["dropout_p"] != 0.0:
            raise Reject(f"attention dropout p={m['dropout_p']}: the kernels have no dropout")
        scale = m["scale"]
        if isinstance(scale, fx.Node):
            raise Reject("the softmax scale is computed at run time")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        mask, causal, softcap = m["attn_mask"], bool(m["is_causal"]), 0.0
        if mask is not None and causal:
            raise Reject("both a mask and is_causal=True")
        gqa_allowed = bool(m["enable_gqa"])
    else:
        if m["training"] and m["p"] != 0.0:
            raise Reject(f"attention dropout p={m['p']} in training: the kernels have no dropout")
        if {m["d1"] % 4, m["d2"] % 4} != {2, 3}:
            raise Reject("the key is not transposed over its last two dimensions")
        scale, softcap = float(m["scaling"]), float(m.bindings.get("softcap", 0.0))
        if softcap <= 0.0 and "softcap" in m.bindings:
            raise Reject(f"softcap {softcap} is not positive")
        mask, causal, gqa_allowed = m.bindings.get("mask"), False, False
    sinks = m.spelling.startswith("eager_sinks")
    if sinks:
        column = m.value("sinks")
        if column.dim() != 1 or column.shape[0] != q.shape[1] or column.device != q.device:
            raise Reject(f"sinks of shape {tuple(column.shape)} on {column.device} are not one "
                         f"logit per query head ({q.shape[1]}) on the queries' device")
        if column.dtype not in (torch.float32, torch.bfloat16, torch.float16) or \
                m["sm_dtype"] not in (torch.float32, torch.bfloat16, torch.float16):
            raise Reject(f"sinks in {column.dtype}, softmax in {m['sm_dtype']}: the kernel "
                         "takes float32, bfloat16 or float16")
    k_src, group_k = unrepeated_kv(m["key"])
    v_src, group_v = unrepeated_kv(m["value"])
    heads, kv_heads = q.shape[1], example_value(k_src).shape[1]
    if group_k != group_v or example_value(v_src).shape[1] != kv_heads:
        raise Reject("key and value are repeated differently")
    if kv_heads != heads and not (gqa_allowed or group_k > 1):
        raise Reject(f"{heads} query heads but {kv_heads} key heads without enable_gqa")
    if heads % kv_heads:
        raise Reject(f"{heads} query heads cannot share {kv_heads} key/value heads evenly")
    window, docs, key_mask, key_rows, uniform = 0, None, None, "batch", False
    if mask is not None:
        causal, window, docs, key_mask, key_rows, uniform = prove_mask(mask, q.shape, k.shape)
    if docs is not None and q.shape[2] != k.shape[2]:
        raise Reject("packed documents with queries and keys of different lengths")
    kernel, why = choose_kernel(causal, window, softcap, docs is not None, key_mask is not None,
                                sinks)
    if kernel == "none":
        raise Reject(why)
    if kernel == "sdpa" and _flash_for_varying_lengths(q, cast_to):
        kernel, why = "sdpa_flash", why + FLASH_WHY
    if kernel == "triton" and head_dim > 256:
        raise Reject(f"head dim {head_dim} > 256 is not supported by the Triton kernel")
    # Graph values the replacement reads besides the matched inputs (the rewriter passes every
    # input to the replacement by name and inserts it after all of them). Under checkpointing
    # the document ids and the padding mask are computed outside the layer: the rewriter passes
    # each in as one more operand of the checkpointed call, once the match is proven.
    m.add_input("k_src", k_src)
    m.add_input("v_src", v_src)
    if docs is not None:
        m.add_input("doc_ids", docs)
    if key_mask is not None:
        m.add_input("key_mask", key_mask)
    kinds = [("causal" if causal else "full"), "window" * bool(window),
             "documents" * (docs is not None), "padding" * (key_mask is not None),
             "sinks" * sinks]
    params = {"kernel": kernel, "why": why, "mask": "+".join(k for k in kinds if k),
              "causal": causal, "window": window, "softcap": softcap, "sm_scale": scale,
              "gqa": kv_heads != heads, "cast_to": cast_to}
    if key_mask is not None:  # what a row that sees no key gets: eager's additive mask makes
        params["empty_rows"] = "uniform" if uniform else "zero"  # it uniform, SDPA's bool one 0
        params["key_mask_rows"] = key_rows
    return params


def replacement(query, k_src, v_src, doc_ids=None, key_mask=None, sinks=None, *, kernel, causal,
                window, softcap, sm_scale, gqa, cast_to=None, empty_rows=None,
                key_mask_rows="batch", **_matched):
    if cast_to is not None:
        to = torch.ops.aten.to.dtype  # an op, not a method: the rewriter runs it on fakes
        query, k_src, v_src = to(query, cast_to), to(k_src, cast_to), to(v_src, cast_to)
    if key_mask is not None:
        # The rows and columns the model reads: rows 0..B-1 (or row 0 for all) and keys
        # 0..S_k-1. Views, and no-ops where the shapes match (shapes that are only equal at run
        # time under dynamic shapes, or a longer mask); a shorter mask fails here as in eager.
        size, narrow = torch.ops.aten.sym_size.int, torch.ops.aten.narrow.default
        rows = size(query, 0) if key_mask_rows == "batch" else 1
        key_mask = narrow(narrow(key_mask, 0, 0, rows), 1, 0, size(k_src, 2))
    if kernel == "sdpa":
        return torch.ops.aten.scaled_dot_product_attention.default(
            query, k_src, v_src, None, 0.0, causal, scale=sm_scale, enable_gqa=gqa)
    if kernel == "sdpa_flash":  # GQA natively: k/v keep their own heads
        return torch.ops.fastlora.sdpa_flash(query, k_src, v_src, causal, sm_scale)[0]
    return torch.ops.fastlora.flash_attention(query, k_src, v_src, doc_ids, sm_scale, causal,
                                              window, softcap, key_mask,
                                              empty_rows == "uniform", sinks)[0]


def unrepeated_kv(node):
    """(source, n_rep): HF's ``repeat_kv`` (``x[:, :, None].expand(..).reshape(..)``) or
    ``repeat_interleave(x, n, dim=1)`` undone; (node, 1) for anything else."""
    out = example_value(node)
    if node.op == "call_function" and node.target in (torch.Tensor.reshape, torch.Tensor.view):
        expanded = node.args[0]
        if isinstance(expanded, fx.Node) and expanded.target is torch.Tensor.expand:
            indexed = expanded.args[0]
            full = slice(None, None, None)
            if isinstance(indexed, fx.Node) and indexed.target is operator.getitem and \
                    indexed.args[1] == (full, full, None, full, full):
                src, big = example_value(indexed.args[0]), example_value(expanded)
                B, Hk, S, D = src.shape
                if tuple(big.shape) == (B, Hk, big.shape[2], S, D) and \
                        tuple(out.shape) == (B, Hk * big.shape[2], S, D):
                    return indexed.args[0], int(big.shape[2])
    if node.op == "call_function" and node.target in (torch.repeat_interleave,
                                                      torch.Tensor.repeat_interleave):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        if isinstance(reps, int) and dim in (1, -3) and set(node.kwargs) <= {"dim"}:
            return node.args[0], reps
    return node, 1


def _explain(node, refusal):
    """Every SDPA left unfused is a near miss; a softmax only where an eager spelling got far
    enough to reach it (a router's or a user's softmax is no attention)."""
    if node.target is softmax and refusal.kind is RefusalKind.NO_SPELLING:
        return None
    return refusal.reason


register_pattern(Pattern(
    name="attention",
    spellings=[sdpa] + EAGER + EAGER_SINKS,
    check=check,
    replacement=replacement,
    anchor=(F.scaled_dot_product_attention, softmax),
    explain_near_miss=_explain,
    description="attention (SDPA and eager; causal, GQA, sliding window, softcap, packed "
                "documents, padding masks, GPT-OSS's sinks) as flash attention",
    builtin=True,
))
