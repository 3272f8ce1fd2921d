"""The ``fastlora`` command: ``fastlora train`` (LoRA/QLoRA fine-tune through TRL, compiled by the
fastlora backend) and ``fastlora export`` (merge the adapter, save 16-bit weights and GGUF).

Errors the user can fix are printed as one paragraph (exit status 2); ``--debug`` shows the
traceback too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import traceback
import warnings

from .errors import FastloraError, Interrupted, paragraph

_TRAIN_EXAMPLES = """\
examples:
  fastlora train
      LoRA fine-tune of the embedded tiny Llama on the embedded dataset (about two minutes
      on a 2-core CPU; add --no-compile there for half a minute)
  fastlora train --model meta-llama/Llama-3.2-1B-Instruct --dataset chats.jsonl --steps 500
  fastlora train --model ./my-8b --load-in-4bit --gradient-checkpointing --batch-size 4 \\
      --max-length 2048 --output-dir runs/qlora-8b
  fastlora train --resume latest
      continue the newest interrupted run under fastlora-output/

dataset formats (JSONL, one object per line, the same format on every line):
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
  {"prompt": "...", "completion": "..."}           (loss on the completion only)
  {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}
  {"text": "..."}

The output folder holds the LoRA adapter (peft format), the tokenizer and fastlora_run.json;
it is written as <folder>.partial and renamed when training finishes, so a folder with the
final name is always complete. Checkpoints go into <folder>.partial every --checkpoint-every
steps and on Ctrl-C or SIGTERM (the step in progress finishes first); an interrupted run keeps
it, and fastlora train --resume <folder>.partial (or --resume latest) continues exactly where
it stopped. Docs: docs/quickstart.md, docs/trl.md.
"""

_EXPORT_EXAMPLES = """\
examples:
  fastlora export fastlora-output/20261128-101500
      merge the adapter into the base weights (bf16) and save a Hugging Face model folder
      in <adapter>/merged
  fastlora export runs/my-lora --out merged-model --dtype fp16 --gguf merged-model/model.gguf

The merge goes through peft (merge_and_unload). GGUF output supports Llama-architecture models
(llama, mistral) with llama.cpp's tensor names and metadata. Docs: docs/export.md.
"""


def _fill(text: str) -> str:
    return textwrap.fill(text, width=80)


class _Parser(argparse.ArgumentParser):
    """argparse with fastlora's one-line errors: ``fastlora: error: --steps: expected a positive
    integer, got 'abc' (fastlora train --help lists the flags)`` instead of the usage block."""

    def error(self, message: str):
        message = message[len("argument "):] if message.startswith("argument ") else message
        sys.stderr.write(paragraph(f"{message} ({self.prog} --help lists the flags)") + "\n")
        sys.exit(2)


def _number(kind: str, convert, ok, expected: str):
    """An argparse type: ``convert`` the text, accept it if ``ok(value)``; otherwise say
    ``expected <expected>, got '<text>'``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = kind
    return parse


_positive_int = _number("positive_int", int, lambda v: v >= 1, "a positive integer")
_count = _number("count", int, lambda v: v >= 0, "0 or a positive integer")
_int = _number("int", int, lambda v: True, "an integer")
_positive_float = _number("positive_float", float, lambda v: math.isfinite(v) and v > 0,
                          "a positive number")
_dropout = _number("dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _valued(group, rows) -> None:
    """Flags that take a value, one (flag, type, default, metavar, help) row each."""
    for flag, kind, default, metavar, text in rows:
        group.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastlora",
        description="LoRA and QLoRA fine-tuning of Hugging Face models, compiled by the fastlora "
                    "torch.compile backend (fused, exact Triton kernels; a rewrite report says "
                    "what was fused where).")
    parser.add_argument("--version", action="version", version=f"fastlora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train", help="fine-tune a model with LoRA/QLoRA through TRL's SFTTrainer",
        description=_fill("Fine-tune a causal language model with LoRA (or QLoRA with "
                          "--load-in-4bit) through TRL's SFTTrainer, the model compiled by the "
                          "fastlora backend. With no arguments it trains the embedded tiny "
                          "Llama on the embedded dataset."),
        epilog=_TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = t.add_argument_group("model and data")
    g.add_argument("--model", metavar="PATH_OR_ID",
                   help="model folder or Hugging Face hub id (default: the embedded tiny Llama, "
                        "randomly initialised, saved with the adapter)")
    g.add_argument("--dataset", metavar="FILE.jsonl",
                   help="training data, JSONL in one of the formats below (default: the "
                        "embedded 480-row instruction dataset)")
    g.add_argument("--max-length", type=_positive_int, default=1024, metavar="N",
                   help="truncate examples to N tokens (default: %(default)s)")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: load the base weights in 4-bit NF4 with bitsandbytes")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype (default auto: bf16 on a GPU, fp32 on the CPU)")
    _valued(t.add_argument_group("LoRA"), [
        ("--lora-r", _positive_int, 16, "R", "adapter rank (default: %(default)s)"),
        ("--lora-alpha", _positive_float, None, "ALPHA",
         "scaling numerator, scale = alpha / r (default: 2 * r)"),
        ("--lora-dropout", _dropout, 0.0, "P",
         "dropout on the adapter input (default: %(default)s)"),
        ("--lora-targets", None, "all-linear", "NAMES",
         "comma-separated module names, e.g. q_proj,v_proj, or all-linear "
         "(default: %(default)s)")])
    g = t.add_argument_group("training")
    _valued(g, [
        ("--steps", _positive_int, 200, "N", "optimizer steps (default: %(default)s)"),
        ("--epochs", _positive_float, None, "E", "train E epochs instead of a number of steps"),
        ("--batch-size", _positive_int, 8, "B", "examples per device step (default: %(default)s)"),
        ("--grad-accum", _positive_int, 1, "K",
         "accumulate K steps per optimizer step (default: %(default)s)")])
    g.add_argument("--lr", type=_positive_float, metavar="LR",
                   help="peak learning rate, linear decay after 5%% warm-up (default: 2e-4; "
                        "2e-3 for the embedded random model)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory")
    g.add_argument("--checkpoint-every", type=_count, default=50, metavar="N",
                   help="save a checkpoint (adapter, optimizer, scheduler, RNG states, step) "
                        "every N steps, and always on Ctrl-C or SIGTERM (default: %(default)s; "
                        "0: only on an interruption)")
    g.add_argument("--resume", metavar="CHECKPOINT|latest",
                   help="continue an interrupted run from a checkpoint folder, a run's folder, "
                        "or 'latest' (the newest unfinished run in --output-dir, or under "
                        "fastlora-output/); the run keeps its own settings and folder")
    g.add_argument("--seed", type=_count, default=0, help="seed for LoRA init and data order "
                                                        "(default: %(default)s)")
    g = t.add_argument_group("compilation")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="train in eager PyTorch (to compare speed or rule fastlora out)")
    g.add_argument("--compiler", choices=["auto", "inductor", "aot_eager", "eager"],
                   default="auto",
                   help="what compiles the graph around fastlora's fused ops (default auto: "
                        "inductor on a GPU, aot_eager on the CPU, where inductor's C++ build "
                        "takes minutes)")
    g.add_argument("--disable-pattern", dest="disable", action="append", default=[],
                   metavar="NAME", help="leave a pattern unfused, e.g. rms_norm (repeatable)")
    g.add_argument("--no-padding-free", dest="padding_free", action="store_false",
                   help="pad every example of a batch to the longest one, with an attention "
                        "mask (default: padding-free, the batch's examples concatenated into "
                        "one row with position ids restarting per example and no mask: no "
                        "compute on padding, and the fused attention kernel runs)")
    g.add_argument("--pad-to-multiple-of", type=_count, default=64, metavar="N",
                   help="pad each batch (padding-free: its one row) to a multiple of N tokens, "
                        "so batches share a few shapes (default: %(default)s; 0: no extra "
                        "padding)")
    g.add_argument("--packing", action="store_true",
                   help="pack several examples into each row of --max-length tokens, without "
                        "padding (position ids restart per example; the fused attention kernel "
                        "handles it)")
    g.add_argument("--dynamic", choices=["auto", "true", "false"], default="true",
                   help="torch.compile dynamic shapes (default true: one compile for every "
                        "sequence length; auto: static first, dynamic after the first new "
                        "shape; false: a compile per shape)")
    g.add_argument("--no-report", dest="report", action="store_false",
                   help="do not print the rewrite report after compilation")
    g = t.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR",
                   help="where to save the adapter (default: fastlora-output/<date-time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it exists (only once the new run has finished)")
    g.add_argument("--log-every", type=_positive_int, default=10, metavar="N",
                   help="print a loss line every N steps (default: %(default)s)")
    g.add_argument("--debug", action="store_true",
                   help="show warnings and full tracebacks")

    e = sub.add_parser(
        "export", help="merge a LoRA adapter into 16-bit weights; optionally write GGUF",
        description=_fill("Merge a LoRA adapter into its base model through peft "
                          "(merge_and_unload), save the merged model in Hugging Face format, and "
                          "optionally write a GGUF file for llama.cpp-compatible runtimes."),
        epilog=_EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("adapter", metavar="ADAPTER_DIR",
                   help="folder with adapter_config.json (what fastlora train saved)")
    e.add_argument("--base", metavar="PATH_OR_ID",
                   help="base model (default: the one named in adapter_config.json)")
    e.add_argument("--out", metavar="DIR", help="merged model folder (default: ADAPTER_DIR/merged)")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="dtype of the merged weights (default: %(default)s)")
    e.add_argument("--gguf", metavar="FILE.gguf", help="also write a GGUF file")
    e.add_argument("--gguf-dtype", choices=["f16", "bf16", "f32"], default=None,
                   help="GGUF tensor type (default: f16, or f32 with --dtype fp32)")
    e.add_argument("--overwrite", action="store_true", help="replace --out / --gguf if present")
    e.add_argument("--debug", action="store_true", help="show warnings and full tracebacks")
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _quiet() -> None:
    """Silence library chatter (deprecation warnings, progress bars of dataset preparation)
    through the settings the libraries read when they are imported, so nothing heavy is
    imported here."""
    warnings.simplefilter("ignore")
    for name, value in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    import logging

    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes",
                 "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already (main() called from Python)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _train(args) -> int:
    from .train import TrainConfig, train

    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    cfg = TrainConfig(
        model=args.model, dataset=args.dataset, output_dir=args.output_dir,
        overwrite=args.overwrite, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
        load_in_4bit=args.load_in_4bit, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        compile=args.compile, compiler=args.compiler, disable=tuple(args.disable),
        dynamic=dynamic, padding_free=args.padding_free,
        pad_to_multiple_of=args.pad_to_multiple_of, packing=args.packing,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, report=args.report)
    train(cfg, resume=args.resume)
    return 0


def _export(args) -> int:
    from .export import export

    export(args.adapter, out=args.out, base=args.base, dtype=args.dtype, gguf_path=args.gguf,
           gguf_dtype=args.gguf_dtype, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.debug:
        _quiet()
    try:
        return {"train": _train, "export": _export}[args.command](args)
    except Interrupted as e:
        print(f"\nfastlora: {e}", file=sys.stderr)
        return e.exit_code
    except FastloraError as e:
        if args.debug:
            traceback.print_exc()
        print(paragraph(str(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected library error: still one paragraph
        if args.debug:
            traceback.print_exc()
            return 1
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(paragraph(f"{type(e).__name__}: {text} (raised at {os.path.basename(where.filename)}"
                        f":{where.lineno}). This is not an input problem fastlora recognises; "
                        f"rerun with --debug for the full traceback, and please report it with "
                        f"that output."), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
