"""``fastlora train``: a LoRA / QLoRA supervised fine-tune through TRL's ``SFTTrainer`` with the
model compiled by the fastlora backend, on your model and data or on the embedded default.

``train(TrainConfig(...))`` is the whole job; the command line (cli.py) only parses flags into a
``TrainConfig``. Every input is checked before torch loads. The output folder is written under a
``.partial`` name and renamed when training has finished, so a folder with the final name is
always complete; checkpoints in it let ``resume=`` continue an interrupted run (run_folder.py).

Launched by ``torchrun`` or ``accelerate launch`` (docs/multi_gpu.md), every process loads and
compiles the model and the Trainer runs DDP across them (gloo on the CPU); only the main process
(global rank 0) prints and writes the output folder.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time

from .. import builtin_patterns
from . import embedded
from .dataset import FORMATS, is_conversational, load_jsonl
from .errors import FastloraError, Interrupted, out_of_memory
from ..options import unknown_patterns_message
from .run_folder import (RUN_FILE, RunFolder, final_dir, find_resume_point, output_dir,
                         resumed_config)

DEFAULT_LR, DEFAULT_LR_EMBEDDED = 2e-4, 2e-3


@dataclasses.dataclass
class TrainConfig:
    model: str | None = None  # a folder or hub id; None: the embedded default model
    dataset: str | None = None  # a JSONL file; None: the embedded default dataset
    output_dir: str | None = None  # None: fastlora-output/<date-time>
    overwrite: bool = False
    steps: int = 200
    epochs: float | None = None  # when set, train this many epochs instead of `steps`
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    lr: float | None = None  # None: 2e-4, or 2e-3 on the embedded (randomly initialised) model
    warmup_ratio: float = 0.05
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 * r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    load_in_4bit: bool = False
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    compile: bool = True
    compiler: str = "auto"  # auto: inductor on a GPU, aot_eager on the CPU
    disable: tuple[str, ...] = ()
    dynamic: bool | None = True  # torch.compile's `dynamic` (compile_for_trainer's default)
    padding_free: bool = True  # a batch is one row of its examples, position_ids, no mask
    pad_to_multiple_of: int = 64
    packing: bool = False  # TRL's BFD packing: rows of max_length tokens, no padding
    checkpoint_every: int = 50  # steps between checkpoints (0: only when interrupted)
    log_every: int = 10
    report: bool = True


@dataclasses.dataclass(frozen=True)
class Process:
    """Which of the processes of a ``torchrun`` / ``accelerate launch`` this one is (both set
    RANK, LOCAL_RANK and WORLD_SIZE); one process of one when launched plainly."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Process":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0


# field -> (flag, what it must be, test): every number checked before anything loads
_NUMBERS = {
    "steps": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "batch_size": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "grad_accum": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "max_length": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "lora_r": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "log_every": ("a positive integer", lambda v: isinstance(v, int) and v >= 1),
    "pad_to_multiple_of": ("0 or a positive integer", lambda v: isinstance(v, int) and v >= 0),
    "checkpoint_every": ("0 or a positive integer", lambda v: isinstance(v, int) and v >= 0),
    "seed": ("0 or a positive integer", lambda v: isinstance(v, int) and v >= 0),
    "epochs": ("a positive number", lambda v: v is None or _positive(v)),
    "lr": ("a positive number", lambda v: v is None or _positive(v)),
    "lora_alpha": ("a positive number", lambda v: v is None or _positive(v)),
    "lora_dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "warmup_ratio": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
}
_CHOICES = {"dtype": ("auto", "bf16", "fp16", "fp32"),
            "compiler": ("auto", "inductor", "aot_eager", "eager")}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def check_config(cfg: TrainConfig) -> None:
    """Raise a one-line FastloraError for the first bad setting, naming its flag."""
    for name, (expected, ok) in _NUMBERS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not ok(value):
            raise FastloraError(f"--{name.replace('_', '-')}: expected {expected}, got "
                                f"{value!r}.")
    for name, allowed in _CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise FastloraError(f"--{name}: expected one of {', '.join(allowed)}, got "
                                f"{getattr(cfg, name)!r}.")
    known = builtin_patterns.names()
    unknown = sorted(set(cfg.disable) - set(known))
    if unknown:
        raise FastloraError(unknown_patterns_message("--disable-pattern", unknown, known) + ".")


# ----------------------------------------------------------------------------- the run
def _compiler(cfg: TrainConfig, device: str) -> str:
    if cfg.compiler != "auto":
        return cfg.compiler
    return "inductor" if device == "cuda" else "aot_eager"


def train(cfg: TrainConfig, stream=None, resume: str | None = None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the summary also saved as
    ``fastlora_run.json`` in the output folder. ``resume``: a checkpoint folder, an interrupted
    run's folder, or ``"latest"``; the run continues with its own settings (those of ``cfg``
    that differ from the defaults must agree, except how it is compiled and logged)."""
    process = Process.from_env()
    # Every process checks the input (so all stop on a bad one); only the main one speaks.
    stream = (stream or sys.stdout) if process.main else io.StringIO()
    say = lambda text="": print(text, file=stream, flush=True)  # noqa: E731
    _require("trl", "datasets", extra="train")
    checkpoint = None
    if resume:
        checkpoint = find_resume_point(resume, cfg.output_dir)
        cfg = resumed_config(checkpoint, cfg, TrainConfig())
    check_config(cfg)
    out = final_dir(checkpoint.parent).resolve() if checkpoint else output_dir(cfg)
    rows, fmt = load_jsonl(cfg.dataset or embedded.DATASET)

    import torch  # the inputs are fine: now the heavy part

    from .interrupt import StopOnSignal

    folder = RunFolder(out, resuming=checkpoint is not None, main=process.main)
    if checkpoint is None:
        folder.save_config(cfg)
    stop = StopOnSignal()
    try:
        summary = _run(cfg, rows, fmt, folder, checkpoint, stop, stream, process)
    except torch.OutOfMemoryError as e:  # loading, compiling or training
        kept = folder.abandon()
        raise out_of_memory(e, cfg.batch_size, cfg.max_length, kept) from e
    except KeyboardInterrupt:
        raise Interrupted(None, folder.abandon()) from None
    except BaseException:
        kept = folder.abandon()
        if kept is not None:
            say(f"kept     {folder.partial} (checkpoint at step {_step_of(kept)}): continue "
                f"with fastlora train --resume {folder.partial}")
        raise
    if summary is None:
        raise Interrupted(stop.signal_name, folder.abandon())
    _say_done(summary, out, say)
    return summary


def _run(cfg, rows, fmt, folder, checkpoint, stop, stream, process) -> dict | None:
    """Load, build, compile and train; publish the finished run and return its summary, or
    ``None`` when a signal stopped it early (its checkpoint is in ``folder``)."""
    import torch
    import transformers

    from .loading import add_lora, load_model_and_tokenizer, pick_device, pick_dtype
    from .progress import ProgressCallback
    from ..report import reports
    from .sft import build_trainer, keep_adapters_in, padding_free_collator, sft_config
    from .. import compile_cache
    from ..trainer import compile_count, compile_for_trainer

    say = lambda text="": print(text, file=stream, flush=True)  # noqa: E731
    device = pick_device()
    if device == "cuda" and process.world_size > 1:
        torch.cuda.set_device(process.local_rank)  # "cuda" is this process's GPU from here on
    dtype = pick_dtype(cfg, device)
    if cfg.load_in_4bit and device != "cuda":
        say("note: --load-in-4bit without a GPU runs bitsandbytes' CPU kernels (slow)")
    partial = folder.partial
    transformers.set_seed(cfg.seed)
    model, tokenizer, base = load_model_and_tokenizer(
        cfg, device, dtype, partial / "base_model" if process.main else None)
    if is_conversational(fmt) and not getattr(tokenizer, "chat_template", None):
        raise FastloraError(
            f"The dataset is in the {FORMATS[fmt]} format, but the tokenizer of "
            f"{cfg.model!r} has no chat template to turn messages into text.",
            'Use a model with a chat template, or write the rows as {"prompt": "...", '
            '"completion": "..."} strings or {"text": "..."}.')
    model = add_lora(model, cfg)
    lr = cfg.lr or (DEFAULT_LR_EMBEDDED if cfg.model is None else DEFAULT_LR)
    compiler = _compiler(cfg, device)
    progress = ProgressCallback(model, every=cfg.log_every, print_report=cfg.report,
                                stream=stream, dynamic=cfg.dynamic)
    trainer = build_trainer(model, tokenizer, rows, sft_config(cfg, partial, device, dtype, lr),
                            [progress, stop], padding_free_collator(cfg, tokenizer, model))
    kept_fp32 = cfg.load_in_4bit and keep_adapters_in(model, dtype)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"model    {cfg.model or embedded.DEFAULT_NAME + ' (embedded default, random init)'}"
        f": {total / 1e6:.1f}M parameters, {dtype_name(dtype)}"
        f"{', 4-bit NF4' if cfg.load_in_4bit else ''}, on {device}")
    say(f"LoRA     r={cfg.lora_r} alpha={cfg.lora_alpha or 2 * cfg.lora_r} "
        f"dropout={cfg.lora_dropout} on {cfg.lora_targets}: "
        f"{trainable / 1e6:.2f}M trainable parameters"
        f"{' (kept in float32 for float32 compute)' if kept_fp32 else ''}")
    say(f"data     {cfg.dataset or 'embedded default dataset'}: {len(rows)} rows "
        f"({FORMATS[fmt]}); {_batches(cfg)}")
    processes = f" x {process.world_size} processes" if process.world_size > 1 else ""
    say(f"training {_length(cfg)}, batch {cfg.batch_size}{processes} x {cfg.grad_accum} "
        f"accumulated, "
        f"lr {lr:g}, max length {cfg.max_length}, seed {cfg.seed}; "
        + (f"a checkpoint every {cfg.checkpoint_every} steps and on Ctrl-C"
           if cfg.checkpoint_every else "a checkpoint on Ctrl-C"))
    if checkpoint is not None:
        say(f"resume   from {checkpoint} (step {_step_of(checkpoint)})")
    if cfg.compile:
        compile_cache.use()  # compiled code kept between runs (compile_cache.py)
        options = {"compiler": compiler}
        if cfg.disable:
            options["disable"] = list(cfg.disable)
        compile_for_trainer(model, dynamic=cfg.dynamic, **options)
        say(f"compile  backend=\"fastlora\" (rest of the graph: {compiler}); the first step "
            f"compiles")
    else:
        say("compile  off (--no-compile): plain eager PyTorch")
    say()
    graphs_before = compile_count()
    started = time.perf_counter()
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    if stop.signal_name is not None and trainer.state.global_step < trainer.state.max_steps:
        return None  # stopped early, with a checkpoint; the signal on the last step is too late
    stop.signal_name = None
    trainer.save_model(str(partial))  # called by every process, writes on the main one
    if cfg.compile and process.main:
        compile_cache.save()
    summary = _summary(cfg, trainer, progress, result, seconds, base, folder.out, compiler,
                       compile_count() - graphs_before, reports(model) if cfg.compile else [],
                       process.world_size)
    if process.main:
        folder.discard_checkpoints()
        _point_adapter_at_base(partial, folder.out, base, cfg.model is None)
        (partial / RUN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        folder.publish()
    return summary


def _say_done(summary: dict, out: pathlib.Path, say) -> None:
    first = [loss for _, loss in summary["loss_history"][:10]]
    say()
    say(f"done     {summary['steps']} steps in {summary['seconds']:.1f}s; mean loss of the first "
        f"10 steps {sum(first) / max(1, len(first)):.3f}, of the last 10 "
        f"{summary['final_loss']:.3f}; {summary['tokens_per_second_after_compile'] or 0:,.0f} "
        f"tokens/s after the last compilation; {summary['fastlora_graphs']} graph(s) compiled "
        f"through fastlora, {summary['dynamo_graphs_compiled']} Dynamo graph(s) in all")
    say(f"saved    LoRA adapter in {out}")
    for line in next_steps(out, summary["model_type"]):
        say(f"next     {line}")


def next_steps(out: pathlib.Path, model_type: str | None) -> list[str]:
    """The export commands that work here: GGUF only for an architecture export writes and
    with the gguf package installed (the [export] extra)."""
    import importlib.util

    from .export import GGUF_ARCHS

    merge = f"fastlora export {out}"
    if model_type not in GGUF_ARCHS:
        return [f"{merge}    (merge into 16-bit weights; GGUF export supports "
                f"{', '.join(GGUF_ARCHS)}, not {model_type})"]
    if importlib.util.find_spec("gguf") is None:
        return [f"{merge}    (merge into 16-bit weights; for a GGUF file too, pip install "
                f"'fastlora[export]' and add --gguf {out / 'model.gguf'})"]
    return [f"{merge} --gguf {out / 'model.gguf'}    (merge, and write GGUF for llama.cpp)"]


def _step_of(checkpoint: pathlib.Path) -> str:
    return checkpoint.name.rsplit("-", 1)[-1]


def _batches(cfg: TrainConfig) -> str:
    if cfg.packing:
        return f"packed into rows of {cfg.max_length} tokens (padding-free)"
    if cfg.padding_free:
        return "padding-free batches (one row per batch, position ids, no mask)"
    return "padded batches with an attention mask"


def _require(*modules: str, extra: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FastloraError(f"This command needs {', '.join(missing)}, which "
                            f"{'is' if len(missing) == 1 else 'are'} not installed.",
                            f"Install them with pip install 'fastlora[{extra}]'.")


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _length(cfg: TrainConfig) -> str:
    return f"{cfg.epochs:g} epoch(s)" if cfg.epochs else f"{cfg.steps} steps"


def _summary(cfg, trainer, progress, result, seconds, base, out, compiler, graphs, model_reports,
             processes=1):
    import fastlora

    state = trainer.state  # its log_history goes back to step 1 on a resumed run too
    history = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
    last = [loss for _, loss in history[-10:]]
    after = progress.steady_tokens_per_second()
    return {
        "fastlora_version": fastlora.__version__,
        "model_type": getattr(trainer.model.config, "model_type", None),
        "config": dataclasses.asdict(cfg),
        "base_model": str(out / "base_model") if cfg.model is None else base,
        "steps": state.global_step,
        "seconds": round(seconds, 2),
        "first_step_seconds": round(progress.first_step_s or 0.0, 2),
        "processes": processes,
        "tokens": state.num_input_tokens_seen,  # of all processes (the Trainer gathers them)
        "tokens_per_second_after_compile": None if after is None else round(after, 1),
        "loss_history": history,
        "final_loss": sum(last) / max(1, len(last)),
        "train_loss": result.training_loss,
        "compiled": cfg.compile,
        "compiler": compiler if cfg.compile else None,
        "dynamo_graphs_compiled": graphs,
        "fastlora_graphs": len(model_reports),
        "recompiled_at_steps": progress.recompiles,
        "report_counts": fastlora.Reports(model_reports).counts() if model_reports else {},
        "near_misses": len(fastlora.Reports(model_reports).near_misses()) if model_reports else 0,
    }


def _point_adapter_at_base(partial: pathlib.Path, out: pathlib.Path, base: str, embedded_base):
    """adapter_config.json names the base model; for the embedded default that is the copy
    saved beside the adapter, at its final location."""
    config_file = partial / "adapter_config.json"
    if not embedded_base or not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(out / "base_model")
    config_file.write_text(json.dumps(config, indent=2) + "\n")
