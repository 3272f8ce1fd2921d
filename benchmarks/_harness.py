"""What the benchmark scripts share: a worker per variant in its own process, the timing loop,
the GPU and host time of a step, and the JSON lines / CSV / table they write.

Definitions every script uses:

- step time: wall time of one step with the device synchronised before and after it;
- GPU ms per step: torch.profiler over replayed steady-state steps, CUDA activity only, the
  self device time of the kernel events summed and divided by the step count (an op's device
  time repeats its kernels', so only the kernels are counted). None without a GPU.
- host ms per step: the wall time of one step's issue, without the final synchronisation: the
  Python, dispatch and launch cost. The least of 3 tries started on an idle GPU and 3 started
  behind a sleep kernel that keeps the GPU behind. Both can only read high, never low: a step
  that waits on the GPU inside (a ``.item()``) waits in both; a full launch queue stalls the
  issue behind the sleep whenever the step launches more kernels than the queue holds, and from
  an idle GPU only where the GPU falls that far behind (a GPU-bound step), so there it reads at
  most the step time. On the CPU the host does the work: it is the step time there.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


HERE = pathlib.Path(__file__).resolve().parent


def unshadow() -> None:
    """Take this folder off sys.path, where Python put it for the script that runs: its
    kernels.py would shadow the ``kernels`` package transformers imports. Call it right after
    ``import _harness``; sibling() loads the other scripts."""
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]


def sibling(name: str):
    """Another benchmark script of this folder as a module (train_step: shapes, build_model)."""
    import importlib.util
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def progress_printer(tag: str) -> Callable[[str], None]:
    """A worker's phases on stderr, ``[tag] phase at N s``, so a timed-out run says where it
    stood (run_worker reads the last one back)."""
    t0 = time.perf_counter()

    def progress(phase: str) -> None:
        print(f"[{tag}] {phase} at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    return progress


# ------------------------------------------------------------------------ worker processes


def unsloth_env(variant: str) -> dict:
    """The environment of a variant's process: Unsloth's own site folder (run_gpu.sh installs
    it there, as Unsloth patches libraries on import) on the unsloth variant's path only."""
    env = dict(os.environ)
    if variant == "unsloth" and os.environ.get("FASTLORA_UNSLOTH_SITE"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["FASTLORA_UNSLOTH_SITE"],
                                                          env.get("PYTHONPATH")]))
    return env


def run_worker(cmd: list[str], base: dict, timeout: float, log: pathlib.Path | None = None,
               env: dict | None = None) -> dict:
    """Run one worker process; its result is the last stdout line that starts with ``{``.
    Its stderr (phases, warnings, TORCH_LOGS output) is kept in ``log``. A failure or a
    timeout is ``base`` with an ``error``: the last lines of the output, or the last phase."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:  # run() collected the output the worker had written
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        if log is not None:
            log.write_text(err)
        phases = re.findall(r"^\[\w+\] (.* at \d+ s)$", err, re.MULTILINE)  # progress_printer's
        where = f" (last: {phases[-1]})" if phases else ""
        return {**base, "error": f"timed out after {timeout} s{where}"}
    if log is not None:
        log.write_text(proc.stderr or "")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**base, "error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


def importable(variant: str) -> str | None:
    """Why a peer variant cannot run here, or None."""
    module = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(variant)
    if module is None:
        return None
    import importlib.util
    site = os.environ.get("FASTLORA_UNSLOTH_SITE") if variant == "unsloth" else None
    if site and (pathlib.Path(site) / module).is_dir():
        return None
    return None if importlib.util.find_spec(module) else f"{module} is not importable here"


# ------------------------------------------------------------------------------ timing


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    warmup_s: float  # the warm-up steps (compiles included), synchronised at the end
    first: object  # what the first warm-up step returned
    last: object  # what the last step returned
    times: list = field(default_factory=list)  # seconds of each timed step
    base_bytes: int = 0  # CUDA memory allocated when the timed steps began

    @property
    def median_s(self) -> float:
        return sorted(self.times)[len(self.times) // 2]


def measure(step: Callable, warmup: int, steps: int, device, progress=None,
            before: Callable | None = None) -> Timing:
    """``warmup`` steps, then ``steps`` steps each synchronised before and after (``before``
    runs ahead of each, e.g. a barrier). The CUDA peak-memory counter restarts between them,
    so max_memory_allocated() afterwards covers the timed steps only."""
    import torch
    cuda = str(device).startswith("cuda")
    first = last = None
    t0 = time.perf_counter()
    for i in range(warmup):
        if progress:
            progress(f"warm-up step {i + 1} of {warmup}" + (" (compiles)" if i == 0 else ""))
        last = step()
        first = last if i == 0 else first
    sync(device)
    timing = Timing(time.perf_counter() - t0, first, last)
    if cuda:
        timing.base_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if progress:
        progress(f"timing {steps} steps")
    for _ in range(steps):
        if before:
            before()
        sync(device)
        t = time.perf_counter()
        timing.last = step()
        sync(device)
        timing.times.append(time.perf_counter() - t)
    return timing


def kernel_ms(prof, steps: int) -> float:
    """GPU kernel time per step in a finished torch.profiler run (kernel events only)."""
    import torch
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / 1e3 / steps


def top_kernels(prof, steps: int, top: int = 60) -> list[dict]:
    """The ``top`` kernels of a finished torch.profiler run by GPU time: name (cut to 90
    characters), ms and calls per step, so two variants' steps compare kernel by kernel."""
    import torch
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:90], "ms": round(e.self_device_time_total / 1e3 / steps, 3),
             "calls": e.count / steps} for e in kernels[:top]]


def gpu_ms_per_step(steps: list[Callable], device, table: list | None = None) -> float | None:
    """Run ``steps`` (callables, one step each) under the profiler: kernel ms per step. With a
    list for ``table``, the top kernels (:func:`top_kernels`) are appended to it."""
    if not str(device).startswith("cuda") or not steps:
        return None
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in steps:
            step()
        sync(device)
    if table is not None:
        table.extend(top_kernels(prof, len(steps)))
    return kernel_ms(prof, len(steps))


def host_ms_per_step(step: Callable, device, busy_s: float, repeats: int = 3) -> float:
    """Least ms of one step's issue, from an idle GPU and behind a sleep (module docstring)."""
    import torch
    cuda = str(device).startswith("cuda")
    cycles = int(2e9 * max(busy_s, 0.01) * 3)  # about 3 steps of GPU time at ~2 GHz
    host = []
    for behind in (False, True) if cuda else (False,):
        for _ in range(repeats):
            sync(device)
            if behind:
                torch.cuda._sleep(cycles)
            t = time.perf_counter()
            step()
            host.append(time.perf_counter() - t)
            sync(device)
    return 1e3 * min(host)


def wall_ms_per_step(step: Callable, steps: int, device) -> float:
    """ms per step over ``steps`` steps issued back to back, one synchronisation at the end."""
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return 1e3 * (time.perf_counter() - t) / steps


# ------------------------------------------------------------------------------ results


def emit(row: dict) -> None:
    """A worker's result: one JSON line on stdout (run_worker reads the last)."""
    print(json.dumps(row), flush=True)


def append_jsonl(path: pathlib.Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class Results:
    """The rows of one benchmark run in ``out`` (created): each kept, printed as one JSON line
    (less the ``hide`` keys; ``echo=False``: not printed) and appended to ``<name>.jsonl`` as it
    comes, so a run cut short keeps what it measured."""

    def __init__(self, out, name: str, hide: tuple = (), echo: bool = True):
        self.dir = pathlib.Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.hide, self.echo = name, hide, echo
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.echo:
            print(json.dumps({k: v for k, v in row.items() if k not in self.hide}), flush=True)
        append_jsonl(self.dir / f"{self.name}.jsonl", row)
        return row

    def path(self, suffix: str) -> pathlib.Path:
        """``<out>/<name><suffix>`` (".csv", ".png", "_fastlora.log")."""
        return self.dir / f"{self.name}{suffix}"


def write_csv(path: pathlib.Path, rows: list[dict], keys: list[str]) -> None:
    """One line per row, each cell JSON (commas inside a cell become semicolons)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(json.dumps(r.get(k, "")).replace(",", ";") for k in keys) + "\n")


def table(rows: list[dict], labels: list[tuple], columns: list[tuple], missing: str = "-") -> str:
    """A text table. ``labels``: (key, width) of the left-aligned name columns; ``columns``:
    (header, width, value, format), value a key of the row or a function of it; a missing
    value prints ``missing``. A row with an ``error`` prints it after its labels."""
    head = "".join(f"{key:<{w}}" for key, w in labels)
    head += "".join(f"{h:>{w}}" for h, w, _, _ in columns)
    out = [head]
    for r in rows:
        line = "".join(f"{str(r.get(key, '')):<{w}}" for key, w in labels)
        if "error" in r:
            out.append(f"{line}  n/a: {str(r['error']).strip()}")
            continue
        for _, w, value, fmt in columns:
            v = value(r) if callable(value) else r.get(value)
            line += f"{missing if v is None else format(v, fmt):>{w}}"
        out.append(line)
    return "\n".join(out)


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None
