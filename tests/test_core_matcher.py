"""Unit tests of step 3 of the pipeline, matcher.py, on small hand-built FX graphs: a spelling
traced from a plain function matches the graph's canonical form, binds tensors and literals, and
says where and why it stopped when it does not match."""
import torch

from fastlora.canonicalize import CAST, canonicalize
from fastlora.matcher import attempts_at, output_targets, precedence, trace_spelling
from fx_graphs import graph_of, node_calling


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _canonical(fn, *inputs):
    gm = graph_of(fn, *inputs)
    canonicalize(gm.graph)
    return gm.graph


def _attempts(spelling_fn, graph, target):
    spelling = trace_spelling(spelling_fn)
    return list(attempts_at(spelling, node_calling(graph, target), set()))


X, W = torch.randn(3, 8), torch.randn(8)


def test_spelling_parameters_bind_tensors_and_literals():
    spelling = trace_spelling(rms)
    assert sorted(spelling.params.values()) == [("literal", "eps"), ("tensor", "weight"),
                                                ("tensor", "x")]
    assert output_targets(spelling) == {torch.mul}


def test_a_full_match_binds_inputs_and_captures_the_literal():
    graph = _canonical(lambda x, w: w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)),
                       X, W)
    # x * x is pow(x, 2) once canonical
    last_mul = [n for n in graph.nodes if n.target is torch.mul][-1]
    (attempt,) = [a for a in attempts_at(trace_spelling(rms), last_mul, set()) if a.reason is None]
    names = {k: getattr(v, "name", v) for k, v in attempt.state.bindings.items()}
    assert names == {"x": "x", "weight": "w", "eps": 1e-5}
    matched = {n.target for n in attempt.state.node_map.values()}
    assert matched == {torch.mul, torch.rsqrt, torch.pow, torch.mean, torch.add}


def test_commuted_operands_match_either_way():
    graph = _canonical(lambda x, w: (torch.rsqrt(1e-6 + x.pow(2).mean(-1, keepdim=True)) * x) * w,
                       X, W)
    last_mul = [n for n in graph.nodes if n.target is torch.mul][-1]
    attempts = list(attempts_at(trace_spelling(rms), last_mul, set()))
    assert [a.reason for a in attempts] == [None]
    assert attempts[0].state.bindings["eps"] == 1e-6


def test_a_different_op_says_what_was_expected_and_found():
    graph = _canonical(lambda x, w: w * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)),
                       X, W)
    last_mul = [n for n in graph.nodes if n.target is torch.mul][-1]
    attempts = list(attempts_at(trace_spelling(rms), last_mul, set()))
    assert all(a.reason is not None for a in attempts)
    assert any("expected torch.mean, found torch.sum" in a.reason for a in attempts), attempts


def test_one_parameter_cannot_stand_for_two_values():
    def twice(x: torch.Tensor):
        return x * torch.sin(x)

    graph = _canonical(lambda a, b: a * torch.sin(b), X, X)
    attempts = list(attempts_at(trace_spelling(twice), node_calling(graph, torch.mul), set()))
    assert attempts and all("would be both" in a.reason for a in attempts), attempts


def test_a_literal_parameter_does_not_bind_a_tensor():
    graph = _canonical(lambda x, w, e: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e)),
                       X, W, torch.tensor(1e-6))
    last_mul = [n for n in graph.nodes if n.target is torch.mul][-1]
    attempts = list(attempts_at(trace_spelling(rms), last_mul, set()))
    assert any("`eps` must be a constant known at compile time" in a.reason for a in attempts)


def test_a_cast_matches_a_cast_or_a_value_already_of_that_dtype():
    def sin_float(x: torch.Tensor):
        return torch.sin(x.float())

    bf16 = _canonical(lambda x: torch.sin(x.float()), X.bfloat16())
    (attempt,) = _attempts(sin_float, bf16, torch.sin)
    assert attempt.reason is None
    assert CAST in {n.target for n in attempt.state.node_map.values()}  # the cast joins the region
    fp32 = _canonical(lambda x: torch.sin(x.float()), X)  # the cast was a no-op, removed
    (attempt,) = _attempts(sin_float, fp32, torch.sin)
    assert attempt.reason is None and attempt.state.bindings["x"].name == "x"
    no_cast = _canonical(lambda x: torch.sin(x), X.bfloat16())  # bf16 sin: other numerics
    (attempt,) = _attempts(sin_float, no_cast, torch.sin)
    assert "casts to torch.float32 where the graph has torch.bfloat16" in attempt.reason


def test_a_second_output_is_found_near_the_first():
    def pair(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor):
        return q * c, k * c

    graph = _canonical(lambda q, k, c: (q * c, k * c, q - k), X, X + 1, X + 2)
    first = [n for n in graph.nodes if n.target is torch.mul][0]
    full = [a for a in attempts_at(trace_spelling(pair), first, set()) if a.reason is None]
    assert len(full) == 1 and [o.name for o in full[0].state.outputs] == ["mul", "mul_1"]
    taken = {[n for n in graph.nodes if n.target is torch.mul][1]}  # an earlier match took it
    attempts = list(attempts_at(trace_spelling(pair), first, taken))
    assert [a.reason for a in attempts] == ["no partner found for output 1 of the pattern"]


def test_precedence_counts_casts_only_to_break_ties():
    """A cast may bind nothing (a no-op cast in a float32 graph), so a cast-heavy spelling must
    not outrank one with more real ops; between otherwise equal spellings, the casts decide."""
    def plain(x: torch.Tensor, w: torch.Tensor):
        return x * w

    def with_casts(x: torch.Tensor, w: torch.Tensor):
        return (x.float() * w.float()).to(torch.bfloat16)

    def more_ops(x: torch.Tensor, w: torch.Tensor):
        return x * w + x

    ranked = sorted((trace_spelling(f) for f in (plain, with_casts, more_ops)),
                    key=precedence, reverse=True)
    assert [s.name for s in ranked] == ["more_ops", "with_casts", "plain"]
