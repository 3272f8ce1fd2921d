"""Stand-ins for fastlora's Triton kernels that record what each launch would make Triton
specialize on, instead of running it (used under the interpreter, on CPU tensors).

Triton compiles a kernel once per specialization: the values of its constexpr arguments, for
each integer argument not listed in ``do_not_specialize`` whether it equals 1 or is a multiple
of 16, and (``pointers=True``) each pointer's dtype and whether its address is a multiple of 16.
"""
from __future__ import annotations

import torch


def specialization(value: int) -> str:
    return "1" if value == 1 else ("16" if value % 16 == 0 else "other")


class Recorder:
    """Stands in for a Triton kernel: records what its launch would specialize on."""

    def __init__(self, kernel, name: str, calls: list, pointers: bool = False):
        self.name, self.calls, self.pointers = name, calls, pointers
        self.arg_names = kernel.arg_names
        self.unspecialized = set(kernel.kwargs.get("do_not_specialize") or ())

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            ints = {n: specialization(int(v)) for n, v in zip(self.arg_names, args)
                    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                    and n not in self.unspecialized}
            if self.pointers:  # a tensor or Triton's MockTensor (the warm-up's stand-in)
                ints.update({n: (str(v.dtype), v.data_ptr() % 16 == 0)
                             for n, v in zip(self.arg_names, args) if hasattr(v, "data_ptr")})
            self.calls.append((self.name, ints, {k: str(v) for k, v in kwargs.items()}))
        return run


def replace_kernels(monkeypatch, calls: list, pointers: bool = False) -> dict:
    """Replace every Triton kernel of fastlora.kernels (as the interpreter makes them) by a
    Recorder appending to ``calls``; returns the recorders by kernel name."""
    import triton

    from fastlora.kernels import triton_kernels
    interpreted = triton.runtime.interpreter.InterpretedFunction
    recorders = {}
    for module, name, value in triton_kernels():
        if isinstance(value, interpreted):
            recorders[name] = Recorder(value, name, calls, pointers)
            monkeypatch.setattr(module, name, recorders[name])
    assert recorders, "no Triton kernel found to record (TRITON_INTERPRET=1 is the suite's)"
    return recorders
