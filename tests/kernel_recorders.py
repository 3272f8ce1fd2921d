"""Stand-ins for fastlora's Triton kernels that record what each launch would make Triton
specialize on, instead of running it (used under the interpreter, on CPU tensors).

Triton compiles a kernel once per specialization: the values of its constexpr arguments, for
each integer argument not listed in ``do_not_specialize`` whether it equals 1 or is a multiple
of 16, and (``pointers=True``) each pointer's dtype and whether its address is a multiple of 16.
"""
from __future__ import annotations

import torch


def batch(kind: str, seq: int) -> dict:
    """Two rows of ``seq`` tokens: "packed" (two documents in one row with ``position_ids``,
    TRL's padding-free batch), "right"/"left" (the second row has 5 pads), or "plain"."""
    ids = torch.randint(0, 128, (2, seq))
    if kind == "packed":
        return {"input_ids": ids.reshape(1, -1), "labels": ids.reshape(1, -1),
                "position_ids": torch.arange(seq).repeat(2)[None]}
    out = {"input_ids": ids, "labels": ids}
    if kind in ("right", "left"):
        mask = torch.ones_like(ids)
        pads = slice(seq - 5, seq) if kind == "right" else slice(0, 5)
        mask[1, pads] = 0
        out["attention_mask"] = mask
    return out


def tiny_lora_llama(variant: str = "float32"):
    """The recorders' model (sizes multiples of 16, as real models'), in training mode;
    ``variant``: "float32", "bfloat16", "dropout" (LoRA dropout 0.1) or "checkpointing"."""
    from helpers import tiny_llama, with_lora

    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, inter=128,
                                 vocab=128), r=16, dropout=0.1 if variant == "dropout" else 0.0)
    if variant == "bfloat16":
        model.to(torch.bfloat16)
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def specialization(value: int) -> str:
    return "1" if value == 1 else ("16" if value % 16 == 0 else "other")


class Recorder:
    """Stands in for a Triton kernel: records what its launch would specialize on."""

    def __init__(self, kernel, name: str, calls: list, pointers: bool = False):
        self.name, self.calls, self.pointers = name, calls, pointers
        self.arg_names = kernel.arg_names
        self.fn, self.kwargs = kernel.fn, kernel.kwargs  # the signature warmup.py reads
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
