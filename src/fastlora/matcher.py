"""Step 3 of the pipeline: find where a pattern's spellings occur in a canonical graph.

A spelling is traced with ``torch.fx.symbolic_trace`` and canonicalized like the model graph.
Matching starts at each graph node that calls the same op as the spelling's (first) output and
walks backwards through arguments, like inductor's pattern matcher:

- a spelling parameter binds to a graph node (tensor inputs) or a literal (eps); binding the same
  parameter twice must give the same thing;
- an operation must call the same canonical op with equal literal arguments; for ``add`` and
  ``mul`` both argument orders are tried;
- a dtype cast in the spelling matches a cast in the graph, or nothing (a removed no-op cast).

Every failed attempt remembers how far it got and why it stopped, so the report can say why a
place that nearly matched did not ("expected torch.mean, found torch.sum").
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import torch
from torch import fx

from .canonicalize import CAST, canonicalize

_COMMUTATIVE = (torch.add, torch.mul)
_LITERAL_TYPES = (float, int, bool)


@dataclasses.dataclass
class SpellingGraph:
    name: str
    graph: fx.Graph
    params: dict  # placeholder node -> ("tensor" | "literal" | "any", parameter name)
    outputs: list[fx.Node]


def _param_kind(annotation) -> str:
    if annotation in _LITERAL_TYPES or annotation in ("float", "int", "bool"):
        return "literal"
    if annotation is torch.Tensor or annotation in ("Tensor", "torch.Tensor"):
        return "tensor"
    return "any"


@functools.lru_cache(maxsize=None)
def trace_spelling(fn: Callable) -> SpellingGraph:
    """Trace a spelling function into a canonical pattern graph (cached per function)."""
    gm = fx.symbolic_trace(fn)
    graph = canonicalize(gm.graph)
    graph.eliminate_dead_code()
    sig = inspect.signature(fn)
    params = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            ann = sig.parameters[node.target].annotation
            params[node] = (_param_kind(ann), node.target)
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if not all(isinstance(o, fx.Node) and o.op == "call_function" for o in outs):
        raise ValueError(f"spelling {fn.__name__}: every output must be computed by an operation")
    return SpellingGraph(fn.__name__, graph, params, outs)


class _Fail(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class _State:
    node_map: dict  # pattern op node -> graph node
    bindings: dict  # parameter name -> graph node or literal

    def copy(self):
        return _State(dict(self.node_map), dict(self.bindings))


@dataclasses.dataclass
class Attempt:
    """A finished attempt: a full match (reason None) or how far a failed one got."""

    spelling: str
    state: _State
    reason: str | None


def _op_name(target) -> str:
    if target is CAST:
        return "a dtype cast"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    if mod.startswith("torch.nn.functional") or target.__class__.__name__ == "builtin_function_or_method" and mod == "torch._C._nn":
        return f"F.{name}"
    if name.startswith("TensorBase.") or name.startswith("Tensor."):
        return "Tensor." + name.split(".", 1)[1]
    if mod == "torch" or mod.startswith("torch._C"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


def describe(node_or_literal) -> str:
    if isinstance(node_or_literal, fx.Node):
        if node_or_literal.op == "call_function":
            return f"{_op_name(node_or_literal.target)} (`{node_or_literal.name}`)"
        return f"`{node_or_literal.name}` ({node_or_literal.op})"
    return f"the literal {node_or_literal!r}"


def _match_value(p_arg, t_arg, spelling: SpellingGraph, st: _State) -> None:
    if isinstance(p_arg, fx.Node):
        _match_node(p_arg, t_arg, spelling, st)
    elif isinstance(p_arg, (list, tuple)):
        if not isinstance(t_arg, (list, tuple)) or len(p_arg) != len(t_arg):
            raise _Fail(f"expected a sequence of {len(p_arg)} items, found {t_arg!r}")
        for a, b in zip(p_arg, t_arg):
            _match_value(a, b, spelling, st)
    elif isinstance(t_arg, fx.Node):
        raise _Fail(f"expected the literal {p_arg!r}, found {describe(t_arg)}")
    elif p_arg != t_arg or type(p_arg) is bool and type(t_arg) is not bool:
        raise _Fail(f"expected the literal {p_arg!r}, found {t_arg!r}")


def _bind(p: fx.Node, t, spelling: SpellingGraph, st: _State) -> None:
    kind, name = spelling.params[p]
    if kind == "tensor" and not isinstance(t, fx.Node):
        raise _Fail(f"input `{name}` must be a tensor, found {describe(t)}")
    if kind == "literal" and isinstance(t, fx.Node):
        raise _Fail(f"`{name}` must be a constant known at compile time, found {describe(t)}")
    if name in st.bindings:
        if st.bindings[name] is not t and not (not isinstance(t, fx.Node)
                                               and st.bindings[name] == t):
            raise _Fail(f"input `{name}` would be both {describe(st.bindings[name])} "
                        f"and {describe(t)}")
        return
    st.bindings[name] = t


def _match_node(p: fx.Node, t, spelling: SpellingGraph, st: _State) -> None:
    if p.op == "placeholder":
        return _bind(p, t, spelling, st)
    if p in st.node_map:
        if st.node_map[p] is not t:
            raise _Fail(f"{describe(t)} should be the same value as {describe(st.node_map[p])}")
        return
    if p.target is CAST:
        if isinstance(t, fx.Node) and t.op == "call_function" and t.target is CAST:
            st.node_map[p] = t
            return _match_value(p.args[0], t.args[0], spelling, st)
        return _match_value(p.args[0], t, spelling, st)  # the cast was a no-op here
    if not isinstance(t, fx.Node) or t.op != "call_function":
        raise _Fail(f"expected {_op_name(p.target)}, found {describe(t)}")
    if t.target is not p.target:
        raise _Fail(f"expected {_op_name(p.target)}, found {describe(t)}")
    if t in st.node_map.values():
        raise _Fail(f"{describe(t)} would stand for two operations of the pattern")
    if len(p.args) != len(t.args) or set(p.kwargs) != set(t.kwargs):
        raise _Fail(f"{describe(t)} is called with other arguments than the pattern's")
    st.node_map[p] = t
    orders = [list(t.args)]
    if p.target in _COMMUTATIVE and len(t.args) == 2:
        orders.append([t.args[1], t.args[0]])
    failure = None
    for order in orders:
        trial = st.copy()
        try:
            for a, b in zip(p.args, order):
                _match_value(a, b, spelling, trial)
            for k, v in p.kwargs.items():
                _match_value(v, t.kwargs[k], spelling, trial)
        except _Fail as e:
            if failure is None or len(trial.node_map) > failure[1]:
                failure = (e, len(trial.node_map), trial)
            continue
        st.node_map, st.bindings = trial.node_map, trial.bindings
        return
    st.node_map, st.bindings = failure[2].node_map, failure[2].bindings
    raise failure[0]


def _local_nodes(seeds, depth: int) -> list[fx.Node]:
    """Nodes reachable from ``seeds`` through at most ``depth`` user edges."""
    seen, frontier = set(), [n for n in seeds if isinstance(n, fx.Node)]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return list(seen)


def attempts_at(spelling: SpellingGraph, first_output: fx.Node, taken: set):
    """Yield attempts to match ``spelling`` with its first output at ``first_output``.

    Later outputs of a multi-output spelling (k beside q in RoPE) are searched among nodes near
    the inputs already bound, so the search stays local.
    """
    st = _State({}, {})
    try:
        _match_node(spelling.outputs[0], first_output, spelling, st)
    except _Fail as e:
        yield Attempt(spelling.name, st, e.reason)
        return
    yield from _match_rest(spelling, 1, st, taken)


def _match_rest(spelling: SpellingGraph, i: int, st: _State, taken: set):
    if i == len(spelling.outputs):
        yield Attempt(spelling.name, st, None)
        return
    depth = len([n for n in spelling.graph.nodes if n.op == "call_function"])
    seeds = [v for v in st.bindings.values() if isinstance(v, fx.Node)]
    target = spelling.outputs[i].target
    found = False
    for cand in _local_nodes(seeds, depth):
        if cand.op != "call_function" or cand.target is not target or cand in taken \
                or cand in st.node_map.values():
            continue
        trial = st.copy()
        try:
            _match_node(spelling.outputs[i], cand, spelling, trial)
        except _Fail as e:
            yield Attempt(spelling.name, trial, e.reason)
            continue
        found = True
        yield from _match_rest(spelling, i + 1, trial, taken)
    if not found:
        yield Attempt(spelling.name, st, f"no partner found for output {i} of the pattern")
