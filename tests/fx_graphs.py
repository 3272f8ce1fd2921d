"""Small hand-built FX graphs for the unit tests of the compiler stages (tests/test_core_*.py).

``graph_of(fn, *inputs)`` traces ``fn`` with ``torch.fx.symbolic_trace`` (so the graph keeps
the spellings model code uses: ``x.float()`` as call_method, ``a * b`` as operator.mul) and
records on every node the fake tensor it computes, as ``meta["example_value"]``, the way Dynamo
does. ``run(gm, *inputs)`` runs a graph module on real tensors."""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode


class _Recorder(fx.Interpreter):
    def run_node(self, node):
        value = super().run_node(node)
        node.meta["example_value"] = value
        return value


def graph_of(fn, *inputs) -> fx.GraphModule:
    """``fn`` traced, with a fake ``example_value`` on every node computed from ``inputs``."""
    gm = fx.symbolic_trace(fn)
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with mode:
        _Recorder(gm).run(*fakes)
    return gm


def run(gm: fx.GraphModule, *inputs):
    gm.recompile()
    return gm(*inputs)


def calls(graph: fx.Graph) -> list:
    """The targets of the graph's call_function nodes, in order."""
    return [n.target for n in graph.nodes if n.op == "call_function"]


def node_calling(graph: fx.Graph, target) -> fx.Node:
    found = [n for n in graph.nodes if n.op == "call_function" and n.target is target]
    assert len(found) == 1, f"{len(found)} nodes call {target}"
    return found[0]
