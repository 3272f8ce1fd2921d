"""fastlora: LoRA and QLoRA fine-tuning made fast and lean by a torch.compile backend.

    model = torch.compile(model, backend="fastlora")      # no import needed for this line
    ...
    import fastlora
    print(fastlora.last_report())

Public API: the backend name ``"fastlora"`` and its ``options`` (``Options``), the rewrite
report (``last_report``, ``reports``), and ``register_pattern`` for your own fusions.
"""
from .backend import fastlora_backend
from .options import Options
from .pattern import Match, Pattern, Reject, register_pattern, registered_patterns
from .pattern import unregister_pattern
from .report import Report, Reports, clear_reports, last_report, reports
from .trainer import compile_for_trainer

__version__ = "0.1.0"


def _register_backend_name() -> None:
    """Make backend="fastlora" resolvable when fastlora is imported from a source tree without
    being installed (the entry point covers installed copies)."""
    try:
        from importlib.metadata import entry_points

        from torch._dynamo.backends import registry
        if any(e.name == "fastlora" for e in entry_points(group="torch_dynamo_backends")):
            return  # installed: torch registers it from the entry point when first asked
        if "fastlora" not in registry._COMPILER_FNS:
            registry.register_backend(fastlora_backend, "fastlora")
    except Exception:  # pragma: no cover - private registry moved; the entry point still works
        pass


_register_backend_name()

__all__ = [
    "fastlora_backend", "Options", "Pattern", "Match", "Reject", "register_pattern",
    "unregister_pattern", "registered_patterns", "Report", "Reports", "last_report", "reports",
    "clear_reports", "compile_for_trainer",
]
