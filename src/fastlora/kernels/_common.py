"""Helpers shared by the kernel files: where a kernel runs and how many programs to launch.

Lengths are run-time values. Triton compiles a kernel again for each new specialisation of its
integer arguments (equal to 1, divisible by 16); a token count or sequence length changes its
class from one batch to the next, so every kernel lists the arguments that follow the batch's
length in ``@triton.jit(do_not_specialize=[...])``: one compile serves every length. Strides
and sizes of the model's fixed dimensions stay specialised (their divisibility feeds the
vectorised loads and never changes)."""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # macOS / Windows CPU installs: the PyTorch reference kernels still work
    triton = None
    HAVE_TRITON = False


def interpret_on_cpu() -> bool:
    """True when CPU tensors should go through the Triton kernels (``TRITON_INTERPRET=1``).

    The interpreter runs the real kernels on CPU tensors, slowly: tests use it on tiny shapes so
    that CI checks the code that runs on the GPU, not only the PyTorch reference.
    """
    return HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpret_on_cpu()))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def size_hint(n) -> int:
    """The value of a size, without a guard: a symbolic size (a token count under dynamic
    shapes, while inductor traces an op's body: kernels/_launch.py) gives the value it has in
    the example inputs. Only for choices that change speed, never results (block sizes, how
    many programs or splits); the kernels then take the symbolic size itself."""
    if isinstance(n, int):
        return n
    hint = n.node.hint
    return int(hint) if hint is not None else 8192


def cdiv(a, b):
    """ceil(a / b) for sizes, ints or symbolic: what ``triton.cdiv`` computes, without its cost
    on the host (Triton 3.9 makes it a constexpr function: 1.7 us a call, where this takes 0.05;
    a lora_qkv_backward made 34 such calls)."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """The smallest power of two >= ``n``, 0 for ``n`` <= 0: ``triton.next_power_of_2``'s
    values, for ints and symbolic sizes, without Triton."""
    if isinstance(n, int):
        return 1 << (n - 1).bit_length() if n >= 1 else 0
    n = n - 1
    for shift in (1, 2, 4, 8, 16, 32):
        n = n | (n >> shift)
    return n + 1


def persistent_programs(t: torch.Tensor, rows: int, per_sm: int = 1) -> int:
    """Programs for a grid that loops over rows: a few per SM on a GPU, 4 under the interpreter.
    With symbolic ``rows`` the count is chosen on their example value and kept for every length
    (a program past the last row stores zero partial sums)."""
    if t.is_cuda:
        return max(1, min(size_hint(rows), sm_count(t.device.index or 0) * per_sm))
    return max(1, min(size_hint(rows), 4))


def rows2d(t: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """``t`` as [rows, last dim] with unit stride along the row: a view when possible (rows may
    then be strided, as the halves of a packed gate_up are); ``dense=True`` also puts the rows
    back to back (stride(0) == last dim), as the norms' outputs view back to ``t``'s shape."""
    if dense:
        return t.reshape(-1, t.shape[-1]).contiguous()
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def require(cond: bool, message: str, exc=ValueError) -> None:
    if not cond:
        raise exc(message)


def check_float(name: str, t: torch.Tensor) -> None:
    require(t.dtype in (torch.float32, torch.bfloat16, torch.float16),
            f"fastlora: {name} must be float32, bfloat16 or float16, got {t.dtype}", TypeError)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    require(len(set(devices.values())) == 1,
            f"fastlora: tensors on different devices: {devices}", RuntimeError)


def row_tile(n: int, element_size: int, table, override=None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a row-wise kernel whose tile is BLOCK_M whole rows of
    ``n`` features: ``table`` is ((row bytes up to, (BLOCK_M, num_warps)), ...) ending in a
    ``None`` limit; ``override`` (BLOCK_M, num_warps, ...) wins (tuning sweeps set it)."""
    block_n = next_power_of_2(max(1, n))
    if override is not None:
        return override[0], block_n, override[1]
    row_bytes = block_n * element_size
    for limit, (block_m, warps) in table:
        if limit is None or row_bytes <= limit:
            break
    if row_bytes < 1024:  # tiny rows (tests, small models): more rows, fewer warps
        block_m, warps = max(1, min(16, 4096 // row_bytes)), 2
    return block_m, block_n, warps


_FITTED: dict = {}  # (key, tuned block) -> the block that fitted (or was checked to fit)


def halve_until_it_fits(launch, block: int, key=None, smallest: int = 16):
    """``launch(block)``; where the compiled kernel needs more shared memory than the GPU has
    (Triton raises OutOfResources when it loads the kernel, before anything runs), again with
    half the block, down to ``smallest``. Launch configurations are tuned at the common ranks;
    a large rank (r = 64 with dropout) can push a tuned tile past the limit. With a ``key``
    (what decides the kernel's resources), the block that fitted is remembered, so later calls
    launch it directly.

    Traced for inductor (kernels/_launch.py) nothing is launched now, and a tile past the limit
    would fail only when inductor compiles the graph: there each block is first compiled and
    loaded by Triton on its own (``_launch.fits``) and halved until it fits, then traced."""
    from triton.runtime.errors import OutOfResources

    from . import _launch

    tuned = block
    block = _FITTED.get((key, tuned), tuned) if key is not None else tuned
    if _launch.tracing():
        if key is None or (key, tuned) not in _FITTED:
            while block // 2 >= smallest and not _launch.fits(launch, block):
                block //= 2
            if key is not None:
                _FITTED[(key, tuned)] = block
        return launch(block)
    while True:
        try:
            result = launch(block)
        except OutOfResources:
            if block // 2 < smallest:
                raise
            block //= 2
            continue
        if key is not None and block != tuned:
            _FITTED[(key, tuned)] = block
        return result
