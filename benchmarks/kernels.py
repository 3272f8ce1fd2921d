"""Per-kernel forward and backward timings on the GPU: fastlora vs eager PyTorch vs inductor.

    python benchmarks/kernels.py [--ops rms_norm,rope] [--dtype bf16] [--out results/]

For every case in benchmarks/kernel_cases/*.py: median time (triton.testing.do_bench) of the
forward, and of the backward alone (autograd.grad of a kept graph), for the unfused eager
function, the same function through torch.compile (inductor), and the fastlora op; achieved
GB/s (or TFLOP/s) over the fewest bytes (FLOPs) the op must move, and that as a share of the
card's measured ceilings. Each fused and compiled version's forward output is also compared
with the eager function's on one set of inputs (column ``err``, relative): a timing of a wrong
kernel would say nothing. ``--gpu-time`` adds the kernels' own time (torch.profiler) and
``--host-time`` the CPU's dispatch-and-launch time per call: where the host time is the larger,
the op leaves the GPU idle. Prints a table last; writes JSON lines and CSV under --out.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import pathlib
import pkgutil
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
import kernel_cases  # noqa: E402

COPY_GBPS = 4220.0  # measured device copy (read + write), ../shared/targets.md
BF16_TFLOPS = 788.0


def _bench(fn):
    """Median of event-timed calls (triton.testing.do_bench). This includes each op's Python and
    launch overhead, which matters for small ops; CUDA-graph replay cannot be used here because
    capturing autograd and the inputs' random generators fails."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _gpu_ms(fn, calls: int = 10) -> float:
    """GPU kernel time per call (ms): the device time of every kernel fn launches, from
    torch.profiler, without the Python dispatch and launch gaps that _bench includes."""
    fn()
    return h.gpu_ms_per_step([fn] * calls, "cuda")


def _host_ms(fn, calls: int = 20) -> float:
    """Host time per call (ms): how long the CPU takes to dispatch fn and enqueue its kernels,
    timed without synchronizing inside the loop (the kernels of 20 calls fit the launch queue).
    An op whose host time exceeds its GPU time leaves the GPU idle between kernels unless CUDA
    graphs replay it."""
    import time
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync()
    return 1000 * host / calls


def _no_grad(timer):
    """The forward as compiled code calls it: the op alone, without recording autograd."""
    def timed(fn):
        def call():
            with torch.no_grad():
                return fn()
        return timer(call)
    return timed


def _tensors(inputs):
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def time_impl(case, fn, timer=None, fwd_timer=None):
    timer = timer or _bench
    inputs = case.make()
    fwd = (fwd_timer or timer)(lambda: fn(**inputs))
    bwd = None
    if case.backward and _tensors(inputs):
        out = _first(fn(**inputs))
        grad = torch.randn_like(out)
        leaves = _tensors(inputs)
        bwd = timer(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    return fwd, bwd


def output_error(case, fn) -> float:
    """Relative error (2-norm) of fn's first output against the eager function's."""
    inputs = case.make()
    want = _first(case.eager(**inputs)).detach().double()
    got = _first(fn(**inputs)).detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def rate(case, ms, direction):
    if ms is None:
        return None, None
    nbytes = case.bytes_fwd if direction == "fwd" else case.bytes_bwd
    flops = case.flops_fwd if direction == "fwd" else case.flops_bwd
    if flops:
        tf = flops / ms / 1e9
        return f"{tf:.0f} TFLOP/s", tf / BF16_TFLOPS
    gbps = nbytes / ms / 1e6
    return f"{gbps:.0f} GB/s", gbps / COPY_GBPS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--gpu-time", action="store_true",
                    help="also report GPU kernel time per call (torch.profiler), no dispatch")
    ap.add_argument("--host-time", action="store_true",
                    help="also report host (CPU dispatch + launch) time per call: forward under "
                         "no_grad as compiled code calls it, backward through autograd.grad")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    import fastlora  # noqa: F401  (registers torch.ops.fastlora.*)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    wanted = set(filter(None, args.ops.split(",")))
    rows = []
    for info in pkgutil.iter_modules(kernel_cases.__path__):
        if wanted and info.name not in wanted:
            continue
        module = importlib.import_module(f"kernel_cases.{info.name}")
        for case in module.cases(dtype):
            impls = {"eager": case.eager, "fastlora": case.fastlora}
            if case.inductor:
                impls["inductor"] = torch.compile(case.eager, dynamic=False)
            for name, fn in impls.items():
                try:
                    fwd, bwd = time_impl(case, fn)
                except Exception as e:  # one broken case must not hide the others
                    rows.append({"op": case.op, "shape": case.shape, "impl": name,
                                 "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                row = {"op": case.op, "shape": case.shape, "impl": name,
                       "fwd_ms": fwd, "bwd_ms": bwd,
                       "err": None if name == "eager" else output_error(case, fn)}
                if args.gpu_time:  # kernel time alone, next to the dispatch-inclusive time
                    row["fwd_gpu_ms"], row["bwd_gpu_ms"] = time_impl(case, fn, _gpu_ms)
                if args.host_time:  # the CPU's share: is the op bound by its own dispatch?
                    row["fwd_host_ms"], row["bwd_host_ms"] = time_impl(
                        case, fn, _host_ms, _no_grad(_host_ms))
                for d, ms in (("fwd", fwd), ("bwd", bwd)):
                    r, frac = rate(case, ms, d)
                    row[f"{d}_rate"], row[f"{d}_of_peak"] = r, frac
                rows.append(row)
                torch.cuda.empty_cache()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    keys = ["op", "shape", "impl", "fwd_ms", "fwd_rate", "fwd_of_peak", "bwd_ms", "bwd_rate",
            "bwd_of_peak", "fwd_gpu_ms", "bwd_gpu_ms", "fwd_host_ms", "bwd_host_ms", "err",
            "error"]
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
    print(format_table(rows))


def format_table(rows):
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    lines = [f"{'op':<22}{'shape':<22}{'impl':<10}{'fwd ms':>9}{'fwd rate':>16}{'%peak':>7}"
             f"{'bwd ms':>9}{'bwd rate':>16}{'%peak':>7}{'gpu fwd/bwd ms':>18}"
             f"{'host fwd/bwd ms':>18}{'err':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<22}{r['shape']:<22}{r['impl']:<10}  ERROR {r['error']}")
            continue
        lines.append(f"{r['op']:<22}{r['shape']:<22}{r['impl']:<10}{fmt(r['fwd_ms']):>9}"
                     f"{fmt(r['fwd_rate']):>16}{pct(r['fwd_of_peak']):>7}{fmt(r['bwd_ms']):>9}"
                     f"{fmt(r['bwd_rate']):>16}{pct(r['bwd_of_peak']):>7}"
                     f"{fmt(r.get('fwd_gpu_ms')) + ' / ' + fmt(r.get('bwd_gpu_ms')):>18}"
                     f"{fmt(r.get('fwd_host_ms')) + ' / ' + fmt(r.get('bwd_host_ms')):>18}"
                     f"{'-' if r.get('err') is None else format(r['err'], '.1e'):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
