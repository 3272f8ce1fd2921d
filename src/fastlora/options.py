"""The backend's options: ``torch.compile(model, backend="fastlora", options={...})``."""
from __future__ import annotations

import dataclasses
import difflib
import inspect

_INNER = ("auto", "inductor", "aot_eager", "eager")
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionsError(ValueError):
    """A bad option name or value; the message is one line that names it and what is valid."""


def unknown_patterns_message(where: str, unknown, known) -> str:
    """One line for pattern names that are not registered, e.g. a misspelt ``disable`` entry."""
    close = {u: difflib.get_close_matches(u, sorted(known), n=1) for u in unknown}
    hints = "".join(f" ({u!r}: did you mean {c[0]!r}?)" for u, c in close.items() if c)
    return (f"{where} names unknown pattern(s) {sorted(unknown)}{hints}; the patterns are "
            f"{', '.join(sorted(known))}")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every option, its default, and what it does (docs/options.md shows them in use).

    - ``disable``: pattern names to leave unfused, e.g. ``["rms_norm"]``.
    - ``print_report``: print each graph's rewrite report to stdout (it is always logged to the
      ``fastlora`` logger, which ``TORCH_LOGS="+fastlora"`` shows).
    - ``compiler``: what compiles the rewritten graph: ``"auto"`` (default: ``"inductor"`` for a
      graph on a GPU, or with ``mode`` or ``offload_activations`` set; ``"aot_eager"`` for a
      graph on the CPU, where it is faster end to end, docs/options.md has the figures),
      ``"inductor"``, ``"aot_eager"`` (AOTAutograd without code generation) or ``"eager"``.
    - ``strict``: raise on an internal error of a pattern instead of reporting it and compiling
      the graph unfused.
    - ``return_logits``: whether a causal-LM graph keeps returning logits when the loss is fused
      (``False`` lets the fused loss skip them).
    - ``mode``: inductor's mode for the rewritten graph, e.g. ``"reduce-overhead"`` (CUDA
      graphs). ``torch.compile`` refuses ``mode=`` together with ``options=``; this takes its
      place then (``mode=`` alone works too).
    - ``offload_activations``: experimental; a size in MiB: saved activations at least this
      large are offloaded to CPU memory between forward and backward (see offload.py). Needs
      the inductor compiler. ``None`` (default): off.
    - ``reuse_layers``: in ``compile_for_trainer`` (and ``fastlora train``), compile identical
      decoder layers once and reuse the compiled layer (each layer's call a
      ``torch.compiler.nested_compile_region``, regions.py), meant to keep compile time flat
      in depth (not yet shown on the CPU: docs/options.md); every fusion is kept. ``True``
      (default); ``False`` inlines every layer. ``torch.compile(model, backend="fastlora")``
      alone does not mark layers.
    """

    disable: tuple[str, ...] = ()
    print_report: bool = False
    compiler: str = "auto"
    strict: bool = False
    return_logits: bool = False
    mode: str | None = None
    offload_activations: float | None = None
    reuse_layers: bool = True

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        """The options of a ``dict``; every bad name or value raises ``OptionsError`` with one
        line naming it and what is valid."""
        if options is not None and not isinstance(options, dict):
            raise OptionsError(f"options must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names, key=str)
        if unknown:
            raise OptionsError(f"unknown fastlora option(s) {unknown}; valid options are "
                               f"{sorted(names)} (see docs/options.md)")
        disable = options.get("disable", ())
        if isinstance(disable, str):
            disable = (disable,)
        if not isinstance(disable, (list, tuple, set, frozenset)) or \
                not all(isinstance(d, str) for d in disable):
            raise OptionsError(f"options['disable'] must be a pattern name or a list of pattern "
                               f"names, got {disable!r}")
        options["disable"] = tuple(disable)
        compiler = options.get("compiler", "auto")
        if compiler not in _INNER:
            raise OptionsError(f"options['compiler'] must be one of {_INNER}, got {compiler!r}")
        if options.get("mode") not in (None, *_MODES):
            raise OptionsError(f"options['mode'] must be one of {_MODES}, got "
                               f"{options['mode']!r}")
        offload = options.get("offload_activations")
        if offload is not None:
            if isinstance(offload, bool) or not isinstance(offload, (int, float)) or offload < 0:
                raise OptionsError(f"options['offload_activations'] must be a size in MiB (a "
                                   f"number >= 0) or None, got {offload!r}")
            if compiler not in ("auto", "inductor"):
                raise OptionsError("options['offload_activations'] needs compiler='inductor' "
                                   "(the offload is planned by inductor's partitioner)")
        for flag in ("print_report", "strict", "return_logits", "reuse_layers"):
            if flag in options and not isinstance(options[flag], bool):
                raise OptionsError(f"options[{flag!r}] must be True or False, got "
                                   f"{options[flag]!r}")
        return cls(**options)

    def check_pattern_names(self, known) -> None:
        """Raise ``OptionsError`` if ``disable`` names a pattern not in ``known``."""
        unknown = sorted(set(self.disable) - set(known))
        if unknown:
            raise OptionsError(unknown_patterns_message("options['disable']", unknown, known))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def backend_options(options: dict | None, pattern_names, example_inputs=(),
                    mode: str | None = None) -> Options:
    """``Options.parse`` and the pattern names, for the backend's call on a graph, with
    ``compiler="auto"`` resolved for that graph (``inductor_or_not``). A bad option raises
    ``OptionsError`` as an exception Dynamo passes on unwrapped, its traceback cut to the
    backend's frame, instead of a long ``BackendCompilerFailed`` whose text asks for a bug
    report."""
    try:
        opts = Options.parse(options)
        opts.check_pattern_names(pattern_names)
    except OptionsError as e:
        raise _dynamo_passes_on(e, inspect.currentframe().f_back) from None
    if opts.compiler == "auto":
        opts = dataclasses.replace(opts, compiler=auto_compiler(opts, example_inputs, mode))
    return opts


def auto_compiler(opts: Options, example_inputs=(), mode: str | None = None) -> str:
    """``compiler="auto"``: inductor where it pays or is needed (a tensor of the graph on a GPU,
    an inductor ``mode``, ``offload_activations``); otherwise aot_eager. On the CPU the fused
    ops run their PyTorch reference kernels either way, and inductor's C++ build costs more
    than it saves on the rest (docs/options.md, "On the CPU")."""
    if opts.mode or mode or opts.offload_activations is not None:
        return "inductor"
    on_gpu = any(getattr(getattr(t, "device", None), "type", "cpu") != "cpu"
                 for t in example_inputs)
    return "inductor" if on_gpu else "aot_eager"


def _dynamo_passes_on(error: OptionsError, frame) -> Exception:
    try:  # Dynamo re-raises its ShortenTraceback errors as they are (torch 2.11 - 2.13)
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - moved: Dynamo wraps it, the message is the same
        return error

    class InvalidOptions(ShortenTraceback, OptionsError):
        pass

    InvalidOptions.__name__ = InvalidOptions.__qualname__ = "OptionsError"
    InvalidOptions.__module__ = __name__
    return InvalidOptions(str(error), first_useful_frame=frame)
