"""Following values into and out of checkpointed layers (used by the attention mask prover).

Under gradient checkpointing each decoder layer is the body of a higher-order op and the mask
enters it as a placeholder; ``outer_value`` follows such a placeholder to the operand the call
passes in (the graph around the body is reachable: the backend records each body's callers as
``graph.fastlora_callers``; src/fastlora/bodies.py), where that binding is certain; otherwise
the reason is raised. Passing an outer value into a body is the rewriter's (``Match.add_input``).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlora.bodies import callers_of, operands
from fastlora.canonicalize import example_value
from fastlora.matcher import describe


class _Unknown(Exception):
    """The prover cannot evaluate a node; the message names it."""


def outer_value(node):
    """The node outside that body placeholder ``node`` receives: every call of the body passes
    that same node, with the same dtype, device and shape. Else ``_Unknown`` says why."""
    found = callers_of(node.graph)
    if isinstance(found, str):
        raise _Unknown(f"{describe(node)} ({found})")
    callers, places = found
    passed = {operands(c)[places.index(node)] for c in callers}
    outer = passed.pop() if len(passed) == 1 else None
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

