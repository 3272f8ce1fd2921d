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

from .canonicalize import CAST, canonicalize, example_value

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


def output_targets(spelling: SpellingGraph, i: int = 0) -> set:
    """Ops a graph node may call to be the spelling's output ``i``: its op, and if that is a
    cast, also the op under it (the cast may have been a no-op, removed from the graph)."""
    targets, node = set(), spelling.outputs[i]
    while node.op == "call_function" and node.target is CAST:
        targets.add(CAST)
        node = node.args[0]
    if node.op == "call_function":
        targets.add(node.target)
    return targets


def precedence(spelling: SpellingGraph) -> tuple[int, int]:
    """Which spelling of a pattern is tried first (larger first): the count of its ops that
    always bind a graph node, then the count of all its ops. A cast may bind nothing (a no-op
    cast in a float32 graph), so casts only break ties: a spelling that is another plus casts
    wins where the graph has those casts, and cannot outrank a spelling with more real ops
    (GLM's partial interleaved rotation against ERNIE's cast-heavy full one, in float32)."""
    ops = [n for n in spelling.graph.nodes if n.op == "call_function"]
    return sum(1 for n in ops if n.target is not CAST), len(ops)


class _Fail(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class _State:
    node_map: dict  # pattern op node -> graph node
    bindings: dict  # parameter name -> graph node or literal
    casts: list = dataclasses.field(default_factory=list)  # (dtype spec, graph node) to verify
    outputs: list = dataclasses.field(default_factory=list)  # graph node of each output

    def copy(self):
        return _State(dict(self.node_map), dict(self.bindings), list(self.casts),
                      list(self.outputs))

    def adopt(self, trial: "_State") -> None:
        """Take over what a successful (or the furthest failed) trial copy matched."""
        self.node_map, self.bindings, self.casts = trial.node_map, trial.bindings, trial.casts


@dataclasses.dataclass
class Attempt:
    """A finished attempt: a full match (reason None) or how far a failed one got."""

    spelling: str
    state: _State
    reason: str | None


def _op_name(target) -> str:
    if target is CAST:
        return "a dtype cast"
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)  # torch.ops.* overloads print as ns.op.overload
    for prefix, owner in (("torch", torch), ("F", torch.nn.functional), ("Tensor", torch.Tensor)):
        if getattr(owner, name, None) is target:
            return f"{prefix}.{name}"
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


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
    elif isinstance(p_arg, slice):  # x[..., :half] with `half` a spelling parameter
        if not isinstance(t_arg, slice):
            raise _Fail(f"expected a slice, found {describe(t_arg)}")
        for a, b in ((p_arg.start, t_arg.start), (p_arg.stop, t_arg.stop),
                     (p_arg.step, t_arg.step)):
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


def _match_cast(p: fx.Node, t, spelling: SpellingGraph, st: _State) -> None:
    """A cast in the spelling matches a cast in the graph (which joins the region), or nothing:
    the graph value already has the dtype the spelling casts to, so the spelling's cast is a
    no-op on it (a removed no-op cast, or a cast the model made earlier for other readers too,
    such as Gemma's RMSNorm casting its output back to bf16 for q, k and v). Either way the
    dtype there must be the one the spelling asked for (checked by _verify_casts once every
    input is bound), so both readings compute the same values.

    A graph cast read by more nodes than the spelling's cast is read by would escape the region
    (each reader in the spelling stands for one graph node), so it is only ever taken as an
    input. Otherwise taking it into the region is tried first, then taking it as an input.
    """
    readings = [(t, False)]  # (the graph value the spelling's input stands for, cast taken in)
    if isinstance(t, fx.Node) and t.op == "call_function" and t.target is CAST \
            and (p in spelling.outputs or len(t.users) <= len(p.users)):
        readings.insert(0, (t.args[0], True))
    failure = None
    for source, taken_in in readings:
        trial = st.copy()
        if taken_in:
            trial.node_map[p] = t
        trial.casts.append((p.args[1], t))
        try:
            _match_value(p.args[0], source, spelling, trial)
        except _Fail as e:
            failure = failure or (e, trial)
            continue
        st.adopt(trial)
        return
    st.adopt(failure[1])
    raise failure[0]


def _match_node(p: fx.Node, t, spelling: SpellingGraph, st: _State) -> None:
    if p.op == "placeholder":
        return _bind(p, t, spelling, st)
    if p in st.node_map:
        if st.node_map[p] is not t:
            raise _Fail(f"{describe(t)} should be the same value as {describe(st.node_map[p])}")
        return
    if p.target is CAST:
        return _match_cast(p, t, spelling, st)
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
        st.adopt(trial)
        return
    st.adopt(failure[2])
    raise failure[0]


def _intended_dtype(spec, spelling: SpellingGraph, st: _State):
    if isinstance(spec, torch.dtype):
        return spec
    if isinstance(spec, fx.Node) and spec.op == "call_function" and spec.target is getattr \
            and spec.args[1] == "dtype":
        spec = spec.args[0]  # x.dtype
    if isinstance(spec, fx.Node) and spec.op == "placeholder":
        value = example_value(st.bindings.get(spelling.params[spec][1]))
        return value.dtype if isinstance(value, torch.Tensor) else None
    return None


def _verify_casts(spelling: SpellingGraph, st: _State) -> None:
    for spec, node in st.casts:
        want = _intended_dtype(spec, spelling, st)
        have = example_value(node)
        have = have.dtype if isinstance(have, torch.Tensor) else None
        if want is None or have != want:
            raise _Fail(f"the spelling casts to {want or 'an unknown dtype'} where the graph "
                        f"has {have} ({describe(node)}), so the numerics would differ")


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
    st = _State({}, {}, outputs=[first_output])
    try:
        _match_node(spelling.outputs[0], first_output, spelling, st)
    except _Fail as e:
        yield Attempt(spelling.name, st, e.reason)
        return
    yield from _match_rest(spelling, 1, st, taken)


def _match_rest(spelling: SpellingGraph, i: int, st: _State, taken: set):
    if i == len(spelling.outputs):
        try:
            _verify_casts(spelling, st)
        except _Fail as e:
            yield Attempt(spelling.name, st, e.reason)
            return
        yield Attempt(spelling.name, st, None)
        return
    if spelling.outputs[i] in st.node_map:
        # An output that is also an intermediate of an earlier one (the logits beside the loss
        # computed from them): it is the graph node already matched there.
        trial = st.copy()
        trial.outputs.append(st.node_map[spelling.outputs[i]])
        yield from _match_rest(spelling, i + 1, trial, taken)
        return
    depth = len([n for n in spelling.graph.nodes if n.op == "call_function"])
    seeds = [v for v in st.bindings.values() if isinstance(v, fx.Node)]
    targets = output_targets(spelling, i)
    found = False
    for cand in _local_nodes(seeds, depth):
        if cand.op != "call_function" or cand.target not in targets or cand in taken \
                or cand in st.node_map.values():
            continue
        trial = st.copy()
        trial.outputs.append(cand)
        try:
            _match_node(spelling.outputs[i], cand, spelling, trial)
        except _Fail as e:
            yield Attempt(spelling.name, trial, e.reason)
            continue
        found = True
        yield from _match_rest(spelling, i + 1, trial, taken)
    if not found:
        yield Attempt(spelling.name, st, f"no partner found for output {i} of the pattern")
