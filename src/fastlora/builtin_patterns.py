"""Load the built-in pattern library (the top-level ``patterns/`` folder, shipped as
``fastlora.patterns``). Each file there calls ``register_pattern`` once per pattern family."""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import pkgutil
import sys

_loaded = False


def _package():
    try:
        return importlib.import_module("fastlora.patterns")
    except ModuleNotFoundError:
        # Running from a source checkout with only src/ on sys.path: use the folder beside it.
        folder = pathlib.Path(__file__).resolve().parents[2] / "patterns"
        spec = importlib.util.spec_from_file_location(
            "fastlora.patterns", folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastlora.patterns"] = module
        spec.loader.exec_module(module)
        return module


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = _package()
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"fastlora.patterns.{info.name}")
