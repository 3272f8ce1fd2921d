"""A graph the backend has compiled before, for the same parameters: the report says so.

Dynamo compiles a frame again when one of its guards fails. A new input size, grad mode or
autocast state changes what the backend receives; anything else (a module whose class is
made anew at each call, an attribute that keeps changing) hands the backend the same graph
again and again, and each time costs a full compile. When Dynamo's ``recompile_limit`` is
reached the frame runs eagerly: unfused and uncompiled, with nothing said but one warning.
The note comes from the second compile on; the `fastlora` logger warns at the third.

peft's ``target_parameters`` do this at every forward (docs/lora.md, MoE experts), so the
report is where a user learns why those steps are not faster. Two graphs are "the same" when
their code (nested bodies included), their inputs' sizes, dtypes, devices and
``requires_grad``, the grad mode and the autocast state are equal, and they take the same
parameter objects: one model's frame compiled again, not two models of one architecture.
"""
from __future__ import annotations

import hashlib

import torch
from torch import fx

_WARNED: set[str] = set()  # keys already warned about on the `fastlora` logger
PREFIX = "compiled again"  # how the note starts (benchmarks count the notes by it)


def graph_key(gm: fx.GraphModule, example_inputs) -> str:
    """A digest of what the backend receives that Dynamo's guards could have changed."""
    parts = [m.code for m in gm.modules() if isinstance(m, fx.GraphModule)]
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"{tuple(x.shape)} {x.dtype} {x.device.type} {x.requires_grad}")
        else:
            parts.append(type(x).__name__)
    parts.append(f"grad={torch.is_grad_enabled()}")
    parts.extend(f"autocast {d}={torch.is_autocast_enabled(d)}" for d in ("cpu", "cuda"))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _same_parameters(a: dict, b: dict) -> bool:
    """Whether two reports' ``_model_params`` (id -> weakref) name the same live tensors."""
    return a.keys() == b.keys() and all(ref() is not None and ref() is b[i]() for i, ref in
                                        a.items())


WARN_AT = 3  # compiles of one graph before the warning: one recompile can be a mode switch
#              (model.eval() with grad enabled), a third compile is a guard that keeps failing


def note(report, earlier, log) -> str | None:
    """The report's note when ``earlier`` reports hold the same graph (``report._graph_key``),
    or None. Warns once per graph on ``log``, at its ``WARN_AT``-th compile."""
    same = [r for r in earlier if getattr(r, "_graph_key", None) == report._graph_key
            and _same_parameters(r._model_params, report._model_params)]
    if not same:
        return None
    text = (f"{PREFIX}: the same graph (code, input sizes, parameters) has now been "
            f"compiled {len(same) + 1} times (graphs {', '.join(str(r.index) for r in same)}); "
            f"a Dynamo guard on something else failed (TORCH_LOGS=recompiles names it). If it "
            f"keeps failing, every call pays a compile, and after recompile_limit the frame "
            f"runs eagerly, unfused. peft's target_parameters do this at every forward "
            f"(docs/lora.md)")
    if len(same) + 1 >= WARN_AT and report._graph_key not in _WARNED:
        _WARNED.add(report._graph_key)
        log.warning("fastlora: graph %d: %s", report.index, text)
    return text


def forget() -> None:
    _WARNED.clear()
