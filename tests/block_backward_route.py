"""A script (tests/test_block_buffers.py starts it in a process of its own): what torch.compile
makes of lora_mlp_block_backward on a pretend GPU, in five variants, one process.

    python tests/block_backward_route.py

For each variant: whether the op is traced into its Triton kernels (the inductor launch route)
or left opaque, and whether fastlora/reuse_dead_inputs.py, run on the graph as the backend has
inductor run it, makes the GLU backward kernel write d gate over base gate. Variants:

- ``inputs`` / ``inputs-dynamic``: base gate and base up are inputs of the compiled function
  (as a tensor saved by the forward reaches the backward), every size static / dynamic. With
  every size dynamic a width is a difference of sizes (s1 - s0), which the shape environment
  cannot prove >= 1: traced into its kernels, such a graph failed inside inductor's tiling
  analysis on the H100 (torch 2.11, 2026-12-07), so the op stays opaque there
  (kernels/_launch.py, UNPROVEN_SIZE).
- ``made`` / ``made-dynamic``: base gate and base up are made inside it (x @ W^T, as a
  checkpointed layer recomputes them) and read by nothing after the op.
- ``made-read-after``: made inside, and base gate is also returned.

Nothing is launched: AOTAutograd's graph is captured. Prints one JSON line:
{variant: {"route": "kernels" | "opaque", "kernels": [...], "dg_over_bg": bool}}.
"""
from __future__ import annotations

import json

import torch

import fastlora  # noqa: F401  (registers torch.ops.fastlora)
from block_buffer_graph import _is_user_kernel, _kernel_name
from helpers import mlp_block_case
from pretend_gpu import NOT_COMPILED, pretend_gpu, step_until_captured

VARIANTS = {"inputs": ("inputs", False, False), "inputs-dynamic": ("inputs", True, False),
            "made": ("made", False, False), "made-dynamic": ("made", True, False),
            "made-read-after": ("made", False, True)}


def facts(case, dy, bases: str, dynamic: bool, read_after: bool) -> dict:
    from torch._dynamo.backends.common import aot_autograd

    from fastlora.reuse_dead_inputs import ReuseDeadInputs

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)

        def not_run(*_):
            raise RuntimeError(NOT_COMPILED)
        return not_run

    def made_bases(dy, x, xa, xa_d):  # base gate and base up made here, x @ W^T
        bg, bu = x @ case.gw.T, x @ case.uw.T
        grads = case.backward(dy, x, bg, bu, xa, xa_d)
        return grads + ((bg,) if read_after else ())
    if bases == "made":
        fn, inputs = made_bases, (dy, case.x, case.xa, case.xa_d)
    else:
        fn, inputs = case.backward, (dy, case.x, case.bg, case.bu, case.xa, case.xa_d)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), dynamic=dynamic)
    step_until_captured(lambda: compiled(*inputs))
    (graph,) = graphs
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    opaque = any("lora_mlp_block_backward" in str(n.target) for n in nodes)
    kernels = sorted({_kernel_name(n) for n in nodes if _is_user_kernel(n)})
    ReuseDeadInputs()(graph.graph)
    glu = [n for n in nodes if _is_user_kernel(n) and _kernel_name(n) == "_lora_glu_bwd_kernel"]
    over = bool(glu) and glu[0].kwargs["kwargs"]["DG"] is glu[0].kwargs["kwargs"]["BG"]
    return {"route": "opaque" if opaque else "kernels", "kernels": kernels, "dg_over_bg": over}


def main():
    m, k, f, r, dtype = 64, 32, 64, 8, torch.bfloat16  # m == f: one symbol for both when dynamic
    torch.manual_seed(0)
    case = mlp_block_case(m, k, f, r, dtype, device="cpu")  # the reference forward, before
    pretend_gpu()
    dy = (torch.randn(m, k) * 0.05).to(dtype)
    print(json.dumps({name: facts(case, dy, *v) for name, v in VARIANTS.items()}))


if __name__ == "__main__":
    main()
