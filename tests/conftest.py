"""Test set-up: without a GPU, CPU tensors go through the real Triton kernels (interpreter).
This must happen before anything imports triton (importing torch does not).

Threads: one per process by default (``FASTLORA_TEST_THREADS`` sets another count). The tests'
tensors are tiny; on a busy 2-core machine two threads per op ran the suite about 6x slower
than one (2026-12-03), and the results must not depend on how many cores the host has."""
import contextlib
import logging
import os

THREADS = os.environ.get("FASTLORA_TEST_THREADS", "1")
os.environ.setdefault("FASTLORA_CACHE", "off")  # no compile cache in ~/.cache from test runs
os.environ.setdefault("OMP_NUM_THREADS", THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
PLAIN_INTERPRETER = os.environ.get("FASTLORA_TEST_PLAIN_INTERPRETER") == "1"
if os.environ.get("TRITON_INTERPRET") == "1" and not PLAIN_INTERPRETER:
    import interpreter_patching  # noqa: E402  (tests/interpreter_patching.py)

    interpreter_patching.install()

from fastlora import builtin_patterns  # noqa: E402  (after TRITON_INTERPRET)

import collector  # noqa: E402  (tests/collector.py)

collector.collect_less_often()

# Tests import fastlora.patterns.* directly; from a source tree (PYTHONPATH=src, as on the GPU
# machine) that package is the top-level patterns/ folder, which this makes importable.
builtin_patterns._package()


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def tuned():
    """``tuned(op, **cfg)``: a launch-configuration override (fastlora.kernels.tuning) that holds
    until the test ends."""
    from fastlora.kernels import tuning
    with contextlib.ExitStack() as stack:
        yield lambda op, **cfg: stack.enter_context(tuning.override(op, **cfg))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (GPU tests run on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Lines(logging.Handler):
    """The ``fastlora`` logger's warnings (the suite runs with ``-p no:logging``: no caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    """The messages the ``fastlora`` logger warns during the test."""
    lines = Lines()
    logger = logging.getLogger("fastlora")
    logger.addHandler(lines)
    yield lines.lines
    logger.removeHandler(lines)
