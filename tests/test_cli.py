"""fastlora train: --help, an end-to-end run of the embedded default in a subprocess (no Triton
interpreter: the CPU reference kernels, as a user gets them), the dataset formats and each bad
input's one-paragraph error, and output folders that never look complete when they are not."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from fastlora.app import cli
from fastlora.app.dataset import load_jsonl
from fastlora.app.errors import FastloraError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _main(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_paragraph(err: str, *phrases):
    assert err.startswith("fastlora: error: "), err
    assert "Traceback" not in err
    assert err.count("\n\n") == 0 and len(err.splitlines()) <= 8, err
    flat = " ".join(err.split())
    for phrase in phrases:
        assert phrase in flat, (phrase, flat)


# ----------------------------------------------------------------------------- --help
def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--lora-r", "--lora-alpha", "--lora-targets",
                 "--lora-dropout", "--load-in-4bit", "--batch-size", "--max-length", "--steps",
                 "--lr", "--output-dir", "--seed", "--debug", '{"messages": [', "examples:"):
        assert flag in text, flag
    assert max(len(line) for line in text.splitlines()) <= 100
    assert cli.main([]) == 2  # no command: the overview
    assert "train" in capsys.readouterr().out


# ----------------------------------------------------------------------------- datasets
def test_dataset_formats(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    conv = {"prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}]}
    cases = {"messages": chat, "prompt_completion": {"prompt": "a", "completion": "b", "id": 3},
             "conversational_prompt_completion": conv, "text": {"text": "hello"}}
    for fmt, row in cases.items():
        rows, found = load_jsonl(_write(tmp_path / f"{fmt}.jsonl", [json.dumps(row), "",
                                                                     json.dumps(row)]))
        assert found == fmt and len(rows) == 2
        assert "id" not in rows[0]


@pytest.mark.parametrize("lines,line,why", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], 2, "not valid JSON"),
    (['{"prompt": "a"}'], 1, 'has "prompt" but no "completion"'),
    (['{"text": "a"}', '["text"]'], 2, "expected a JSON object"),
    (['{"question": "a", "answer": "b"}'], 1, "no training fields"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}'], 1,
     "has role 'bot'"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], 1, 'no "assistant" message'),
    (['{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}'],
     1, '"messages"[0]["content"] must be a string'),
    (['{"text": "a"}', '{"prompt": "a", "completion": "b"}'], 2, "use one format per file"),
    (['{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}'], 1,
     "both be strings or both be lists"),
])
def test_malformed_rows_name_the_line_and_why(tmp_path, lines, line, why):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(FastloraError) as e:
        load_jsonl(path)
    assert f"malformed at line {line}: " in str(e.value) and why in str(e.value), str(e.value)


def test_empty_and_missing_dataset(tmp_path):
    with pytest.raises(FastloraError, match="has no rows"):
        load_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(FastloraError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- bad input via the CLI
def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _main(["train", "--model", str(tmp_path / "no-such-model"), "--output-dir",
                          str(out)], capsys)
    assert code == 2
    _assert_one_paragraph(err, "does not exist", "--model")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_malformed_dataset_through_the_cli(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", ['{"text": "fine"}', '{"text": ""}'])
    code, _, err = _main(["train", "--dataset", str(data), "--output-dir", str(tmp_path / "o")],
                         capsys)
    assert code == 2
    _assert_one_paragraph(err, "malformed at line 2", '"text" must be a non-empty string')


@pytest.mark.parametrize("kind,phrase", [("bert", "an encoder"),
                                         ("t5", "not a causal language model")])
def test_unsupported_model_type(tmp_path, capsys, kind, phrase):
    from transformers import AutoConfig
    AutoConfig.for_model(kind).save_pretrained(tmp_path / kind)
    code, _, err = _main(["train", "--model", str(tmp_path / kind), "--output-dir",
                          str(tmp_path / "o")], capsys)
    assert code == 2
    _assert_one_paragraph(err, f"of type '{kind}'", phrase, "decoder-only language model")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_train_without_trl_says_which_extra(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real(name, *a))
    code, _, err = _main(["train", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2
    _assert_one_paragraph(err, "needs trl, which is not installed", "fastlora[train]")


def test_four_bit_without_bitsandbytes(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    code, _, err = _main(["train", "--load-in-4bit", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2
    _assert_one_paragraph(err, "--load-in-4bit needs bitsandbytes", "fastlora[qlora]")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_misspelt_lora_target_is_not_silently_dropped(tmp_path, capsys):
    code, _, err = _main(["train", "--lora-targets", "q_proj,w_pack", "--output-dir",
                          str(tmp_path / "o")], capsys)
    assert code == 2
    _assert_one_paragraph(err, "--lora-targets names w_pack, which is not in this model",
                          "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not list(tmp_path.iterdir())


class _Boom:
    """Stands in for the SFTTrainer: fails the way a real run fails, at train()."""

    def __init__(self, exc):
        self.exc = exc

    def train(self, resume_from_checkpoint=None):
        raise self.exc


def _fail_training(monkeypatch, exc):
    import fastlora.app.sft
    monkeypatch.setattr(fastlora.app.sft, "build_trainer", lambda *a, **k: _Boom(exc))


def test_gpu_out_of_memory_is_one_paragraph(tmp_path, capsys, monkeypatch):
    _fail_training(monkeypatch, torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"))
    out = tmp_path / "o"
    code, _, err = _main(["train", "--output-dir", str(out), "--batch-size", "8",
                          "--max-length", "2048"], capsys)
    assert code == 2
    _assert_one_paragraph(err, "ran out of memory", "Tried to allocate 20.00 GiB",
                          "--batch-size 4 with --grad-accum 2", "--max-length 1024",
                          "--gradient-checkpointing", "Nothing was saved")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unexpected_error_is_short_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    _fail_training(monkeypatch, RuntimeError("something deep broke"))
    code, _, err = _main(["train", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 1
    _assert_one_paragraph(err, "RuntimeError: something deep broke", "--debug")
    assert not list(tmp_path.iterdir())
    code, _, err = _main(["train", "--output-dir", str(tmp_path / "o"), "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "something deep broke" in err


def test_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "fastlora_run.json").write_text("{}")
    code, _, err = _main(["train", "--output-dir", str(out)], capsys)
    assert code == 2
    _assert_one_paragraph(err, "already exists", "holds a finished run", "--overwrite")
    assert (out / "fastlora_run.json").read_text() == "{}"


# ----------------------------------------------------------------------------- end to end
def test_train_end_to_end_in_a_subprocess_then_export(tmp_path):
    """The main job as a user runs it (no Triton interpreter): the embedded default model and
    dataset, compiled by the fastlora backend; the report printed once; the loss falls; the
    adapter saved; then exported to GGUF."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastlora.cli", "train", "--steps", "30", "--batch-size", "8",
           "--log-every", "10", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    text = proc.stdout
    assert text.count("fastlora rewrite report, graph") == 1, text
    assert "rms_norm x9" in text  # 4 layers x 2 + the final norm
    assert "attention x4" in text  # padding-free batches (the default): no mask, fused
    assert "compiled in" in text and "done     30 steps" in text
    run = json.loads((out / "fastlora_run.json").read_text())
    losses = [loss for _, loss in run["loss_history"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # it learns
    graphs = run["fastlora_graphs"]  # the dynamic recompile keeps every fusion
    assert run["report_counts"]["rms_norm"] == 9 * graphs and run["dynamo_graphs_compiled"] >= 1
    assert run["report_counts"]["attention"] == 4 * graphs and run["near_misses"] == 0, text
    # padding-free: the batch's one row takes a few lengths (multiples of 64), so the graph is
    # compiled at most twice: static, then once with dynamic shapes
    assert len(run["recompiled_at_steps"]) <= 1, run["recompiled_at_steps"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "base_model/config.json", "base_model/model.safetensors"):
        assert (out / name).exists(), name
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(out / "base_model")
    assert not (tmp_path / "run.partial").exists()

    # the command the run suggests, as printed (gguf is installed here, the model is a Llama)
    [hint] = [line for line in text.splitlines() if line.startswith("next     ")]
    command = shlex.split(hint[len("next     "):].split("    (")[0])
    assert command == ["fastlora", "export", str(out), "--gguf", str(out / "model.gguf")], hint
    proc = subprocess.run([sys.executable, "-m", "fastlora.cli", *command[1:]],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "merged" / "model.safetensors").exists() and (out / "model.gguf").exists()
    assert "gguf     " in proc.stdout


@pytest.mark.parametrize("dtype", ["bf16", "auto"])
def test_train_qlora_fuses_every_4bit_layer(tmp_path, dtype):
    """QLoRA as the main job runs it. bf16 (the GPU default): peft's k-bit recipe makes the
    activations float32 and TRL casts the adapters to bfloat16. auto (float32 on the CPU): TRL's
    bfloat16 adapters are cast back to float32, the dtype the 4-bit matmul computes in. Either
    way every adapted 4-bit layer of the embedded model (4 x 7) is fused, none is a near miss."""
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastlora.cli", "train", "--load-in-4bit", "--dtype", dtype,
           "--steps", "2", "--log-every", "1", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    run = json.loads((out / "fastlora_run.json").read_text())
    assert run["report_counts"].get("lora_linear_4bit") == 28, run["report_counts"]
    misses = proc.stdout.split("near misses (left unfused):")[1:]
    assert not any("lora_linear_4bit" in m.split("\nstep")[0] for m in misses), proc.stdout
    assert ("kept in float32" in proc.stdout) == (dtype == "auto"), proc.stdout


# ----------------------------------------------------------------------------- GPU (the H200)
def _train_subprocess(tmp_path, *flags):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastlora.cli", "train", "--steps", "60", "--log-every", "20",
           "--output-dir", str(out), "--debug", *flags]  # --debug: a failure shows its traceback
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stdout, json.loads((out / "fastlora_run.json").read_text())


@pytest.mark.gpu
def test_train_default_on_the_gpu(tmp_path):
    """The README command on a GPU: bf16, inductor around the Triton kernels; the loss falls."""
    text, run = _train_subprocess(tmp_path)
    assert "bfloat16, on cuda" in text and "rest of the graph: inductor" in text, text
    assert run["compiler"] == "inductor" and run["report_counts"]["rms_norm"] == 9
    losses = [loss for _, loss in run["loss_history"]]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0, losses
    print(text)  # the lead pastes the GPU output into the docs


@pytest.mark.gpu
def test_train_qlora_on_the_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    text, run = _train_subprocess(tmp_path, "--load-in-4bit")
    assert "4-bit NF4" in text, text
    assert run["report_counts"].get("lora_linear_4bit") == 28, run["report_counts"]
    losses = [loss for _, loss in run["loss_history"]]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
    print(text)
