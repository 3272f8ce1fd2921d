"""Step 4 of the pipeline: replace each proven match with one call of a fused op.

For every pattern (in the order of stages.py) and every spelling, each graph node calling the
spelling's output op is tried. A full match is rewritten only when all of these hold, and is
otherwise reported as a near miss with the first that failed:

1. no value computed inside the region is used outside it (an escaping intermediate would have to
   be recomputed or kept alive, and the fused op does not produce it);
2. the pattern's ``check`` accepts it (dtypes, shapes, devices, literals);
3. what the check declared on the match (``Match.absorb``, ``add_input``, ``drop_input``) keeps
   1. true of the final region, and every added input from a graph around this one can be
   passed in (bodies.py);
4. the replacement, run on the recorded fake tensors, gives outputs of exactly the shapes and
   dtypes the graph had there;
5. there is a place for the fused op at which every input holds the value the region read (no
   in-place write to an input lies between that place and the region's reads; mutations.py).

Only then is the graph changed: added outer inputs are passed into the body, the replacement
function is called with ``torch.fx.Proxy`` arguments, which records its ops into the graph, the
region's outputs are redirected to the new values and the region is erased.
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .bodies import bring_into, cannot_bring_into
from .canonicalize import example_value
from .matcher import Attempt, attempts_at, describe, output_targets, precedence, trace_spelling
from .mutations import placement
from .pattern import Match, Pattern, Reject
from .refusal import Refusal, RefusalKind
from .report import Report
from .report_graph import record_flow


def _escaping(match: Match) -> Refusal | None:
    region, outputs = match.region, set(match.outputs)
    for node in match.outputs[0].graph.nodes:
        if node in region and node not in outputs:
            outside = [u for u in node.users if u not in region]
            if outside:
                return Refusal(RefusalKind.ESCAPE,
                               f"the intermediate {describe(node)} is also used outside the "
                               f"pattern by {describe(outside[0])}, so the region cannot be "
                               f"replaced by one op")
    for name, bound in match.inputs().items():
        if isinstance(bound, fx.Node) and bound in region:
            return Refusal(RefusalKind.INPUT_INSIDE,
                           f"input `{name}` is computed inside the region itself")
    return None


def _declared(match: Match) -> Refusal | None:
    """Step 3: what the check declared, proven on the final region before anything changes."""
    if not (match.absorbed or match.added_inputs or match.dropped_inputs):
        return None
    refusal = _escaping(match)
    if refusal is not None:
        return refusal
    graph = match.outputs[0].graph
    for value in match.added_inputs.values():
        if isinstance(value, fx.Node) and value.graph is not graph:
            reason = cannot_bring_into(value, graph)
            if reason is not None:
                return Refusal(RefusalKind.INPUT_OUTSIDE, reason)
    return None


def _fake_mode(values):
    for v in values:
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _same_meta(old, new) -> str | None:
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return "the replacement returned something other than a tensor"
    if old.dtype != new.dtype:
        return f"the fused op would return {new.dtype} where the graph has {old.dtype}"
    if old.dim() != new.dim() or not all(
            statically_known_true(a == b) for a, b in zip(old.shape, new.shape)):
        return f"the fused op would return shape {tuple(new.shape)} where the graph has " \
               f"{tuple(old.shape)}"
    if old.device != new.device:
        return f"the fused op would return a tensor on {new.device}, not {old.device}"
    return None


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@contextlib.contextmanager
def _on_fakes(mode):
    """Run ops on the graph's fake tensors as Dynamo does: in its fake mode, with the Python
    dispatcher on. Without it a composite op runs its C++ form, which may read a symbolic size
    as a number (CUDA's scaled_dot_product_attention calls ``sizes()``): that guards the length
    to its example value, and the graph recompiles at every new length."""
    from torch._dispatch.python import enable_python_dispatcher

    with mode, enable_python_dispatcher():
        yield


def _check_replacement(match: Match) -> str | None:
    """Run the replacement on the recorded fake tensors; compare with the graph's outputs."""
    values = {k: example_value(v) if isinstance(v, fx.Node) else v
              for k, v in match.inputs().items()}
    mode = _fake_mode(values.values())
    if mode is None:
        return "the graph carries no fake tensors for the inputs (not a Dynamo graph?)"
    with _on_fakes(mode):
        outs = _as_list(match.pattern.replacement(**{**values, **match.params}))
    if len(outs) != len(match.outputs):
        return f"the replacement returned {len(outs)} values for {len(match.outputs)} outputs"
    for old_node, new in zip(match.outputs, outs):
        problem = _same_meta(example_value(old_node), new)
        if problem:
            return problem
    return None


def _position(match: Match):
    """The node the fused op is inserted before: right after its last input if that lies after
    the first output, else before the first output; moved where an input is written in place
    in between (mutations.py). A Refusal where no place keeps every input's value."""
    graph = match.outputs[0].graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    inputs = [v for v in match.inputs().values() if isinstance(v, fx.Node) and v.graph is graph]
    last_input = max((order[n] for n in inputs), default=-1)
    first_out = min(order[n] for n in match.outputs)
    preferred = last_input + 1 if last_input >= first_out else first_out
    readers = [order[u] for out in match.outputs for u in out.users if u not in match.region]
    latest = max(min(readers, default=len(nodes) - 1), preferred)
    where = placement(match, inputs, order, preferred, last_input, latest)
    if isinstance(where, str):
        return Refusal(RefusalKind.WRITTEN_INPUT, where)
    return nodes[where]


def _insert(match: Match, index: int, at: fx.Node) -> None:
    graph = match.outputs[0].graph
    # inputs from a graph around this body, passed in as new operands of its calls
    bound = {k: bring_into(v, graph) if isinstance(v, fx.Node) else v
             for k, v in match.inputs().items()}
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [v for v in bound.values() if isinstance(v, fx.Node)]
    ctx = graph.inserting_before(at)  # keeps the new nodes in program order
    meta_src = match.outputs[-1]
    tracer = fx.proxy.GraphAppendingTracer(graph)
    before = set(graph.nodes)
    with ctx:
        args = {k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v
                for k, v in bound.items()}
        outs = _as_list(match.pattern.replacement(**{**args, **match.params}))
    new_nodes = [n for n in graph.nodes if n not in before]
    mode = _fake_mode(example_value(n) for n in inputs)
    for n in new_nodes:  # record fake values so later patterns can read shapes and dtypes
        n.meta["fastlora_match"] = index  # which report entry inserted it
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in meta_src.meta:
                n.meta[key] = meta_src.meta[key]
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: example_value(a))
        with _on_fakes(mode):
            n.meta["example_value"] = n.target(*args, **kwargs)
    out_nodes = [new.node if isinstance(new, fx.Proxy) else new for new in outs]
    for old, new in zip(match.outputs, out_nodes):
        old.replace_all_uses_with(new)
    for node in sorted(match.region, key=order.__getitem__, reverse=True):  # users first
        if not node.users:
            graph.erase_node(node)
    _stable_topological_sort(graph, new_nodes + [n for n in out_nodes if isinstance(n, fx.Node)])


def _stable_topological_sort(graph: fx.Graph, changed: list[fx.Node]) -> None:
    """Move nodes only where a node now precedes one of its inputs (rare: multi-output regions).
    Only ``changed`` nodes (the inserted ones and the outputs whose users they took over) can
    be out of order: the rest of the graph kept its order."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    if all(position[i] < position[n] for n in changed for i in n.all_input_nodes) and \
            all(position[n] < position[u] for n in changed for u in n.users):
        return
    placed, cursor = set(), None
    for node in list(graph.nodes):
        stack = [node]
        while stack:
            top = stack[-1]
            if top in placed:
                stack.pop()
                continue
            waiting = [i for i in top.all_input_nodes if i not in placed]
            if waiting:
                stack.extend(waiting)
                continue
            stack.pop()
            placed.add(top)
            if cursor is not None:
                cursor.append(top)
            cursor = top


def apply_patterns(graph: fx.Graph, patterns: list[Pattern], report: Report,
                   strict: bool = False, options=None, top_level: bool = True,
                   call_sites=None) -> None:
    """Match and rewrite ``patterns`` in ``graph``; record matches and near misses in ``report``.

    ``options`` (the backend's Options) and ``top_level`` (False for the body of a higher-order
    op, whose outputs are not the model's) are handed to each pattern's ``check`` on the Match.
    ``call_sites``: the module path of each call that runs ``graph`` (a body shared by several
    decoder layers), recorded on each entry of the report so it counts once per call.
    """
    first_near_miss = len(report.near_misses)
    for pattern in patterns:
        best: dict[fx.Node, tuple[int, Refusal]] = {}  # anchor node -> (progress, refusal)

        def remember(attempt_nodes, progress: int, refusal: Refusal):
            for n in attempt_nodes:
                if pattern.is_anchor(n):
                    if n not in best or progress > best[n][0]:
                        best[n] = (progress, refusal)

        # Larger spellings first: Gemma's norm contains Llama's, and must win where both fit.
        spellings = sorted((trace_spelling(fn) for fn in pattern.spellings), key=precedence,
                           reverse=True)
        for spelling in spellings:
            starts = output_targets(spelling)
            erased: set = set()
            for node in list(graph.nodes):
                if node in erased or node.op != "call_function" or node.target not in starts:
                    continue
                for attempt in attempts_at(spelling, node, erased):
                    if _try_rewrite(pattern, attempt, spelling, report, remember, erased, strict,
                                    options, top_level, call_sites):
                        break
        for node in graph.nodes:  # anchors left in the graph are the near misses
            if pattern.is_anchor(node):
                refusal = best.get(node, (0, Refusal(
                    RefusalKind.NO_SPELLING,
                    f"no spelling of `{pattern.name}` leads to this {describe(node)}")))[1]
                reason = refusal.reason
                if pattern.explain_near_miss is not None:
                    reason = pattern.explain_near_miss(node, refusal)
                    if reason is None:
                        continue
                report.add_near_miss(pattern.name, node, reason, refusal.kind.value, call_sites)
    record_flow(report, graph, first_near_miss)  # which fused op feeds which (report_graph.py)


def _try_rewrite(pattern, attempt: Attempt, spelling, report, remember, erased, strict,
                 options=None, top_level=True, call_sites=None) -> bool:
    nodes = set(attempt.state.node_map.values())
    if attempt.reason is not None:
        remember(nodes, len(nodes),
                 Refusal(RefusalKind.SPELLING, f"spelling `{spelling.name}`: {attempt.reason}"))
        return False
    outputs = attempt.state.outputs
    match = Match(pattern, spelling.name, attempt.state.bindings, attempt.state.node_map, outputs)
    match.options, match.top_level = options, top_level
    refusal = _escaping(match)
    if refusal is None:
        try:
            match.params = dict(pattern.check(match) or {}) if pattern.check else {}
            refusal = _declared(match)
            problem = _check_replacement(match) if refusal is None else None
            if problem is not None:
                refusal = Refusal(RefusalKind.REPLACEMENT, problem)
            at = _position(match) if refusal is None else None
            if isinstance(at, Refusal):
                refusal = at
        except Reject as e:
            refusal = Refusal(RefusalKind.CHECK, str(e))
        except Exception as e:  # a broken pattern must not break the user's compile
            if strict:
                raise
            refusal = Refusal(RefusalKind.INTERNAL_ERROR, f"internal error in pattern "
                              f"`{pattern.name}`: {type(e).__name__}: {e}")
            report.errors.append(traceback.format_exc())
    if refusal is not None:
        remember(nodes, len(nodes) + 1000, refusal)  # a full match that was refused: best reason
        return False
    index = report.add_match(match, call_sites)
    for node in match.region:  # ops an earlier match inserted, now fused further by this one
        if "fastlora_match" in node.meta:
            report.absorb(node.meta["fastlora_match"], pattern.name)
    erased.update(match.region)
    _insert(match, index, at)
    return True
