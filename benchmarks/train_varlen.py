"""Variable-length LoRA training benchmark: what a real SFT run looks like (issue 16).

    python benchmarks/train_varlen.py --shape llama-1b --modes padded,padfree \
        --variants eager,inductor,fastlora,unsloth

Same model, LoRA and optimizer as train_step.py (random bf16 weights, LoRA r=16 on all seven
linears, fused AdamW). What changes is the batch: every step draws ``--batch`` examples whose
token lengths follow a real length distribution, so the sequence length changes every step.

Length distribution: the character lengths of the embedded SFT dataset's messages
(src/fastlora/app/data/default_dataset.jsonl, 480 chat examples; prompt + completion 25 to 104
characters, quartiles 49 / 59 / 73), mapped affinely onto [--min-len, --max-len] (default
256..2048): the shortest example becomes 256 tokens, the longest 2048, quartiles 806 / 1027 /
1345 tokens. A batch of 4 is padded to its longest example: over the default 30 steps that is
17 distinct widths between 914 and 1957. Examples are drawn with a fixed seed, so every variant
sees the same batches.

Modes:
- ``padded``: the batch is right-padded to its longest example (HF's DataCollatorWithPadding),
  with an ``attention_mask``; labels are -100 on pads.
  Variant ``fastlora-trainer-unpad``: ``compile_for_trainer(model, remove_padding=True)``,
  which packs these batches into one row before the compiled call (src/fastlora/unpad.py); its
  result row has ``unpad`` (calls packed, and the reasons of any that ran padded).
- ``padfree``: the examples are packed into one row with ``position_ids`` restarting at 0 for
  each example and no mask (TRL's ``padding_free=True``, DataCollatorWithFlattening); the first
  label of each example is -100.

On a machine without a GPU it runs on the CPU in float32 (a smoke run: ``--shape tiny
--min-len 8 --max-len 64 --steps 4 --steady 2``), without peak memory.

Per (mode, variant), in its own process: wall time of each step (synchronised), whether its
length was new, steady-state tok/s over the last ``--steady`` steps (real tokens and padded
tokens), total wall time of all steps including compiles, graphs compiled by Dynamo, peak memory,
and GPU time per step (torch profiler over the steady-state steps) beside the step time, so host
overhead shows. Writes JSON lines and CSV under --out and prints a table last.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import random
import sys
import time

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()
ts = h.sibling("train_step")  # build_config, build_model, progress, variants, peers

DATASET = pathlib.Path(__file__).resolve().parents[1] / "src/fastlora/app/data/default_dataset.jsonl"


def example_lengths(lo: int, hi: int) -> list[int]:
    """Token lengths of the embedded dataset's examples, mapped affinely onto [lo, hi]."""
    chars = []
    for line in DATASET.read_text().splitlines():
        row = json.loads(line)
        chars.append(sum(len(m["content"]) for part in ("prompt", "completion")
                         for m in row[part]))
    c0, c1 = min(chars), max(chars)
    return [round(lo + (c - c0) * (hi - lo) / (c1 - c0)) for c in chars]


def batches(args) -> list[list[int]]:
    """The example lengths of every step (same for every variant)."""
    pool = example_lengths(args.min_len, args.max_len)
    rng = random.Random(args.seed)
    return [[rng.choice(pool) for _ in range(args.batch)] for _ in range(args.steps)]


def make_batch(lengths: list[int], mode: str, vocab: int, gen, pad_multiple: int):
    """Model inputs for one step and (real tokens, tokens computed)."""
    import torch
    real = sum(lengths)
    if mode == "padfree":
        ids = torch.randint(0, vocab, (1, real), device=gen.device, generator=gen)
        pos = torch.cat([torch.arange(n, device=gen.device) for n in lengths])[None]
        labels = ids.clone()
        starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))],
                              device=gen.device)
        labels[0, starts] = -100
        return {"input_ids": ids, "position_ids": pos, "labels": labels}, real, real
    width = max(lengths)
    width = -(-width // pad_multiple) * pad_multiple
    ids = torch.randint(0, vocab, (len(lengths), width), device=gen.device, generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, real, ids.numel()


def worker(args) -> dict:
    import torch
    import torch._dynamo.utils
    cfg = ts.build_config(args.shape)
    args.seq, args.load_4bit, args.kbit_recipe = args.max_len, False, "bf16"
    torch.manual_seed(args.seed)  # the same random weights and adapters for every variant
    model, opt = ts.trainable(args, cfg)
    step_model = model
    if args.variant == "inductor":
        step_model = torch.compile(model, dynamic=args.dynamic)
    elif args.variant.startswith("fastlora"):
        import fastlora
        if args.variant == "fastlora-trainer":  # the TRL route: compile_for_trainer's defaults
            step_model = fastlora.compile_for_trainer(model, **json.loads(args.fastlora_options))
        elif args.variant == "fastlora-trainer-unpad":  # the same, pads removed (unpad.py)
            step_model = fastlora.compile_for_trainer(model, remove_padding=True,
                                                      **json.loads(args.fastlora_options))
        else:
            step_model = torch.compile(model, backend="fastlora", dynamic=args.dynamic,
                                       options=json.loads(args.fastlora_options))
    device = h.default_device()  # cuda; the CPU for a smoke run (--shape tiny)
    gen = torch.Generator(device=device).manual_seed(0)
    seen, rows = set(), []
    plan = batches(args)
    steady_from = len(plan) - args.steady

    def step(inputs):
        loss = step_model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t_start = time.perf_counter()
    for i, lengths in enumerate(plan):
        inputs, real, computed = make_batch(lengths, args.mode, cfg.vocab_size, gen,
                                            args.pad_multiple)
        width = inputs["input_ids"].shape[1]
        if args.variant == "fastlora-trainer-unpad":
            computed = real  # the pads are removed before the model (unpad.stats says if not)
        h.sync(device)
        t = time.perf_counter()
        loss = step(inputs)
        h.sync(device)
        dt = time.perf_counter() - t
        rows.append({"width": width, "new": width not in seen, "s": dt, "real": real,
                     "computed": computed})
        seen.add(width)
        if i < 3 or i % 10 == 0:
            ts.progress(f"step {i + 1}: width {width}, {dt * 1000:.0f} ms")
    total_s = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])  # before the profiling
    gpu_ms = None
    if args.profile:  # the steady-state batches again, untimed, under the profiler
        gen.manual_seed(0)
        again = [make_batch(b, args.mode, cfg.vocab_size, gen, args.pad_multiple)[0]
                 for b in plan][steady_from:]
        gpu_ms = h.gpu_ms_per_step([functools.partial(step, x) for x in again], device)
    if args.profile:  # where a never-seen length's extra time goes: host and GPU, top ops
        for label, lengths in (("new width", [args.max_len - 3] * args.batch),
                               ("seen width", plan[-1])):
            inputs = make_batch(lengths, args.mode, cfg.vocab_size, gen, args.pad_multiple)[0]
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            h.sync(device)
            t = time.perf_counter()
            with torch.profiler.profile(activities=acts) as prof:
                step(inputs)
                h.sync(device)
            dt = time.perf_counter() - t
            print(f"[train_varlen] {label} {inputs['input_ids'].shape}: {dt * 1000:.0f} ms "
                  f"(profiled), GPU {h.kernel_ms(prof, 1):.1f} ms", file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                            max_name_column_width=70), file=sys.stderr)
    steady = rows[steady_from:]
    steady_s = sum(r["s"] for r in steady)
    fresh = [r["s"] for r in steady if r["new"]]
    repeat = [r["s"] for r in steady if not r["new"]]
    out = {"shape": args.shape, "mode": args.mode, "variant": args.variant,
           "steps": len(rows), "steady_steps": len(steady),
           "tok_s_real": sum(r["real"] for r in steady) / steady_s,
           "tok_s_computed": sum(r["computed"] for r in steady) / steady_s,
           "step_ms": 1000 * steady_s / len(steady),
           "gpu_ms": gpu_ms,
           "fresh_ms": 1000 * sum(fresh) / len(fresh) if fresh else None,
           "repeat_ms": 1000 * sum(repeat) / len(repeat) if repeat else None,
           "fresh_tok_per_ms": (sum(r["computed"] for r in steady if r["new"]) / 1000 / sum(fresh))
           if fresh else None,
           "repeat_tok_per_ms": (sum(r["computed"] for r in steady if not r["new"]) / 1000
                                 / sum(repeat)) if repeat else None,
           "total_s": total_s, "first_step_s": rows[0]["s"],
           "graphs": graphs,
           "peak_gib": peak,
           "loss": float(loss), "per_step_ms": [round(1000 * r["s"], 1) for r in rows],
           "widths": [r["width"] for r in rows]}
    if args.variant.startswith("fastlora"):
        import fastlora
        out["matches"] = fastlora.reports(model).counts()
        if args.variant == "fastlora-trainer-unpad":  # calls packed, and why any ran padded
            from fastlora import unpad
            out["unpad"] = unpad.stats(model)
        out["near_misses"] = sorted({f"{n['pattern']}: {n['reason'][:160]}"
                                     for n in fastlora.reports(model).near_misses()})
    return out


def run_one(args, mode: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--shape", args.shape, "--mode", mode,
           "--variant", variant, "--batch", str(args.batch), "--steps", str(args.steps),
           "--steady", str(args.steady), "--min-len", str(args.min_len), "--max-len",
           str(args.max_len), "--pad-multiple", str(args.pad_multiple), "--seed",
           str(args.seed), "--rank", str(args.rank), "--cache", args.cache,
           "--gc", "on" if args.gc else "off"]
    cmd += ["--dynamic", args.dynamic_arg] if args.dynamic_arg else []
    cmd += ["--profile"] if args.profile else []
    cmd += ["--fastlora-options", args.fastlora_options]
    return h.run_worker(cmd, {"shape": args.shape, "mode": mode, "variant": variant},
                        args.timeout,
                        pathlib.Path(args.out) / f"varlen_{args.shape}_{mode}_{variant}.log",
                        h.unsloth_env(variant))


def table(rows: list[dict]) -> str:
    return h.table(rows, [("mode", 8), ("variant", 18)], [
        ("real tok/s", 11, "tok_s_real", ".0f"), ("comp tok/s", 11, "tok_s_computed", ".0f"),
        ("step ms", 9, "step_ms", ".1f"), ("GPU ms", 8, "gpu_ms", ".1f"),
        ("fresh ms", 9, "fresh_ms", ".1f"), ("seen ms", 8, "repeat_ms", ".1f"),
        ("total s", 9, "total_s", ".1f"), ("graphs", 7, "graphs", ""),
        ("GiB", 7, "peak_gib", ".2f")])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(ts.SHAPES))
    ap.add_argument("--modes", default="padded,padfree")
    ap.add_argument("--variants", default="eager,inductor,fastlora,unsloth")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--steady", type=int, default=10, help="last N steps count as steady state")
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--pad-multiple", type=int, default=1, help="pad widths to a multiple")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gc", default="off", choices=["on", "off"], help="gradient checkpointing")
    ap.add_argument("--dynamic", dest="dynamic_arg", default="",
                    help="torch.compile's dynamic= for inductor/fastlora: true, false or empty")
    ap.add_argument("--profile", action="store_true", help="GPU time of the steady steps")
    ap.add_argument("--fastlora-options", default="{}",
                    help="JSON dict of fastlora options (e.g. '{\"reuse_layers\": true}')")
    ap.add_argument("--timeout", type=int, default=500)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dynamic = {"true": True, "false": False}.get(args.dynamic_arg.lower())
    args.gc = args.gc == "on"
    if args.worker:
        h.emit(worker(args))
        return
    results = h.Results(args.out, "train_varlen", hide=("per_step_ms", "widths"))
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            missing = h.importable(variant)
            results.add({"shape": args.shape, "mode": mode, "variant": variant, "error": missing}
                        if missing else run_one(args, mode, variant))
    rows = results.rows
    h.write_csv(results.path(".csv"), rows, [
        "shape", "mode", "variant", "tok_s_real", "tok_s_computed", "step_ms", "gpu_ms",
        "fresh_ms", "repeat_ms", "total_s", "graphs", "peak_gib", "loss", "error"])
    print(table(rows))


if __name__ == "__main__":
    main()
