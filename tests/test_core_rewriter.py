"""Unit tests of step 4 of the pipeline, rewriter.py, on small hand-built FX graphs: a proven
match becomes one call of the fused op and the graph computes the same values; every refusal
leaves the graph as it was and is reported as a near miss of the right kind."""
import pytest
import torch

from fastlora.canonicalize import canonicalize
from fastlora.pattern import Pattern, Reject
from fastlora.report import Report
from fastlora.rewriter import apply_patterns
from fx_graphs import calls, graph_of, node_calling, run


@torch.library.custom_op("fastlora_core::scaled_sin", mutates_args=())
def scaled_sin(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.sin(x) * scale


@scaled_sin.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("fastlora_core::scaled_sin_plus", mutates_args=())
def scaled_sin_plus(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    return torch.sin(x) * scale + shift


@scaled_sin_plus.register_fake
def _(x, scale, shift):
    return torch.empty_like(x)


def sin_times(x: torch.Tensor, scale: float):
    return torch.sin(x) * scale


def fused_plus(x: torch.Tensor, scale: float, shift: float):
    return torch.ops.fastlora_core.scaled_sin(x, scale) + shift


def _scaled_sin_pattern(**fields):
    return Pattern(**{"name": "scaled_sin", "spellings": [sin_times], "anchor": torch.sin,
                      "replacement": lambda x, scale: torch.ops.fastlora_core.scaled_sin(x, scale),
                      **fields})


PLUS = Pattern(name="scaled_sin_plus", spellings=[fused_plus], stage="fused",
               anchor=torch.ops.fastlora_core.scaled_sin,
               replacement=lambda x, scale, shift:
               torch.ops.fastlora_core.scaled_sin_plus(x, scale, shift))


def _rewrite(fn, patterns, x=None, strict=False):
    """Rewrite the graph of ``fn``; check it still computes ``fn``; return (graph, report)."""
    x = torch.randn(4, 6) if x is None else x
    gm = graph_of(fn, x)
    canonicalize(gm.graph)
    report = Report(0, {})
    apply_patterns(gm.graph, patterns, report, strict=strict)
    gm.graph.lint()
    torch.testing.assert_close(run(gm, x), fn(x))
    return gm.graph, report


def test_a_proven_match_becomes_one_call_of_the_fused_op():
    graph, report = _rewrite(lambda x: torch.sin(x) * 3.0 - 1, [_scaled_sin_pattern()])
    assert calls(graph) == [torch.ops.fastlora_core.scaled_sin, torch.sub]
    (match,) = report.matches
    assert match["pattern"] == "scaled_sin" and match["params"] == {"scale": 3.0}
    assert report.near_misses == []
    fused = next(n for n in graph.nodes if n.target is torch.ops.fastlora_core.scaled_sin)
    assert fused.meta["example_value"].shape == (4, 6)  # later patterns read it


def test_check_params_reach_the_replacement():
    seen = {}

    def replacement(x, scale, note):
        seen["note"] = note
        return torch.ops.fastlora_core.scaled_sin(x, scale)

    _rewrite(lambda x: torch.sin(x) * 2.0, [_scaled_sin_pattern(
        check=lambda m: {"note": m.value("x").shape[-1]}, replacement=replacement)])
    assert seen == {"note": 6}


def _only_near_miss(report):
    assert report.matches == []
    (miss,) = report.near_misses
    return miss


def test_an_escaping_intermediate_is_refused():
    graph, report = _rewrite(lambda x: torch.sin(x) * 3.0 + torch.sin(x).exp(),
                             [_scaled_sin_pattern()])
    # the two sin calls are two nodes; each anchor gets its own verdict
    assert len(report.matches) == 1
    graph, report = _rewrite(lambda x: (lambda s: s * 3.0 + s)(torch.sin(x)),
                             [_scaled_sin_pattern()])
    miss = _only_near_miss(report)
    assert miss["kind"] == "escape" and "also used outside the pattern" in miss["reason"]
    assert torch.sin in calls(graph) and torch.ops.fastlora_core.scaled_sin not in calls(graph)


def test_a_check_that_rejects_is_a_near_miss_with_its_reason():
    def check(m):
        raise Reject(f"scale {m['scale']} is not supported")

    _, report = _rewrite(lambda x: torch.sin(x) * 3.0, [_scaled_sin_pattern(check=check)])
    miss = _only_near_miss(report)
    assert (miss["kind"], miss["reason"]) == ("check", "scale 3.0 is not supported")


def test_a_replacement_of_another_dtype_is_refused():
    _, report = _rewrite(lambda x: torch.sin(x) * 3.0, [_scaled_sin_pattern(
        replacement=lambda x, scale: torch.ops.fastlora_core.scaled_sin(x, scale).double())])
    miss = _only_near_miss(report)
    assert miss["kind"] == "replacement"
    assert "would return torch.float64 where the graph has torch.float32" in miss["reason"]


def test_a_broken_check_is_an_internal_error_unless_strict():
    def check(m):
        raise KeyError("oops")

    pattern = _scaled_sin_pattern(check=check)
    _, report = _rewrite(lambda x: torch.sin(x) * 3.0, [pattern])
    miss = _only_near_miss(report)
    assert miss["kind"] == "internal_error" and "KeyError" in miss["reason"]
    assert len(report.errors) == 1
    with pytest.raises(KeyError):
        _rewrite(lambda x: torch.sin(x) * 3.0, [pattern], strict=True)


def test_an_anchor_no_spelling_reaches_and_one_a_spelling_stopped_at():
    _, report = _rewrite(lambda x: torch.sin(x) + 1, [_scaled_sin_pattern()])
    miss = _only_near_miss(report)
    assert miss["kind"] == "no_spelling"
    assert miss["reason"] == "no spelling of `scaled_sin` leads to this torch.sin (`sin`)"
    _, report = _rewrite(lambda x: torch.sin(x) * x, [_scaled_sin_pattern()])
    miss = _only_near_miss(report)
    assert miss["kind"] == "spelling" and "must be a constant" in miss["reason"]


def test_explain_near_miss_reads_the_kind_and_may_drop_the_near_miss():
    seen = []

    def explain(node, refusal):
        seen.append(refusal.kind.value)
        return None if refusal.kind.value == "no_spelling" else f"because: {refusal.reason}"

    pattern = _scaled_sin_pattern(explain_near_miss=explain)
    _, report = _rewrite(lambda x: torch.sin(x) + 1, [pattern])
    assert seen == ["no_spelling"] and report.near_misses == []
    _, report = _rewrite(lambda x: (lambda s: s * 3.0 + s)(torch.sin(x)), [pattern])
    assert _only_near_miss(report)["reason"].startswith("because: the intermediate")


def test_a_fusion_of_fused_ops_absorbs_the_earlier_match():
    graph, report = _rewrite(lambda x: torch.sin(x) * 3.0 + 0.5, [_scaled_sin_pattern(), PLUS])
    assert calls(graph) == [torch.ops.fastlora_core.scaled_sin_plus]
    assert [(m["pattern"], m.get("absorbed_into")) for m in report.matches] == [
        ("scaled_sin", "scaled_sin_plus"), ("scaled_sin_plus", None)]
    # run in the other order, the fused pattern finds nothing to fuse
    graph, report = _rewrite(lambda x: torch.sin(x) * 3.0 + 0.5, [PLUS, _scaled_sin_pattern()])
    assert calls(graph) == [torch.ops.fastlora_core.scaled_sin, torch.add]
    assert [m["pattern"] for m in report.matches] == ["scaled_sin"]


# ---- what a check declares: absorbed nodes and inputs, applied after the final region's proof


def sin_of(base: torch.Tensor, scale: float):
    return torch.sin(base) * scale


def _absorbing(**fields):
    """A pattern whose spelling names `sin(base) * scale` and whose check takes in the exp that
    computes base: the fused op reads exp's input instead."""
    def check(m):
        producer = m["base"]
        if producer.op != "call_function" or producer.target is not torch.exp:
            raise Reject("base is not an exp")
        m.absorb(producer)
        m.drop_input("base")
        m.add_input("x", producer.args[0])
        return {}

    return Pattern(**{"name": "exp_scaled_sin", "spellings": [sin_of], "check": check,
                      "replacement": lambda x, scale:
                      torch.ops.fastlora_core.scaled_sin(torch.exp(x), scale), **fields})


def test_declared_additions_are_applied_after_the_proof():
    graph, report = _rewrite(lambda x: torch.sin(x.exp()) * 2.0, [_absorbing()])
    assert calls(graph) == [torch.exp, torch.ops.fastlora_core.scaled_sin]
    assert len(report.matches) == 1
    # the exp in the graph now is the replacement's: it reads the placeholder x
    assert node_calling(graph, torch.exp).args[0].op == "placeholder"


def test_an_absorbed_node_read_outside_the_region_refuses_the_match():
    def fn(x):
        e = x.exp()
        return torch.sin(e) * 2.0 + e

    gm = graph_of(fn, torch.randn(3))
    canonicalize(gm.graph)
    before = [n.format_node() for n in gm.graph.nodes]
    report = Report(0, {})
    apply_patterns(gm.graph, [_absorbing(anchor=torch.sin)], report)
    assert [n.format_node() for n in gm.graph.nodes] == before  # nothing changed
    miss = _only_near_miss(report)
    assert miss["kind"] == "escape" and "torch.exp" in miss["reason"], miss


def test_a_dropped_input_still_computed_inside_is_refused():
    def check(m):
        m.absorb(m["base"])  # forgot drop_input("base")
        return {}

    _, report = _rewrite(lambda x: torch.sin(x.exp()) * 2.0, [_absorbing(
        anchor=torch.sin, check=check,
        replacement=lambda base, scale: torch.ops.fastlora_core.scaled_sin(base, scale))])
    assert _only_near_miss(report)["kind"] == "input_inside"


def test_declarations_of_a_refused_match_change_nothing():
    def check(m):
        m.absorb(m["base"])
        m.drop_input("base")
        m.add_input("x", m["base"].args[0])
        return {}

    def wrong_dtype(x, scale):
        return torch.ops.fastlora_core.scaled_sin(torch.exp(x), scale).double()

    gm = graph_of(lambda x: torch.sin(x.exp()) * 2.0, torch.randn(3))
    canonicalize(gm.graph)
    before = [n.format_node() for n in gm.graph.nodes]
    report = Report(0, {})
    apply_patterns(gm.graph, [_absorbing(anchor=torch.sin, check=check,
                                         replacement=wrong_dtype)], report)
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert _only_near_miss(report)["kind"] == "replacement"


def test_an_input_from_outside_a_body_nobody_calls_is_refused():
    outer = graph_of(lambda y: torch.exp(y), torch.randn(3)).graph
    y_exp = node_calling(outer, torch.exp)

    def check(m):
        m.add_input("extra", y_exp)  # a value of another graph, not around this one
        return {}

    _, report = _rewrite(lambda x: torch.sin(x) * 2.0, [_scaled_sin_pattern(
        check=check,
        replacement=lambda x, scale, extra: torch.ops.fastlora_core.scaled_sin(x, scale))])
    miss = _only_near_miss(report)
    assert miss["kind"] == "input_outside"
    assert "(an input of the compiled graph)" in miss["reason"], miss


PROBE_SEEN = []


@torch.library.custom_op("fastlora_core::dispatch_probe", mutates_args=())
def dispatch_probe(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.sin(x) * scale


@dispatch_probe.register_fake
def _(x, scale):
    PROBE_SEEN.append(torch._C._dispatch_tls_is_dispatch_key_included(
        torch._C.DispatchKey.PythonDispatcher))
    return torch.empty_like(x)


def test_replacements_run_on_fakes_with_the_python_dispatcher():
    """The rewriter runs a replacement on the graph's fake tensors (its check, and the example
    value of each new node) the way Dynamo runs ops: with the Python dispatcher on. Without it a
    composite op runs its C++ form, which may read a symbolic size as a number: CUDA's
    scaled_dot_product_attention did, guarding the length (a recompile per length on a GPU)."""
    PROBE_SEEN.clear()
    pattern = _scaled_sin_pattern(
        replacement=lambda x, scale: torch.ops.fastlora_core.dispatch_probe(x, scale))
    graph, report = _rewrite(lambda x: torch.sin(x) * 3.0, [pattern])
    assert [m["pattern"] for m in report.matches] == ["scaled_sin"]
    assert len(PROBE_SEEN) >= 2 and all(PROBE_SEEN), PROBE_SEEN  # the check and the new node
