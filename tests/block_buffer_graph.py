"""A script (tests/test_block_buffers.py starts it in a process of its own): the backward graph
of stacked fused MLP blocks as the inductor launch route makes it, on a machine without a GPU,
and the most [M, F] buffers that graph holds at once.

    python tests/block_buffer_graph.py --layers 2 [--no-checkpoint]

The inductor route traces an op's body into its Triton kernel calls only for CUDA tensors
(kernels/_launch.py); tests/pretend_gpu.py stands in for a GPU. Nothing is launched: Dynamo
and AOTAutograd trace and partition, the two graphs
are captured, inductor's reinplacing pass is applied to the backward as inductor applies it,
and the backward's buffers are followed node by node in its order (the order inductor keeps
for extern and user-kernel calls). Its inputs (saved activations, weights) are not counted.

Prints one JSON line: {"peak": n, "alive_at_peak": [...], "kernels": [...], "analyses": n}
(analyses: how many times PyTorch asked what a traced kernel call reads and writes, answered
or served from kernels/_access_cache.py: one question per traced call and phase).
"""
from __future__ import annotations

import argparse
import json
import operator

import torch

from pretend_gpu import pretend_gpu


def capture_graphs(layers: int, checkpoint: bool, m: int, k: int, f: int, r: int):
    """(forward, backward) GraphModules of `layers` residual rms_norm_lora_mlp_blocks."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = gm
            return gm
        return compiler
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    torch._functorch.config.force_non_lazy_backward_lowering = True  # backward traced now
    dt = torch.bfloat16

    def param(*shape, dtype=torch.float32, grad=False):
        return (torch.randn(*shape) * 0.1).to(dtype).requires_grad_(grad)
    blocks = [(param(k, dtype=dt), param(f, k, dtype=dt), param(f, k, dtype=dt),
               param(k, f, dtype=dt)) + tuple(param(*s, grad=True) for s in
                                             [(r, k), (f, r), (r, k), (f, r), (r, f), (k, r)])
              for _ in range(layers)]

    def block(x, nw, gw, uw, dw, ga, gb, ua, ub, da, db):
        return torch.ops.fastlora.rms_norm_lora_mlp_block(
            x, nw, 1e-6, 0.0, False, gw, None, ga, gb, uw, None, ua, ub, None, 0.5, 0.7, 0.0,
            "silu", dt, dw, None, da, db, None, 1.5, 0.0, dt)[0]

    def model(x):
        for params in blocks:
            y = (torch.utils.checkpoint.checkpoint(block, x, *params, use_reentrant=False)
                 if checkpoint else block(x, *params))
            x = x + y
        return x
    x = param(m, k, dtype=dt, grad=True)
    try:  # compiles both graphs, then fails at the first kernel launch: no GPU
        torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    except Exception:  # noqa: BLE001 - only the graphs are wanted
        pass
    return graphs["forward"], graphs["backward"]


def _is_user_kernel(node) -> bool:
    return node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)


def _kernel_name(node) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


VIEWS = {"view", "_unsafe_view", "reshape", "detach", "alias", "t", "permute", "expand",
         "slice", "select", "squeeze", "unsqueeze", "as_strided", "split_with_sizes"}


def storage_owners(graph) -> dict:
    """node -> the node whose buffer it is (views and reinplaced kernel outputs share one)."""
    owner = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and _is_user_kernel(
                n.args[0]):
            kernel, key = n.args[0], n.args[1]
            cloned = key in kernel.kwargs["tensors_to_clone"]
            owner[n] = n if cloned else owner[kernel.kwargs["kwargs"][key]]
        elif n.op == "call_function" and (
                n.target is operator.getitem
                or getattr(n.target, "__name__", "").split(".")[0] in VIEWS):
            owner[n] = owner.get(n.args[0], n.args[0])
        else:
            owner[n] = n
    return owner


def peak_buffers(graph, numel: int):
    """(most buffers of `numel` elements alive at once, their names there), in node order."""
    owner, order = storage_owners(graph), {n: i for i, n in enumerate(graph.nodes)}
    last_use = {}
    for n in graph.nodes:
        used = list(n.all_input_nodes)
        if _is_user_kernel(n):
            used += [v for v in n.kwargs["kwargs"].values() if isinstance(v, torch.fx.Node)]
        for u in used:
            last_use[owner[u]] = max(last_use.get(owner[u], -1), order[n])

    def counted(n):
        value = n.meta.get("val")
        return n.op != "placeholder" and isinstance(value, torch.Tensor) and \
            value.numel() == numel
    alive, peak, at_peak = set(), 0, []
    for n in graph.nodes:
        if owner[n] is n and counted(n):
            alive.add(n)
        if len(alive) > peak:
            peak, at_peak = len(alive), sorted(a.name for a in alive)
        alive = {a for a in alive if last_use.get(a, order[a]) > order[n]}
    return peak, at_peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument("--no-reuse", action="store_true", help="without reuse_dead_inputs.py")
    parser.add_argument("--grad-a", action="store_true",
                        help="dA_down with h made in registers (kernels/_glu_grad_a.py)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pretend_gpu()
    import fastlora  # noqa: F401  (the ops)
    from fastlora.kernels import tuning
    tuning.set("lora_glu_grad_a", on=args.grad_a)
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    from fastlora.reuse_dead_inputs import ReuseDeadInputs

    m, k, f, r = 64, 32, 96, 4
    _, backward = capture_graphs(args.layers, not args.no_checkpoint, m, k, f, r)
    if not args.no_reuse:  # as fastlora's backend has inductor run it, before reinplacing
        ReuseDeadInputs()(backward.graph)
    reinplace_inplaceable_ops_core(backward.graph)
    peak, at_peak = peak_buffers(backward.graph, m * f)
    kernels = sorted({_kernel_name(n) for n in backward.graph.nodes if _is_user_kernel(n)})
    from fastlora.kernels import _access_cache
    print(json.dumps({"peak": peak, "alive_at_peak": at_peak, "kernels": kernels,
                      "analyses": sum(_access_cache.stats.values())}))


if __name__ == "__main__":
    main()
