"""Values across the bodies of higher-order ops (checkpointed layers).

Under gradient checkpointing each decoder layer is the body of a higher-order op: a graph of its
own whose placeholders receive the operands of the call in the graph around it. So is each layer
compiled once as a nested compile region (trainer.py), one body then serving every call. The backend
records each body's callers as ``graph.fastlora_callers`` (backend.py). ``callers_of`` says
whether those calls bind the placeholders certainly; ``bring_into`` passes a value of the graph
around into the body as a new operand (the rewriter does it for a match's ``add_input`` of an
outer value, once the match is proven; ``cannot_bring_into`` says first whether it can).
"""
from __future__ import annotations

import torch
from torch import fx

from .canonicalize import example_value
from .matcher import describe

# Higher-order ops that run their body on the call's operands in order, and where the operands
# start: ``tag_activation_checkpoint(body, *operands)`` (a checkpointed layer) and
# ``invoke_subgraph(body, identifier, *operands)`` (a ``torch.compiler.nested_compile_region``,
# one body shared by every call: a decoder layer compiled once; the same form on torch 2.11 and
# 2.13). Others (autograd_function_apply, cond, ...) bind inputs differently: not followed.
OPERANDS_FROM = {torch.ops.higher_order.tag_activation_checkpoint: 1}
if hasattr(torch.ops.higher_order, "invoke_subgraph"):
    OPERANDS_FROM[torch.ops.higher_order.invoke_subgraph] = 2
CALLS_BODY = tuple(OPERANDS_FROM)


def operands(call: fx.Node) -> tuple:
    """The operands ``call`` (a call of a ``CALLS_BODY`` op) passes to its body, in order."""
    return tuple(call.args[OPERANDS_FROM[call.target]:])


def callers_of(graph: fx.Graph):
    """(the calls of body ``graph``, its placeholders) when every call binds the placeholders to
    its operands in order, else the reason the mapping is not certain."""
    callers = getattr(graph, "fastlora_callers", None)  # recorded by the backend
    if not callers:
        return "an input of the compiled graph"
    places = [n for n in graph.nodes if n.op == "placeholder"]
    for c in callers:
        body, owner = (c.args or [None])[0], c.graph.owning_module
        if c.op != "call_function" or c.target not in CALLS_BODY:
            return f"an input of a subgraph called by {describe(c)}, which fastlora does not follow"
        if not (isinstance(body, fx.Node) and body.op == "get_attr" and c.graph is callers[0].graph
                and getattr(getattr(owner, body.target, None), "graph", None) is graph
                and len(operands(c)) == len(places)):
            return f"an input of the subgraph {describe(c)} calls, whose operands do not line up"
    return callers, places


def cannot_bring_into(node: fx.Node, graph: fx.Graph) -> str | None:
    """Why ``node`` (of a graph around ``graph``) cannot be passed into ``graph``; None if it
    can (or already is a node of ``graph``)."""
    while node.graph is not graph:
        found = callers_of(graph)
        if isinstance(found, str):
            return (f"{describe(node)} is computed outside the subgraph of the match, which "
                    f"fastlora cannot pass it into ({found})")
        graph = found[0][0].graph
    return None


def bring_into(node: fx.Node, graph: fx.Graph) -> fx.Node:
    """``node`` (of ``graph`` or a graph around it) as a node of ``graph``: the placeholder that
    receives it, added (with the operand appended to every call of the body, outwards through
    nested bodies) where none does yet. Call ``cannot_bring_into`` first."""
    if node.graph is graph:
        return node
    found = callers_of(graph)
    assert not isinstance(found, str), found
    callers, places = found
    outer = bring_into(node, callers[0].graph)
    for i, p in enumerate(places):
        if all(operands(c)[i] is outer for c in callers):
            return p
    name, taken = f"fastlora_{outer.name}", {p.target for p in places}
    while name in taken:
        name += "_"
    with graph.inserting_after(places[-1]) if places else graph.inserting_before():
        p = graph.placeholder(name)
    p.meta["example_value"] = example_value(outer)
    for c in callers:  # the body runs as body(*operands): one more operand, in the same place
        c.args = (*c.args, outer)
    return p
