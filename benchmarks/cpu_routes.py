"""Which compile route is fastest end to end on a CPU: time of whole processes, compilation
included, each variant in its own fresh process with an empty inductor cache (a user's first
run), repeated, the best of the repeats reported. Each process runs on one thread
(``OMP_NUM_THREADS=1``, inductor compiling in-process), so its CPU time is what its wall time is
on an idle core: on a shared machine compare the CPU seconds, which other users' load does not
inflate the way it inflates wall time.

    python benchmarks/cpu_routes.py                 # both workloads, 3 repeats
    python benchmarks/cpu_routes.py --workload train --repeats 2

Workloads:
- ``readme``: the README's first example (2-layer tiny Llama, LoRA on q/k/v/o, batch 2 x 16)
  compiled with ``options={"compiler": ...}`` and trained 20 AdamW steps;
- ``train``: ``fastlora train`` with its defaults (embedded model and dataset, 200 steps) and
  ``--compiler ...`` / ``--no-compile``.

Prints a table (seconds: best, then every repeat) and writes it as JSON lines under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROUTES = ["aot_eager", "inductor", "eager", "none"]  # none: not compiled

README_STEP = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = get_peft_model(LlamaForCausalLM(config),
                       LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
route = sys.argv[1]
run = model if route == "none" else torch.compile(model, backend="fastlora",
                                                  options={"compiler": route})
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, 128, (2, 16))
for _ in range(20):
    run(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad()
"""


def _command(workload: str, route: str, scratch: pathlib.Path) -> list[str]:
    if workload == "readme":
        return [sys.executable, "-c", README_STEP, route]
    flags = ["--no-compile"] if route == "none" else ["--compiler", route]
    return [sys.executable, "-m", "fastlora.cli", "train", *flags, "--no-report",
            "--output-dir", str(scratch / "run")]


def measure(workload: str, route: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor-cache")  # cold, as a first run
        env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(_command(workload, route, scratch), env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{workload}/{route} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["readme", "train", "both"], default="both")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    workloads = ["readme", "train"] if args.workload == "both" else [args.workload]
    routes = args.routes.split(",")
    times = {(w, r): [] for w in workloads for r in routes}
    for _ in range(args.repeats):  # interleaved, so a busy minute hurts every route alike
        for key in times:
            times[key].append(measure(*key))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu_routes.jsonl", "a") as f:
        for (w, r), t in times.items():
            f.write(json.dumps({"workload": w, "route": r, "wall_cpu_seconds": t,
                                "cores": os.cpu_count()}) + "\n")
    print(f"{'workload':<9} {'route':<10} {'CPU s':>6} {'wall s':>7}  every repeat (wall / CPU)")
    for (w, r), t in times.items():
        print(f"{w:<9} {r:<10} {min(c for _, c in t):6.1f} {min(x for x, _ in t):7.1f}  "
              + ", ".join(f"{x:.1f} / {c:.1f}" for x, c in t))


if __name__ == "__main__":
    main()
