"""LoRA training on several GPUs: throughput and memory per GPU under DDP or FSDP2, launched by
torchrun (one process per GPU).

    torchrun --nproc-per-node 2 benchmarks/train_multi_gpu.py --shape llama-8b --engine ddp \\
        --variant fastlora

The workload of train_step.py (a random model of --shape, bf16, LoRA r=16 on q,k,v,o,gate,up,down,
random token ids, fused AdamW on the adapters, median of --steps steps after --warmup), with
--batch rows per GPU: the global batch grows with the GPU count, as data parallelism does.

Engines:
- ``ddp``: DistributedDataParallel. ``fastlora`` compiles the model in place with
  fastlora.compile_for_trainer before wrapping it (fastlora fuses each graph whole, then splits it
  at DDP's gradient buckets); ``inductor`` is ``torch.compile(DDP(model))``; ``unsloth`` wraps
  Unsloth's model in DDP (where Unsloth supports that).
- ``fsdp2``: ``fully_shard`` on every decoder layer and on the root (base weights and adapters
  sharded). ``fastlora`` / ``inductor`` compile each decoder layer (``--compile whole``: the whole
  model, which graph-breaks at every layer; docs/multi_gpu.md).

Rank 0 prints one JSON line (GPUs, tok/s in all and per GPU, step ms, the peak GiB of every GPU,
warm-up s, fastlora's match counts) and appends it to --out/train_multi_gpu.jsonl. Without a GPU
the processes train on the CPU over gloo (float32; a smoke run: ``--shape tiny``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import _harness as h  # this folder is first on sys.path when a script of it runs

# kernels.py would shadow the `kernels` package that transformers 5.25 imports; train_step.py
# (shapes, Unsloth's random checkpoint) is loaded from its file instead.
h.unshadow()
train_step = h.sibling("train_step")

VARIANTS = ("eager", "inductor", "fastlora", "unsloth")


def setup():
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build_model(args, device):
    import torch
    import torch.distributed as dist
    import transformers
    from peft import LoraConfig, get_peft_model

    cfg = train_step.build_config(args.shape)
    if args.variant == "unsloth":
        from unsloth import FastLanguageModel

        path = pathlib.Path(args.cache) / f"{args.shape}-random"
        if dist.get_rank() == 0:
            train_step._save_random(cfg, path)
        dist.barrier()
        model, _ = FastLanguageModel.from_pretrained(
            str(path), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=False,
            device_map={"": device.index})
        return FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
            target_modules=train_step.TARGETS,
            use_gradient_checkpointing="unsloth" if args.gc else False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=train_step.TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def wrap(args, model, device):
    """The model each step calls, under ``args.engine``."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    fastlora_options = {} if device.type == "cuda" else {"compiler": "aot_eager"}
    if args.engine == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        if args.variant == "fastlora":
            import fastlora
            fastlora.compile_for_trainer(model, dynamic=None, **fastlora_options)
            return DDP(model, device_ids=ids)
        wrapped = DDP(model, device_ids=ids)
        return torch.compile(wrapped) if args.variant == "inductor" else wrapped

    from torch.distributed.fsdp import fully_shard

    if args.variant == "fastlora":
        import fastlora  # noqa: F401  (registers the backend name when run from a source tree)
    layers = model.get_base_model().model.layers
    compile_kwargs = {"backend": "fastlora", "options": fastlora_options or None} \
        if args.variant == "fastlora" else {}
    per_layer = args.variant in ("fastlora", "inductor") and args.compile == "per-layer"
    for layer in layers:
        fully_shard(layer)
        if per_layer:
            layer.compile(**compile_kwargs)
    fully_shard(model)
    if args.variant in ("fastlora", "inductor") and args.compile == "whole":
        model.compile(**compile_kwargs)
    return model


def run(args) -> dict | None:
    import torch
    import torch.distributed as dist

    device = setup()
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = train_step.build_config(args.shape)
    model = build_model(args, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step_model = wrap(args, model, device)
    # after fully_shard, the optimizer must see the sharded parameters
    params = [p for p in model.parameters() if p.requires_grad] if args.engine == "fsdp2" \
        else params
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" and args.engine == "ddp")
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each GPU its own rows
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=gen)

    def step():
        loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timing = h.measure(step, args.warmup, args.steps, device.type, before=dist.barrier)
    median, loss, warmup_s = timing.median_s, timing.last, timing.warmup_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    row = {"shape": args.shape, "engine": args.engine, "variant": args.variant, "gpus": world,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "batch_per_gpu": args.batch, "seq": args.seq, "gc": args.gc, "rank": args.rank,
           "compile": args.compile if args.engine == "fsdp2" else None,
           "tok_s": world * args.batch * args.seq / median,
           "tok_s_per_gpu": args.batch * args.seq / median, "step_ms": 1000 * median,
           "peak_gib_per_gpu": peaks, "warmup_s": warmup_s, "loss": float(loss)}
    if args.variant == "fastlora":
        import fastlora
        reports = fastlora.reports(model)
        row["matches"] = reports.counts()
        row["near_misses"] = len(reports.near_misses())
        row["notes"] = sorted({note for r in reports for note in r.notes})
    dist.destroy_process_group()
    return row if rank == 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", help=f"from {sorted(train_step.SHAPES)}")
    ap.add_argument("--engine", default="ddp", choices=["ddp", "fsdp2"])
    ap.add_argument("--variant", default="fastlora", choices=VARIANTS)
    ap.add_argument("--compile", default="per-layer", choices=["per-layer", "whole"],
                    help="fsdp2: compile each decoder layer, or the whole model")
    ap.add_argument("--batch", type=int, default=4, help="rows per GPU")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--gc", default="auto", choices=["auto", "on", "off"],
                    help="gradient checkpointing (auto: as train_step.py, on for llama-8b)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench", help="random checkpoints for peers")
    args = ap.parse_args(argv)
    args.gc = train_step.SHAPES[args.shape][2] if args.gc == "auto" else args.gc == "on"
    row = run(args)
    if row is not None:
        print(json.dumps(row), flush=True)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_multi_gpu.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
