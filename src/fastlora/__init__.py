"""fastlora: LoRA and QLoRA fine-tuning made fast and lean by a torch.compile backend.

    model = torch.compile(model, backend="fastlora")      # no import needed for this line
    ...
    import fastlora
    print(fastlora.last_report())

Public API: the backend name ``"fastlora"`` and its ``options`` (``Options``), the rewrite
report (``last_report``, ``reports``), and ``register_pattern`` for your own fusions.

``import fastlora`` alone does not import torch: the names below load on first use, so the
``fastlora`` command answers ``--help`` and input errors at once. Where torch is already
imported, or fastlora runs from a source tree that is not installed (no entry point names the
backend), the backend loads at import and registers the name ``"fastlora"`` itself.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "fastlora_backend": "backend", "Options": "options", "OptionsError": "options",
    "Pattern": "pattern", "Match": "pattern", "Reject": "pattern",
    "register_pattern": "pattern", "unregister_pattern": "pattern",
    "registered_patterns": "pattern", "Report": "report", "Reports": "report",
    "last_report": "report", "reports": "report", "clear_reports": "report",
    "compile_for_trainer": "trainer",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    _register_backend_name()
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


def _installed() -> bool:
    """Whether an installed copy's entry point names the backend (torch then finds it)."""
    from importlib.metadata import entry_points

    try:
        return any(e.name == "fastlora" for e in entry_points(group="torch_dynamo_backends"))
    except Exception:  # pragma: no cover - broken metadata: register the name ourselves
        return False


_registered = False


def _register_backend_name() -> None:
    """Make backend="fastlora" resolvable when fastlora runs from a source tree without being
    installed (the entry point covers installed copies; torch imports the backend from it when
    first asked)."""
    global _registered
    if _registered:
        return
    _registered = True
    from .backend import fastlora_backend

    if _installed():
        return
    try:
        from torch._dynamo.backends import registry

        if "fastlora" not in registry._COMPILER_FNS:
            registry.register_backend(fastlora_backend, "fastlora")
    except Exception:  # pragma: no cover - private registry moved; the entry point still works
        pass


if "torch" in sys.modules or not _installed():
    _register_backend_name()
