"""The backend's options: ``torch.compile(model, backend="fastlora", options={...})``."""
from __future__ import annotations

import dataclasses

_INNER = ("inductor", "aot_eager", "eager")
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every option, its default, and what it does (docs/options.md shows them in use).

    - ``disable``: pattern names to leave unfused, e.g. ``["rms_norm"]``.
    - ``print_report``: print each graph's rewrite report to stdout (it is always logged to the
      ``fastlora`` logger, which ``TORCH_LOGS="+fastlora"`` shows).
    - ``compiler``: what compiles the rewritten graph: ``"inductor"`` (default), ``"aot_eager"``
      (AOTAutograd without code generation, fast to compile, for debugging) or ``"eager"``.
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
    """

    disable: tuple[str, ...] = ()
    print_report: bool = False
    compiler: str = "inductor"
    strict: bool = False
    return_logits: bool = False
    mode: str | None = None
    offload_activations: float | None = None

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown fastlora option(s) {unknown}; valid options are "
                             f"{sorted(names)} (see docs/options.md)")
        disable = options.get("disable", ())
        if isinstance(disable, str):
            disable = (disable,)
        options["disable"] = tuple(disable)
        if options.get("compiler", "inductor") not in _INNER:
            raise ValueError(f"options['compiler'] must be one of {_INNER}, "
                             f"got {options['compiler']!r}")
        if options.get("mode") not in (None, *_MODES):
            raise ValueError(f"options['mode'] must be one of {_MODES}, got {options['mode']!r}")
        offload = options.get("offload_activations")
        if offload is not None:
            if isinstance(offload, bool) or not isinstance(offload, (int, float)) or offload < 0:
                raise TypeError(f"options['offload_activations'] must be a size in MiB (a number "
                                f">= 0) or None, got {offload!r}")
            if options.get("compiler", "inductor") != "inductor":
                raise ValueError("options['offload_activations'] needs compiler='inductor' (the "
                                 "offload is planned by inductor's partitioner)")
        for flag in ("print_report", "strict", "return_logits"):
            if flag in options and not isinstance(options[flag], bool):
                raise TypeError(f"options[{flag!r}] must be True or False, got {options[flag]!r}")
        return cls(**options)

    def check_pattern_names(self, known: set[str]) -> None:
        unknown = sorted(set(self.disable) - known)
        if unknown:
            raise ValueError(f"options['disable'] names unknown pattern(s) {unknown}; "
                             f"registered patterns are {sorted(known)}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
