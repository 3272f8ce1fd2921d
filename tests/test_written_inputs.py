"""A fused op stands where its inputs hold the values the region read (rewriter step 5).

transformers 5.17's grouped experts forward reads the expert weight (peft's merge, the first
output of the cached ``lora_moe_experts`` spelling), then zeroes rows of the gathered tokens in
place, then multiplies: the fused op must be placed after that write. A write between two reads
of the same input leaves no such place: the match is refused and the report says why.
"""
import pytest
import torch

import fastlora
from fastlora.refusal import RefusalKind
from helpers import rel_err


def experts_masking_after_the_merge(tokens, perm, weight, lhs, rhs, offs, mask):
    """The order of transformers 5.17's grouped_mm_experts_forward: the merged weight is read
    (and returned, for peft's parametrization cache) before the rows are masked in place."""
    merged = torch.baddbmm(weight, lhs, rhs, alpha=1.5)
    rows = tokens[perm]
    rows.masked_fill_(mask, 0.0)
    y = torch._grouped_mm(rows, merged.transpose(-2, -1), offs=offs, bias=None, out_dtype=None)
    return y, merged


def _experts_operands(requires_grad: bool):
    experts, d_in, d_out, r, counts = 4, 48, 24, 8, torch.tensor([5, 0, 7, 4])
    rows = int(counts.sum())
    tokens = torch.randn(rows, d_in, dtype=torch.bfloat16, requires_grad=requires_grad)
    perm = torch.randperm(rows)
    weight = (torch.randn(experts, d_out, d_in) / d_in ** 0.5).to(torch.bfloat16)
    lhs = (torch.randn(experts, d_out, r) * 0.3).to(torch.bfloat16).requires_grad_(requires_grad)
    rhs = (torch.randn(experts, r, d_in) * 0.3).to(torch.bfloat16).requires_grad_(requires_grad)
    offs = counts.cumsum(0).to(torch.int32)
    mask = torch.zeros(rows, 1, dtype=torch.bool)
    mask[::3] = True  # a third of the rows zeroed: reading them unmasked is far off
    return tokens, perm, weight, lhs, rhs, offs, mask


def _compiled(fn, compiler="aot_eager"):
    fastlora.clear_reports()
    torch._dynamo.reset()
    return torch.compile(fn, backend="fastlora", options={"compiler": compiler})


def test_experts_op_reads_the_rows_after_their_in_place_mask():
    args = _experts_operands(requires_grad=False)
    want, _ = experts_masking_after_the_merge(*args)
    with torch.no_grad():
        got, merged = _compiled(experts_masking_after_the_merge)(*args)
    (match,) = fastlora.last_report().matches
    assert match["pattern"] == "lora_moe_experts" and match["spelling"].endswith("_cached")
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_experts_gradients_through_the_in_place_mask(compiler):
    args = _experts_operands(requires_grad=True)
    tokens, _, _, lhs, rhs, _, _ = args
    g = torch.randn(tokens.shape[0], 24, dtype=torch.bfloat16)
    want = torch.autograd.grad(experts_masking_after_the_merge(*args)[0], (tokens, lhs, rhs), g)
    got = torch.autograd.grad(_compiled(experts_masking_after_the_merge, compiler)(*args)[0],
                              (tokens, lhs, rhs), g)
    assert [m["pattern"] for m in fastlora.last_report().matches] == ["lora_moe_experts"]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2


def norm_with_a_write_between_its_reads(inp, weight):
    """An RMSNorm whose input is incremented in place after the variance read it and before
    the scaling reads it: no single place gives a fused norm both values."""
    h = inp * 2.0
    variance = h.pow(2).mean(-1, keepdim=True)
    h.add_(1.0)
    return weight * (h * torch.rsqrt(variance + 1e-6))


def test_a_write_between_two_reads_is_refused_and_reported():
    inp, weight = torch.randn(3, 37, 72), torch.randn(72)
    want = norm_with_a_write_between_its_reads(inp, weight)
    got = _compiled(norm_with_a_write_between_its_reads)(inp, weight)
    assert rel_err(got, want) < 1e-6
    report = fastlora.last_report()
    assert not [m for m in report.matches if m["pattern"] == "rms_norm"]
    (miss,) = [m for m in report.near_misses if m["pattern"] == "rms_norm"]
    assert miss["kind"] == RefusalKind.WRITTEN_INPUT.value
    assert "is written in place by Tensor.add_" in miss["reason"]


def norm_with_a_write_after_its_reads(inp, weight):
    h = inp * 2.0
    variance = h.pow(2).mean(-1, keepdim=True)
    y = weight * (h * torch.rsqrt(variance + 1e-6))
    h.add_(1.0)
    return y, h


def test_a_write_after_every_read_still_fuses():
    inp, weight = torch.randn(3, 37, 72), torch.randn(72)
    want = norm_with_a_write_after_its_reads(inp, weight)
    got = _compiled(norm_with_a_write_after_its_reads)(inp, weight)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    assert [m["pattern"] for m in fastlora.last_report().matches] == ["rms_norm"]


def test_the_writes_it_recognises():
    """An in-place method, a mutable ATen overload, ``out=``, ``inplace=True`` and item
    assignment each name the tensor they write; an out-of-place op names none."""
    import operator

    from torch import fx

    from fastlora.mutations import _written

    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    cases = [
        (graph.call_method("mul_", (x, 2.0)), [x]),
        (graph.call_function(torch.ops.aten.add_.Tensor, (y, x)), [y]),
        (graph.call_function(torch.add, (x, 1.0), {"out": y}), [y]),
        (graph.call_function(torch.nn.functional.relu, (x,), {"inplace": True}), [x]),
        (graph.call_function(operator.setitem, (x, 0, 1.0)), [x]),
        (graph.call_function(torch.mul, (x, y)), []),
    ]
    for node, written in cases:
        assert _written(node) == written, node
