"""Compile caches kept between runs, so that a second run of the same model and shapes starts
from compiled code instead of compiling again.

Inductor caches what it compiles (the FX graph cache, AOTAutograd's cache, Triton's kernels)
under one folder, by default in /tmp (lost at reboot, and per machine). :func:`use` points it
at a lasting folder, ``~/.cache/fastlora/inductor`` unless ``FASTLORA_CACHE`` names another
(``FASTLORA_CACHE=off``: leave inductor's own setting alone), and loads the portable bundle of
:func:`save` if one is there (``torch.compiler.load_cache_artifacts``: a folder copied from
another machine with the same torch, Triton and GPU starts warm too).

Only inductor's work is cached: Dynamo still traces the model and fastlora still matches and
rewrites the graph at each start (seconds), and ``compiler="aot_eager"`` (the default on a CPU)
compiles nothing that a cache could keep.

    from fastlora import compile_cache
    compile_cache.use()          # before the first compiled call
    ...                          # train
    compile_cache.save()         # after the first steps: the bundle for another machine
"""
from __future__ import annotations

import os
import pathlib

ENV = "FASTLORA_CACHE"
_BUNDLE = "artifacts.bin"


def folder() -> pathlib.Path | None:
    """The cache folder: $FASTLORA_CACHE, else ~/.cache/fastlora; None when it is "off"."""
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return pathlib.Path(value).expanduser() if value else \
        pathlib.Path("~/.cache/fastlora").expanduser()


def use(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Keep inductor's caches in ``path`` (default :func:`folder`) and load a saved bundle.
    Returns the folder, or None when caching is off. Call it before the first compiled call: an
    inductor cache folder set by the user (``TORCHINDUCTOR_CACHE_DIR``) is left as it is."""
    root = pathlib.Path(path).expanduser() if path is not None else folder()
    if root is None:
        return None
    inductor = root / "inductor"
    inductor.mkdir(parents=True, exist_ok=True)
    if _inductor_folder_is_default():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    bundle = root / _BUNDLE
    if bundle.is_file():
        import torch

        torch.compiler.load_cache_artifacts(bundle.read_bytes())
    return root


def _inductor_folder_is_default() -> bool:
    """Whether inductor's cache folder is unset or its default (torch writes the default into
    ``TORCHINDUCTOR_CACHE_DIR`` the first time it asks, so a set variable may be torch's own)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None:
        return True
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return False
    return os.path.abspath(current) == os.path.abspath(default_cache_dir())


def save(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Write what this process compiled as one portable file (``artifacts.bin`` in the folder);
    returns its path, or None when caching is off or nothing was compiled."""
    import torch

    root = pathlib.Path(path).expanduser() if path is not None else folder()
    if root is None:
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    bundle = root / _BUNDLE
    tmp = bundle.with_suffix(".tmp")
    tmp.write_bytes(saved[0])
    tmp.replace(bundle)
    return bundle
