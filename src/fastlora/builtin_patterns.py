"""Load the built-in pattern library (the top-level ``patterns/`` folder, shipped as
``fastlora.patterns``). Each file there calls ``register_pattern`` once per pattern family.

``names()`` lists the built-in pattern names without importing torch (the command line checks
``--disable-pattern`` with it before anything heavy loads)."""
from __future__ import annotations

import ast
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


def _folder() -> pathlib.Path:
    """The pattern library's folder, found without running its code."""
    try:
        spec = importlib.util.find_spec("fastlora.patterns")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return pathlib.Path(__file__).resolve().parents[2] / "patterns"


def names() -> list[str]:
    """The built-in pattern names, read from the ``Pattern(name="...")`` calls of the library's
    files (tests/test_cli.py checks them against the registry)."""
    found = []
    for path in sorted(_folder().glob("[!_]*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Pattern":
                found += [k.value.value for k in node.keywords
                          if k.arg == "name" and isinstance(k.value, ast.Constant)]
    return sorted(found)


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = _package()
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"fastlora.patterns.{info.name}")
