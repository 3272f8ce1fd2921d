"""The backend's options: ``torch.compile(model, backend="fastlora", options={...})``."""
from __future__ import annotations

import dataclasses
import difflib
import inspect

from . import memory_budget

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
      graph on a GPU, or with ``mode``, ``memory_budget`` or an explicit ``offload_activations``
      set; ``"aot_eager"`` for a
      graph on the CPU, where it is faster end to end, docs/options.md has the figures),
      ``"inductor"``, ``"aot_eager"`` (AOTAutograd without code generation) or ``"eager"``.
    - ``strict``: raise on an internal error of a pattern instead of reporting it and compiling
      the graph unfused.
    - ``return_logits``: whether a causal-LM graph keeps returning logits when the loss is fused
      (``False`` lets the fused loss skip them).
    - ``mode``: inductor's mode for the rewritten graph, e.g. ``"reduce-overhead"`` (CUDA
      graphs). ``torch.compile`` refuses ``mode=`` together with ``options=``; this takes its
      place then (``mode=`` alone works too).
    - ``offload_activations``: whether the inputs of checkpointed layers go to pinned host
      memory between forward and backward, on a side stream, reloaded one layer ahead
      (offload.py). ``"auto"`` (default): on for a graph with checkpointed regions (gradient
      checkpointing on) that inductor compiles, as ``offload.OFFLOAD_WHEN_CHECKPOINTING``
      says; ``True``: on for checkpointed regions (forces inductor); ``False`` or ``None``:
      off; a number: every saved activation of at least that many MiB instead (forces
      inductor).
    - ``memory_budget``: what the partitioner may save for backward (memory_budget.py). A
      fraction in [0, 1] of the activation memory, passed to
      ``torch._functorch.config.activation_memory_budget``: 1 saves what is fastest
      (PyTorch's default), 0 only what cannot be recomputed, values between trade recompute
      for memory. Or a size, ``"14GiB"`` (GiB, MiB, GB, MB, any case): the bytes of
      activations each compiled graph may keep saved, turned into that graph's fraction by
      the partitioner; under gradient checkpointing, room the checkpointed plan leaves in a
      size keeps the last checkpointed layers that fit (not recomputed). ``None`` (default):
      PyTorch's setting. Forces inductor (the budget is a setting of its partitioner). The
      report says what each graph saves.
    - ``reuse_layers``: in ``compile_for_trainer`` (and ``fastlora train``), compile identical
      decoder layers once and reuse the compiled layer (each layer's call a
      ``torch.compiler.nested_compile_region``, regions.py), meant to keep compile time flat
      in depth; every fusion is kept. ``"auto"`` (default): on where inductor launches the
      kernels (``FASTLORA_LAUNCH=inductor``, the default: first step 104.5 s against 176.9 s
      on the H200) for calls on a GPU, off on the Python launch route, which it did not speed
      up (65.0 s against 67.9 s), and for calls on the CPU (docs/options.md). ``True`` marks
      the layers on either route; ``False`` inlines every layer. Checkpointed layers whose
      inputs are offloaded (``offload_activations``) run unmarked either way. ``torch.compile(model, backend="fastlora")`` alone marks no layers.
    - ``remove_padding``: in ``compile_for_trainer``, a padded batch (``attention_mask`` with
      zeros) is packed into one padding-free row before the compiled model runs, so no pad
      token goes through the norms, projections, MLP or loss; logits come back padded
      (unpad.py: what is proven first, and when a call is left padded). ``False`` (default:
      no faster than padded on the H200, docs/options.md).
    - ``warm_kernels``: compile the Triton kernels of the fused ops that Python launches in
      parallel, on a thread pool, while the graph is compiled, instead of one after another at
      their first launches in the first step (warmup.py; it only fills Triton's caches).
      ``"auto"`` (default): as ``warmup.WARM_BY_DEFAULT`` says (on), for a graph on a GPU;
      ``True``: planned for every graph (compiled only for CUDA tensors); ``False``: off.
    - ``offload_embeddings``: in ``compile_for_trainer``, a frozen, untied input embedding
      table (a plain ``nn.Embedding``) moves to pinned host memory before the first step and
      the GPU reads each step's rows from there (host_embeddings.py): 0.98 GiB of GPU memory
      for Llama-3-8B. ``"auto"`` (default): as ``host_embeddings.OFFLOAD_BY_DEFAULT`` says
      (on, for a table on a GPU at the first call), never under CUDA graphs; ``True``: on;
      ``False``: off.
      ``torch.compile(model, backend="fastlora")`` alone moves nothing.
    - ``offload_lm_head``: in ``compile_for_trainer``, a frozen, untied lm_head without bias
      (a plain ``nn.Linear``) is kept in pinned host memory and copied to the GPU for the loss
      only (host_lm_head.py; prefetched on a side stream from the start of each call without
      gradient checkpointing): 0.98 GiB less for Llama-3-8B. ``"auto"`` (default): on for a
      model on a GPU that trains with gradient checkpointing at the first call (as
      ``host_lm_head.OFFLOAD_BY_DEFAULT`` allows), never under CUDA graphs; ``True``: on;
      ``False``: off. ``torch.compile`` alone moves nothing.
    """

    disable: tuple[str, ...] = ()
    print_report: bool = False
    compiler: str = "auto"
    strict: bool = False
    return_logits: bool = False
    mode: str | None = None
    offload_activations: bool | float | str | None = "auto"
    memory_budget: float | str | None = None
    reuse_layers: bool | str = "auto"
    remove_padding: bool = False
    warm_kernels: bool | str = "auto"
    offload_embeddings: bool | str = "auto"
    offload_lm_head: bool | str = "auto"

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
        offload = options.get("offload_activations", "auto")
        if offload not in ("auto", True, False, None) and (
                isinstance(offload, bool) or not isinstance(offload, (int, float)) or offload < 0):
            raise OptionsError(f"options['offload_activations'] must be 'auto', True, False, "
                               f"None or a size in MiB (a number >= 0), got {offload!r}")
        budget = options.get("memory_budget")
        if not memory_budget.valid(budget):
            hint = " (a size needs a unit)" if isinstance(budget, (int, float)) and \
                not isinstance(budget, bool) and budget > 1 else ""
            raise OptionsError(f"options['memory_budget'] must be a fraction between 0 and 1 "
                               f"(of the activation memory the fastest plan saves), a size such "
                               f"as '14GiB' (units GiB, MiB, GB, MB) or None, got "
                               f"{budget!r}{hint}")
        for name, value in (("offload_activations", offload), ("memory_budget", budget)):
            if _needs_inductor(name, value) and compiler not in ("auto", "inductor"):
                raise OptionsError(f"options[{name!r}] needs compiler='inductor' (it is a "
                                   f"setting of inductor's partitioner), got {compiler!r}")
        for name in ("reuse_layers", "warm_kernels", "offload_embeddings", "offload_lm_head"):
            value = options.get(name, "auto")
            if not (isinstance(value, bool) or value == "auto"):
                raise OptionsError(f"options[{name!r}] must be True, False or 'auto', got "
                                   f"{value!r}")
        for flag in ("print_report", "strict", "return_logits", "remove_padding"):
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


def _needs_inductor(name: str, value) -> bool:
    """Whether an option's value asks for something only inductor's compile does."""
    if name == "offload_activations":
        return value not in ("auto", False, None)
    return value is not None


def auto_compiler(opts: Options, example_inputs=(), mode: str | None = None,
                  on_gpu: bool | None = None) -> str:
    """``compiler="auto"``: inductor where it pays or is needed (a tensor of the graph on a GPU,
    an inductor ``mode``, ``offload_activations`` asked for explicitly, ``memory_budget``);
    otherwise aot_eager. On the CPU the fused
    ops run their PyTorch reference kernels either way, and inductor's C++ build costs more
    than it saves on the rest (docs/options.md, "On the CPU"). ``on_gpu``: whether the graph
    is on a GPU, for a caller that asks before there is a graph (else read off
    ``example_inputs``)."""
    if opts.mode or mode or _needs_inductor("offload_activations", opts.offload_activations) \
            or _needs_inductor("memory_budget", opts.memory_budget):
        return "inductor"
    if on_gpu is None:
        on_gpu = bool(device_types(example_inputs) - {"cpu"})
    return "inductor" if on_gpu else "aot_eager"


def device_types(example_inputs) -> set[str]:
    """The device types (``"cuda"``, ``"cpu"``) of a graph's example inputs that have one."""
    types = {getattr(getattr(t, "device", None), "type", None) for t in example_inputs}
    return types - {None}


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
