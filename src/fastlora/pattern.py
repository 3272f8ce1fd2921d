"""What a fusion pattern is, and the registry that holds them.

A pattern is declared once, with plain PyTorch functions:

- ``spellings``: one or more functions, each a way the computation is written in model code
  (Llama's RMSNorm, Gemma's). Their parameters are the pattern's inputs; a parameter annotated
  ``torch.Tensor`` binds to a tensor in the graph, one annotated ``float``/``int``/``bool`` binds to
  a literal (eps, a scale), so literals are captured, not compared. Dtype casts in a spelling are
  optional: a graph where the cast was a no-op (fp32 model) matches too.
- ``check(match)``: proves the constraints the fused op needs (dtypes, shapes, devices) and
  returns the extra keyword arguments of the replacement; it raises ``Reject(reason)`` otherwise.
  The reason is shown in the rewrite report. A check only decides: what it adds to the match
  (graph nodes that join the region, inputs the replacement also reads) it declares on the
  ``Match`` (``absorb``, ``add_input``, ``drop_input``), and the rewriter applies that only after
  proving the final region.
- ``replacement``: a plain function of the same inputs (plus what ``check`` returned) that calls
  the fused op; it is traced into the graph in place of the matched region.
- ``stage``: when it runs (``"adapters"``, ``"ops"`` or ``"fused"``); the stages and the order of
  the built-in patterns are listed in one place, stages.py.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

from torch import fx

from .canonicalize import example_value
from .refusal import Refusal, RefusalKind  # noqa: F401  (explain_near_miss reads them)
from .stages import DEFAULT_STAGE, STAGE_NAMES, run_order, stage_listing


class Reject(Exception):
    """Raised by a pattern's ``check`` to leave a match alone; the message goes in the report."""


@dataclasses.dataclass
class Pattern:
    """A fusion pattern. ``name`` is what the report counts and what ``options["disable"]`` names."""

    name: str
    spellings: Sequence[Callable]
    replacement: Callable
    check: Callable[["Match"], dict] | None = None
    # op (or tuple of ops) whose unmatched occurrences are reported as near misses
    anchor: Callable | tuple[Callable, ...] | None = None
    # which stage of src/fastlora/stages.py runs it: "adapters", "ops" or "fused"; None: the
    # stage that lists the name (a built-in one), else "ops"
    stage: str | None = None
    description: str = ""
    builtin: bool = False
    # Optional ``(anchor_node, refusal) -> reason | None``: rewrites the near-miss reason at an
    # anchor left unmatched (``refusal.kind`` says what refused it, refusal.py), or returns None
    # where that node is no near miss at all (an ``F.linear`` that is not a LoRA adapter).
    explain_near_miss: Callable | None = None

    def is_anchor(self, node) -> bool:
        anchors = self.anchor if isinstance(self.anchor, tuple) else (self.anchor,)
        return self.anchor is not None and node.op == "call_function" and node.target in anchors

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"pattern name must be a non-empty identifier, got {self.name!r}")
        if callable(self.spellings):
            self.spellings = [self.spellings]
        self.spellings = list(self.spellings)
        if not self.spellings or not all(callable(s) for s in self.spellings):
            raise TypeError(f"pattern {self.name!r}: spellings must be one or more functions")
        if not callable(self.replacement):
            raise TypeError(f"pattern {self.name!r}: replacement must be a function")
        listed = stage_listing(self.name)
        if self.stage is None:
            self.stage = listed or DEFAULT_STAGE
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"pattern {self.name!r}: stage must be one of {list(STAGE_NAMES)}, "
                             f"got {self.stage!r}")
        if self.builtin and listed is not None and self.stage != listed:
            raise ValueError(f"pattern {self.name!r}: src/fastlora/stages.py lists it in stage "
                             f"{listed!r}, not {self.stage!r}")


class Match:
    """One place in the graph where a spelling matched; handed to ``check`` and the report."""

    def __init__(self, pattern: Pattern, spelling: str, bindings: dict, nodes: dict,
                 outputs: list[fx.Node]):
        self.pattern = pattern
        self.spelling = spelling
        self.bindings = bindings  # input name -> fx.Node (tensor) or Python literal
        self.node_map = nodes  # pattern node -> graph node, for the matched operations
        self.outputs = outputs
        self.params: dict = {}
        self.options = None  # the backend's Options for this compile (set by the rewriter)
        self.top_level = True  # False inside the body of a higher-order op (e.g. checkpoint)
        # What ``check`` declared, applied by the rewriter once the final region is proven
        self.absorbed: list[fx.Node] = []
        self.added_inputs: dict = {}
        self.dropped_inputs: set[str] = set()

    def __getitem__(self, name):
        """The graph node (or literal) bound to input ``name``."""
        return self.bindings[name]

    def value(self, name):
        """The example value (a fake tensor with shape, dtype, device) of input ``name``."""
        return example_value(self.bindings[name])

    @property
    def region(self) -> set[fx.Node]:
        """The graph nodes the fused op replaces: the matched ones and those ``absorb``ed."""
        return set(self.node_map.values()) | set(self.absorbed)

    def absorb(self, *nodes: fx.Node) -> None:
        """Declare graph nodes the spelling does not name that join the region and are replaced
        with it (the 4-bit matmul behind a QLoRA adapter's ``base``). Before anything is
        rewritten, the rewriter proves that no value of the final region is used outside it."""
        self.absorbed += [n for n in nodes if n not in self.absorbed]

    def add_input(self, name: str, value) -> None:
        """Declare one more input the replacement reads, passed as keyword ``name``: a node of
        this graph, a literal, or a node of a graph around this one (this graph being the body
        of a checkpointed layer), which the rewriter passes into the body as a new operand of
        its calls where that binding is certain (else the match is refused)."""
        self.added_inputs[name] = value

    def drop_input(self, name: str) -> None:
        """Declare that the replacement no longer reads spelling input ``name`` (an absorbed
        node computes it)."""
        self.dropped_inputs.add(name)

    def inputs(self) -> dict:
        """Input name -> graph node or literal, as the replacement is called (plus ``params``):
        the spelling's bindings, less those dropped, plus those added."""
        kept = {k: v for k, v in self.bindings.items() if k not in self.dropped_inputs}
        return {**kept, **self.added_inputs}

    def nodes_calling(self, target) -> list[fx.Node]:
        """Matched graph nodes that call ``target`` (e.g. ``torch.rsqrt``), in graph order."""
        found = {n for p, n in self.node_map.items() if p.target is target}
        return [n for n in self.outputs[0].graph.nodes if n in found]

    def output_value(self, i: int = 0):
        return example_value(self.outputs[i])


_REGISTRY: dict[str, Pattern] = {}


def register_pattern(pattern: Pattern | None = None, *, replace: bool = False, **fields) -> Pattern:
    """Add a fusion pattern to the registry used by every later ``backend="fastlora"`` compile.

    Call it with a ``Pattern`` or with its fields as keywords::

        fastlora.register_pattern(name="my_op", spellings=[f], replacement=g, check=c)

    A name already registered raises unless ``replace=True``.
    """
    if "priority" in fields:
        raise TypeError("`priority` was replaced by `stage` (\"adapters\", \"ops\" or "
                        "\"fused\"; see docs/patterns.md)")
    if pattern is None:
        pattern = Pattern(**fields)
    elif fields:
        raise TypeError("pass either a Pattern or its fields as keywords, not both")
    if pattern.name in _REGISTRY and not replace:
        raise ValueError(f"a pattern named {pattern.name!r} is already registered; "
                         "pass replace=True to replace it")
    _REGISTRY[pattern.name] = pattern
    return pattern


def unregister_pattern(name: str) -> None:
    """Remove a pattern by name (KeyError with the known names if there is none)."""
    if name not in _REGISTRY:
        raise KeyError(f"no pattern named {name!r}; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def registered_patterns() -> list[Pattern]:
    """All registered patterns, built-in ones included, in the order they are tried."""
    from . import builtin_patterns

    builtin_patterns.load()
    return run_order(_REGISTRY.values())



def spelling_variants(make: Callable[..., Callable], name: Callable[..., str],
                      **axes: Sequence) -> list[Callable]:
    """Spellings for every combination of the ``axes`` (axis name -> the values it takes):
    ``make(**combination)`` returns the spelling, named ``name(**combination)`` (the name the
    report shows). The first axis varies fastest::

        spelling_variants(make_peft_lora, name, dropout=(False, True), final_cast=(True, False))

    gives (no dropout, cast), (dropout, cast), (no dropout, no cast), (dropout, no cast). Each
    spelling takes the parameters of every variant; one a variant does not read (the dropout
    ``p`` without dropout) is never bound, so the replacement gets its default."""
    keys = list(axes)[::-1]
    spellings = []
    for values in itertools.product(*(axes[k] for k in keys)):
        combination = dict(zip(keys, values))
        spelling = make(**combination)
        spelling.__name__ = spelling.__qualname__ = name(**combination)
        spellings.append(spelling)
    return spellings
