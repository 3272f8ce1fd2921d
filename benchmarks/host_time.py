"""Is the LoRA training step bound by the GPU or by the host? Per launch route of the fused ops
(``FASTLORA_LAUNCH``, kernels/_launch.py), each in its own process:

    python benchmarks/host_time.py --shape llama-1b --routes python,inductor

For each route, after warm-up steps of the fastlora-compiled peft model (bf16, LoRA r=16 on
every linear, the batch below):

- ``wall_ms``: one step, timed over ``--steps`` steps with one synchronisation at the end;
- ``gpu_ms``: the GPU kernels' time per step (torch.profiler, kernels only);
- ``host_ms``: the CPU's time to issue one step (its wall time without the final
  synchronisation), the least of tries from an idle GPU and behind a sleep kernel that keeps
  the GPU busy: the dispatch and launch cost; it reads high where the launch queue fills;
  the three are measured as train_step.py's columns are (benchmarks/_harness.py);
- ``wall_over_gpu``: the issue's goal is at most 1.03.

Writes $OUT/host_time.json (a list, one object per route) and prints a table.
"""
import argparse
import json
import os
import pathlib
import sys
import time

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()


def worker(a) -> dict:
    import torch

    train_step = h.sibling("train_step")

    import fastlora  # noqa: F401
    from fastlora.kernels import _launch

    args = argparse.Namespace(shape=a.shape, variant="fastlora", rank=16, load_4bit=False,
                              gc=train_step.SHAPES[a.shape][2], cache="/tmp/fastlora-bench")
    cfg = train_step.build_config(a.shape)
    model = train_step.build_model(args, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    run = torch.compile(model, backend="fastlora", mode=a.mode)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")

    def step():
        run(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step()
    h.sync("cuda")
    first = time.perf_counter() - t
    h.measure(step, a.warmup, 0, "cuda")
    wall = h.wall_ms_per_step(step, a.steps, "cuda")
    gpu = h.gpu_ms_per_step([step] * a.steps, "cuda")
    host = h.host_ms_per_step(step, "cuda", wall / 1e3)
    out = {"route": os.environ.get("FASTLORA_LAUNCH", "inductor"), "launch": _launch.LAUNCH,
           "shape": a.shape, "batch": a.batch, "seq": a.seq, "mode": a.mode,
           "first_step_s": round(first, 2), "wall_ms": round(wall, 2),
           "gpu_ms": round(gpu, 2), "host_ms": round(host, 2),
           "wall_over_gpu": round(wall / gpu, 3) if gpu else None,
           "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--routes", default="python,inductor",
                    help="FASTLORA_LAUNCH values, one process each")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead)")
    ap.add_argument("--timeout", type=int, default=500, help="seconds per route")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        h.emit(worker(a))
        return
    rows = []
    for route in a.routes.split(";" if ";" in a.routes else ","):
        cmd = [sys.executable, __file__, "--worker", "--shape", a.shape, "--batch", str(a.batch),
               "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        if a.mode:
            cmd += ["--mode", a.mode]
        row = h.run_worker(cmd, {"route": route}, a.timeout,
                           env={**os.environ, "FASTLORA_LAUNCH": route})
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = pathlib.Path(a.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "host_time.json").write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print(h.table(rows, [("route", 28)], [
        ("wall ms", 9, "wall_ms", ""), ("GPU ms", 9, "gpu_ms", ""), ("host ms", 9, "host_ms", ""),
        ("wall/GPU", 10, "wall_over_gpu", "")]))


if __name__ == "__main__":
    main()
