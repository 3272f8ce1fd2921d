"""The first training step from empty compile caches, variant against variant.

    python benchmarks/cold_first_step.py --shape llama-1b --layers 4 --repeat 2
    python benchmarks/cold_first_step.py --variant off='{"warm_kernels": false}' \
        --variant on='{"warm_kernels": true}' --repeat 3

A user's first run on a machine starts with empty Triton and inductor caches; its first step
holds every compile. Each run here is ``compile_profile.py --no-cprofile`` (``--shape``'s model
cut to ``--layers`` decoder layers, ``compile_for_trainer`` with the variant's options, one
padded step, then one at a new length) in a process of its own, with ``TRITON_CACHE_DIR`` and
``TORCHINDUCTOR_CACHE_DIR`` in a new empty folder. Variants alternate, so a busy spell of the
shared host falls on both. Prints the first and second step of each run and each variant's
range; writes the rows as JSON under --out. The default variants are ``warm_kernels`` off and
on (docs/options.md).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_VARIANTS = ['off={"warm_kernels": false}', 'on={"warm_kernels": true}']


def run_once(args, name: str, options: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="cold-") as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{tmp}/triton",
                   TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor")
        cmd = [sys.executable, str(HERE / "compile_profile.py"), "--no-cprofile",
               "--shape", args.shape, "--layers", str(args.layers), "--lengths", args.lengths,
               "--options", json.dumps(options), "--out", f"{tmp}/out"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        found = list(pathlib.Path(f"{tmp}/out").glob("*.json"))
        if proc.returncode or not found:
            tail = (proc.stdout + proc.stderr)[-2000:]
            return {"variant": name, "error": f"rc {proc.returncode}: {tail}"}
        summary = json.loads(found[0].read_text())
    return {"variant": name, "options": options, "first_step_s": summary["first_step_s"],
            "second_step_s": summary["second_step_s"], "graphs": summary["graphs"],
            "matches": summary["matches"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="1500,1100")
    ap.add_argument("--variant", action="append", metavar="NAME=JSON",
                    help="options of compile_for_trainer for one variant (repeatable)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    variants = [v.split("=", 1) for v in (args.variant or DEFAULT_VARIANTS)]
    variants = [(name, json.loads(opts)) for name, opts in variants]

    rows = []
    print(f"{args.shape}, {args.layers} layers, empty caches each run")
    print(f"{'variant':10s} {'run':>3s} {'first step s':>13s} {'second s':>9s} {'graphs':>6s}")
    for i in range(args.repeat):
        for name, options in variants:
            row = run_once(args, name, options)
            row["run"] = i + 1
            rows.append(row)
            if "error" in row:
                print(f"{name:10s} {i + 1:3d}  failed: {row['error'][-300:]}")
                continue
            print(f"{name:10s} {i + 1:3d} {row['first_step_s']:13.1f} "
                  f"{row['second_step_s']:9.2f} {row['graphs']:6d}", flush=True)
    print("\nfirst step, range over runs:")
    for name, _ in variants:
        firsts = [r["first_step_s"] for r in rows if r["variant"] == name and "error" not in r]
        if firsts:
            print(f"  {name:10s} {min(firsts):6.1f} - {max(firsts):6.1f} s ({len(firsts)} runs)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cold_first_step_{args.shape}_L{args.layers}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
