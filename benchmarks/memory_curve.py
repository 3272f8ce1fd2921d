"""Speed against memory on one row of train_step.py: gradient checkpointing, offload and
options["memory_budget"] as points of one curve.

    python benchmarks/memory_curve.py --shape llama-8b                       # on the H200
    python benchmarks/memory_curve.py --shape tiny --steps 2 --warmup 1      # a CPU smoke run

Workload: train_step.py's (LoRA r16 on q,k,v,o,gate,up,down, bf16, batch 4 x 2048, fused AdamW),
variant ``fastlora-trainer`` (``compile_for_trainer``, the product's path and train_step.py's
8B row; ``--variant fastlora`` for ``torch.compile`` on the model, which keeps the embeddings
and lm_head on the GPU: 1.96 GiB more at 8B); each point runs train_step.py's worker in its own
process (its ``run_one``), so each peak is clean. Points (``--points``, in order):

- ``gc-offload``: gradient checkpointing on, default options (checkpointed layer inputs
  offloaded to host memory);
- ``gc``: gradient checkpointing on, ``offload_activations=False``;
- ``budget-<B>``: gradient checkpointing off, ``memory_budget=B``: a fraction (``budget-0.3``)
  or a size per graph (``budget-24GiB``); the partitioner chooses what to save and recompute;
- ``no-gc``: gradient checkpointing off, ``memory_budget=1.0`` (PyTorch's default, given so
  that the report records the plan): the partitioner's fastest plan;
- ``gc-budget-<size>``: gradient checkpointing on (inputs offloaded) with ``memory_budget=size``
  (``gc-budget-30GiB``): the room the checkpointed plan leaves in the size keeps the last
  layers that fit, not recomputed (memory_budget.py).

Per point: tok/s, step ms (median of --steps), GPU ms (profiler, kernel time), peak GiB
(``max_memory_allocated`` over the timed steps) and, for a budget, what the partitioner saved
for backward per graph (``report.memory_budget``: GiB saved, the fraction used). A point that
runs out of memory or time is a row with its error. Writes memory_curve.jsonl, .csv and, with
matplotlib, memory_curve.png (tok/s against peak GiB) under --out. Without a GPU the budget
points compile with inductor (the budget is its partitioner's setting), the others with
aot_eager, as train_step.py does; GPU ms and GiB are n/a.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import types

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()
ts = h.sibling("train_step")

# The budgets without checkpointing saved activations on the 8B row but not peak memory (the
# backward recomputes everything at once; docs/options.md): the default curve's middle points
# are checkpointed layers kept by a size instead (about 0.7 GiB a layer on the 8B row)
DEFAULT_POINTS = "gc-offload,gc,gc-budget-8GiB,gc-budget-16GiB,no-gc"


def point_settings(point: str) -> tuple[bool, dict]:
    """(gradient checkpointing, fastlora options) of a point name."""
    if point == "gc-offload":
        return True, {}
    if point == "gc":
        return True, {"offload_activations": False}
    if point == "no-gc":  # PyTorch's default fraction, given so the report records the plan
        return False, {"memory_budget": 1.0}
    for prefix, gc in (("budget-", False), ("gc-budget-", True)):
        if point.startswith(prefix):
            budget = ts.budget_option(point[len(prefix):])
            import fastlora
            fastlora.Options.parse({"memory_budget": budget})  # a bad one fails here
            return gc, {"memory_budget": budget}
    raise SystemExit(f"unknown point {point!r}: gc-offload, gc, no-gc, budget-<fraction|size> "
                     "or gc-budget-<size>")


def run_point(args, point: str) -> dict:
    gc, options = point_settings(point)
    if "memory_budget" in options and h.default_device() == "cpu":
        options["compiler"] = "inductor"  # train_step's CPU default, aot_eager, has no budget
    worker_args = types.SimpleNamespace(
        gc="on" if gc else "off", batch=args.batch, seq=args.seq, rank=args.rank,
        steps=args.steps, warmup=args.warmup, cache=args.cache, load_4bit=args.load_4bit,
        kbit_recipe=args.kbit_recipe, fastlora_options=json.dumps(options) if options else "",
        memory_budget=None, tuning=None, timeout=args.timeout,
        out=str(pathlib.Path(args.out) / point))
    row = ts.run_one(worker_args, args.shape, args.variant)
    row.update(point=point, gc=gc, options=options)
    graphs = row.get("budget_graphs") or []
    if graphs:
        row["saved_gib"] = sum(g["saved_bytes"] for g in graphs) / 2**30
        row["fractions"] = [round(g["fraction"], 3) for g in graphs]
        kept = [g for g in graphs if g.get("checkpointed_layers")]
        if kept:  # gc-budget points: layers kept of the checkpointed ones
            row["kept_layers"] = "+".join(f"{g['kept_layers']}/{g['checkpointed_layers']}"
                                          for g in kept)
    return row


def table(rows: list[dict]) -> str:
    return h.table(rows, [("point", 16)], [
        ("tok/s", 9, "tok_s", ".0f"), ("step ms", 9, "step_ms", ".1f"),
        ("GPU ms", 9, "gpu_ms", ".1f"), ("peak GiB", 10, "peak_gib", ".2f"),
        ("saved GiB", 11, "saved_gib", ".3f"),
        ("fraction", 10, lambda r: ",".join(map(str, r.get("fractions", []))) or None, ""),
        ("layers kept", 12, "kept_layers", ""),
        ("warm-up s", 11, "warmup_s", ".1f")], missing="n/a")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r and r.get("peak_gib") is not None]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["peak_gib"] for r in ok], [r["tok_s"] for r in ok], "o")
    for r in ok:
        ax.annotate(r["point"], (r["peak_gib"], r["tok_s"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("peak GiB (max_memory_allocated)")
    ax.set_ylabel("tokens / s")
    first = ok[0]
    ax.set_title(f"{first['shape']}, batch {first['batch']} x {first['seq']}, "
                 f"LoRA r{first['rank']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", help=f"from {sorted(ts.SHAPES)}")
    ap.add_argument("--points", default=DEFAULT_POINTS,
                    help="comma-separated: gc-offload, gc, budget-<fraction|size>, no-gc")
    ts.add_workload_args(ap)  # --batch --seq --rank --load-4bit --kbit-recipe (each point sets gc)
    ap.add_argument("--variant", default="fastlora-trainer", choices=["fastlora-trainer", "fastlora"],
                    help="compile_for_trainer (the product's path: embeddings and lm_head as "
                         "train_step.py's row) or torch.compile on the model")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (and profiled steps)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=170, help="seconds per point")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench", help="random checkpoints (4-bit)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    points = [p for p in args.points.split(",") if p]
    for point in points:
        point_settings(point)  # every name checked before the first worker starts
    results = h.Results(args.out, "memory_curve")
    for point in points:
        results.add(run_point(args, point))
    rows = results.rows
    h.write_csv(results.path(".csv"), rows, [
        "shape", "point", "gc", "options", "batch", "seq", "rank", "load_4bit", "tok_s",
        "step_ms", "gpu_ms", "host_ms", "peak_gib", "reserved_gib", "saved_gib", "fractions",
        "warmup_s", "loss", "offloaded", "error"])
    plot(rows, results.path(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
