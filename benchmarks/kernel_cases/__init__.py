"""Per-op benchmark cases for benchmarks/kernels.py: one module per fastlora op.

Each module defines ``cases(dtype) -> list[Case]``. A case names the op, builds CUDA inputs,
and gives the eager PyTorch function the op replaces (inductor compiles that same function) and
the fastlora call, plus the fewest bytes (or FLOPs) each direction must move, so the runner can
report achieved GB/s (TFLOP/s) against the card's measured ceilings.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], dict]  # fresh CUDA inputs; tensors that need gradients have requires_grad
    eager: Callable[..., object]  # the unfused PyTorch function (inductor compiles it too)
    fastlora: Callable[..., object]
    bytes_fwd: int = 0  # fewest bytes the forward must read + write
    bytes_bwd: int = 0
    flops_fwd: int = 0  # for compute-bound ops (attention, matmuls)
    flops_bwd: int = 0
    backward: bool = True
    inductor: bool = True  # False where compiling the eager function is not meaningful
