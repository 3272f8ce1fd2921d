"""Why a place in the graph was left unfused: a kind that code reads, and a reason that users read.

The rewriter (rewriter.py) gives every near miss a ``Refusal``. A pattern's
``explain_near_miss(anchor_node, refusal)`` reads ``refusal.kind`` to decide what to say (or
whether the node is a near miss at all); the report shows ``refusal.reason`` and records the kind
as ``near_misses[i]["kind"]`` (the enum's value, e.g. ``"escape"``).
"""
from __future__ import annotations

import dataclasses
import enum


class RefusalKind(enum.Enum):
    NO_SPELLING = "no_spelling"  # no spelling of the pattern reached this anchor
    SPELLING = "spelling"  # a spelling matched part way, then the graph computes something else
    ESCAPE = "escape"  # a value computed inside the region is also used outside it
    INPUT_INSIDE = "input_inside"  # an input of the pattern is computed inside the region
    INPUT_OUTSIDE = "input_outside"  # an added input cannot be passed into this subgraph
    WRITTEN_INPUT = "written_input"  # an input is written in place between the region's reads
    CHECK = "check"  # the pattern's check refused (``Reject``)
    REPLACEMENT = "replacement"  # the replacement would return other shapes, dtypes or devices
    INTERNAL_ERROR = "internal_error"  # the pattern's code raised something other than Reject


@dataclasses.dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    reason: str  # the English shown in the report

    def __str__(self) -> str:
        return self.reason

