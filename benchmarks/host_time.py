"""Is the LoRA training step bound by the GPU or by the host? Per launch route of the fused ops
(``FASTLORA_LAUNCH``, kernels/_launch.py), each in its own process:

    python benchmarks/host_time.py --shape llama-1b --routes python,inductor

For each route, after warm-up steps of the fastlora-compiled peft model (bf16, LoRA r=16 on
every linear, the batch below):

- ``wall_ms``: one step, timed over ``--steps`` steps with one synchronisation at the end;
- ``gpu_ms``: the GPU kernels' time per step (torch.profiler, kernels only);
- ``host_ms``: the CPU's time to issue one step while the GPU is kept busy by a sleep kernel
  queued in front of it (the CPU never waits for the GPU, so this is the dispatch and launch
  cost alone; a step of more kernels than the launch queue holds would wait and read high);
- ``wall_over_gpu``: the issue's goal is at most 1.03.

Writes $OUT/host_time.json (a list, one object per route) and prints a table.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def worker(a) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import train_step  # noqa: E402

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
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()

    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / a.steps

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / a.steps

    host = []
    cycles = int(2e9 * max(wall, 0.01) * 3)  # about 3 steps of GPU time at ~2 GHz
    for _ in range(3):
        torch.cuda._sleep(cycles)
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    out = {"route": os.environ.get("FASTLORA_LAUNCH", "inductor"), "launch": _launch.LAUNCH,
           "shape": a.shape, "batch": a.batch, "seq": a.seq, "mode": a.mode,
           "first_step_s": round(first, 2), "wall_ms": round(1e3 * wall, 2),
           "gpu_ms": round(gpu, 2), "host_ms": round(1e3 * statistics.median(host), 2),
           "wall_over_gpu": round(1e3 * wall / gpu, 3) if gpu else None,
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
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    rows = []
    for route in a.routes.split(";" if ";" in a.routes else ","):
        cmd = [sys.executable, __file__, "--worker", "--shape", a.shape, "--batch", str(a.batch),
               "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        if a.mode:
            cmd += ["--mode", a.mode]
        env = {**os.environ, "FASTLORA_LAUNCH": route}
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {
                "route": route, "error": (p.stderr or p.stdout)[-3000:]}
        except subprocess.TimeoutExpired:
            row = {"route": route, "error": f"timed out after {a.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = pathlib.Path(a.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "host_time.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{'route':<28}{'wall ms':>9}{'GPU ms':>9}{'host ms':>9}{'wall/GPU':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['route']:<28} error: {r['error'].splitlines()[-1] if r['error'] else ''}")
        else:
            print(f"{r['route']:<28}{r['wall_ms']:>9}{r['gpu_ms']:>9}{r['host_ms']:>9}"
                  f"{r['wall_over_gpu']:>10}")


if __name__ == "__main__":
    main()
