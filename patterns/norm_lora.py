"""RMSNorm and the grouped LoRA op that reads its output, as one op that recomputes the norm's
output in backward.

Two patterns over the graph as the other patterns left it:

``rms_norm_lora_qkv``: a ``torch.ops.fastlora.rms_norm`` (patterns/rms_norm.py) whose y is read
only by a ``torch.ops.fastlora.lora_qkv`` (patterns/lora_grouped.py), as its x: Llama's
input_layernorm then q/k/v. ``rms_norm_lora_mlp_block``: the same norm read only by a
``torch.ops.fastlora.lora_mlp_block`` (patterns/lora_mlp_block.py): post_attention_layernorm then
the MLP. Each pair becomes one op (src/fastlora/kernels/rms_norm_lora_qkv.py,
rms_norm_lora_mlp_block.py), which computes the same values but keeps x (the residual, which
the norm keeps anyway) instead of y: M x N x e bytes less saved per pattern (M tokens, N the
hidden size, e the bytes of the dtype).

The spellings call the ops exactly as the other patterns' replacements insert them. Both run
last, after ``lora_mlp_block`` (the ``fused`` stage of src/fastlora/stages.py). Where y has another
reader, the rewriter's escape check leaves the pair alone and the report names the reader; a norm
whose y reaches no such LoRA op at all (the final norm, a LoRA op under autocast that reads a cast
of y) is no near miss.
"""
import torch

import fastlora.kernels  # noqa: F401  (registers the ops named below)
from fastlora.matcher import describe
from fastlora.pattern import Pattern, register_pattern

T = torch.Tensor
_ops = torch.ops.fastlora
NORM_ARGS = ("x", "norm_weight", "eps", "offset", "cast_before_weight")


def norm_then_qkv(x: T, norm_weight: T, eps: float, offset: float, cast_before_weight: bool,
                  q_weight: T, q_bias, q_A: T, q_B: T, k_weight: T, k_bias, k_A: T, k_B: T,
                  v_weight: T, v_bias, v_A: T, v_B: T, seed, q_scale: float, k_scale: float,
                  v_scale: float, dropout_p: float, out_dtype):
    y = _ops.rms_norm(x, norm_weight, eps, offset, cast_before_weight)[0]
    out = _ops.lora_qkv(y, q_weight, q_bias, q_A, q_B, k_weight, k_bias, k_A, k_B, v_weight,
                        v_bias, v_A, v_B, seed, q_scale, k_scale, v_scale, dropout_p, out_dtype)
    return out[0], out[1], out[2]


QKV_ARGS = NORM_ARGS + ("q_weight", "q_bias", "q_A", "q_B", "k_weight", "k_bias", "k_A", "k_B",
                        "v_weight", "v_bias", "v_A", "v_B", "seed", "q_scale", "k_scale",
                        "v_scale", "dropout_p", "out_dtype")


def replacement_qkv(**args):
    out = _ops.rms_norm_lora_qkv(*(args[n] for n in QKV_ARGS))
    return out[0], out[1], out[2]


def norm_then_mlp_block(x: T, norm_weight: T, eps: float, offset: float, cast_before_weight: bool,
                        gate_weight: T, gate_bias, gate_A: T, gate_B: T, up_weight: T, up_bias,
                        up_A: T, up_B: T, seed, gate_scale: float, up_scale: float,
                        dropout_p: float, activation, hidden_dtype, down_weight: T, down_bias,
                        down_A: T, down_B: T, down_seed, down_scale: float,
                        down_dropout_p: float, out_dtype):
    y = _ops.rms_norm(x, norm_weight, eps, offset, cast_before_weight)[0]
    return _ops.lora_mlp_block(y, gate_weight, gate_bias, gate_A, gate_B, up_weight, up_bias,
                               up_A, up_B, seed, gate_scale, up_scale, dropout_p, activation,
                               hidden_dtype, down_weight, down_bias, down_A, down_B, down_seed,
                               down_scale, down_dropout_p, out_dtype)[0]


MLP_ARGS = NORM_ARGS + ("gate_weight", "gate_bias", "gate_A", "gate_B", "up_weight", "up_bias",
                        "up_A", "up_B", "seed", "gate_scale", "up_scale", "dropout_p",
                        "activation", "hidden_dtype", "down_weight", "down_bias", "down_A",
                        "down_B", "down_seed", "down_scale", "down_dropout_p", "out_dtype")


def replacement_mlp_block(**args):
    return _ops.rms_norm_lora_mlp_block(*(args[n] for n in MLP_ARGS))[0]


def _near_miss(lora_op, op_name):
    def explain(node, refusal):
        """Name the nodes besides the LoRA op that read y; None where no such LoRA op reads y."""
        readers = [u for g in node.users if g.args[1:] == (0,) for u in g.users]
        ours = [u for u in readers if u.target is lora_op and u.args[0] in node.users]
        if not ours:
            return None  # y feeds something else entirely (the final norm): nothing to fuse
        others = [u for u in readers if u not in ours]
        if others:
            names = ", ".join(describe(u) for u in others)
            return (f"y (rms_norm's output) is also read by {names}; the fused op does not "
                    f"return y, so rms_norm and {op_name} stay two ops (y kept for backward)")
        return refusal.reason
    return explain


register_pattern(Pattern(
    name="rms_norm_lora_qkv",
    spellings=[norm_then_qkv],
    replacement=replacement_qkv,
    anchor=_ops.rms_norm,
    explain_near_miss=_near_miss(_ops.lora_qkv, "lora_qkv"),
    stage="fused",
    description="rms_norm + lora_qkv as one op that recomputes the norm's output in backward",
    builtin=True,
))

register_pattern(Pattern(
    name="rms_norm_lora_mlp_block",
    spellings=[norm_then_mlp_block],
    replacement=replacement_mlp_block,
    anchor=_ops.rms_norm,
    explain_near_miss=_near_miss(_ops.lora_mlp_block, "lora_mlp_block"),
    stage="fused",
    description="rms_norm + lora_mlp_block as one op that recomputes the norm's output in "
                "backward",
    builtin=True,
))
