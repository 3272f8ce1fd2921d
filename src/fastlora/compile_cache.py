"""Compile caches kept between runs, so that a second run of the same model and shapes starts
from compiled code instead of compiling again.

Inductor caches what it compiles (the FX graph cache, AOTAutograd's cache, Triton's kernels)
under one folder, by default in /tmp (lost at reboot, and per machine). :func:`use` points it
at a lasting folder, ``~/.cache/fastlora/inductor`` unless ``FASTLORA_CACHE`` names another
(``FASTLORA_CACHE=off``: leave inductor's own setting alone), and loads the portable bundle of
:func:`save` if one is there (``torch.compiler.load_cache_artifacts``: a folder copied from
another machine with the same torch, Triton and GPU starts warm too).

Only what comes after the rewrite is cached: Dynamo still traces the model and fastlora still
matches and rewrites the graph at each start (seconds); AOTAutograd's trace of the forward and
backward and inductor's code are served from the cache. ``compiler="aot_eager"`` (the default
on a CPU) compiles nothing that a cache could keep.

Every compile of a rewritten graph is keyed by fastlora's own code as well
(:func:`keyed_by_fastlora`): PyTorch keys a graph by its nodes, and a node of fastlora is an op
name, whose autograd formula and fake (what AOTAutograd's cached backward was traced from)
would otherwise be taken as unchanged after an upgrade of fastlora. On a GPU AOTAutograd traces
the ops into launches of their kernels, so the key also holds what the launchers read besides
the code: the launch route and the tuning overrides (the GPU's name is in PyTorch's own key).

    from fastlora import compile_cache
    compile_cache.use()          # before the first compiled call
    ...                          # train
    compile_cache.save()         # after the first steps: the bundle for another machine
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib

log = logging.getLogger("fastlora")

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


@contextlib.contextmanager
def keyed_by_fastlora():
    """Within it, PyTorch's compile caches (AOTAutograd's, inductor's) key every graph also by
    :func:`code_key` and :func:`settings_key`: ``torch.compiler.config.cache_key_tag``, a tag
    PyTorch adds to every cache key, gets them appended to whatever the user set."""
    import torch.compiler.config as cconfig

    if not hasattr(cconfig, "cache_key_tag"):  # pragma: no cover - torch before 2.6
        yield
        return
    tag, ours = cconfig.cache_key_tag, f"fastlora-{code_key()}{settings_key()}"
    with cconfig.patch(cache_key_tag=f"{tag}+{ours}" if tag else ours):
        yield


def settings_key() -> str:
    """What the launchers read at trace time besides fastlora's code: the tuning overrides in
    force (block sizes, the LoRA dot precision) and whether Triton interprets. "" when neither
    is set, else ``-`` and a short hash (read at each compile: overrides come and go)."""
    from .kernels import tuning

    settings = tuning.overrides(), os.environ.get("TRITON_INTERPRET", "")
    if settings == ({}, ""):
        return ""
    return "-" + hashlib.sha256(repr(settings).encode()).hexdigest()[:12]


class GraphRecord:
    """A small JSON file beside inductor's cache: what fastlora learnt while compiling a graph
    (for its report), read back when a later run is served that graph from the cache."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def write(self, value) -> None:
        """Keep ``value``; a folder that cannot be written loses the record, not the compile
        (a later hit then says the record is missing)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(self.path)
        except OSError as e:
            log.info("fastlora: no record kept in %s (%s)", self.path.parent, e)

    def read(self):
        """The value written, or None when there is none."""
        return json.loads(self.path.read_text()) if self.path.is_file() else None


def graph_record(gm, kind: str, *key) -> GraphRecord | None:
    """The record ``kind`` of compiling ``gm`` (None when PyTorch's caches are off), keyed by
    what keys the compile: the graph's code (nested graphs too), its placeholders' example
    values (symbolic sizes as symbols: a dynamic graph served at another first length has the
    same record), torch's version, fastlora's code and settings, and ``key``."""
    import torch
    from torch import fx
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    if torch.compiler.config.force_disable_caches:
        return None
    digest = hashlib.sha256(f"{torch.__version__} {key!r} {code_key()}{settings_key()}".encode())
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            digest.update(module.code.encode())
    for node in gm.graph.find_nodes(op="placeholder"):
        x = node.meta.get("example_value", node.meta.get("val"))
        digest.update((f"{x.dtype} {x.device.type} {tuple(x.shape)} {x.stride()}"
                       if isinstance(x, torch.Tensor) else repr(x)).encode())
    folder = pathlib.Path(cache_dir()) / f"fastlora_{kind}"
    return GraphRecord(folder / f"{digest.hexdigest()[:32]}.json")


@functools.lru_cache(maxsize=None)
def code_key() -> str:
    """A hash of fastlora's Python sources (the package, with its kernels, and the pattern
    library) and of the launch route (``FASTLORA_LAUNCH`` as read, defaults resolved), which
    decides how the ops are traced: what a cached compile of a rewritten graph depends on
    besides the graph itself."""
    from . import builtin_patterns
    from .kernels import _launch

    digest = hashlib.sha256(f"{_launch.LAUNCH} {sorted(_launch.PER_OP.items())}".encode())
    roots = [pathlib.Path(__file__).parent, builtin_patterns._folder()]
    for root in dict.fromkeys(roots):
        for source in sorted(root.rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]
