"""The Triton interpreter (CPU test runs) without its repeated language patching: the same
kernels, the same numbers, less Python per call.

Before each kernel launch the interpreter patches ``triton.language`` (its builtins, ``range``,
``reduce`` and the rest) with interpreted versions, and restores it after the launch. It also
patches again at every call of a ``@triton.jit`` helper function inside a kernel, although the
launch around that call has already patched the same modules; each patch walks the modules'
members with ``inspect.getmembers``. On the CPU suite that re-patching was about a fifth of the
time of the kernel-heavy test files (measured 2026-12-06, triton 3.9).

``install()`` skips the patching of a helper call when the launch it runs in has already
patched every language module the helper's globals name. What is patched, and with what, is
unchanged: the patches are stateless functions, set by the launch and restored by it as before.
Calls outside a launch (none in the suite) are patched as before. On a triton without these
internals nothing is installed and the interpreter runs as it comes."""
from __future__ import annotations

import inspect


def _language_modules(fn, tl, known: dict) -> frozenset[int]:
    """The language modules ``fn``'s globals name (what the interpreter patches for it)."""
    if fn not in known:
        known[fn] = frozenset(id(value) for value in fn.__globals__.values()
                              if inspect.ismodule(value) and value in (tl, tl.core))
    return known[fn]


def install() -> bool:
    """Installs the skip; returns whether it could (the interpreter has the expected parts)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
        interpreter._LangPatchScope  # noqa: B018 - the skip returns an empty one
    except (ImportError, AttributeError):
        return False
    if getattr(patch_lang, "_skips_repeats", False):
        return True
    launches: list[set[int]] = []  # per launch in progress: the language modules it patched
    known: dict = {}

    def _patch_lang(fn):
        langs = _language_modules(fn, tl, known)
        if langs and launches and langs <= launches[-1]:
            return interpreter._LangPatchScope()  # patched by the launch around this call
        scope = patch_lang(fn)
        if launches:
            launches[-1] |= langs
        return scope
    _patch_lang._skips_repeats = True

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = _patch_lang
    interpreter.GridExecutor.__call__ = launch
    return True
