"""fastlora train's checkpoints: a run stopped by SIGINT or SIGTERM keeps a checkpoint of the step
it was in, and --resume continues to the same losses and adapter weights as a run that was never
stopped. Padding-free batches (the default) and padded ones train the same."""
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import fastlora.app.sft
from fastlora.app.errors import FastloraError, Interrupted
from fastlora.app.train import TrainConfig, train

SMALL = dict(steps=6, batch_size=4, max_length=128, log_every=1, report=False, compile=False)


def _config(out, **changes) -> TrainConfig:
    return TrainConfig(output_dir=str(out), **{**SMALL, **changes})


def _losses(run: dict) -> list[float]:
    return [loss for _, loss in run["loss_history"]]


def _adapter(folder) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


class _SignalAt(TrainerCallback):
    """Sends ``signum`` to this process at the end of step ``step``, as a user would."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _signal_at(monkeypatch, step, signum):
    real = fastlora.app.sft.build_trainer

    def build(model, tokenizer, rows, sft_args, callbacks, collator=None):
        return real(model, tokenizer, rows, sft_args, [_SignalAt(step, signum)] + callbacks,
                    collator)
    monkeypatch.setattr(fastlora.app.sft, "build_trainer", build)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(run, output folder) of the uninterrupted eager run the tests below compare with, trained
    once for them (they only read it)."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "whole"
    return train(_config(folder, checkpoint_every=0), stream=io.StringIO()), folder


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_a_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch,
                                                                   signum, code, uninterrupted):
    whole, whole_folder = uninterrupted

    out = tmp_path / "stopped"
    _signal_at(monkeypatch, 4, signum)
    with pytest.raises(Interrupted) as stopped:
        train(_config(out, checkpoint_every=3), stream=io.StringIO())
    monkeypatch.undo()
    partial = tmp_path / "stopped.partial"
    assert stopped.value.exit_code == code and stopped.value.checkpoint == partial / "checkpoint-4"
    assert f"--resume {partial}" in str(stopped.value)
    assert not out.exists()  # never looks finished
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-4"]  # newest only
    saved = partial / "checkpoint-4"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (saved / name).exists(), name
    assert list(saved.glob("rng_state*.pth")), "RNG states"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 4

    resumed = train(TrainConfig(output_dir=str(out)), resume="latest",
                    stream=io.StringIO())
    same = lambda config: {k: v for k, v in config.items()  # noqa: E731
                           if k not in ("output_dir", "checkpoint_every")}
    assert same(resumed["config"]) == same(whole["config"])  # the run's own settings
    assert _losses(resumed) == _losses(whole)  # every step, the first four included
    after, reference = _adapter(out), _adapter(whole_folder)
    assert after.keys() == reference.keys()
    for name in after:
        torch.testing.assert_close(after[name], reference[name], rtol=0, atol=0)
    assert not partial.exists() and not list(out.glob("checkpoint-*"))


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, monkeypatch):
    with pytest.raises(FastloraError, match="found no unfinished run"):
        train(TrainConfig(output_dir=str(tmp_path / "none")), resume="latest")
    with pytest.raises(FastloraError, match="does not exist"):
        train(TrainConfig(), resume=str(tmp_path / "nowhere"))
    _signal_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(Interrupted):
        train(_config(tmp_path / "run"), stream=io.StringIO())
    monkeypatch.undo()
    with pytest.raises(FastloraError, match=r"changes --lr \(0.5, the run has None\)"):
        train(TrainConfig(lr=0.5), resume=str(tmp_path / "run.partial"))
    # a new run into the same folder must not silently delete the resumable one
    with pytest.raises(FastloraError, match="holds an unfinished run with checkpoints"):
        train(_config(tmp_path / "run"))


def test_padding_free_and_padded_batches_train_the_same(tmp_path):
    """The default (one row of the batch's examples, position ids, no mask) against TRL's padded
    batches with an attention mask: the same examples, so the same losses within rounding."""
    free = train(_config(tmp_path / "free", steps=3), stream=io.StringIO())
    padded = train(_config(tmp_path / "padded", steps=3, padding_free=False),
                   stream=io.StringIO())
    assert free["config"]["padding_free"] and not padded["config"]["padding_free"]
    losses = _losses(free)
    assert all(2.0 < loss < 10.0 for loss in losses), losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_losses(padded)),
                               rtol=1e-4, atol=0)
    assert free["tokens"] == padded["tokens"]  # non-padding tokens: the same examples


def test_sigterm_to_a_compiled_run_then_resume(tmp_path, uninterrupted):
    """The command as a user runs it (compiled, no Triton interpreter), stopped by SIGTERM
    once a step was logged, then resumed (uncompiled, which a resumed run may change; it keeps
    every other setting): the run finishes with every step's loss, equal to an uninterrupted
    eager run's within the compiled kernels' rounding."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastlora.cli", "train", "--steps", "6", "--batch-size", "4",
           "--max-length", "128", "--log-every", "1", "--no-report", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:
        if line.startswith("step     2/6"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopping after this step" in stderr and "--resume" in stderr, stderr
    partial = tmp_path / "run.partial"
    [saved] = partial.glob("checkpoint-*")
    assert not out.exists()

    proc = subprocess.run([sys.executable, "-m", "fastlora.cli", "train", "--no-compile",
                           "--resume", str(partial)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert f"resume   from {saved}" in proc.stdout
    run = json.loads((out / "fastlora_run.json").read_text())
    eager, _ = uninterrupted  # the same settings, never stopped, eager
    assert [s for s, _ in run["loss_history"]] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(eager)),
                               rtol=1e-4, atol=0)
