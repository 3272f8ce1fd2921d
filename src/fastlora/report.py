"""Step 6 of the pipeline: the rewrite report, one per graph the backend compiles.

``fastlora.last_report()`` is the latest; ``fastlora.reports(model)`` holds every graph of one
model (a graph break makes several). Each report lists every match (pattern, module path, module
class, source file:line, captured parameters) and every near miss with its reason.
"""
from __future__ import annotations

import collections
import json
import logging
import re
import weakref

import torch
from torch import fx

from . import distributed, repeats

log = logging.getLogger("fastlora")
try:  # TORCH_LOGS="+fastlora" turns the logger on
    torch._logging._internal.register_log("fastlora", "fastlora")
except Exception:  # pragma: no cover - private API moved: plain logging still works
    pass


def module_path(node: fx.Node) -> tuple[str, list[str]]:
    """(dotted path of the innermost module that made ``node``, the qualified class names of
    the modules on its ``nn_module_stack``, outermost first), from Dynamo's metadata; ("", [])
    for a node made outside any module. A root that is the compiled module itself or a
    positional argument is dropped (``L['self'].model.__dict__['_modules']['layers']`` reads
    ``model.layers``, ``L['args'][0].layers`` reads ``layers``); any other root keeps its name
    (``L['lora_A']``, a module peft's DoRA calls as an input, reads ``lora_A``: the LoRA patterns
    find adapters by that name). The one parser of nn_module_stack (the report and the patterns
    use it)."""
    entries = list((node.meta.get("nn_module_stack") or {}).values())
    if not entries:
        return "", []
    classes = [c if isinstance(c, str) else getattr(c, "__qualname__", str(c)) for _, c in entries]
    path = entries[-1][0]
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^L(\.self|\.args|\.kwargs)?(\[\d+\])*(\.|$)", "", path)
    # A layer compiled once (regions.py) is reached as `layers.1.forward.args[0]`: its forward
    # is a partial whose first argument is the layer itself.
    return re.sub(r"\.forward\.args\[0\](?=\.|$)", "", path), classes


_PER_GRAPH: "weakref.WeakKeyDictionary[fx.Graph, dict]" = weakref.WeakKeyDictionary()


def per_graph(graph: fx.Graph, name: str, compute):
    """``compute(graph)``, once per graph (again if its node count changed): for facts about the
    whole graph that a pattern's near-miss explanation reads. It is asked once per unfused
    anchor, and a walk of the graph per call made the compile quadratic in depth (135k
    module_path calls for a 16-layer tiny Llama)."""
    cache = _PER_GRAPH.setdefault(graph, {})
    key = (name, len(graph.nodes))
    if key not in cache:
        cache[key] = compute(graph)
    return cache[key]


def _module_of(node: fx.Node) -> tuple[str, str]:
    path, classes = module_path(node)
    return path, (classes[-1].rsplit(".", 1)[-1] if classes else "")


def _sites(entry: dict, call_sites) -> dict:
    """``entry`` with how often it runs per step, where a shared body runs it more than once:
    ``calls`` (counted by ``counts()``) and the module path of each ``call_sites``."""
    if call_sites and len(call_sites) > 1:
        entry["calls"] = len(call_sites)
        entry["call_sites"] = list(call_sites)
    return entry


def _source_of(node: fx.Node) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line = frames[-1]
    for marker in ("site-packages/", "src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}"


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


class Report:
    """What the backend did to one graph."""

    def __init__(self, index: int, options: dict):
        self.index = index
        self.options = options
        self.matches: list[dict] = []
        self.near_misses: list[dict] = []
        self.errors: list[str] = []
        self.fallback: str | None = None  # set when the graph was compiled unrewritten
        self.notes: list[str] = []  # how the graph was compiled around the rewrite (DDP splits)
        # saved activations offloaded to CPU memory (options["offload_activations"]); filled in
        # when inductor partitions the graph, after the report is published
        self.offloaded: list[dict] = []
        # what options["memory_budget"] became when the graph was partitioned, one entry per
        # partition (memory_budget.py): budget_bytes, fraction, saved_bytes, fastest_bytes, tries
        self.memory_budget: list[dict] = []
        # ("match:<i>" | "near_miss:<i>", same) pairs: a value of the first reaches the second
        # through unfused ops only (report_graph.py; to_networkx / to_dot)
        self.flow: set[tuple[str, str]] = set()
        self._model_params: dict = {}  # id -> weakref of each parameter the graph takes

    def add_match(self, match, call_sites=None) -> int:
        """Record a match; returns its index in ``matches``. ``call_sites``: the module paths
        of the calls that run the graph of the match (backend.call_sites), where several do."""
        out = match.outputs[0]
        path, cls = _module_of(out)
        params = {k: _plain(v) for k, v in match.bindings.items() if not isinstance(v, fx.Node)}
        params.update({k: _plain(v) for k, v in match.params.items()})
        self.matches.append(_sites({"pattern": match.pattern.name, "spelling": match.spelling,
                                    "module": path, "class": cls, "source": _source_of(out),
                                    "params": params}, call_sites))
        return len(self.matches) - 1

    def absorb(self, index: int, by: str) -> None:
        """Mark match ``index`` as fused further into a later match of pattern ``by`` (its op
        no longer runs on its own; it is still counted)."""
        self.matches[index].setdefault("absorbed_into", by)

    def add_near_miss(self, pattern: str, node: fx.Node, reason: str, kind: str,
                      call_sites=None) -> None:
        """Record a near miss; ``kind`` is a ``RefusalKind`` value (refusal.py)."""
        path, cls = _module_of(node)
        self.near_misses.append(_sites({"pattern": pattern, "node": node.name, "module": path,
                                        "class": cls, "source": _source_of(node),
                                        "reason": reason, "kind": kind}, call_sites))

    def counts(self) -> dict[str, int]:
        """Fused places per pattern name, e.g. ``{"rms_norm": 5}``: a match in a body that
        several calls share (a decoder layer compiled once) counts once per call."""
        total = collections.Counter()
        for m in self.matches:
            total[m["pattern"]] += m.get("calls", 1)
        return dict(total)

    def to_dict(self) -> dict:
        """The report as plain JSON-serialisable data."""
        return {"graph": self.index, "options": _plain_dict(self.options),
                "counts": self.counts(), "matches": self.matches,
                "near_misses": self.near_misses, "fallback": self.fallback,
                "errors": self.errors, "offloaded": self.offloaded, "notes": self.notes,
                "memory_budget": self.memory_budget,
                "flow": sorted(self.flow)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_networkx(self):
        """A ``networkx.DiGraph``: a node per match (``"match:<i>"``) and per near miss
        (``"near_miss:<i>"``) with its report entry as attributes, and an edge where the output
        of one reaches the other through unfused ops only."""
        from .report_graph import to_networkx

        return to_networkx(self)

    def to_dot(self) -> str:
        """The same graph in Graphviz's DOT language (``dot -Tsvg report.dot``), transitively
        reduced; near misses dashed, with their reason as a tooltip."""
        from .report_graph import to_dot

        return to_dot(self)

    def __str__(self) -> str:
        lines = [f"fastlora rewrite report, graph {self.index}: "
                 + (", ".join(f"{k} x{v}" for k, v in self.counts().items()) or "no matches")]
        if self.fallback:
            lines.append(f"  FALLBACK: compiled without rewrites because {self.fallback}")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.matches:
            lines.append(_table(["pattern", "module", "class", "source", "params"],
                                [[_pattern_label(m), _module_label(m), m["class"], m["source"],
                                  _fmt_params(m["params"])] for m in self.matches]))
        if self.offloaded:
            lines.append(f"  offloaded to CPU memory: {len(self.offloaded)} saved activations, "
                         + ", ".join(f"{o['tensor']} {o['shape']}" for o in self.offloaded[:4])
                         + (", ..." if len(self.offloaded) > 4 else ""))
        if self.memory_budget:
            from .memory_budget import describe

            lines.extend(f"  {describe(entry)}" for entry in self.memory_budget)
        if self.near_misses:
            lines.append("  near misses (left unfused):")
            lines.append(_table(["pattern", "module", "source", "reason"],
                                [[n["pattern"], n["module"] or n["node"], n["source"],
                                  n["reason"]] for n in self.near_misses]))
        return "\n".join(lines)

    __repr__ = __str__


def _plain_dict(d: dict) -> dict:
    return {k: _plain(v) for k, v in d.items()}


def _pattern_label(match: dict) -> str:
    into = match.get("absorbed_into")
    return f"{match['pattern']} (in {into})" if into else match["pattern"]


def _module_label(entry: dict) -> str:
    calls = entry.get("calls")
    return f"{entry['module']} (x{calls}, one compiled body)" if calls else entry["module"]


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[-1] = len(header[-1])  # the last column runs free
    fmt = lambda r: "  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


class Reports(list):
    """A list of reports with the combined ``counts()`` and a printable summary."""

    def counts(self) -> dict[str, int]:
        total = collections.Counter()
        for r in self:
            total.update(r.counts())
        return dict(total)

    def near_misses(self) -> list[dict]:
        return [n for r in self for n in r.near_misses]

    def __str__(self) -> str:
        return "\n\n".join(str(r) for r in self) or "fastlora: no graph compiled yet"


_ALL: list[Report] = []


def publish(report: Report, example_inputs, print_it: bool, graph: fx.GraphModule | None = None
            ) -> None:
    """Keep ``report`` (``graph``: what the backend received, to note a repeated compile)."""
    # Weak references, not bare ids: a freed model's ids get reused by later parameters.
    report._model_params = {id(t): weakref.ref(t)
                            for t in distributed.graph_parameters(example_inputs)}
    if graph is not None:
        report._graph_key = repeats.graph_key(graph, example_inputs)
        repeated = repeats.note(report, _ALL, log)
        if repeated:
            report.notes.append(repeated)
    _ALL.append(report)
    log.info("%s", report)
    try:
        torch._logging.trace_structured(
            "artifact", metadata_fn=lambda: {"name": "fastlora_report", "encoding": "json"},
            payload_fn=report.to_json)
    except Exception:  # pragma: no cover - tlparse artifacts are optional
        pass
    if print_it:
        print(report, flush=True)


def last_report() -> Report:
    """The report of the graph compiled most recently by the fastlora backend."""
    if not _ALL:
        raise LookupError("fastlora has compiled no graph yet: torch.compile is lazy, so call "
                          "the compiled model once before asking for its report")
    return _ALL[-1]


def reports(model: torch.nn.Module | None = None) -> Reports:
    """Every report so far, or only those of graphs that take ``model``'s parameters."""
    if model is None:
        return Reports(_ALL)
    model = getattr(model, "_orig_mod", model)
    params = {id(p): p for p in [*model.parameters(), *distributed.unsharded_parameters(model)]}
    return Reports(r for r in _ALL
                   if any(ref() is params[i] for i, ref in r._model_params.items() if i in params))


def clear_reports() -> None:
    _ALL.clear()
    repeats.forget()
