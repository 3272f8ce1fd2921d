"""A never-seen length compiles no Triton kernel (issue 16, item 2), checked without a GPU.

Triton compiles a kernel once per specialization: the values of its constexpr arguments, and
for each integer argument not listed in ``do_not_specialize`` whether it equals 1 or is a
multiple of 16. A launcher that passed a length-dependent integer without listing it, or chose
a constexpr from a length, would compile anew at some new length in the middle of training.

Here a tiny Llama is trained through ``compile_for_trainer`` (dynamic shapes: one graph) at
six lengths, odd ones included, with every Triton kernel of fastlora replaced by a recorder
(the same launchers run; the kernels do not). Launch by launch, each step must ask for the
specializations the first step asked for: right and left padding, packed rows, no mask.
The model's sizes are multiples of 16 (head_dim 16), as real models' are: a stride of
``S * H * head_dim`` then keeps its class at every length, as on a Llama-3 at head_dim 128.
Launch choices that follow the token count on purpose (block sizes past a size threshold,
``_common.size_hint``) are below their thresholds at these sizes.
"""
from __future__ import annotations

import pytest

import fastlora
from kernel_recorders import batch, replace_kernels, tiny_lora_llama

triton = pytest.importorskip("triton")
from fastlora.kernels._common import interpret_on_cpu  # noqa: E402

# The launchers run on CPU tensors only under the interpreter (the CPU suite's setting; on a GPU
# machine the suite leaves it off and CPU tensors take the PyTorch reference, no launch).
pytestmark = pytest.mark.skipif(not interpret_on_cpu(), reason=(
    "records the launches of CPU tensors, which need TRITON_INTERPRET=1 (set by conftest.py "
    "on a machine without CUDA)"))

LENGTHS = (24, 40, 56, 33, 17, 97)


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel of fastlora.kernels replaced by a Recorder; yields the list of
    launches (cleared by the test between steps) and the recorders by kernel name."""
    calls = []
    yield calls, replace_kernels(monkeypatch, calls)


def _steps(kind: str, calls: list, variant: str = "float32") -> list[list]:
    """The launches of each step at LENGTHS; ``variant``: "float32", "bfloat16", "dropout"
    (LoRA dropout 0.1) or "checkpointing" (gradient checkpointing: the recompute launches)."""
    model = tiny_lora_llama(variant)
    fastlora.compile_for_trainer(model)
    steps, graphs = [], []
    for seq in LENGTHS:
        calls.clear()
        model(**batch(kind, seq)).loss.backward()
        steps.append(list(calls))
        graphs.append(len(fastlora.reports(model)))
    assert graphs == graphs[:1] * len(LENGTHS), graphs  # compiled at the first step only
    return steps


def new_specializations(steps: list[list]) -> list[str]:
    """What a later step's launches ask for that the first step's did not, launch by launch."""
    first, found = steps[0], []
    for seq, step in zip(LENGTHS[1:], steps[1:]):
        assert [c[0] for c in step] == [c[0] for c in first], "the launches changed order"
        for i, (was, now) in enumerate(zip(first, step)):
            if was != now:
                found.append(f"length {seq}, launch {i} ({now[0]}): {was[1:]} -> {now[1:]}")
    return found


@pytest.mark.parametrize("kind,variant", [
    ("right", "float32"), ("left", "float32"), ("packed", "float32"), ("plain", "float32"),
    ("right", "bfloat16"), ("right", "dropout"), ("packed", "checkpointing")])
def test_a_new_length_asks_for_no_new_specialization(launches, kind, variant):
    calls, _ = launches
    steps = _steps(kind, calls, variant)
    assert len(steps[0]) > 50, len(steps[0])  # every fused op launched its kernels
    assert new_specializations(steps) == []


def test_a_specialized_length_would_be_caught(launches):
    """The check sees a length passed without ``do_not_specialize``: rms_norm's row count,
    specialized, is 1 or a multiple of 16 at some lengths and neither at others."""
    calls, recorders = launches
    recorders["_rms_norm_fwd"].unspecialized.discard("M")
    found = new_specializations(_steps("plain", calls))
    assert found and all("_rms_norm_fwd" in f for f in found), found
