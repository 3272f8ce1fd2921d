"""Test set-up: without a GPU, CPU tensors go through the real Triton kernels (interpreter).
This must happen before anything imports triton (importing torch does not)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlora import builtin_patterns  # noqa: E402  (after TRITON_INTERPRET)

# Tests import fastlora.patterns.* directly; from a source tree (PYTHONPATH=src, as on the GPU
# machine) that package is the top-level patterns/ folder, which this makes importable.
builtin_patterns._package()


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (GPU tests run on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
