"""``offload_embeddings`` on a GPU: the kernel reads rows of a pinned host table exactly; a
compiled model's frozen table moves to pinned host memory at its first call (the GPU's
allocated memory falls by the table's size), trains as the same model compiled without it, and
a later ``model.to("cuda")`` is undone at the next call."""
from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from helpers import rel_err, run_step, tiny_llama, token_batch, with_lora

pytestmark = pytest.mark.gpu

VOCAB, HIDDEN = 32768, 64  # an 8 MiB float32 table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rows_of_a_pinned_host_table(dtype):
    table = torch.randn(VOCAB, 72).to(dtype).pin_memory()
    ids = torch.randint(0, VOCAB, (3, 37), device="cuda")
    ids[0, 0], ids[1, 1] = -1, VOCAB  # outside the table: NaN rows
    rows = torch.ops.fastlora.embedding_from_host(ids, table)
    assert rows.is_cuda and table.device.type == "cpu"
    ok = ((ids >= 0) & (ids < VOCAB)).cpu()
    assert torch.equal(rows.cpu()[ok], table[ids.cpu()[ok]])
    assert torch.isnan(rows.cpu()[~ok]).all()
    with pytest.raises(RuntimeError, match="pinned host memory"):
        torch.ops.fastlora.embedding_from_host(ids, table.clone())  # not pinned: refused


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_gpu_table_moves_to_host_and_trains_as_without():
    torch.manual_seed(0)
    model = with_lora(tiny_llama(tie_word_embeddings=False, vocab=VOCAB, hidden=HIDDEN,
                                 heads=4, kv_heads=2, inter=96)).cuda()
    model.train()
    inputs = token_batch(vocab=VOCAB, seq=33, device="cuda", use_cache=False)
    plain, moved = copy.deepcopy(model), copy.deepcopy(model)
    fastlora.compile_for_trainer(plain, offload_embeddings=False)
    loss_p, grads_p = run_step(plain, inputs)
    del plain

    weight = moved.get_input_embeddings().weight
    table_bytes = weight.numel() * weight.element_size()
    fastlora.compile_for_trainer(moved, offload_embeddings=True)
    before = _allocated()
    loss_m, grads_m = run_step(moved, inputs)
    assert moved.get_input_embeddings().weight is weight
    assert weight.device.type == "cpu" and weight.is_pinned()
    assert rel_err(loss_m, loss_p) < 1e-6
    assert set(grads_m) == set(grads_p)
    errs = {n: rel_err(grads_m[n], g) for n, g in grads_p.items()}
    assert max(errs.values()) < 1e-6, errs
    notes = [n for r in fastlora.reports(moved) for n in r.notes]
    assert any("read from pinned host memory" in n for n in notes), notes

    run_step(moved, inputs)  # gradients allocated in both measurements
    after = _allocated()
    assert after <= before - table_bytes + 2**20, (before, after, table_bytes)
    moved.to("cuda")  # as a Trainer does when it is built: the table comes back to the GPU
    assert weight.is_cuda and _allocated() >= after + table_bytes
    loss_again, _ = run_step(moved, inputs)  # the next call moves it out again
    assert weight.device.type == "cpu" and _allocated() <= after + 2**20
    assert rel_err(loss_again, loss_p) < 1e-6


def test_gpu_default_moves_a_gpu_table_at_the_first_call():
    """``"auto"`` (the default): a table on the GPU at the first call goes to host memory; a
    CPU run keeps its table and nn.Embedding's own lookup (tests/test_offload_embeddings.py)."""
    model = with_lora(tiny_llama(tie_word_embeddings=False, vocab=VOCAB, hidden=HIDDEN,
                                 heads=4, kv_heads=2, inter=96))
    fastlora.compile_for_trainer(model)
    assert "forward" not in vars(model.get_input_embeddings())  # not decided yet
    model.cuda()  # after compiling, as a Trainer moves the model when it is built
    run_step(model, token_batch(vocab=VOCAB, seq=17, device="cuda", use_cache=False))
    weight = model.get_input_embeddings().weight
    assert weight.device.type == "cpu" and weight.is_pinned()
