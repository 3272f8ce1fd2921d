"""A script (tests/test_block_buffers.py starts it in a process of its own): whether
torch.compile traces lora_mlp_block_backward into its Triton kernels (the inductor launch route)
or leaves the op opaque, with every size static or every size dynamic, on a pretend GPU.

    python tests/block_backward_route.py --dynamic

With every size dynamic a width can be a difference of sizes (s1 - s0): PyTorch gives such a
contiguous tensor the row stride Max(1, s1 - s0), which kernels/_launch.dense has to accept
(the GPU run of 2026-12-06 found the op opaque there). Nothing is launched: AOTAutograd's
graph is captured. Prints one JSON line: {"route": "kernels" | "opaque", "kernels": [...]}.
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
    args = parser.parse_args()
    m, k, f, r, dtype = 64, 32, 64, 8, torch.bfloat16  # m == f: one symbol for both when dynamic
    torch.manual_seed(0)
    case = mlp_block_case(m, k, f, r, dtype, device="cpu")  # the reference forward, before
    pretend_gpu()
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)

        def not_run(*_):
            raise RuntimeError(NOT_COMPILED)
        return not_run
    compiled = torch.compile(case.backward, backend=aot_autograd(fw_compiler=capture),
                             dynamic=args.dynamic)
    dy = (torch.randn(m, k) * 0.05).to(dtype)
    step_until_captured(lambda: compiled(dy, case.x, case.bg, case.bu, case.xa, case.xa_d))
    (graph,) = graphs
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    opaque = any("lora_mlp_block_backward" in str(n.target) for n in nodes)
    kernels = sorted({_kernel_name(n) for n in nodes if _is_user_kernel(n)})
    print(json.dumps({"route": "opaque" if opaque else "kernels", "kernels": kernels}))


if __name__ == "__main__":
    main()
