"""Following values into and out of checkpointed layers (used by the attention mask prover).

Under gradient checkpointing each decoder layer is the body of a higher-order op and the mask
enters it as a placeholder; ``outer_value`` follows such a placeholder to the operand the call
passes in (the graph around the body is reachable: the backend records each body's callers as
``graph.fastlora_callers``), and ``bring_into`` passes an outer value (document ids) into the
body as a new operand. Only where the binding is certain; otherwise the reason is raised.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.canonicalize import example_value
from fastlora.matcher import describe
from fastlora.pattern import Reject


class _Unknown(Exception):
    """The prover cannot evaluate a node; the message names it."""


# Higher-order ops that run their body as ``body(*node.args[1:])``: body placeholder i receives
# operand i. Others (autograd_function_apply, cond, ...) bind inputs differently: not followed.
_CALLS_BODY = (torch.ops.higher_order.tag_activation_checkpoint,)


def _callers(graph):
    """(the calls of body ``graph``, its placeholders) when every call binds the placeholders to
    its operands in order, else the reason the mapping is not certain."""
    callers = getattr(graph, "fastlora_callers", None)  # recorded by the backend
    if not callers:
        return "an input of the compiled graph"
    places = [n for n in graph.nodes if n.op == "placeholder"]
    for c in callers:
        body, owner = (c.args or [None])[0], c.graph.owning_module
        if c.op != "call_function" or c.target not in _CALLS_BODY:
            return f"an input of a subgraph called by {describe(c)}, which fastlora does not follow"
        if not (isinstance(body, fx.Node) and body.op == "get_attr" and c.graph is callers[0].graph
                and getattr(getattr(owner, body.target, None), "graph", None) is graph
                and len(c.args) == 1 + len(places)):
            return f"an input of the subgraph {describe(c)} calls, whose operands do not line up"
    return callers, places


def outer_value(node):
    """The node outside that body placeholder ``node`` receives: every call of the body passes
    that same node, with the same dtype, device and shape. Else ``_Unknown`` says why."""
    found = _callers(node.graph)
    if isinstance(found, str):
        raise _Unknown(f"{describe(node)} ({found})")
    callers, places = found
    operands = {c.args[1 + places.index(node)] for c in callers}
    outer = operands.pop() if len(operands) == 1 else None
    a, b = example_value(outer), example_value(node)
    same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
        (a.dtype, a.device, a.dim()) == (b.dtype, b.device, b.dim()) and \
        all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
    if not (isinstance(outer, fx.Node) and same):
        raise _Unknown(f"{describe(node)} (an input of a checkpointed layer that its calls do "
                       "not bind to one tensor outside it)")
    return outer


def _outside(node):
    """``node``, or while it is a body placeholder with a certain outer value, that value."""
    while isinstance(node, fx.Node) and node.op == "placeholder":
        try:
            node = outer_value(node)
        except _Unknown:
            break
    return node


def bring_into(node, graph):
    """``node`` (of ``graph`` or a graph around it) as a node of ``graph``: the placeholder that
    receives it, added (with the operand appended to every call of the body, outwards through
    nested bodies) where none does yet. Reject where that is not certain."""
    if node.graph is graph:
        return node
    found = _callers(graph)
    if isinstance(found, str):
        raise Reject(f"{describe(node)} is computed outside the subgraph of the attention, "
                     f"which fastlora cannot pass it into ({found})")
    callers, places = found
    outer = bring_into(node, callers[0].graph)
    for i, p in enumerate(places):
        if all(c.args[1 + i] is outer for c in callers):
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
