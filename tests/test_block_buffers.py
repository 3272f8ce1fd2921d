"""How many [M, F] buffers (M tokens, F the MLP's width) the backward of fused MLP blocks holds
at once on the inductor launch route, read from the graph AOTAutograd and inductor's
reinplacing make of it (tests/block_buffer_graph.py, a pretend GPU: no kernel runs).

A checkpointed layer's backward recomputes its forward. AOTAutograd's partitioner places each
recomputed value just before its first use, so where the block's backward first reads the saved
xa_down decides when the forward's own h exists: read after this backward's h and dh were made,
five [M, F] buffers were alive at once (base gate, base up, both h's, dh: the 8B row's peak,
benchmarks/RESULTS.md, twenty-eighth run); read first, four (16.30 -> 16.08 GiB on that row,
twenty-ninth run). Then dA_down was moved before dh (h and dh never alive together) and
fastlora/reuse_dead_inputs.py writes d gate over the recomputed base gate, dead after the GLU
backward: three (base gate, base up, dh). Without checkpointing the base outputs are saved
inputs of the graph (not counted, and not written over): the backward makes two, dh and d gate.
"""
import pytest

from pretend_gpu import run_script


@pytest.mark.parametrize("args,most", [(["--layers", "2"], 3), (["--layers", "3"], 3),
                                       (["--layers", "2", "--no-reuse"], 4),
                                       (["--layers", "2", "--no-checkpoint"], 2),
                                       (["--layers", "2", "--grad-a"], 3),
                                       (["--layers", "2", "--no-checkpoint", "--grad-a"], 2)])
def test_mlp_block_backward_buffers(args, most):
    facts = run_script("block_buffer_graph.py", *args)
    # the op bodies were traced into their kernels (else there is nothing to count)
    kernels = set(facts["kernels"])
    assert {"_lora_glu_bwd_kernel", "_lora_grad_b_kernel"} <= kernels, facts
    # with --grad-a dA_down makes h in registers (kernels/_glu_grad_a.py): the forward's GLU
    # kernel runs in the backward graph only where the checkpointed forward is recomputed
    grad_a = "--grad-a" in args
    assert ("_glu_grad_a_kernel" in kernels) == grad_a, facts
    recomputed_forward = "--no-checkpoint" not in args
    assert ("_lora_glu_fwd_kernel" in kernels) == (recomputed_forward or not grad_a), facts
    assert facts["peak"] == most, facts


def test_fake_metadata_traces_the_same_backward():
    """FASTLORA_FAKE_METADATA=1 (kernels/_launch.py): AOTAutograd's metadata pass takes the ops'
    fakes instead of tracing their bodies; the joint trace still traces them into their
    kernels, and the backward graph holds the same buffers."""
    facts = run_script("block_buffer_graph.py", "--layers", "2",
                       env={"FASTLORA_FAKE_METADATA": "1"})
    assert {"_lora_glu_fwd_kernel", "_lora_glu_bwd_kernel", "_lora_grad_b_kernel"} <= set(
        facts["kernels"]), facts
    assert facts["peak"] == 3, facts
    traced_twice = run_script("block_buffer_graph.py", "--layers", "2")
    assert facts["analyses"] < traced_twice["analyses"], (facts, traced_twice)


@pytest.fixture(scope="module")
def routes():
    return run_script("block_backward_route.py")  # five variants, one process


@pytest.mark.parametrize("variant", ["inputs", "made"])
def test_mlp_block_backward_is_traced_into_its_kernels(routes, variant):
    facts = routes[variant]
    assert facts["route"] == "kernels", facts
    assert {"_lora_glu_bwd_kernel", "_lora_grad_b_kernel", "_lora_grad_x_kernel"} <= set(
        facts["kernels"]), facts


@pytest.mark.parametrize("variant", ["inputs-dynamic", "made-dynamic"])
def test_mlp_block_backward_with_every_size_dynamic_stays_opaque(routes, variant):
    """With every size dynamic (torch.compile(dynamic=True)) the op's widths include a
    difference of sizes (s1 - s0), which the shape environment cannot prove >= 1. Traced into
    its kernels, that graph made inductor's tiling analysis fail on the H100 (torch 2.11,
    kernels/_launch.py, UNPROVEN_SIZE), so the op stays opaque there: its Python launcher
    runs, and no kernel of it is in the graph."""
    facts = routes[variant]
    assert facts["route"] == "opaque", facts
    assert not {"_lora_glu_bwd_kernel", "_lora_grad_b_kernel"} & set(facts["kernels"]), facts


@pytest.mark.parametrize("variant,over", [("inputs", False), ("inputs-dynamic", False),
                                          ("made", True), ("made-dynamic", False),
                                          ("made-read-after", False)])
def test_d_gate_goes_over_base_gate_only_where_base_gate_is_dead(routes, variant, over):
    """reuse_dead_inputs.py: not over a graph input (a tensor saved by the forward), not over a
    value read after the kernel; over a base gate made in the graph and read by nothing after
    (with every size dynamic the op stays opaque: no kernel to write over it)."""
    assert routes[variant]["dg_over_bg"] is over, routes[variant]
