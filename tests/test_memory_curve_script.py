"""benchmarks/memory_curve.py builds train_step.py's worker command for each point. Each point's
worker runs only on the GPU machine, so an argument that train_step.py started to read and
memory_curve.py did not pass (``tuning``, 2026-12-06) showed there first, as a crash. Here the
command is built and checked without starting a worker."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def memory_curve(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `import _harness`; it unshadows itself
    for name in ("memory_curve", "train_step", "_harness"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("memory_curve", BENCHMARKS / "memory_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in ("memory_curve", "train_step", "_harness"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("point,gc,options", [
    ("gc-offload", "on", None), ("gc", "on", {"offload_activations": False}),
    ("gc-budget-4.2GiB", "on", {"memory_budget": "4.2GiB"}),
    ("budget-0.3", "off", {"memory_budget": 0.3}), ("no-gc", "off", {"memory_budget": 1.0})])
def test_each_point_builds_train_steps_worker_command(memory_curve, monkeypatch, tmp_path,
                                                       point, gc, options):
    commands = []

    def run_worker(cmd, row, *rest):
        commands.append(cmd)
        return dict(row)
    monkeypatch.setattr(memory_curve.ts.h, "run_worker", run_worker)
    args = memory_curve.parser().parse_args(["--shape", "tiny", "--out", str(tmp_path)])
    row = memory_curve.run_point(args, point)
    (cmd,) = commands
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--variant") == "fastlora-trainer" and flag("--shape") == "tiny"
    assert flag("--gc") == gc and row["point"] == point
    given = json.loads(flag("--fastlora-options")) if "--fastlora-options" in cmd else None
    if given is not None:
        given.pop("compiler", None)  # inductor on a CPU for a budget: not the point's setting
    assert given == options


def test_an_unknown_point_is_refused_before_any_worker(memory_curve):
    with pytest.raises(SystemExit, match="unknown point"):
        memory_curve.point_settings("gc-twice")
