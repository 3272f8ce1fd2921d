"""The output folder of ``fastlora train``: where a run writes, what it leaves when it stops, and
how an interrupted run is found again.

A run writes into ``<out>.partial`` and renames it to ``<out>`` when training has finished, so a
folder with the final name is always complete (its ``fastlora_run.json`` is written last). Inside
``<out>.partial``: ``fastlora_config.json`` (the run's settings, written first), the trainer's
``checkpoint-<step>/`` folders, and for the embedded default model ``base_model/``.

When a run stops early, ``<out>.partial`` stays if it holds a checkpoint (``--resume`` continues
from it) and is removed otherwise, with any folder the run created above it that is left empty.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import tempfile

from .errors import FastloraError

RUN_FILE = "fastlora_run.json"  # written last: its presence marks a finished run
CONFIG_FILE = "fastlora_config.json"  # the settings, written first: what --resume continues
DEFAULT_ROOT = pathlib.Path("fastlora-output")
# Settings that say how a run computes, not what it trains: a resumed run may change them.
MAY_CHANGE_ON_RESUME = {"output_dir", "overwrite", "log_every", "report", "checkpoint_every",
                        "compile", "compiler", "disable", "dynamic"}


def output_dir(cfg) -> pathlib.Path:
    """The final output folder of a new run, checked before anything loads."""
    if cfg.output_dir:
        out = pathlib.Path(cfg.output_dir).expanduser()
    else:
        out = DEFAULT_ROOT / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise FastloraError(f"The output path {out} is a file.", "Pass a folder with --output-dir.")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        finished = (out / RUN_FILE).exists()
        raise FastloraError(
            f"The output folder {out} already exists and is not empty"
            f"{' (it holds a finished run)' if finished else ''}.",
            "Pass another --output-dir, or --overwrite to replace it when this run finishes.")
    partial = partial_dir(out)
    if partial.exists() and checkpoints(partial):
        raise FastloraError(
            f"{partial} holds an unfinished run with checkpoints (newest: step "
            f"{_step(checkpoints(partial)[-1])}).",
            f"Continue it with fastlora train --resume {partial}, or delete that folder to "
            f"start over.")
    check_writable(out)
    return out.resolve()


def check_writable(out: pathlib.Path) -> None:
    """Raise a FastloraError unless a folder can be created beside ``out`` and written into."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FastloraError(f"The output folder {out} cannot be created: {parent} is a file.",
                            "Pass another --output-dir.")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise FastloraError(f"The output folder {out} cannot be written: {parent} is not "
                            f"writable ({e.strerror or e}).",
                            "Pass an --output-dir in a folder you can write to.") from None


def partial_dir(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(out.name + ".partial")


def final_dir(partial: pathlib.Path) -> pathlib.Path:
    return partial.with_name(partial.name[:-len(".partial")])


class RunFolder:
    """``<out>.partial`` while the run goes on, with what it takes to clean up after it. Only
    the main process of a multi-process run (``main``) creates, publishes or removes it; the
    others only know where it is (the Trainer writes their RNG states into its checkpoints).
    """

    def __init__(self, out: pathlib.Path, resuming: bool = False, main: bool = True):
        self.out, self.partial, self.main = out, partial_dir(out), main
        if not main:
            self.created = []
            return
        # folders this run creates above the partial folder, removed again if left empty
        self.created = [p for p in reversed(self.partial.parents) if not p.exists()]
        if not resuming and self.partial.exists():
            shutil.rmtree(self.partial)  # left by a run killed before its first checkpoint
        self.partial.mkdir(parents=True, exist_ok=resuming)

    def save_config(self, cfg) -> None:
        if not self.main:
            return
        (self.partial / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2)
                                                + "\n")

    def latest_checkpoint(self) -> pathlib.Path | None:
        found = checkpoints(self.partial)
        return found[-1] if found else None

    def discard_checkpoints(self) -> None:
        if not self.main:
            return
        for path in checkpoints(self.partial):
            shutil.rmtree(path)

    def publish(self) -> None:
        """Rename the finished partial folder to the final name (replacing an old one)."""
        if not self.main:
            return
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + f".old-{os.getpid()}")
            self.out.rename(old)
        self.partial.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> pathlib.Path | None:
        """After a run stopped early: keep the partial folder if it holds a checkpoint (returns
        the newest), else remove it and the empty folders the run created."""
        latest = self.latest_checkpoint() if self.partial.exists() else None
        if latest is not None or not self.main:
            return latest
        shutil.rmtree(self.partial, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        return None


def checkpoints(folder: pathlib.Path) -> list[pathlib.Path]:
    """The trainer's complete ``checkpoint-<step>`` folders in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and _step(p) is not None
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=_step)


def _step(path: pathlib.Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def find_resume_point(resume: str, output_dir: str | None) -> pathlib.Path:
    """The checkpoint folder ``--resume`` names: a checkpoint, a run's folder (its newest
    checkpoint), or ``latest`` (the newest unfinished run in ``output_dir``, or under
    fastlora-output/)."""
    if resume == "latest":
        if output_dir:
            out = pathlib.Path(output_dir).expanduser()
            candidates = [out if out.name.endswith(".partial") else partial_dir(out)]
            where = str(candidates[0])
        else:
            candidates = sorted(DEFAULT_ROOT.glob("*.partial"))
            where = f"{DEFAULT_ROOT}/*.partial"
        found = [c for folder in candidates for c in checkpoints(folder)]
        if not found:
            raise FastloraError(f"--resume latest found no unfinished run with a checkpoint in "
                                f"{where}.",
                                "Pass the checkpoint folder or the run's .partial folder, or "
                                "the --output-dir of the interrupted run.")
        return max(found, key=lambda p: (p.stat().st_mtime, _step(p)))
    path = pathlib.Path(resume).expanduser()
    if not path.exists() and partial_dir(path).exists():
        path = partial_dir(path)  # the run's final name, given for its .partial folder
    if (path / "trainer_state.json").exists() and _step(path) is not None:
        return path
    if path.is_dir() and checkpoints(path):
        return checkpoints(path)[-1]
    what = "does not exist" if not path.exists() else "holds no checkpoint"
    raise FastloraError(f"--resume {resume}: {path} {what}.",
                        "Pass a checkpoint-<step> folder, the .partial folder of an interrupted "
                        "run, or latest.")


def resumed_config(checkpoint: pathlib.Path, cfg, defaults):
    """The interrupted run's settings, with the ones ``cfg`` changes from ``defaults`` that a
    resumed run may change; raises if ``cfg`` changes any other."""
    run = checkpoint.parent
    saved_file = run / CONFIG_FILE
    if not run.name.endswith(".partial") or not saved_file.exists():
        raise FastloraError(f"--resume: {checkpoint} is not inside the .partial folder of a "
                            f"fastlora train run (no {CONFIG_FILE} beside it).",
                            "Pass a checkpoint that fastlora train wrote.")
    saved = json.loads(saved_file.read_text())
    fields = {f.name for f in dataclasses.fields(cfg)}
    merged = {k: v for k, v in saved.items() if k in fields}
    merged["disable"] = tuple(merged.get("disable", ()))
    conflicts = []
    for name in sorted(fields):
        mine, default = getattr(cfg, name), getattr(defaults, name)
        if mine == default:
            continue
        if name in MAY_CHANGE_ON_RESUME:
            merged[name] = mine
        elif mine != merged.get(name):
            conflicts.append(f"--{name.replace('_', '-')} ({mine!r}, the run has "
                             f"{merged.get(name)!r})")
    if conflicts:
        raise FastloraError(f"--resume continues the run with its own settings, but this "
                            f"command changes {', '.join(conflicts)}.",
                            "Drop those flags to continue the run, or start a new run without "
                            "--resume.")
    merged["output_dir"] = str(final_dir(run))
    return type(cfg)(**merged)
