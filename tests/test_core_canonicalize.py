"""Unit tests of step 2 of the pipeline, canonicalize.py, on small hand-built FX graphs: each
rule gives one spelling for many, and the graph computes the same values after it."""
import operator

import torch
import torch.nn.functional as F
from torch import fx

from fastlora.canonicalize import CAST, canonicalize
from fx_graphs import calls, graph_of, node_calling, run


def _same_values(fn, *inputs):
    """Canonicalize the graph of ``fn``; check that it still computes what ``fn`` does."""
    gm = graph_of(fn, *inputs)
    canonicalize(gm.graph)
    got, want = run(gm, *inputs), fn(*inputs)
    assert torch.equal(got, want)
    return gm.graph


def test_methods_and_operators_become_torch_functions():
    graph = _same_values(lambda x, y: (x.pow(2) * y).rsqrt().reshape(6, 4) - y.reshape(6, 4),
                         torch.rand(4, 6) + 1, torch.rand(4, 6) + 1)
    assert calls(graph) == [torch.pow, torch.mul, torch.rsqrt, torch.Tensor.reshape,
                            torch.Tensor.reshape, torch.sub]
    assert all(n.op != "call_method" for n in graph.nodes)


def test_no_op_cast_is_removed_and_its_readers_read_the_input():
    graph = _same_values(lambda x: torch.sin(x.float()), torch.randn(5))
    assert calls(graph) == [torch.sin]
    assert node_calling(graph, torch.sin).args[0].op == "placeholder"


def test_every_real_cast_becomes_one_spelling():
    x, y = torch.randn(3, dtype=torch.bfloat16), torch.randn(3)
    for fn in (lambda x, y: x.float(), lambda x, y: x.to(torch.float32),
               lambda x, y: x.to(dtype=torch.float32), lambda x, y: x.type_as(y),
               lambda x, y: x.to(y.dtype), lambda x, y: x.type(torch.float32)):
        graph = _same_values(lambda x, y: fn(x, y) + y, x, y)
        cast = node_calling(graph, CAST)
        assert cast.args[1] == torch.float32 and not cast.kwargs, cast.format_node()


def test_a_cast_that_moves_to_another_device_is_not_a_cast():
    gm = graph_of(lambda x: x.to("meta", torch.float16), torch.randn(3))
    canonicalize(gm.graph)
    assert node_calling(gm.graph, CAST).args[1:] == ("meta", torch.float16)  # left as written


def test_square_by_product_becomes_pow():
    graph = _same_values(lambda x: x * x + 1, torch.randn(4))
    pow_node = node_calling(graph, torch.pow)
    assert pow_node.args[1] == 2 and torch.mul not in calls(graph)


def test_defaults_are_filled_in_and_keywords_made_positional():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    graph = _same_values(lambda x, w: F.linear(x, w), x, w)
    assert node_calling(graph, F.linear).args[2] is None
    graph = _same_values(lambda x: torch.mean(x, dim=[-1], keepdim=True), x)
    mean = node_calling(graph, torch.mean)
    assert mean.args[1:] == (-1, True) and mean.kwargs == {"dtype": None}
    graph = _same_values(lambda x, w: torch.add(x, w[:2, :], alpha=1), x, w)
    add = node_calling(graph, torch.add)
    assert not add.kwargs and len(add.args) == 2
    graph = _same_values(lambda x, w: torch.add(x, w[:2, :], alpha=2), x, w)
    assert node_calling(graph, torch.add).kwargs == {"alpha": 2}


def test_slices_from_zero_or_by_one_spell_the_default():
    graph = _same_values(lambda x: x[..., 0::2] + x[..., 1::2] * x[..., 0:3:1].sum(),
                         torch.randn(2, 6))
    indices = [n.args[1] for n in graph.nodes if n.target is operator.getitem]
    assert (Ellipsis, slice(None, None, 2)) in indices
    assert (Ellipsis, slice(1, None, 2)) in indices
    assert (Ellipsis, slice(None, 3, None)) in indices


def test_comparison_dunder_becomes_the_torch_comparison():
    # Dynamo records HF's `a == b` as the method call `a.__eq__(b)` on some torch versions
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.output(graph.call_method("__eq__", (x, y)))
    canonicalize(graph)
    assert calls(graph) == [torch.eq]
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert run(gm, torch.tensor([1, 2]), torch.tensor([1, 3])).tolist() == [True, False]


def test_canonical_graph_is_a_fixed_point():
    gm = graph_of(lambda x: (x.float() * x.float()).mean(-1, keepdim=True).rsqrt(),
                  torch.randn(2, 8, dtype=torch.bfloat16))
    canonicalize(gm.graph)
    before = [(n.target, n.args, n.kwargs) for n in gm.graph.nodes]
    canonicalize(gm.graph)
    assert [(n.target, n.args, n.kwargs) for n in gm.graph.nodes] == before
