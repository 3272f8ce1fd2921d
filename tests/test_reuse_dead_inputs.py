"""fastlora/reuse_dead_inputs.py as inductor calls it: a pass already set runs after it, the cache
key follows both, and a graph it cannot read is left as it is with a warning. (What it moves is
tested on real graphs: tests/test_block_buffers.py.)"""
import torch
from torch import fx
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

import fastlora  # noqa: F401  (the kernels and their declarations)
from fastlora.reuse_dead_inputs import ReuseDeadInputs


class _Recorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(graph)

    def uuid(self):
        return "recorder-1"


def _graph_with_an_unknown_kernel() -> fx.Graph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(triton_kernel_wrapper_functional, kwargs={
        "kernel_idx": 10 ** 9, "constant_args_idx": 0, "grid": [(1, 1, 1)],
        "tma_descriptor_metadata": {}, "kwargs": {"X": x}, "tensors_to_clone": ["X"]})
    graph.output(node)
    return graph


def test_an_unreadable_graph_is_left_alone_and_the_next_pass_runs(warnings_logged):
    recorder = _Recorder()
    graph = _graph_with_an_unknown_kernel()
    before = str(graph)
    ReuseDeadInputs(then=recorder)(graph)
    assert str(graph) == before
    assert recorder.graphs == [graph]
    assert any("reuse_dead_inputs stopped" in line for line in warnings_logged), warnings_logged


def test_cache_key_names_both_passes():
    alone, chained = ReuseDeadInputs().uuid(), ReuseDeadInputs(then=_Recorder()).uuid()
    assert alone.startswith("fastlora-reuse-dead-inputs-") and chained == alone + "+recorder-1"
    assert ReuseDeadInputs(then=lambda graph: None).uuid() is None  # inductor caches nothing
