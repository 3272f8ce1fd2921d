"""``fastlora train``: a LoRA / QLoRA supervised fine-tune through TRL's ``SFTTrainer`` with the
model compiled by the fastlora backend, on your model and data or on the embedded default.

``train(TrainConfig(...))`` is the whole job; the command line (cli.py) only parses flags into a
``TrainConfig``. The output folder is written under a ``.partial`` name and renamed when training
has finished, so a folder with the final name is always complete.

Launched by ``torchrun`` or ``accelerate launch`` (docs/multi_gpu.md), every process loads and
compiles the model and the Trainer runs DDP across them (gloo on the CPU); only the main process
(global rank 0) prints and writes the output folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import pathlib
import shutil
import sys
import time

from . import embedded
from .dataset import FORMATS, is_conversational, load_jsonl
from .errors import FastloraError, out_of_memory
from .loading import add_lora, load_model_and_tokenizer, pick_device, pick_dtype

RUN_FILE = "fastlora_run.json"  # written last: its presence marks a finished run
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
    pad_to_multiple_of: int = 64
    packing: bool = False  # TRL's BFD packing: rows of max_length tokens, no padding
    log_every: int = 10
    report: bool = True


# ----------------------------------------------------------------------------- processes
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


# ----------------------------------------------------------------------------- output folder
def _output_dir(cfg: TrainConfig) -> pathlib.Path:
    if cfg.output_dir:
        out = pathlib.Path(cfg.output_dir).expanduser()
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("fastlora-output") / stamp
    if out.exists() and not out.is_dir():
        raise FastloraError(f"The output path {out} is a file.", "Pass a folder with --output-dir.")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        finished = (out / RUN_FILE).exists()
        raise FastloraError(
            f"The output folder {out} already exists and is not empty"
            f"{' (it holds a finished run)' if finished else ''}.",
            "Pass another --output-dir, or --overwrite to replace it when this run finishes.")
    return out.resolve()


def _partial_dir(out: pathlib.Path) -> pathlib.Path:
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a run that was killed
    partial.mkdir(parents=True)
    return partial


def _publish(partial: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the finished ``partial`` folder to ``out`` (replacing an old ``out``)."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the run
def _sft_config(cfg: TrainConfig, out: pathlib.Path, device: str, dtype, lr: float):
    import torch
    from trl import SFTConfig

    steps = {"max_steps": -1, "num_train_epochs": cfg.epochs} if cfg.epochs else \
        {"max_steps": cfg.steps}
    # transformers 5 takes a fraction in warmup_steps; 4.x has warmup_ratio for it
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    steps["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = cfg.warmup_ratio
    return SFTConfig(
        output_dir=str(out), **steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=lr,
        lr_scheduler_type="linear", max_length=cfg.max_length,
        pad_to_multiple_of=cfg.pad_to_multiple_of or None, dataloader_drop_last=True,
        packing=cfg.packing, packing_strategy="bfd",
        gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, data_seed=cfg.seed,
        ddp_find_unused_parameters=False,  # every adapter takes part in every step
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16, use_cpu=device == "cpu",
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", dataset_num_proc=None)


def _build_trainer(model, tokenizer, rows, sft_args, callbacks):
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=callbacks)
    for cb in (PrinterCallback, ProgressCallback):  # our own bar replaces them
        trainer.remove_callback(cb)
    return trainer


def _compiler(cfg: TrainConfig, device: str) -> str:
    if cfg.compiler != "auto":
        return cfg.compiler
    return "inductor" if device == "cuda" else "aot_eager"


def train(cfg: TrainConfig, stream=None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the summary also saved as
    ``fastlora_run.json`` in the output folder."""
    import torch
    import transformers

    from .report import reports
    from .progress import ProgressCallback
    from .trainer import compile_count, compile_for_trainer

    process = Process.from_env()
    # Every process checks the input (so all stop on a bad one); only the main one speaks.
    stream = (stream or sys.stdout) if process.main else io.StringIO()
    say = lambda text="": print(text, file=stream, flush=True)  # noqa: E731
    _require("trl", "datasets", extra="train")
    out = _output_dir(cfg)
    rows, fmt = load_jsonl(cfg.dataset or embedded.DATASET)
    device = pick_device()
    if device == "cuda" and process.world_size > 1:
        torch.cuda.set_device(process.local_rank)  # "cuda" is this process's GPU from here on
    dtype = pick_dtype(cfg, device)
    if cfg.load_in_4bit and device != "cuda":
        say("note: --load-in-4bit without a GPU runs bitsandbytes' CPU kernels (slow)")
    partial = _partial_dir(out) if process.main else out.with_name(out.name + ".partial")
    try:
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
        trainer = _build_trainer(model, tokenizer, rows, _sft_config(cfg, partial, device, dtype,
                                                                       lr), [progress])
        trainable, total = model.get_nb_trainable_parameters()
        say(f"model    {cfg.model or embedded.DEFAULT_NAME + ' (embedded default, random init)'}"
            f": {total / 1e6:.1f}M parameters, {dtype_name(dtype)}"
            f"{', 4-bit NF4' if cfg.load_in_4bit else ''}, on {device}")
        say(f"LoRA     r={cfg.lora_r} alpha={cfg.lora_alpha or 2 * cfg.lora_r} "
            f"dropout={cfg.lora_dropout} on {cfg.lora_targets}: "
            f"{trainable / 1e6:.2f}M trainable parameters")
        say(f"data     {cfg.dataset or 'embedded default dataset'}: {len(rows)} rows "
            f"({FORMATS[fmt]})")
        processes = f" x {process.world_size} processes" if process.world_size > 1 else ""
        say(f"training {_length(cfg)}, batch {cfg.batch_size}{processes} x {cfg.grad_accum} "
            f"accumulated, lr {lr:g}, max length {cfg.max_length}, seed {cfg.seed}")
        if cfg.compile:
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
        result = trainer.train()
        seconds = time.perf_counter() - started
        trainer.save_model(str(partial))  # called by every process, writes on the main one
        summary = _summary(cfg, trainer, progress, result, seconds, base, out, compiler,
                           compile_count() - graphs_before, reports(model) if cfg.compile else [],
                           process.world_size)
        if process.main:
            _point_adapter_at_base(partial, out, base, cfg.model is None)
            (partial / RUN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            _publish(partial, out)
    except torch.OutOfMemoryError as e:  # loading, compiling or training
        if process.main:
            shutil.rmtree(partial, ignore_errors=True)
        raise out_of_memory(e, cfg.batch_size, cfg.max_length) from e
    except BaseException:
        if process.main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    losses = summary["loss_history"]
    say()
    first = [loss for _, loss in losses[:10]]
    say(f"done     {summary['steps']} steps in {seconds:.1f}s; mean loss of the first 10 steps "
        f"{sum(first) / max(1, len(first)):.3f}, of the last 10 {summary['final_loss']:.3f}; "
        f"{summary['tokens_per_second_after_compile'] or 0:,.0f} tokens/s after the last "
        f"compilation; {summary['fastlora_graphs']} graph(s) compiled through fastlora, "
        f"{summary['dynamo_graphs_compiled']} Dynamo graph(s) in all")
    say(f"saved    LoRA adapter in {out}")
    say(f"next     fastlora export {out} --gguf {out}/model.gguf")
    return summary


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
             processes):
    import fastlora

    history = progress.loss_history
    last = [loss for _, loss in history[-10:]]
    state = trainer.state
    after = progress.steady_tokens_per_second()
    return {
        "fastlora_version": fastlora.__version__,
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
