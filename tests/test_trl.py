"""The TRL route: real SFTTrainer steps on the CPU with the model compiled in place by
fastlora.compile_for_trainer; same losses and adapter weights as an uncompiled run; gradient
accumulation (num_items_in_batch) equal to one big batch; few compilations over varying lengths.

These tests exercise the integration (trainer, graph capture, rewrites, recompilation), so the
fused ops run their CPU reference kernels, as they do for a user without a GPU; the Triton
kernels themselves are checked under the interpreter by each kernel's own tests."""
import copy

import pytest
import torch

import fastlora
from fastlora.app import embedded
from helpers import ALL_LINEAR, rel_err, tiny_llama, with_lora

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

OPTIONS = {"compiler": "aot_eager", "strict": True}
LAYERS = 2


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _model():
    return with_lora(tiny_llama(layers=LAYERS, hidden=32, heads=4, kv_heads=2, inter=48,
                                vocab=len(embedded.load_tokenizer())), r=4)


def _rows(n):
    return embedded.dataset_rows()[:n]


def _run(model, tmp_path, rows, steps, batch=4, accum=1, pad=64, seed=0, padding_free=False):
    """Train ``steps`` optimizer steps; returns (per-step losses, final LoRA weights)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accum, learning_rate=1e-2,
                     lr_scheduler_type="constant", logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
                     seed=seed, pad_to_multiple_of=pad or None,
                     max_length=None if padding_free else 128,
                     disable_tqdm=True, dataloader_drop_last=True, padding_free=padding_free)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=embedded.load_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights


def test_trainer_backend_name_is_still_rejected_by_accelerate(tmp_path):
    """Why compile_for_trainer exists: if this ever passes, docs/trl.md needs updating."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    args = SFTConfig(output_dir=str(tmp_path), torch_compile=True,
                     torch_compile_backend="fastlora", use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        SFTTrainer(model=_model(), args=args, train_dataset=Dataset.from_list(_rows(4)),
                   processing_class=embedded.load_tokenizer())


def test_compile_for_trainer_checks_options_and_compiles_in_place():
    model = _model()
    with pytest.raises(ValueError, match="unknown fastlora option"):
        fastlora.compile_for_trainer(model, nope=1)
    same = fastlora.compile_for_trainer(model, **OPTIONS)
    from peft import PeftModel
    assert same is model and isinstance(model, PeftModel)  # in place: still a PeftModel
    with pytest.raises(RuntimeError, match="already compiled"):
        fastlora.compile_for_trainer(model)


def test_sft_trainer_compiled_matches_eager(tmp_path):
    eager = _model()
    compiled = copy.deepcopy(eager)
    rows = _rows(24)
    losses_e, weights_e = _run(eager, tmp_path / "e", rows, steps=3)
    fastlora.clear_reports()
    fastlora.compile_for_trainer(compiled, **OPTIONS)
    losses_c, weights_c = _run(compiled, tmp_path / "c", rows, steps=3)
    assert len(losses_c) == 3 and losses_c[-1] != losses_c[0]
    assert max(rel_err(torch.tensor(c), torch.tensor(e))
               for c, e in zip(losses_c, losses_e)) < 1e-5, (losses_c, losses_e)
    errors = {n: rel_err(weights_c[n], w) for n, w in weights_e.items()}
    assert max(errors.values()) < 1e-5, errors
    counts = fastlora.reports(compiled).counts()
    assert len(fastlora.reports(compiled)) == 1  # one shape: one compilation of the model
    assert counts["rms_norm"] == 2 * LAYERS + 1
    # every adapter fused, alone (lora_linear) or grouped (gate+up: lora_mlp; q+k+v: lora_qkv)
    adapters = counts.get("lora_linear", 0) + 2 * counts.get("lora_mlp", 0) \
        + 3 * counts.get("lora_qkv", 0)
    assert adapters == len(ALL_LINEAR) * LAYERS, counts


def test_padding_free_batches_fused_and_exact(tmp_path):
    """TRL's padding_free=True: each batch is one packed row with position_ids restarting per
    example and no attention mask. The compiled model proves the documents (attention runs
    per example, fused) over rows of changing lengths in one compile, with eager's losses and
    weights."""
    eager = _model()
    compiled = copy.deepcopy(eager)
    rows = _rows(24)
    losses_e, weights_e = _run(eager, tmp_path / "e", rows, steps=4, pad=None, padding_free=True)
    fastlora.clear_reports()
    fastlora.compile_for_trainer(compiled, **OPTIONS)
    losses_c, weights_c = _run(compiled, tmp_path / "c", rows, steps=4, pad=None,
                               padding_free=True)
    assert len(losses_c) == 4 and losses_c[-1] != losses_c[0]
    assert max(rel_err(torch.tensor(c), torch.tensor(e))
               for c, e in zip(losses_c, losses_e)) < 1e-5, (losses_c, losses_e)
    errors = {n: rel_err(weights_c[n], w) for n, w in weights_e.items()}
    assert max(errors.values()) < 1e-5, errors
    reports = fastlora.reports(compiled)
    assert len(reports) == 1, [r.counts() for r in reports]
    attention = [m["params"] for m in reports[0].matches if m["pattern"] == "attention"]
    assert len(attention) == LAYERS and all(p["kernel"] == "triton" for p in attention), attention
    assert "packed documents" in attention[0]["why"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """TRL divides the summed token loss by num_items_in_batch (tokens of all micro-batches), so
    2 x 2 accumulated examples give the loss and update of one batch of 4."""
    big = _model()
    small = copy.deepcopy(big)
    rows = _rows(16)
    fastlora.compile_for_trainer(big, **OPTIONS)
    losses_big, weights_big = _run(big, tmp_path / "big", rows, steps=2, batch=4)
    fastlora.compile_for_trainer(small, **OPTIONS)
    losses_acc, weights_acc = _run(small, tmp_path / "acc", rows, steps=2, batch=2, accum=2)
    assert len(losses_acc) == len(losses_big) == 2
    for a, b in zip(losses_acc, losses_big):
        assert a == pytest.approx(b, rel=1e-5)
    errors = {n: rel_err(weights_acc[n], w) for n, w in weights_big.items()}
    assert max(errors.values()) < 1e-5, errors


def test_varying_lengths_compile_once(tmp_path):
    """Batches of different lengths: compile_for_trainer's dynamic shapes compile the model once,
    at the first step, for every length, with every fusion a static compile has."""
    rows = _rows(60)  # padded to multiples of 8 below: several distinct lengths
    # reports(model) matches parameters by id(); a freed model of an earlier test can leave a
    # report whose ids are reused by this model's parameters, so start from none.
    fastlora.clear_reports()
    static = _model()
    fastlora.compile_for_trainer(static, dynamic=False, **OPTIONS)
    _run(static, tmp_path / "static", rows[:2], steps=1, batch=2, pad=8)
    static_counts = fastlora.reports(static)[0].counts()
    torch._dynamo.reset()
    fastlora.clear_reports()
    model = _model()
    fastlora.compile_for_trainer(model, **OPTIONS)
    tokenizer = embedded.load_tokenizer()
    lengths = {len(tokenizer.apply_chat_template(r["prompt"] + r["completion"])["input_ids"])
               for r in rows}
    assert len({(n + 7) // 8 for n in lengths}) >= 3, lengths
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    losses, _ = _run(model, tmp_path / "dynamic", rows, steps=12, batch=2, pad=8)
    assert len(losses) == 12
    graphs = fastlora.reports(model)
    assert len(graphs) == 1, [(r.index, r.counts(), r.fallback) for r in graphs]
    assert graphs[0].counts() == static_counts and static_counts
    dynamo_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert dynamo_graphs <= 3, dynamo_graphs  # the model graph + TRL's loss-head pieces


# ----------------------------------------------------------------------------- GPU (the H200)
def _run_cuda(model, tmp_path, rows, steps, bf16_autocast=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                     report_to=[], save_strategy="no", bf16=bf16_autocast,
                     gradient_checkpointing=False, seed=0, pad_to_multiple_of=64, max_length=128,
                     disable_tqdm=True, dataloader_drop_last=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=embedded.load_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().float().cpu() for n, p in model.named_parameters()
               if p.requires_grad}
    return losses, weights


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_sft_trainer_on_cuda_fp32_matches_eager(tmp_path, compiler):
    """Real Triton kernels on the GPU, through SFTTrainer: same losses and adapter weights."""
    eager = _model().cuda()
    compiled = copy.deepcopy(eager)
    rows = _rows(24)
    losses_e, weights_e = _run_cuda(eager, tmp_path / "e", rows, steps=3)
    fastlora.compile_for_trainer(compiled, compiler=compiler, strict=True)
    losses_c, weights_c = _run_cuda(compiled, tmp_path / "c", rows, steps=3)
    assert max(abs(c - e) / abs(e) for c, e in zip(losses_c, losses_e)) < 1e-4
    errors = {n: rel_err(weights_c[n], w) for n, w in weights_e.items()}
    assert max(errors.values()) < 1e-3, errors
    assert fastlora.reports(compiled).counts()["rms_norm"] == 2 * LAYERS + 1


@pytest.mark.gpu
def test_sft_trainer_on_cuda_bf16_close_to_eager_bf16(tmp_path):
    """bf16 weights (adapters float32, peft's default): compiled within bf16 noise of eager."""
    base = _model()
    eager = copy.deepcopy(base).to("cuda", torch.bfloat16)
    compiled = copy.deepcopy(base).to("cuda", torch.bfloat16)
    reference = copy.deepcopy(base).cuda()  # float32: the yardstick for both
    rows = _rows(24)
    losses_ref, _ = _run_cuda(reference, tmp_path / "r", rows, steps=3)
    losses_e, _ = _run_cuda(eager, tmp_path / "e", rows, steps=3)
    fastlora.compile_for_trainer(compiled, strict=True)
    losses_c, _ = _run_cuda(compiled, tmp_path / "c", rows, steps=3)
    err_e = max(abs(e - r) / r for e, r in zip(losses_e, losses_ref))
    err_c = max(abs(c - r) / r for c, r in zip(losses_c, losses_ref))
    assert err_c <= 1.5 * err_e + 1e-2, (losses_ref, losses_e, losses_c)


def test_reports_of_a_model_never_include_a_freed_models_graphs():
    """compile_for_trainer users (and fastlora train) read fastlora.reports(model); parameter ids
    of a freed model are reused by new ones, which must not inherit its reports."""
    import gc
    stale = 0
    for _ in range(8):
        model = with_lora(tiny_llama(layers=1))
        fastlora.compile_for_trainer(model, compiler="eager")
        model(input_ids=torch.randint(0, 97, (1, 5)))
        assert len(fastlora.reports(model)) == 1
        del model
        gc.collect()
        torch._dynamo.reset()
        stale += len(fastlora.reports(with_lora(tiny_llama(layers=1))))
    assert stale == 0
