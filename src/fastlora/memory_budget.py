"""``options={"memory_budget": ...}``: what the partitioner may keep saved for backward.

A graph's forward keeps tensors alive for its backward. PyTorch's min-cut partitioner chooses
them: at ``torch._functorch.config.activation_memory_budget = 1`` (its default) what makes the
step fastest, at 0 only the graph's inputs (everything else recomputed in the backward), in
between the least recompute that fits the fraction (a knapsack). The fraction is the
partitioner's unit; a size is the user's. Both are accepted:

- a fraction in [0, 1]: passed on as ``activation_memory_budget`` while fastlora's graphs are
  partitioned;
- a size, ``"14GiB"``, ``"14 GiB"``, ``"900MiB"``, ``"14GB"`` (units GiB = 2**30 bytes,
  MiB = 2**20, GB = 10**9, MB = 10**6, any case): the bytes of activations each compiled graph
  may keep saved for its backward, counted as the partitioner counts them (``_size_of`` of each
  saved tensor that is not an input of the graph: weights and the batch live anyway; a symbolic
  size counts at its example value).

A size is turned into a fraction per graph, by the partitioner itself: fastlora wraps
``torch._functorch.partitioners.choose_saved_values_set`` (the one function that picks the saved
set, same signature in torch 2.11 and 2.13) while its graphs compile. The wrapper asks for the
fastest plan (fraction 1); if that fits the size, it is kept. Otherwise it asks again with
fractions in (0, 1), at most ``TRIES`` times: first the partitioner's own translation of the
size (its ratio is (saved - all inputs) / (fastest plan's saved - all inputs), so a graph
input that backward does not read counts against the ratio), then bisection, keeping the
largest set that fits. Full recompute (fraction 0) always fits. The saved sets are discrete,
so the result is at most the size asked, not equal to it; each try costs a few min-cut solves
of the joint graph (compile time, never step time).

Under gradient checkpointing the checkpointed layers are recomputed whatever the fraction (their
nodes carry ``recompute`` tags the partitioner obeys), so a size that the fastest plan leaves
room in would buy nothing: there the spare memory buys back layers. fastlora lifts the tags of
the last k checkpointed layers (by ``ac_graph_id``, forward order) and asks for the fastest
plan, searching k by bisection for the largest that fits (``_keep_layers``): those k layers are
then saved as without checkpointing, the others recomputed. The last layers go first: their
activations are the first the backward consumes, so they are held the shortest. Saving a value
instead of recomputing it gives the same value: losses and gradients do not change.

Each partitioned graph's outcome goes to its report (``report.memory_budget``: the size asked,
the fraction used, the bytes saved, the fastest plan's bytes, the partitioner calls and their
seconds, and under checkpointing the layers kept of the checkpointed ones) and to the
``fastlora`` logger.
A size also turns AOTAutograd's cache off for the graph: its key does not see the wrapper.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time

log = logging.getLogger("fastlora")  # report.py's logger; importing report would import torch,
# and options.py (which the CLI checks before importing torch) imports this module

TRIES = 6  # partitioner calls below fraction 1 for a size; each is a few min-cut solves
CLOSE = 0.95  # stop trying once a set fits and uses this share of the size
UNITS = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|mib|gb|mb)\s*$", re.IGNORECASE)


def size_in_bytes(value) -> int | None:
    """The bytes of a size string (``"14GiB"``), or None for anything else."""
    match = _SIZE.match(value) if isinstance(value, str) else None
    return int(float(match.group(1)) * UNITS[match.group(2).lower()]) if match else None


def valid(value) -> bool:
    """Whether ``value`` is a budget: None, a fraction in [0, 1] or a size string."""
    if value is None or size_in_bytes(value) is not None:
        return True
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


def describe(entry: dict) -> str:
    """One line for a ``report.memory_budget`` entry."""
    saved = f"saves {_gib(entry['saved_bytes'])} of activations for backward"
    if entry["budget_bytes"] is None:
        return f"memory_budget {entry['fraction']:g}: {saved}"
    calls = f"{entry['tries']} partitioner call(s), {entry.get('seconds', 0):.1f} s"
    if entry.get("checkpointed_layers"):
        return (f"memory_budget {_gib(entry['budget_bytes'])}: {saved}, "
                f"{entry['kept_layers']} of {entry['checkpointed_layers']} checkpointed layers "
                f"kept, not recomputed (with all recomputed it saves "
                f"{_gib(entry['recomputed_bytes'])}; {calls})")
    return (f"memory_budget {_gib(entry['budget_bytes'])}: {saved} at fraction "
            f"{entry['fraction']:.3g} (the fastest plan saves {_gib(entry['fastest_bytes'])}; "
            f"{calls})")


def partition_with(budget, report) -> contextlib.AbstractContextManager:
    """The context in which a graph is partitioned under ``budget`` (a fraction or a size
    string), recording each partition's outcome on ``report``."""
    import torch._functorch.config as functorch_config
    from torch._functorch import partitioners

    stack = contextlib.ExitStack()
    size = size_in_bytes(budget)
    # Not served from AOTAutograd's cache: the partitioner must run to record its plan on the
    # report (and a size is not part of the cache's key).
    stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    if size is None:
        stack.enter_context(functorch_config.patch(activation_memory_budget=float(budget)))
    original = partitioners.choose_saved_values_set

    def choose(joint_graph, node_info, memory_budget=1.0):
        inputs = set(node_info.inputs)

        def activations(saved) -> int:
            return sum(partitioners._size_of(n) for n in saved if n not in inputs)

        start = time.perf_counter()
        if size is None:
            saved = original(joint_graph, node_info, memory_budget)
            entry = {"budget_bytes": None, "fraction": memory_budget,
                     "saved_bytes": activations(saved), "fastest_bytes": None, "tries": 1}
        else:
            saved, entry = _fit(lambda f: original(joint_graph, node_info, f), activations,
                                node_info.inputs, partitioners._size_of, size)
            layers = checkpointed_layers(joint_graph, partitioners.must_recompute)
            if layers and entry["fraction"] == 1.0:  # the fastest plan fits: room to spare
                saved = _keep_layers(layers, lambda: original(joint_graph, node_info, 1.0),
                                     activations, size, saved, entry)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        if report is not None:
            report.memory_budget.append(entry)
            log.info("fastlora: graph %d: %s", report.index, describe(entry))
        return saved

    @contextlib.contextmanager
    def wrapped():
        partitioners.choose_saved_values_set = choose
        try:
            yield
        finally:
            partitioners.choose_saved_values_set = original

    stack.enter_context(wrapped())
    return stack


def _fit(saved_at, activations, inputs, size_of, size: int):
    """(saved set, report entry): the largest saved set of a fraction in [0, 1] whose
    activations fit ``size`` bytes (module docstring). ``saved_at(f)``: the partitioner's set
    at fraction ``f``; ``activations(set)``: its bytes beyond the graph's inputs."""
    fastest = saved_at(1.0)
    most = activations(fastest)
    entry = {"budget_bytes": size, "fraction": 1.0, "saved_bytes": most, "fastest_bytes": most,
             "tries": 1}
    if most <= size:
        return fastest, entry
    entry.update(fraction=0.0, saved_bytes=0)
    if size == 0:
        return list(inputs), entry
    # the partitioner's ratio of a set saving `size` bytes and the inputs the fastest plan saves
    input_set = set(inputs)
    unread = sum(map(size_of, inputs)) - sum(size_of(n) for n in fastest if n in input_set)
    guess = (size - unread) / (most - unread) if most > unread else 0.0
    best = (0.0, list(inputs), 0)  # full recompute: only the inputs, always fits
    low, high, fraction = 0.0, 1.0, guess if 0.0 < guess < 1.0 else 0.5
    for _ in range(TRIES):
        saved = saved_at(fraction)
        nbytes = activations(saved)
        entry["tries"] += 1
        if nbytes <= size:
            low = fraction
            if nbytes >= best[2]:
                best = (fraction, saved, nbytes)
            if nbytes >= CLOSE * size:
                break
        else:
            high = fraction
        fraction = (low + high) / 2
    entry.update(fraction=best[0], saved_bytes=best[2])
    return best[1], entry


def checkpointed_layers(graph, must_recompute) -> list[list]:
    """The nodes the partitioner must recompute, one list per checkpointed region
    (``ac_graph_id``), in forward order."""
    regions: dict[int, list] = {}
    for node in graph.nodes:
        if must_recompute(node) and "ac_graph_id" in node.meta:
            regions.setdefault(node.meta["ac_graph_id"], []).append(node)
    return [regions[k] for k in sorted(regions)]


def _lift(layers: list[list]) -> dict:
    """Remove the recompute tags of ``layers``' nodes (the partitioner then treats them as nodes
    outside any checkpointed region); returns them for ``_restore``."""
    return {node: node.meta.pop("recompute") for nodes in layers for node in nodes}


def _restore(tags: dict) -> None:
    for node, tag in tags.items():
        node.meta["recompute"] = tag


def _keep_layers(layers: list[list], fastest, activations, size: int, saved, entry: dict):
    """Under checkpointing, with the fastest plan fitting ``size``: the largest k such that the
    fastest plan with the last k of ``layers`` not recomputed still fits (bisection, which
    assumes that keeping more layers never saves fewer bytes; a plan is taken only if it
    fits, so the result fits either way). Leaves the chosen layers' tags lifted (the rest of the
    partition, the rng functionalization included, must see the same plan) and returns that
    plan's saved set (``saved`` when no layer fits). Records ``kept_layers``,
    ``checkpointed_layers`` and ``recomputed_bytes`` (the plan with every layer recomputed) on
    ``entry``."""
    best, low, high = 0, 1, len(layers)
    entry["recomputed_bytes"] = entry["saved_bytes"]
    while low <= high:
        k = (low + high) // 2
        tags = _lift(layers[-k:])
        try:
            trial = fastest()
        finally:
            _restore(tags)
        entry["tries"] += 1
        nbytes = activations(trial)
        if nbytes <= size:
            best, saved, low = k, trial, k + 1
            entry["saved_bytes"] = nbytes
        else:
            high = k - 1
    if best:
        _lift(layers[-best:])  # for the rest of this partition
    entry.update(kept_layers=best, checkpointed_layers=len(layers))
    return saved
