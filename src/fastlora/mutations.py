"""Where a fused op may stand when the graph writes one of its inputs in place.

A Dynamo graph keeps the model's in-place ops: transformers 5.17's grouped experts forward
gathers the rows, reads the expert weight, then zeroes rows with ``x.masked_fill_(mask, 0.0)``
before the product reads ``x``. A fused op reads all its inputs at the one place it is inserted,
so it must stand where every input holds the value the region read: with no write to an
input's storage between that place and any node of the region that reads the input. Inserting
the experts op at the weight merge (its first output) put it before the ``masked_fill_``: it
would have multiplied rows the model had zeroed (autograd caught that one only because the op
saves ``x`` and the write bumped its version; without gradients it is a silent wrong value).

``placement`` picks the place nearest the rewriter's usual one (right after the last input, or
before the first output) among those that keep every input's value, within the span where the
op can stand at all (after its last input, before the first node outside the region that reads
one of its outputs). When no place keeps every value (a write falls between two reads of the
same input), the match is refused with the write named.
"""
from __future__ import annotations

from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .canonicalize import example_value
from .matcher import describe


def _storage(node):
    value = example_value(node)
    try:
        return StorageWeakRef(value.untyped_storage())
    except (AttributeError, NotImplementedError, RuntimeError):
        return None


def _same(a, b) -> bool:
    return a is not None and b is not None and a == b


def _written(node: fx.Node) -> list:
    """The arguments ``node`` writes in place: a mutable ATen overload's written arguments,
    ``out=``, ``inplace=True``, ``operator.setitem``, or a method or function whose name ends
    in one underscore (``x.masked_fill_``, ``torch.Tensor.add_``)."""
    if node.op not in ("call_function", "call_method"):
        return []
    written = []
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        written.append(out)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write \
                    and isinstance(value, fx.Node):
                written.append(value)
        return written
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) \
        or name == "setitem" or node.kwargs.get("inplace") is True
    if in_place and first is not None:
        written.append(first)
    return written


def _aliases(node: fx.Node) -> set:
    """``node`` and the nodes reached from it through arguments and users that share its
    storage: its views, the base it is a view of, in-place ops' results."""
    storage = _storage(node)
    family, todo = {node}, [node]
    while todo and storage is not None:
        current = todo.pop()
        for k in list(current.users) + current.all_input_nodes:
            if k not in family and _same(_storage(k), storage):
                family.add(k)
                todo.append(k)
    return family


def _writes_to(node: fx.Node, region: set, order: dict) -> list[int]:
    """Positions of the nodes outside ``region`` that write ``node``'s storage."""
    family = _aliases(node)
    return sorted(order[u] for m in family for u in m.users
                  if u not in region and any(t in family for t in _written(u)))


def _reads(node: fx.Node, region: set, order: dict) -> list[int]:
    """Positions of the region's nodes that read ``node``, directly or through other region
    nodes (a view in the region reads nothing yet; the product after it does)."""
    seen, todo = set(), [u for u in node.users if u in region]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(u for u in current.users if u in region)
    return [order[n] for n in seen]


def placement(match, inputs: list, order: dict, preferred: int, lo: int, hi: int):
    """The position to insert before (``lo < p <= hi``, nearest ``preferred``) at which none of
    ``inputs`` (the match's input nodes in its graph) is written between the fused op and a
    region node reading it; or a string saying which write leaves no such place."""
    writes = {n: _writes_to(n, match.region, order) for n in inputs}
    if not any(writes.values()):
        return preferred
    reads = {n: _reads(n, match.region, order) for n in inputs}

    def between(w: int, p: int, r: int) -> bool:  # the new op sits between p - 1 and p
        return p <= w < r if p <= r else r < w < p

    def kept(p: int) -> bool:
        return not any(between(w, p, r) for n in inputs for w in writes[n] for r in reads[n])

    for p in sorted(range(lo + 1, hi + 1), key=lambda q: (abs(q - preferred), q)):
        if kept(p):
            return p
    # name a write that falls between two reads of its input where there is one
    n, w = next(((n, w) for n in inputs for w in writes[n] if reads[n]
                 and min(reads[n]) < w < max(reads[n])),
                next((n, writes[n][0]) for n in inputs if writes[n]))
    writer = next(node for node, position in order.items() if position == w)
    return (f"the input {describe(n)} is written in place by {describe(writer)} "
            f"between the nodes of the region that read it, so no single place gives the "
            f"fused op the values the region read")
