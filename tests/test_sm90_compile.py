"""The LoRA GLU kernels compiled for an H100/H200 (sm_90) by Triton's real compiler and ptxas on a
machine without a GPU (tests/sm90_compile.py, in a process of its own). The interpreter runs a
kernel's Python and misses what only code generation checks (the layout of a transposed tile,
dot shapes, shared memory over the limit); this compiles every code path the launchers can pick
in each dot precision. Speed and values on the GPU are the GPU tests' and
benchmarks/tune_lora.py's."""
import pathlib

import pytest
import triton

from pretend_gpu import run_script

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SM90_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton has no CUDA backend (ptxas)")
def test_glu_kernels_compile_for_sm90():
    cases = run_script("sm90_compile.py")
    assert len(cases) == 15, cases  # 5 code paths x 3 precisions
    for case, got in cases.items():
        assert "error" not in got, (case, got)
        assert got["cubin"] and 0 < got["shared"] <= SM90_SHARED, (case, got)
