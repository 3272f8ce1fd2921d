"""Where a fastlora compile spends its time: cProfile over the first training step.

    FASTLORA_LAUNCH=inductor python benchmarks/compile_profile.py --shape llama-1b --layers 4
    python benchmarks/compile_profile.py --shape tiny --layers 2          # CPU smoke run

Builds the model of train_step.py's ``--shape`` (LoRA r16 on all seven linears, bf16 on a GPU)
with ``--layers`` decoder layers, compiles it with ``fastlora.compile_for_trainer`` (dynamic
lengths, the TRL route) and runs one padded training step under cProfile, then a second step at
another length (timed, not profiled: it must not compile again). Prints, by wall time of the
first step:
- the phases Dynamo records (``torch._dynamo.utils.compile_times``; fastlora's rewrite is
  ``fastlora_rewrite``), and the first step's seconds by phase: the compile, its trace, the
  backend, fastlora's rewrite, a cache load, the guards, and what ran outside the compile;
- the profile's own time summed by where the code lives (dynamo, aot autograd, inductor,
  triton's compiler, fastlora, the mutation analysis of user Triton kernels, ...);
- the 30 functions with the most cumulative time under ``torch``/``triton``/``fastlora``;
- the "other" place by function (native code: Triton's LLVM passes, waits on compile workers),
  and the calls and cumulative time of Triton's JIT compile and of inductor's compile waits.
Writes the raw profile (``.pstats``) and a JSON summary under --out. The launch route is read
from ``FASTLORA_LAUNCH`` as in the library, so compare routes by running the script twice.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pathlib
import pstats
import sys
import time

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()
ts = h.sibling("train_step")
varlen = h.sibling("train_varlen")

# Where a function's own time is counted: the first key found in its file path wins.
PLACES = [
    ("triton mutation analysis", "_higher_order_ops/triton_kernel_wrap"),
    ("triton compiler", "triton/compiler"),
    ("triton (other)", "/triton/"),
    ("inductor codecache / async compile", "_inductor/codecache"),
    ("inductor async compile", "_inductor/async_compile"),
    ("inductor", "/_inductor/"),
    ("aot autograd / partitioner", "/_functorch/"),
    ("dynamo", "/_dynamo/"),
    ("fx", "/fx/"),
    ("sympy", "/sympy/"),
    ("fastlora", "/fastlora/"),
    ("patterns", "/patterns/"),
    ("torch (other)", "/torch/"),
    ("transformers / peft", "/transformers/"),
    ("transformers / peft", "/peft/"),
]


def place(filename: str) -> str:
    for name, key in PLACES:
        if key in filename:
            return name
    return "other"


def by_place(stats: pstats.Stats) -> dict[str, float]:
    total: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        total[place(filename)] = total.get(place(filename), 0.0) + tottime
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def unplaced(stats: pstats.Stats, top: int = 15) -> list[dict]:
    """The functions with the most self time in the "other" place: mostly built-ins (native
    code called from Python: Triton's LLVM passes, waits on compiler subprocesses or threads),
    which cProfile files under no source path."""
    rows = [{"function": f"{name} ({filename}:{line})", "self_s": tottime, "calls": calls}
            for (filename, line, name), (_, calls, tottime, _, _) in stats.stats.items()
            if place(filename) == "other"]
    return sorted(rows, key=lambda r: -r["self_s"])[:top]


# Compiles worth counting on their own: (label, file path part, function name).
COMPILES = [("Triton JIT compile (a kernel's first launch)", "triton/compiler/compiler.py",
             "compile"),
            ("Triton JIT: its compile step (triton 3.6+)", "triton/runtime/jit.py", "_do_compile"),
            ("inductor: waiting for its compile workers", "_inductor/async_compile.py", "wait")]


def compile_calls(stats: pstats.Stats) -> dict[str, dict]:
    """Calls and cumulative seconds of each entry of COMPILES."""
    found = {}
    for label, key, func in COMPILES:
        calls, cum = 0, 0.0
        for (filename, _, name), (_, ncalls, _, cumtime, _) in stats.stats.items():
            if key in filename and name == func:
                calls, cum = calls + ncalls, cum + cumtime
        found[label] = {"calls": calls, "cumulative_s": cum}
    return found


# Dynamo's compile-time phases worth a column: the whole compile of a frame, its bytecode trace,
# the backend (fastlora's rewrite inside it, then AOTAutograd and inductor), the guards.
PHASES = ["_compile.compile_inner", "bytecode_tracing", "OutputGraph.call_user_compiler",
          "fastlora_rewrite", "AOTAutogradCache.inductor_load", "build_guards"]


def phases(first_s: float) -> dict[str, float]:
    """Seconds per phase of ``torch._dynamo.utils.compilation_time_metrics`` (summed over calls),
    and what the first step spent outside Dynamo's compiles: running the step, loading and
    launching kernels the first time, lazy imports."""
    import torch._dynamo.utils
    metrics = torch._dynamo.utils.compilation_time_metrics
    found = {name: round(sum(metrics.get(name, [])), 3) for name in PHASES}
    found["outside_compile"] = round(first_s - found["_compile.compile_inner"], 3)
    return found


class _Bypasses(logging.Handler):
    """Why AOTAutograd's or inductor's cache passed a graph by: PyTorch logs the reason at INFO
    level only ("Bypassing autograd cache due to: ...", "Bypassing FX Graph Cache because ...")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "Bypassing" in message:
            self.reasons.append(message[:300])


BYPASSES = _Bypasses()
for _name in ("torch._functorch._aot_autograd.autograd_cache", "torch._inductor.codecache"):
    logging.getLogger(_name).addHandler(BYPASSES)
    logging.getLogger(_name).setLevel(logging.INFO)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(ts.SHAPES))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the shape's if 0)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", default="1500,1100", help="padded width of step 1, step 2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-mode", default="padded", choices=("padded", "padfree", "plain"),
                    help="right-padded rows with a mask, packed rows, or full rows, no mask")
    ap.add_argument("--options", default="{}", help="JSON dict for compile_for_trainer")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--no-cprofile", action="store_true",
                    help="time the compile without cProfile (its overhead is ~1.5x)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)

    import torch
    import torch._dynamo.utils
    import fastlora
    from fastlora.kernels import _access_cache

    device = h.default_device()
    cfg = ts.build_config(args.shape)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    widths = [int(w) for w in args.lengths.split(",")]
    args.variant, args.cache = "fastlora", "/tmp/fastlora-bench"  # (args.gc: build_model's)
    args.seq, args.load_4bit, args.kbit_recipe = max(widths), False, "bf16"
    model = ts.build_model(args, cfg)
    model.train()
    opts = json.loads(args.options)
    if device != "cuda":
        opts.setdefault("compiler", "aot_eager")
    step_model = fastlora.compile_for_trainer(model, **opts)
    gen = torch.Generator(device=device).manual_seed(0)

    def batch(width):
        lengths = [width] + [max(1, width - 97 * i) for i in range(1, args.batch)]
        if args.batch_mode == "plain":
            ids = torch.randint(0, cfg.vocab_size, (args.batch, width), device=device,
                                generator=gen)
            return {"input_ids": ids, "labels": ids}
        return varlen.make_batch(lengths, args.batch_mode, cfg.vocab_size, gen, 1)[0]

    def step(inputs):
        step_model(**inputs, use_cache=False).loss.backward()
        h.sync(device)

    first = batch(widths[0])
    prof = cProfile.Profile()
    t = time.perf_counter()
    if not args.no_cprofile:
        prof.enable()
    step(first)
    prof.disable()
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    step(batch(widths[1]))
    second_s = time.perf_counter() - t
    # TORCH_CACHING_PRECOMPILE=1 (Dynamo's experimental precompile): the traced code and guards
    # are written at save_cache_artifacts(); a later run with the same caches loads them and
    # skips Dynamo's trace (and fastlora's rewrite: no report then).
    precompile = bool(getattr(torch._dynamo.config, "caching_precompile", False))
    timers = torch._dynamo.utils.compilation_time_metrics
    loaded = any(k.startswith("precompile_") for k in timers)
    if precompile:
        torch.compiler.save_cache_artifacts()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launch = os.environ.get("FASTLORA_LAUNCH", "inductor").replace(",", "+").replace("=", "-")
    tag = "".join(f"_{k}-{v}" for k, v in sorted(opts.items()) if k != "compiler")
    tag += "" if os.environ.get("FASTLORA_ACCESS_CACHE") != "0" else "_access-cache-off"
    stem = out / f"compile_profile_{args.shape}_L{cfg.num_hidden_layers}_{launch}{tag}"
    if not args.no_cprofile:
        prof.dump_stats(str(stem) + ".pstats")
    stats = pstats.Stats(prof) if not args.no_cprofile else None
    places = by_place(stats) if stats else {}
    summary = {"shape": args.shape, "layers": cfg.num_hidden_layers, "launch": launch,
               "options": opts, "cprofile": not args.no_cprofile,
               "first_step_s": first_s, "second_step_s": second_s,
               "phases_s": phases(first_s),
               "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
               "matches": fastlora.reports(model).counts(), "self_time_by_place": places,
               "unplaced_top": unplaced(stats) if stats else [],
               "compiles": compile_calls(stats) if stats else {},
               "access_analysis": dict(_access_cache.stats),
               "aot_autograd_cache": {k: v for k, v in torch._dynamo.utils.counters[
                   "aot_autograd"].items() if "cache" in k},
               "fx_graph_cache": {k: v for k, v in torch._dynamo.utils.counters[
                   "inductor"].items() if k.startswith("fxgraph_cache")},
               "cache_bypasses": BYPASSES.reasons,
               "access_cache": os.environ.get("FASTLORA_ACCESS_CACHE", "1") != "0",
               "dynamo_precompile": {"on": precompile, "loaded": loaded}}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))

    print(torch._dynamo.utils.compile_times(repr="str"))
    if stats:
        stats.sort_stats("cumulative").print_stats(r"torch|triton|fastlora|patterns", 30)
    print(f"\n{args.shape}, {cfg.num_hidden_layers} layers, FASTLORA_LAUNCH={launch} {opts}: "
          f"first step {first_s:.1f} s, second step (new length) {second_s:.2f} s, "
          f"graphs {summary['graphs']}; Triton access analyses {summary['access_analysis']} "
          f"(cache {'on' if summary['access_cache'] else 'off'}); AOTAutograd's cache "
          f"{summary['aot_autograd_cache']}; inductor's FX graph cache "
          f"{summary['fx_graph_cache']}; Dynamo's precompile {summary['dynamo_precompile']}")
    print("first step by phase (s): " + ", ".join(
        f"{name} {secs:.1f}" for name, secs in summary["phases_s"].items()))
    for reason in summary["cache_bypasses"]:
        print(f"  cache bypassed: {reason}")
    print("self time by place (s):")
    for name, secs in places.items():
        if secs >= 0.05:
            print(f"  {name:36s} {secs:8.2f}")
    if stats:
        print('"other", by function (self s, calls):')
        for row in summary["unplaced_top"]:
            print(f"  {row['self_s']:8.2f} {row['calls']:8d}  {row['function'][:90]}")
        print("compiles (calls, cumulative s):")
        for label, c in summary["compiles"].items():
            print(f"  {label:48s} {c['calls']:6d} {c['cumulative_s']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
