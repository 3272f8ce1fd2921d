"""Decoder layers compiled once (regions.py, ``reuse_layers``): compile_for_trainer marks each
layer's call as a nested compile region; the backend rewrites the shared body once. The loss,
every LoRA gradient and the report's counts must be those of the layers compiled one by one."""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import types

import pytest
import torch
import transformers as T

import fastlora
from fastlora import regions
from helpers import checkpointed, rel_err, run_step, tiny_llama, token_batch, with_lora

LAYERS = 4


def _qwen2(layers=LAYERS):
    return T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


FAMILIES = {"llama": lambda: tiny_llama(layers=LAYERS), "qwen2": _qwen2}


def _trained(model, inputs, **options):
    """(loss, grads, reports) of one step of a copy of ``model`` through compile_for_trainer."""
    fastlora.clear_reports()
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    options.setdefault("reuse_layers", True)  # opt-in (docs/options.md)
    fastlora.compile_for_trainer(model, strict=True, **options)
    loss, grads = run_step(model, inputs)
    return loss, grads, fastlora.reports(model)


def _shared_bodies(reports) -> int:
    """How many matches sit in a body that several layers share."""
    return sum(1 for r in reports for m in r.matches if m.get("calls", 1) > 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_compiled_once_match_eager_and_counts(family):
    model = with_lora(FAMILIES[family]())
    model.train()
    inputs = token_batch()
    loss_e, grads_e = run_step(model, inputs)
    loss_on, grads_on, reports_on = _trained(model, inputs)
    loss_off, _, reports_off = _trained(model, inputs, reuse_layers=False)

    assert _shared_bodies(reports_on) > 0, str(reports_on)  # the regions were really used
    assert _shared_bodies(reports_off) == 0
    assert reports_on.counts() == reports_off.counts(), (reports_on.counts(),
                                                         reports_off.counts())
    assert reports_on.counts()["rms_norm_lora_qkv"] == LAYERS
    assert rel_err(loss_on, loss_e) < 1e-6
    errs = {n: rel_err(grads_on[n], g) for n, g in grads_e.items()}
    assert set(grads_on) == set(grads_e) and max(errs.values()) < 1e-5, errs
    assert rel_err(loss_off, loss_e) < 1e-6


def test_report_names_every_layer_of_a_shared_body():
    model = with_lora(tiny_llama(layers=LAYERS))
    _, _, reports = _trained(model, token_batch(use_cache=False), dynamic=False)
    shared = [m for r in reports for m in r.matches if m.get("calls", 1) > 1]
    sites = shared[0]["call_sites"]
    assert len(sites) == shared[0]["calls"] and all(".layers." in s for s in sites), sites
    assert "forward.args" not in shared[0]["module"]
    assert any("compiled once" in n for r in reports for n in r.notes)
    assert "one compiled body" in str(reports)


def test_padding_mask_and_dropout():
    model = with_lora(tiny_llama(layers=LAYERS), dropout=0.1)
    ids = token_batch()
    mask = torch.ones_like(ids["input_ids"])
    mask[0, :3] = 0
    inputs = {**ids, "attention_mask": mask}
    model.eval()  # dropout off: comparable with eager
    loss_e, grads_e = run_step(model, inputs)
    loss_c, grads_c, reports = _trained(model, inputs)
    assert _shared_bodies(reports) > 0
    assert reports.counts()["attention"] == LAYERS
    assert rel_err(loss_c, loss_e) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 1e-5
    model.train()  # dropout on: the shared body draws its masks and trains
    loss_t, grads_t, reports = _trained(model, inputs)
    assert torch.isfinite(loss_t) and all(torch.isfinite(g).all() for g in grads_t.values())
    assert _shared_bodies(reports) > 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_gradient_checkpointing(dynamic):
    model = with_lora(tiny_llama(layers=LAYERS))
    inputs = checkpointed(model, token_batch())
    loss_e, grads_e = run_step(model, inputs)
    loss_c, grads_c, reports = _trained(model, inputs, dynamic=dynamic)
    assert rel_err(loss_c, loss_e) < 1e-6
    assert max(rel_err(grads_c[n], g) for n, g in grads_e.items()) < 1e-5
    assert reports.counts()["rms_norm_lora_qkv"] == LAYERS
    notes = " ".join(n for r in reports for n in r.notes)
    if dynamic:  # not proven safe on torch 2.13: layers inlined, and the report says why
        assert _shared_bodies(reports) == 0 and regions.CHECKPOINT_DYNAMIC in notes
    else:
        assert _shared_bodies(reports) > 0


def test_off_and_eager_compiler_leave_layers_unmarked():
    model = with_lora(tiny_llama(layers=LAYERS))
    fastlora.compile_for_trainer(model, reuse_layers=False)
    assert not any(getattr(m, regions._MARK, False) for m in model.modules())
    other = with_lora(tiny_llama(layers=LAYERS))
    fastlora.compile_for_trainer(other, compiler="eager", reuse_layers=True)
    assert not any(getattr(m, regions._MARK, False) for m in other.modules())
    default = with_lora(tiny_llama(layers=LAYERS))  # "auto" on a CPU model: nothing marked
    fastlora.compile_for_trainer(default)
    assert not any(getattr(m, regions._MARK, False) for m in default.modules())
    assert len(regions.decoder_layers(other)) == LAYERS
    for bad in ("yes", 1, None):
        with pytest.raises(fastlora.OptionsError):
            fastlora.compile_for_trainer(with_lora(tiny_llama()), reuse_layers=bad)


def test_auto_is_off_and_the_inductor_route_refuses_shared_layers():
    """reuse_layers="auto" (the default) marks nothing for now; True/False are taken as they
    are; and with FASTLORA_LAUNCH=inductor a model on a GPU is refused (its shared body gave
    wrong LoRA gradients on the H200), with the reason the report notes."""
    cpu = with_lora(tiny_llama(layers=LAYERS))
    # a stand-in for a model on a GPU: why_not reads only its parameters' is_cuda
    gpu = types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(is_cuda=True)]))
    assert regions.resolve("auto") is False
    assert regions.resolve(True) is True and regions.resolve(False) is False
    on = fastlora.Options.parse({"reuse_layers": True})
    assert regions.why_not(on, gpu, launch="inductor") == regions.INDUCTOR_ROUTE
    assert regions.why_not(on, gpu, launch="python") is None
    assert regions.why_not(on, cpu, launch="inductor") is None  # the CPU keeps ops opaque
    off = dataclasses.replace(on, reuse_layers=False)
    assert "turned off" in regions.why_not(off, gpu, launch="inductor")


def _first_step_seconds(layers: int, reuse: bool, dynamic: str = "static") -> float:
    """CPU seconds of the first step (the compile) in a fresh process (compile_time_worker.py):
    inductor, caches off, no kernel compiled before. CPU time (the process and its compiler
    subprocesses), not wall time: the CI machine is shared."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "compile_time_worker.py"),
                          str(layers), "on" if reuse else "off", dynamic],
                         cwd=here, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    return float(line.split()[0].split("=")[1])


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "not met on the CPU (2026-12-04, torch 2.13, 2-core shared machine): 8 vs 2 layers cost "
    "1.53-1.56x with reuse_layers and 1.50x without it. Inductor dedupes identical C++ kernels "
    "by source either way (10 kernels for 8 layers), and their g++ builds dominate; Dynamo still "
    "traces every layer (torch 2.13's body reuse refuses the transformers `kernels` package's "
    "context-variable side effect), so little depth-dependent work is left to save here"))
def test_compile_time_flat_in_depth():
    two = _first_step_seconds(2, True)
    eight = _first_step_seconds(8, True)
    assert eight <= 1.5 * two, f"8 layers {eight:.1f} s, 2 layers {two:.1f} s (CPU)"


def test_layers_moved_to_a_gpu_on_the_inductor_route_run_unmarked(monkeypatch):
    """A Trainer moves the model to the GPU after compile_for_trainer marked its layers: each
    call decides again, and on the inductor launch route (where a shared body gave wrong
    gradients) a layer on the GPU runs as it would unmarked, the report's note saying why."""
    model = with_lora(tiny_llama(layers=LAYERS))
    fastlora.compile_for_trainer(model, reuse_layers=True)  # on the CPU: marked
    assert sum(getattr(m, regions._MARK, False) for m in model.modules()) == LAYERS
    assert regions.why(model, dynamic=True) is None
    monkeypatch.setattr(regions, "_on_gpu", lambda layer: True)  # stands for .cuda()
    monkeypatch.setattr(regions._launch, "LAUNCH", "inductor")
    assert regions.INDUCTOR_ROUTE in regions.why(model, dynamic=True)

    def shared_body(*args, **kwargs):
        raise AssertionError("a layer on the GPU went through the shared body")
    monkeypatch.setattr(regions, "_LAYER_CALL", shared_body)
    layer = regions.decoder_layers(model)[1]
    hidden = torch.randn(1, 5, 40)
    position = torch.arange(5)[None]
    rope = model.base_model.model.model.rotary_emb(hidden, position)
    out = layer(hidden, position_embeddings=rope, position_ids=position)
    assert out[0].shape == (1, 5, 40) if isinstance(out, tuple) else out.shape == (1, 5, 40)
    monkeypatch.setattr(regions._launch, "LAUNCH", "python")
    with pytest.raises(AssertionError, match="shared body"):
        layer(hidden, position_embeddings=rope, position_ids=position)
