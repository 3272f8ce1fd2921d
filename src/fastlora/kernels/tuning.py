"""Launch configurations of the fused ops: one registry of named entries.

Each kernel file registers its entry beside its kernels, with the defaults and the measurement
that chose them::

    TUNING = tuning.register("rms_norm", tile=None)   # (BLOCK_M, num_warps); None: the table

and its launcher reads the entry at each launch (``tuning.get("rms_norm")["tile"]``). A
default of ``None`` means "chosen by the launcher's own rule" (a table by row size, a heuristic
by head dim); a value replaces that rule.

Overriding, for tuning sweeps (benchmarks/tune_*.py) and tests::

    with tuning.override("rms_norm", tile=(2, 8)):
        ...                     # every launch of rms_norm in the block uses the override
    tuning.set("lora_down", block_m=32)      # until tuning.reset("lora_down") (or reset())

An override names only the keys it changes; an unknown op or key is refused (a typo would
otherwise tune nothing). Overrides only change speed, never results (block sizes, warps,
splits), except ``lora_dot``, which selects the dot precision of the LoRA kernels. The values
are read when a launcher runs: under ``FASTLORA_LAUNCH=inductor`` that is when inductor traces
the op, so set them before compiling.

The entries (op: keys) are listed by :func:`entries`; they are registered when their kernel
file is imported (every kernel file is imported with ``fastlora.kernels``).
"""
from __future__ import annotations

import contextlib

_DEFAULTS: dict[str, dict] = {}
_OVERRIDES: dict[str, dict] = {}


def register(op: str, **defaults) -> str:
    """Declare the entry ``op`` with its keys and default values; returns ``op``."""
    if op in _DEFAULTS and _DEFAULTS[op] != defaults:
        raise ValueError(f"fastlora.tuning: entry {op!r} registered twice with different "
                         f"defaults")
    _DEFAULTS[op] = dict(defaults)
    return op


def _check(op: str, cfg: dict) -> None:
    if op not in _DEFAULTS:
        raise KeyError(f"fastlora.tuning: no entry {op!r}; the entries are "
                       f"{', '.join(sorted(_DEFAULTS))}")
    unknown = sorted(cfg.keys() - _DEFAULTS[op].keys())
    if unknown:
        raise KeyError(f"fastlora.tuning: entry {op!r} has no key(s) {unknown}; its keys are "
                       f"{', '.join(_DEFAULTS[op])}")


def get(op: str) -> dict:
    """The configuration in force for ``op`` (a new dict): its defaults updated by the
    overrides."""
    if op not in _DEFAULTS:
        _check(op, {})
    return {**_DEFAULTS[op], **_OVERRIDES.get(op, {})}


def defaults(op: str) -> dict:
    """The registered defaults of ``op`` (a copy)."""
    _check(op, {})
    return dict(_DEFAULTS[op])


def entries() -> dict[str, dict]:
    """Every entry and its defaults: ``{op: {key: default}}``."""
    return {op: dict(d) for op, d in sorted(_DEFAULTS.items())}


def overrides() -> dict[str, dict]:
    """The overrides in force: ``{op: {key: value}}`` (a copy; the compile caches key by it)."""
    return {op: dict(cfg) for op, cfg in sorted(_OVERRIDES.items()) if cfg}


def set(op: str, **cfg) -> None:  # noqa: A001  (tuning.set reads as what it does)
    """Override keys of ``op`` until :func:`reset` (later calls add to earlier ones)."""
    _check(op, cfg)
    _OVERRIDES[op] = {**_OVERRIDES.get(op, {}), **cfg}


def reset(op: str | None = None) -> None:
    """Drop the overrides of ``op`` (of every entry when None)."""
    if op is None:
        _OVERRIDES.clear()
    else:
        _OVERRIDES.pop(op, None)


@contextlib.contextmanager
def override(op: str, **cfg):
    """``with override(op, key=value, ...)``: the keys hold inside the block; the overrides in
    force before it (none, or an outer block's) are restored when it exits."""
    _check(op, cfg)
    before = _OVERRIDES.get(op)
    _OVERRIDES[op] = {**(before or {}), **cfg}
    try:
        yield
    finally:
        if before is None:
            _OVERRIDES.pop(op, None)
        else:
            _OVERRIDES[op] = before
