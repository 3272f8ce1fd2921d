"""The host's cost of each fused op on the Python launch route, measured without a GPU.

    python benchmarks/launcher_host_time.py                   # tiny Llama, 4 layers, 10 steps
    python benchmarks/launcher_host_time.py --layers 8 --steps 20 --hidden 128
    python benchmarks/launcher_host_time.py --fresh-lengths 30     # then new lengths vs seen

On the Python launch route (``FASTLORA_LAUNCH=python``, set here) every call of a fused op runs
its Python launcher: checks, tile choices, grids, buffers, then the Triton launches. On the H200 that
host work, not the GPU, set the step time of the 1B row (issue 17). This script runs training
steps of a tiny peft Llama compiled by fastlora (every pattern, aot_eager) on the CPU with each
Triton kernel of fastlora replaced by a stub that only counts its launches, so what is timed is
the launchers' own work and the custom ops' dispatch (plus the few small aten ops a launcher
runs, at tiny shapes). torch.profiler gives each ``fastlora::`` op's CPU time per call, and its own time (without the
fused ops it calls: a fusion of fused ops such as ``lora_mlp_block_backward`` runs others).

Not measured here: Triton's own launch (its argument binding and the driver call, about
20-40 us a launch on a GPU host) and CUDA's aten launches; ``benchmarks/host_time.py`` measures
a whole step's host time on the GPU. Prints a table; writes ``launcher_host_time.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()  # benchmarks/kernels.py would shadow the `kernels` package transformers imports

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton launchers (stubbed below)
os.environ.setdefault("FASTLORA_LAUNCH", "python")

LAUNCHES: collections.Counter = collections.Counter()


class _StubKernel:
    """A Triton kernel that counts its launches and computes nothing."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            LAUNCHES[self.__name__] += 1
        return run


def stub_kernels() -> int:
    """Replace every Triton kernel of fastlora.kernels by a counting stub; returns how many."""
    from fastlora.kernels import triton_kernels

    stubbed = 0
    for module, name, _ in list(triton_kernels()):
        setattr(module, name, _StubKernel(name))
        stubbed += 1
    return stubbed


def own_times(events, steps: int) -> list[dict]:
    """Per ``fastlora::`` op: calls a step, CPU time a call (with what it calls), and its own
    time: without the fused ops it calls (a fusion of fused ops runs theirs), so that the own
    times add up to the fused ops' host time of a step."""
    def nested(event) -> float:
        return sum(c.cpu_time_total if c.name.startswith("fastlora::") else nested(c)
                   for c in event.cpu_children)
    acc = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for event in events:
        if event.name.startswith("fastlora::"):
            entry = acc[event.name]
            entry[0] += 1
            entry[1] += event.cpu_time_total
            entry[2] += event.cpu_time_total - nested(event)
    rows = [{"op": op, "calls_per_step": n / steps, "us_per_call": total / n,
             "own_us_per_call": own / n, "own_ms_per_step": own / 1000 / steps}
            for op, (n, total, own) in acc.items()]
    return sorted(rows, key=lambda r: -r["own_ms_per_step"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128, help="batch 2 x tokens / 2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fresh-lengths", type=int, default=0, metavar="PAIRS",
                    help="then PAIRS pairs of steps, a length never seen and the nearest seen "
                         "one: does a new length cost the host more (issue 16)?")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastlora
    torch.set_num_threads(1)
    stubbed = stub_kernels()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    ids = torch.randint(0, 256, (2, args.tokens // 2))

    def step():
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    for _ in range(3):  # compile, then warm
        step()
    counts = fastlora.last_report().counts()
    LAUNCHES.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    launches = sum(LAUNCHES.values()) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    rows = own_times(prof.events(), args.steps)
    total = sum(r["own_ms_per_step"] for r in rows)
    print(f"tiny Llama, {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens; "
          f"{stubbed} kernels stubbed; fused: {counts}")
    print(f"step {step_ms:.1f} ms (no profiler); fused ops' host time {total:.1f} ms a step "
          f"(profiled); {launches:.0f} kernel launches a step")
    print(f"{'op':<42}{'calls/step':>11}{'us/call':>9}{'own us/call':>12}{'own ms/step':>12}")
    for r in rows:
        print(f"{r['op']:<42}{r['calls_per_step']:>11.0f}{r['us_per_call']:>9.1f}"
              f"{r['own_us_per_call']:>12.1f}{r['own_ms_per_step']:>12.2f}")
    result = {"args": vars(args), "step_ms": step_ms, "fused_host_ms_per_step": total,
              "launches_per_step": launches, "counts": counts, "ops": rows}
    if args.fresh_lengths:
        result["fresh_lengths"] = fresh_against_seen(compiled, args.tokens // 2,
                                                     args.fresh_lengths)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launcher_host_time.json").write_text(json.dumps(result, indent=1))
    return 0


def fresh_against_seen(compiled, seq: int, pairs: int) -> dict:
    """Step times (ms) of lengths never seen against the nearest seen length, in pairs, after
    the dynamic recompile (Dynamo's second shape); medians, and the compiles it took."""
    import random
    import statistics

    import torch

    import fastlora

    def step_ms(n: int) -> float:
        ids = torch.randint(0, 256, (2, n))
        start = time.perf_counter()
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return 1000 * (time.perf_counter() - start)

    random.seed(0)
    lengths = random.sample(range(seq + 1, 3 * seq), pairs + 4)
    graphs = len(fastlora.reports())
    seen = lengths[:4]
    for n in seen:  # the dynamic recompile, then lengths to compare with
        step_ms(n)
    fresh, again = [], []
    for n in lengths[4:]:
        fresh.append(step_ms(n))
        again.append(step_ms(min(seen, key=lambda s: abs(s - n))))
        seen.append(n)
    row = {"pairs": pairs, "fresh_ms": statistics.median(fresh),
           "seen_ms": statistics.median(again), "graphs": len(fastlora.reports()) - graphs}
    print(f"lengths {min(lengths)}-{max(lengths)}: a new length {row['fresh_ms']:.1f} ms, the "
          f"nearest seen {row['seen_ms']:.1f} ms (medians of {pairs} pairs; "
          f"{row['graphs']} graph(s) compiled for them)")
    return row


if __name__ == "__main__":
    sys.exit(main())
