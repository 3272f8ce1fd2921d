"""Input problems are one-paragraph errors that name them, found before anything heavy loads
(the command line answers without importing torch), and "please report it" is kept for real
internal errors."""
import json
import subprocess
import sys

import pytest

import fastlora
from fastlora import builtin_patterns
from fastlora.app import cli
from fastlora.app.errors import FastloraError
from fastlora.app.train import TrainConfig, next_steps, train

# argv -> phrases its error must contain; each checked in a fresh interpreter without torch
BAD_INPUTS = {
    ("train", "--steps", "abc"): ["--steps: expected a positive integer, got 'abc'"],
    ("train", "--steps", "0"): ["--steps: expected a positive integer, got '0'"],
    ("train", "--pad-to-multiple-of", "-3"): ["--pad-to-multiple-of: expected 0 or a positive "
                                              "integer, got '-3'"],
    ("train", "--lr", "nan"): ["--lr: expected a positive number, got 'nan'"],
    ("train", "--lora-dropout", "1"): ["--lora-dropout: expected a number in [0, 1)"],
    ("train", "--seed", "-1"): ["--seed: expected 0 or a positive integer"],
    ("train", "--compiler", "tvm"): ["--compiler: invalid choice: 'tvm'"],
    ("train", "--disable-pattern", "rms_nrom"): ["unknown pattern(s) ['rms_nrom']",
                                                 "did you mean 'rms_norm'?", "rope, swiglu"],
    ("train", "--resume", "latest", "--output-dir", "{tmp}/nothing"): ["found no unfinished run"],
    ("train", "--dataset", "{tmp}/binary.jsonl"): ["is a binary file", "not JSONL text"],
    ("train", "--dataset", "{tmp}/latin1.jsonl"): ["is not UTF-8 text: line 2 has the byte 0xe9"],
    ("train", "--output-dir", "{tmp}/a-file/run"): ["cannot be created", "is a file"],
}
if sys.platform == "linux":
    BAD_INPUTS[("train", "--output-dir", "/proc/fastlora-run")] = ["cannot be written",
                                                                   "/proc is not writable"]

_CHECK = """
import json, sys
from fastlora.app import cli
code = cli.main(json.loads(sys.argv[1]))
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


def test_input_errors_are_one_paragraph_and_need_no_torch(tmp_path):
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "a-file").write_text("")
    for argv, phrases in BAD_INPUTS.items():
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(argv)],
                              capture_output=True, text=True, timeout=120)
        err = proc.stderr
        assert proc.returncode == 2, (argv, err)
        assert err.startswith("fastlora: error: ") and "Traceback" not in err, (argv, err)
        assert "please report" not in err and len(err.splitlines()) <= 6, (argv, err)
        flat = " ".join(err.split())
        for phrase in phrases:
            assert phrase in flat, (argv, phrase, flat)
    assert not list(tmp_path.glob("fastlora-output*")) and not (tmp_path / "nothing").exists()


def test_help_needs_no_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys; from fastlora.app import cli\n"
                           "try: cli.main(['train', '--help'])\n"
                           "except SystemExit: pass\n"
                           "assert 'torch' not in sys.modules"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint-every" in proc.stdout, proc.stderr


def test_train_config_numbers_are_checked_too():
    for bad, phrase in [({"steps": 0}, "--steps: expected a positive integer, got 0"),
                        ({"batch_size": 2.5}, "--batch-size: expected a positive integer"),
                        ({"lr": float("inf")}, "--lr: expected a positive number, got inf"),
                        ({"dtype": "int8"}, "--dtype: expected one of auto, bf16"),
                        ({"disable": ("ropee",)}, "did you mean 'rope'?")]:
        with pytest.raises(FastloraError, match=None) as e:
            train(TrainConfig(**bad))
        assert phrase in str(e.value), (bad, str(e.value))


def test_failed_run_leaves_no_empty_output_folder(tmp_path, monkeypatch, capsys):
    """The default output folder is fastlora-output/<date-time>; a run that fails before its
    first checkpoint removes what it created, fastlora-output/ included."""
    import fastlora.app.sft

    class Boom:
        def train(self, resume_from_checkpoint=None):
            raise RuntimeError("broke")
    monkeypatch.setattr(fastlora.app.sft, "build_trainer", lambda *a, **k: Boom())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--no-compile"]) == 1
    assert "please report it" in capsys.readouterr().err  # a real internal error
    assert list(tmp_path.iterdir()) == []


def test_builtin_pattern_names_match_the_registry():
    registered = sorted(p.name for p in fastlora.registered_patterns() if p.builtin)
    assert builtin_patterns.names() == registered


def test_next_steps_hint_fits_the_environment(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    [llama] = next_steps(tmp_path, "llama")
    assert llama.startswith(f"fastlora export {tmp_path} --gguf {tmp_path / 'model.gguf'}")
    [qwen] = next_steps(tmp_path, "qwen2")
    assert "--gguf" not in qwen.split("(")[0] and "not qwen2" in qwen
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    [without] = next_steps(tmp_path, "llama")
    assert "--gguf" not in without.split("(")[0] and "fastlora[export]" in without
