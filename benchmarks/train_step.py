"""End-to-end LoRA training-step benchmark (the workload of shared/targets.md).

    python benchmarks/train_step.py --shapes llama-1b --variants eager,inductor,fastlora,unsloth
    python benchmarks/train_step.py --shapes tiny --variants eager,fastlora --steps 3  # on a CPU

Workload: LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down of a randomly initialised
causal LM (attention "sdpa"), bf16 weights, random token ids as inputs and labels, fused AdamW on
the LoRA parameters; median step time of --steps steps after --warmup warm-up steps; peak memory
is torch.cuda.max_memory_allocated() over the timed steps. Each (shape, variant) runs in its own
process, so peak memory is clean. Variants: eager (HF + peft), inductor (torch.compile), fastlora
(torch.compile backend="fastlora"), liger (Liger-Kernel patches, eager) and unsloth
(FastLanguageModel), the last two when importable. Prints a table last; writes JSON lines, CSV
and a PNG plot under --out.

Per variant, besides tok/s, step ms, peak GiB and warm-up s (the --warmup steps, compiles
included), after the timed steps (benchmarks/_harness.py):
- ``gpu_ms``: the GPU's kernel time per step, torch.profiler over --steps more steps of the
  same batch (steady state), kernel events' self device time summed;
- ``host_ms``: the CPU's time to issue one step, its wall time without the final
  synchronisation (the Python, dispatch and launch cost): the least of 3 tries from an idle GPU
  and 3 behind a sleep kernel that keeps the GPU behind. It can read high, never low: where a
  step waits on the GPU inside, or where the GPU falls so far behind that the launch queue
  fills (then it reads at most the step time);
- ``step_over_gpu``: step ms / GPU ms (1.0: the GPU never idles; the excess is host overhead,
  launch gaps and synchronisation).
Without a GPU (a smoke run: ``--shapes tiny``) the model is float32 on the CPU, fastlora
compiles with ``compiler="aot_eager"`` (inductor's C++ build takes minutes), GPU ms and peak GiB
are n/a, and host ms is the step itself (the host does the work).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()

SHAPES = {
    # name: (family, config kwargs, default gradient checkpointing)
    "llama-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                               tie_word_embeddings=True, head_dim=64), False),
    "llama-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                               tie_word_embeddings=False), True),
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                 tie_word_embeddings=True), False),
    "gemma-2b": ("gemma", dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
                               num_key_value_heads=1, head_dim=256, intermediate_size=16384,
                               vocab_size=256000), False),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, vocab_size=256), False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEERS = ("liger", "unsloth")
# fastlora variants: (options, torch.compile mode). "-cg": CUDA graphs (inductor's cudagraph
# trees through mode="reduce-overhead"); "-nolora" / "-noce": a pattern family switched off;
# "fastlora" offloads checkpointed layer inputs to host memory under --gc on (the default);
# "-nooffload": without; "-offload": every saved activation of 16 MiB or more instead;
# "-offload-async" is "-offload" (fastlora's copies are on a side stream either way);
# "-hostemb": the frozen input embeddings read from pinned host memory (offload_embeddings,
# an option of compile_for_trainer, which compiles that variant); "-host": the lm_head too
# (offload_lm_head: in pinned host memory, copied to the GPU for the loss only);
# "-trainer": compile_for_trainer with its defaults (as a Trainer is compiled; with --gc on it
# calls the embeddings' requires_grad_() hook outside Dynamo, which plain torch.compile traces
# and retraces: compare the two warm-ups); "-trainer-cg": that with CUDA graphs.
FASTLORA = {"fastlora": ({}, None),
            "fastlora-nooffload": ({"offload_activations": False}, None),
            "fastlora-cg": ({}, "reduce-overhead"),
            "fastlora-offload": ({"offload_activations": 16}, None),
            "fastlora-offload-async": ({"offload_activations": 16}, None),
            "fastlora-nolora": ({"disable": ["lora_linear", "lora_mlp", "lora_qkv",
                                             "lora_mlp_block", "lora_linear_4bit"]}, None),
            "fastlora-noce": ({"disable": ["linear_cross_entropy"]}, None),
            "fastlora-hostemb": ({"offload_embeddings": True}, None),
            "fastlora-host": ({"offload_embeddings": True, "offload_lm_head": True}, None),
            "fastlora-trainer": ({}, None),
            "fastlora-trainer-cg": ({"mode": "reduce-overhead"}, "reduce-overhead")}
TRAINER = {"fastlora-hostemb", "fastlora-host", "fastlora-trainer",  # compile_for_trainer
           "fastlora-trainer-cg"}


def build_config(shape: str):
    import transformers
    family, kwargs, _ = SHAPES[shape]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "gemma": transformers.GemmaConfig}[family]
    cfg = cls(max_position_embeddings=32768, **kwargs)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    return cfg


progress = h.progress_printer("train_step")


def _save_random(cfg, path: pathlib.Path):
    """Peers and 4-bit loading need a checkpoint on disk: write the random model once."""
    import torch
    import transformers
    if (path / "config.json").exists():
        return
    progress(f"writing a random checkpoint to {path}")
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(path)
    _save_tokenizer(path)
    del model
    torch.cuda.empty_cache()


def _save_tokenizer(path: pathlib.Path):
    """A small word-level tokenizer, so loaders that insist on one find it (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(1000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def build_model(args, cfg):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=TARGETS, task_type="CAUSAL_LM")
    if args.variant == "unsloth":
        from unsloth import FastLanguageModel
        path = pathlib.Path(args.cache) / f"{args.shape}-random"
        _save_random(cfg, path)
        model, _ = FastLanguageModel.from_pretrained(
            str(path), max_seq_length=args.seq, dtype=torch.bfloat16,
            load_in_4bit=args.load_4bit)
        return FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
            target_modules=TARGETS, use_gradient_checkpointing="unsloth" if args.gc else False)
    if args.variant == "liger":
        from liger_kernel.transformers import _apply_liger_kernel
        _apply_liger_kernel(cfg.model_type)
    if args.load_4bit:
        from peft import prepare_model_for_kbit_training
        path = pathlib.Path(args.cache) / f"{args.shape}-random"
        _save_random(cfg, path)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=q, torch_dtype=torch.bfloat16, device_map={"": 0})
        if args.kbit_recipe in ("peft", "trl"):  # targets.md's: norms/embeddings to float32
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gc)
        elif args.gc:  # bfloat16 activations throughout (as Unsloth trains)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # bfloat16 on the GPU; float32 on the CPU (a smoke run)
        device = h.default_device()
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                cfg, torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        if args.gc:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora)
    if args.load_4bit and args.kbit_recipe == "trl":  # SFTTrainer's cast of QLoRA adapters
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model


def trainable(args, cfg):
    """(model, optimizer) of this workload: ``build_model`` in training mode and fused AdamW
    over its trainable parameters (every benchmark of this folder trains the same way)."""
    import torch
    progress("building the model")
    model = build_model(args, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    return model, opt


def add_workload_args(ap, gc_help: str | None = None) -> None:
    """The workload flags the scripts built on this one share (``gc_help=None``: no --gc)."""
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    if gc_help is not None:
        ap.add_argument("--gc", default="auto", choices=["auto", "on", "off"], help=gc_help)
    ap.add_argument("--load-4bit", action="store_true", help="bitsandbytes NF4 + double quant base")
    ap.add_argument("--kbit-recipe", default="peft", choices=["peft", "trl", "bf16"],
                    help="4-bit: peft's prepare_model_for_kbit_training (float32 norms and "
                         "activations, targets.md's eager row); trl: that and the adapters "
                         "cast to bfloat16 as TRL's SFTTrainer does; bf16: bfloat16 "
                         "activations throughout")


def worker(args) -> dict:
    import torch
    device = h.default_device()
    cuda = device == "cuda"
    cfg = build_config(args.shape)
    model, opt = trainable(args, cfg)
    step_model = model
    if args.variant == "inductor":
        step_model = torch.compile(model)
    elif args.variant in FASTLORA:
        import fastlora  # registers the backend name when run from a source tree
        options, mode = FASTLORA[args.variant]
        if args.variant.endswith("-async"):
            torch._functorch.config.activation_offload_separate_stream = True
        options = {**options, **({} if cuda else {"compiler": "aot_eager"}),
                   **(json.loads(args.fastlora_options) if args.fastlora_options else {})}
        if args.memory_budget is not None:
            options["memory_budget"] = budget_option(args.memory_budget)
        from fastlora.kernels import tuning
        for op, keys in (json.loads(args.tuning) if args.tuning else {}).items():
            tuning.set(op, **keys)  # read when the launchers are traced: before compiling
        if args.variant in TRAINER:  # moves parameters, calls hooked embeddings eagerly
            step_model = fastlora.compile_for_trainer(model, dynamic=None, **options)
        else:
            step_model = torch.compile(model, backend="fastlora", options=options or None,
                                       mode=mode)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=gen)

    cuda_graphs = args.variant in FASTLORA and FASTLORA[args.variant][1] == "reduce-overhead"

    def step():
        if cuda_graphs:  # a new iteration: earlier graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timing = h.measure(step, args.warmup, args.steps, device, progress)
    median = timing.median_s
    row = {"shape": args.shape, "variant": args.variant, "batch": args.batch, "seq": args.seq,
           "gc": args.gc, "rank": args.rank, "load_4bit": args.load_4bit,
           "kbit_recipe": args.kbit_recipe if args.load_4bit else None,
           "tok_s": args.batch * args.seq / median, "step_ms": 1000 * median,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           # with CUDA graphs (-cg) the graphs' memory pool was allocated while they were
           # recorded, in warm-up, so peak_gib misses it; what the allocator holds does not
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
           "warmup_s": timing.warmup_s, "loss": float(timing.last),
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    progress(f"profiling {args.steps} steps, then the host time")
    row["top_kernels"] = []
    row["gpu_ms"] = h.gpu_ms_per_step([step] * args.steps, device, row["top_kernels"])
    row["host_ms"] = h.host_ms_per_step(step, device, median)
    row["step_over_gpu"] = h.ratio(row["step_ms"], row["gpu_ms"])
    if args.variant in FASTLORA:
        row["memory_budget"] = budget_option(args.memory_budget) \
            if args.memory_budget is not None else None
        row["tuning"] = json.loads(args.tuning) if args.tuning else None
        row["matches"] = fastlora.reports(model).counts()
        misses = fastlora.reports(model).near_misses()
        row["near_misses"] = len(misses)
        row["near_miss_reasons"] = sorted({f"{n['pattern']}: {n['reason']}" for n in misses})
        offloaded = [o for r in fastlora.reports(model) for o in r.offloaded]
        if offloaded:
            row["offloaded"] = len(offloaded)
        budgets = [b for r in fastlora.reports(model) for b in r.memory_budget]
        if budgets:  # per partitioned graph: fraction, saved_bytes, fastest_bytes (a size)
            row["budget_graphs"] = budgets
    return row


def budget_option(text: str):
    """--memory-budget's value as the option takes it: a fraction (``0.5``) or a size
    (``14GiB``)."""
    try:
        return float(text)
    except ValueError:
        return text


def run_one(args, shape: str, variant: str) -> dict:
    gc = SHAPES[shape][2] if args.gc == "auto" else args.gc == "on"
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--variant", variant,
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--gc", "on" if gc else "off",
           "--cache", args.cache]
    if args.load_4bit:
        cmd += ["--load-4bit", "--kbit-recipe", args.kbit_recipe]
    if args.fastlora_options:
        cmd += ["--fastlora-options", args.fastlora_options]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    if args.tuning:
        cmd += ["--tuning", args.tuning]
    # the worker's stderr (its phases, warnings, TORCH_LOGS output) is kept beside the results
    return h.run_worker(cmd, {"shape": shape, "variant": variant, "gc": gc}, args.timeout,
                        pathlib.Path(args.out) / f"worker_{shape}_{variant}.log",
                        h.unsloth_env(variant))


def table(rows: list[dict]) -> str:
    def vs(r, key, pick):
        same = [x for x in rows if x["shape"] == r["shape"] and "error" not in x]
        ref = pick(same)
        return f"{r[key] / ref[key]:.2f}x" if ref else "-"  # (a string: never "n/a")

    def eager(same):
        return next((x for x in same if x["variant"] == "eager"), None)

    def best_peer(same):
        peers = [x for x in same if x["variant"] in PEERS]
        return max(peers, key=lambda x: x["tok_s"]) if peers else None
    return h.table(rows, [("shape", 12), ("variant", 10)], [
        ("tok/s", 9, "tok_s", ".0f"), ("step ms", 9, "step_ms", ".1f"),
        ("host ms", 9, "host_ms", ".1f"), ("GPU ms", 9, "gpu_ms", ".1f"),
        ("step/GPU", 9, "step_over_gpu", ".2f"), ("peak GiB", 10, "peak_gib", ".2f"),
        ("warm-up s", 11, "warmup_s", ".1f"),
        ("vs eager", 9, lambda r: vs(r, "tok_s", eager), ""),
        ("vs best peer", 13, lambda r: vs(r, "tok_s", best_peer), "")], missing="n/a")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['shape']}\n{r['variant']}" for r in ok]
    axes[0].bar(labels, [r["tok_s"] for r in ok])
    axes[0].set_ylabel("tokens / s")
    axes[1].bar(labels, [r["peak_gib"] or 0.0 for r in ok], color="tab:orange")
    axes[1].set_ylabel("peak GiB")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="llama-1b,llama-8b", help=f"from {sorted(SHAPES)}")
    ap.add_argument("--variants", default="eager,inductor,fastlora,liger,unsloth")
    add_workload_args(ap, gc_help="gradient checkpointing (auto: on for llama-8b only, as in "
                                  "targets.md)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fastlora-options", default="", help="JSON dict for options=")
    ap.add_argument("--memory-budget", default=None,
                    help="fastlora variants: options['memory_budget'] (a fraction in [0, 1] or a "
                         "size such as 24GiB)")
    ap.add_argument("--tuning", default="",
                    help='fastlora variants: launch configurations, JSON {op: {key: value}} for '
                         'fastlora.kernels.tuning.set, e.g. \'{"linear_cross_entropy": '
                         '{"chunk_rows": 256}}\'')
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (shape, variant)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench", help="random checkpoints for peers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.gc = args.gc == "on"
        h.emit(worker(args))
        return
    results = h.Results(args.out, "train_step")
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            missing = h.importable(variant)
            results.add({"shape": shape, "variant": variant, "error": missing} if missing
                        else run_one(args, shape, variant))
    rows = results.rows
    h.write_csv(results.path(".csv"), rows, [
        "shape", "variant", "batch", "seq", "gc", "rank", "load_4bit", "kbit_recipe", "tok_s",
        "step_ms", "host_ms", "gpu_ms", "step_over_gpu", "peak_gib", "warmup_s", "loss",
        "matches", "error"])
    plot(rows, results.path(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
