"""A script (tests/test_block_buffers.py starts it in a process of its own): whether
torch.compile traces lora_mlp_block_backward into its Triton kernels (the inductor launch route)
or leaves the op opaque, with every size static or every size dynamic, on a pretend GPU.

    python tests/block_backward_route.py --dynamic

With every size dynamic a width can be a difference of sizes (s1 - s0): PyTorch gives such a
contiguous tensor the row stride Max(1, s1 - s0), which kernels/_launch.dense has to accept
(the GPU run of 2026-12-06 found the op opaque there). Nothing is launched: AOTAutograd's
graph is captured.

    python tests/block_backward_route.py --bases made [--read-after]

``--bases made``: base gate and base up are made inside the compiled function (matmuls, as a
checkpointed layer recomputes them), ``--read-after`` also returns base gate. Then
fastlora/reuse_dead_inputs.py runs on the graph, as the backend has inductor run it, and
``dg_over_bg`` says whether the GLU backward kernel writes d gate over base gate.

Prints one JSON line: {"route": "kernels" | "opaque", "kernels": [...], "dg_over_bg": bool}.
"""
from __future__ import annotations

import argparse
import json

import torch

import fastlora  # noqa: F401  (registers torch.ops.fastlora)
from block_buffer_graph import _is_user_kernel, _kernel_name
from helpers import mlp_block_case
from pretend_gpu import NOT_COMPILED, pretend_gpu, step_until_captured


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dynamic", action="store_true")
    parser.add_argument("--bases", choices=["inputs", "made"], default="inputs")
    parser.add_argument("--read-after", action="store_true")
    args = parser.parse_args()
    m, k, f, r, dtype = 64, 32, 64, 8, torch.bfloat16  # m == f: one symbol for both when dynamic
    torch.manual_seed(0)
    case = mlp_block_case(m, k, f, r, dtype, device="cpu")  # the reference forward, before
    pretend_gpu()
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
        return grads + ((bg,) if args.read_after else ())
    dy = (torch.randn(m, k) * 0.05).to(dtype)
    if args.bases == "made":
        fn, inputs = made_bases, (dy, case.x, case.xa, case.xa_d)
    else:
        fn, inputs = case.backward, (dy, case.x, case.bg, case.bu, case.xa, case.xa_d)
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), dynamic=args.dynamic)
    step_until_captured(lambda: compiled(*inputs))
    (graph,) = graphs
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    opaque = any("lora_mlp_block_backward" in str(n.target) for n in nodes)
    kernels = sorted({_kernel_name(n) for n in nodes if _is_user_kernel(n)})
    ReuseDeadInputs()(graph.graph)
    glu = [n for n in nodes if _is_user_kernel(n) and _kernel_name(n) == "_lora_glu_bwd_kernel"]
    dg_over_bg = bool(glu) and glu[0].kwargs["kwargs"]["DG"] is glu[0].kwargs["kwargs"]["BG"]
    print(json.dumps({"route": "opaque" if opaque else "kernels", "kernels": kernels,
                      "dg_over_bg": dg_over_bg}))


if __name__ == "__main__":
    main()
