"""Inductor settings that keep a dynamic graph free of guards on the token count.

On the H200 (torch 2.11) inductor's matmul padding pass guarded a dynamic LoRA graph on
``batch * seq < 97``, so a small batch after a large one recompiled the model
(backend.PAD_MM_GUARD_FREE). These tests check the backend's decision without a GPU: the patches
handed to inductor, captured in place of its compile."""
import pytest
import torch
import torch._inductor.compile_fx

import fastlora.backend as backend


@pytest.fixture
def captured_patches(monkeypatch):
    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    return seen


def _step(x, w):
    return torch.nn.functional.silu(x @ w).sum()


@pytest.mark.parametrize("guard_free", [False, True])
@pytest.mark.parametrize("dynamic", [True, False])
def test_matmul_padding_off_only_where_it_would_guard_a_dynamic_size(
        monkeypatch, captured_patches, guard_free, dynamic):
    monkeypatch.setattr(backend, "PAD_MM_GUARD_FREE", guard_free)
    torch._dynamo.reset()
    compiled = torch.compile(_step, backend="fastlora", dynamic=dynamic,
                             options={"compiler": "inductor"})
    x, w = torch.randn(7, 5), torch.randn(5, 3)
    assert torch.allclose(compiled(x, w), _step(x, w))
    assert captured_patches, "the backend did not hand the graph to inductor"
    expect_off = dynamic and not guard_free
    assert all(("shape_padding" in p and p["shape_padding"] is False) == expect_off
               for p in captured_patches), captured_patches


def test_symbolic_sizes_are_seen_on_dynamo_graphs():
    seen = []

    def record(gm, example_inputs):
        seen.append(backend.has_symbolic_sizes(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_step, backend=record, dynamic=True)(torch.randn(7, 5), torch.randn(5, 3))
    torch._dynamo.reset()
    torch.compile(_step, backend=record, dynamic=False)(torch.randn(7, 5), torch.randn(5, 3))
    assert seen == [True, False]
