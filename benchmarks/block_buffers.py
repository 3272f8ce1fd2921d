"""How many [M, F] buffers lora_mlp_block's backward holds, called eagerly and compiled by
inductor (the inductor launch route traces the op's body; its kernel's write of d up over dh
stays in place only where inductor's reinplacing pass proves dh dead).

    benchmarks/run_gpu.sh exec python3 benchmarks/block_buffers.py     # GPU

Prints the peak above the inputs in [M, F] buffers (M = 4096 rows, F = 4096, bf16; the
inputs and outputs are [M, 256]) called eagerly, compiled with static sizes and compiled with
dynamic ones (every size symbolic; ``compile_for_trainer`` marks only the token count; the
op's buffers are then flat allocations viewed, kernels/_buffers.py); for each compile inductor's verdicts on
the kernel writes (its reinplacing log) and the [M, F] allocations of its generated code; the
dynamic compile's code goes to $OUT/block_backward_code.py.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

import torch
from torch._inductor.utils import run_and_get_code

import fastlora  # noqa: F401  (registers torch.ops.fastlora)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from helpers import mlp_block_case  # noqa: E402  (the GPU tests' case, tests/helpers.py)

M, K, F, R, DT = 4096, 256, 4096, 8, torch.bfloat16


def _peak_buffers(fn, args) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / (M * F * DT.itemsize)


def main():
    verdicts = []

    class Keep(logging.Handler):
        def emit(self, record):
            verdicts.append(record.getMessage())
    reinplace_log = logging.getLogger("torch._inductor.fx_passes.reinplace")
    reinplace_log.setLevel(logging.DEBUG)
    reinplace_log.addHandler(Keep())

    torch.manual_seed(0)
    case = mlp_block_case(M, K, F, R, DT)
    backward = case.backward
    args = ((torch.randn(M, K, device="cuda") * 0.05).to(DT), case.x, case.bg, case.bu, case.xa,
            case.xa_d)
    result = {"eager_buffers": _peak_buffers(backward, args)}
    for dynamic in (False, True):
        torch._dynamo.reset()
        verdicts.clear()
        compiled = torch.compile(backward, backend="inductor", dynamic=dynamic)
        _, code = run_and_get_code(compiled, *args)
        code = "\n".join(code)
        name = "dynamic" if dynamic else "static"
        result[name] = {"buffers": _peak_buffers(compiled, args),
                        "reinplace_log": list(verdicts),
                        "allocations": [line.strip()[:160] for line in code.splitlines()
                                        if "empty_strided_cuda" in line]}
    out = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "block_backward_code.py"), "w") as f:
        f.write(code)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
