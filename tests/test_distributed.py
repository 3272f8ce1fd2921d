"""DDP and FSDP2 with the fastlora backend, on two gloo processes on the CPU: every fusion of a
single-process compile kept, and the LoRA gradients of one step on half the batch per rank
(averaged by DDP's all-reduce or FSDP2's reduce-scatter) equal to one process's on the whole
batch. The children run tests/distributed_workers.py; the reference runs here.

What the single process fuses on this model (2 layers, the loss in the graph): per layer the
norm + q/k/v adapters, RoPE, attention, o_proj, the norm + gate/up adapters + SwiGLU, down_proj;
then the final norm and lm_head + cross-entropy."""
import copy

import pytest
import torch

import fastlora
import distributed_workers as W
from helpers import lora_grads, rel_err

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo process groups")
TOL = 1e-5


@pytest.fixture(scope="module")
def single():
    """One process, the whole batch, compiled as fastlora.compile_for_trainer compiles (and
    eager, as the ground truth)."""
    import os
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the reference kernels, as the ranks
    try:
        model, batch = W.model_and_batch()
        eager = copy.deepcopy(model)
        eager(**batch).loss.backward()
        torch._dynamo.reset()
        fastlora.clear_reports()
        fastlora.compile_for_trainer(model, **W.OPTIONS)
        model(**batch).loss.backward()
        reports = fastlora.reports(model)
        return {"counts": reports.counts(), "graphs": len(reports), "grads": lora_grads(model),
                "eager_grads": lora_grads(eager)}
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return W.launch("ddp_and_fsdp2", tmp_path_factory.mktemp("ranks"))


@pytest.fixture
def ddp_ranks(ranks):
    return [r["ddp"] for r in ranks]


@pytest.fixture
def fsdp2_ranks(ranks):
    return [r["fsdp2"] for r in ranks]


def _assert_grads_equal(grads: dict, single: dict, what: str):
    assert set(grads) == set(single["grads"]), what
    for reference in ("grads", "eager_grads"):
        errors = {n: rel_err(g, single[reference][n]) for n, g in grads.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"{what}: {worst} differs from one process's {reference} " \
                                    f"on the whole batch by {errors[worst]:.2e}"


def test_single_process_fuses_everything(single):
    counts = single["counts"]
    assert single["graphs"] == 1
    assert counts["attention"] == 2 and counts["rms_norm_lora_qkv"] == 2, counts
    assert counts["rms_norm_lora_mlp_block"] == 2 and counts["linear_cross_entropy"] == 1, counts


def test_ddp_fuses_first_then_splits_at_buckets(ddp_ranks, single):
    """compile_for_trainer + DDP: one graph, fused whole, then cut by torch's DDPOptimizer into
    several pieces at the 1 MiB buckets; the same fusions as one process on every rank and
    gradients equal to the whole batch's."""
    for rank, result in enumerate(ddp_ranks):
        fused = result["fused_first"]
        assert fused["counts"] == single["counts"], (rank, fused["counts"], single["counts"])
        assert fused["graphs"] == 1 and len(fused["notes"]) == 1, fused["notes"]
        pieces = int(fused["notes"][0].split("gradient-bucket boundaries into ")[1]
                     .split()[0])
        assert pieces >= 3, fused["notes"]  # 4.2 MiB of adapters in 1 MiB buckets
        _assert_grads_equal(fused["grads"], single, f"DDP fused first, rank {rank}")
    assert all(torch.equal(g, ddp_ranks[1]["fused_first"]["grads"][n])
               for n, g in ddp_ranks[0]["fused_first"]["grads"].items())


def test_ddp_split_by_dynamo_first_loses_fusions_and_says_why(ddp_ranks, single):
    """torch.compile(DDP(model), backend="fastlora"): Dynamo's DDPOptimizer cuts the graph
    before fastlora sees it. Correct, but fusions across a cut are lost, and every piece's
    report says so. If this starts fusing everything, torch changed: update docs/multi_gpu.md."""
    for rank, result in enumerate(ddp_ranks):
        split = result["split_first"]
        assert split["graphs"] >= 3 and split["graphs"] == split["all_graphs"], split["graphs"]
        assert len(split["notes"]) == split["graphs"], split["notes"]
        assert all("Dynamo's DDPOptimizer split" in n for n in split["notes"])
        lost = {p for p, n in single["counts"].items() if split["counts"].get(p, 0) < n}
        assert "attention" in lost, split["counts"]  # a mask built in an earlier piece
        reasons = " ".join(reason for pattern, _, reason in split["near_misses"])
        assert "an input of the compiled graph" in reasons, split["near_misses"]
        _assert_grads_equal(split["grads"], single, f"DDP split first, rank {rank}")


@pytest.mark.parametrize("how", ["per_layer", "whole_model"])
def test_fsdp2_fused_ops_take_unsharded_weights(fsdp2_ranks, single, how):
    """FSDP2 shards base weights and adapters (half the rows each); the compiled graphs take
    the all-gathered, whole parameters; the gradients (reduce-scattered, gathered here) equal
    the whole batch's."""
    for rank, result in enumerate(fsdp2_ranks):
        run = result[how]
        assert run["q_local_rows"] * W.WORLD == run["q_rows"], run  # really sharded
        layer_graphs = [shapes for shapes in run["taken"] if shapes == run["layer_shapes"]]
        assert len(layer_graphs) == 2, (run["taken"], run["layer_shapes"])  # both layers, whole
        # reports(model) finds FSDP2's graphs through its unsharded parameters
        assert run["counts"] == run["all_counts"], (run["counts"], run["all_counts"])
        _assert_grads_equal(run["grads"], single, f"FSDP2 {how}, rank {rank}")


def test_fsdp2_per_layer_compile_fuses_every_layer(fsdp2_ranks, single):
    """Compiled per layer, each layer's graph has all its fusions; the final norm and the loss
    run outside the compiled layers (compile them too, or compile the whole model)."""
    expected = {p: n for p, n in single["counts"].items()
                if p not in ("rms_norm", "linear_cross_entropy")}
    expected["rms_norm"] = single["counts"]["rms_norm"] - 1  # not the final norm
    for result in fsdp2_ranks:
        run = result["per_layer"]
        assert run["graphs"] == 2 and run["counts"] == expected, (run["counts"], expected)
        assert run["near_misses"] == []


def test_fsdp2_whole_model_compile_breaks_at_each_layer(fsdp2_ranks, single):
    """Compiled as a whole, Dynamo steps out of the graph at every FSDP2 unit (its hooks are
    not traced): one graph per layer plus the graphs around them. Everything fuses but
    attention, whose causal mask is built in the graph before the layers and reaches each
    layer as an input fastlora cannot prove causal (the report says so)."""
    for result in fsdp2_ranks:
        run = result["whole_model"]
        missing = {p for p, n in single["counts"].items() if run["counts"].get(p, 0) != n}
        assert missing == {"attention"}, (run["counts"], single["counts"])
        assert [p for p, _, _ in run["near_misses"]] == ["attention", "attention"]


def test_fastlora_train_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m fastlora.cli train`: the Trainer runs DDP over gloo, every
    process compiles its model, only the main process prints and writes one output folder.
    (The rest of the graph on the eager compiler to keep this under a minute: the DDP split
    with aot_eager is tested above.)"""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "fastlora.cli", "train", "--steps", "2", "--batch-size", "4",
           "--max-length", "128", "--log-every", "1", "--compiler", "eager", "--debug",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-3000:]
    text = proc.stdout
    assert text.count("model    fastlora-tiny-llama") == 1, text  # the main process only
    assert "batch 4 x 2 processes x 1 accumulated" in text, text
    assert text.count("fastlora rewrite report, graph") == 1 and text.count("done     2") == 1
    run = json.loads((out / "fastlora_run.json").read_text())
    assert run["processes"] == 2 and run["steps"] == 2, run
    assert run["report_counts"]["rms_norm"] == 9 and run["report_counts"]["attention"] == 4
    assert (out / "base_model" / "model.safetensors").exists()
    assert (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .partial left behind
