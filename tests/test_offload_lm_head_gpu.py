"""``offload_lm_head`` on a GPU: ``linear_from_host`` with a pinned host weight gives what the
weight on the GPU gives, a prefetched copy is taken once and then freed, and a compiled model's
frozen lm_head moves to pinned host memory at its first call (the GPU's allocated memory
between steps falls by the head's size), trains as the same model compiled without it, and a
later ``model.to("cuda")`` is undone at the next call."""
from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora.kernels import _host_weights
from helpers import rel_err, run_step, tiny_llama, token_batch, with_lora

pytestmark = pytest.mark.gpu

VOCAB, HIDDEN = 32768, 64  # an 8 MiB float32 head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_product_with_a_pinned_host_weight(dtype):
    weight = torch.randn(VOCAB, 72).to(dtype)
    host = weight.pin_memory()
    x = torch.randn(3, 37, 72, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.ops.fastlora.linear_from_host(x, host)
    expected = torch.nn.functional.linear(x.detach(), weight.cuda())
    assert torch.equal(y, expected)  # the same operands on the same device
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, dy @ weight.cuda())
    with pytest.raises(RuntimeError, match="pinned host memory"):
        torch.ops.fastlora.linear_from_host(x, weight.clone())  # not pinned: refused


def test_gpu_a_prefetched_copy_is_taken_once():
    host = torch.randn(VOCAB, HIDDEN).pin_memory()
    _host_weights.prefetch(host, "cuda")
    assert _host_weights.staged() == 1
    copy_ = _host_weights.on_device(host, torch.device("cuda"))
    assert _host_weights.staged() == 0 and torch.equal(copy_.cpu(), host)
    again = _host_weights.on_device(host, torch.device("cuda"))  # none staged: copied now
    assert again.data_ptr() != copy_.data_ptr() and torch.equal(again.cpu(), host)


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_head_moves_to_host_and_trains_as_without(checkpointing, monkeypatch):
    from fastlora import host_lm_head
    prefetches = []
    real = _host_weights.prefetch
    monkeypatch.setattr(host_lm_head._host_weights, "prefetch",
                        lambda w, d: prefetches.append(d) or real(w, d))
    torch.manual_seed(0)
    model = with_lora(tiny_llama(tie_word_embeddings=False, vocab=VOCAB, hidden=HIDDEN,
                                 heads=4, kv_heads=2, inter=96)).cuda()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = token_batch(vocab=VOCAB, seq=33, device="cuda", use_cache=False)
    plain, moved = copy.deepcopy(model), copy.deepcopy(model)
    fastlora.compile_for_trainer(plain, offload_lm_head=False, offload_embeddings=False)
    loss_p, grads_p = run_step(plain, inputs)
    del plain

    weight = moved.get_output_embeddings().weight
    head_bytes = weight.numel() * weight.element_size()
    fastlora.clear_reports()
    fastlora.compile_for_trainer(moved, offload_lm_head=True, offload_embeddings=False)
    before = _allocated()
    loss_m, grads_m = run_step(moved, inputs)
    assert moved.get_output_embeddings().weight is weight
    assert weight.device.type == "cpu" and weight.is_pinned()
    assert _host_weights.staged() == 0  # the loss took the prefetched copy (or none was made)
    assert len(prefetches) == (0 if checkpointing else 1)
    assert rel_err(loss_m, loss_p) < 1e-6
    assert set(grads_m) == set(grads_p)
    errs = {n: rel_err(grads_m[n], g) for n, g in grads_p.items()}
    assert max(errs.values()) < 1e-6, errs
    reports = fastlora.reports(moved)
    assert reports.counts()["linear_cross_entropy"] == 1
    notes = [n for r in reports for n in r.notes]
    assert any("lm_head kept in pinned host memory" in n for n in notes), notes

    run_step(moved, inputs)  # gradients allocated in both measurements
    after = _allocated()
    assert after <= before - head_bytes + 2**20, (before, after, head_bytes)
    moved.to("cuda")  # as a Trainer does when it is built: the head comes back to the GPU
    assert weight.is_cuda and _allocated() >= after + head_bytes
    loss_again, _ = run_step(moved, inputs)  # the next call moves it out again
    assert weight.device.type == "cpu" and _allocated() <= after + 2**20
    assert rel_err(loss_again, loss_p) < 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_auto_moves_the_head_under_checkpointing_only(checkpointing):
    """offload_lm_head="auto" (the default): the head of a checkpointed model goes to host
    memory at the first call; without checkpointing (no saving: the step peaks at the loss)
    it stays on the GPU and the report says nothing about it."""
    model = with_lora(tiny_llama(tie_word_embeddings=False, vocab=VOCAB, hidden=HIDDEN,
                                 heads=4, kv_heads=2, inter=96)).cuda()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fastlora.clear_reports()
    fastlora.compile_for_trainer(model, offload_embeddings=False)
    run_step(model, token_batch(vocab=VOCAB, seq=33, device="cuda", use_cache=False))
    weight = model.get_output_embeddings().weight
    notes = [n for r in fastlora.reports(model) for n in r.notes if "lm_head" in n]
    if checkpointing:
        assert weight.device.type == "cpu" and weight.is_pinned(), weight.device
        assert any("lm_head kept in pinned host memory" in n for n in notes), notes
    else:
        assert weight.is_cuda and not notes, notes
