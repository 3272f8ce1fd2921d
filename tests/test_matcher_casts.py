"""The matcher's dtype casts and the canonical slice, on small graphs with a user pattern.

A spelling's cast matches a cast in the graph, or nothing (the value already has the dtype the
spelling casts to). A graph cast read by more nodes than the spelling's cast is read by would
escape any region that took it in, so it is taken as the pattern's input (Gemma's RMSNorm casting
its output to bf16 once for q, k, v and their adapters). Every cast is verified, also one under
other operations of the spelling.
"""
import operator

import torch
from torch import fx, nn

import fastlora
from fastlora.canonicalize import canonicalize
from helpers import rel_err

NAME = "sin_of_float_times_two"


def spelling(x: torch.Tensor):
    return torch.sin(x.float()) * 2


@torch.library.custom_op("fastlora_test::sin_of_float_times_two", mutates_args=())
def sin_of_float_times_two(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x.float()) * 2


@sin_of_float_times_two.register_fake
def _(x):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def replacement(x):
    return torch.ops.fastlora_test.sin_of_float_times_two(x)


def _compile(model, x):
    """Compile ``model`` with only the test pattern on; returns (output, report)."""
    builtins = [p.name for p in fastlora.registered_patterns() if p.builtin]
    fastlora.register_pattern(name=NAME, spellings=[spelling],
                              replacement=replacement,
                              anchor=torch.sin, replace=True)
    try:
        compiled = torch.compile(model, backend="fastlora",
                                 options={"compiler": "aot_eager", "strict": True,
                                          "disable": builtins})
        return compiled(x), fastlora.last_report()
    finally:
        fastlora.unregister_pattern(NAME)


class SharedCast(nn.Module):
    def forward(self, x):
        c = x.float()  # read by the pattern's sin and by cos outside it
        return torch.sin(c) * 2, torch.cos(c)


class OwnCast(nn.Module):
    def forward(self, x):
        return torch.sin(x.float()) * 2


class NoCast(nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2  # in bf16: not the spelling's float32 sin


def test_shared_cast_is_the_input_and_stays_in_the_graph():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    (out, other), report = _compile(SharedCast(), x)
    assert report.counts() == {NAME: 1} and report.near_misses == []
    assert rel_err(out, torch.sin(x.float()) * 2) < 1e-7
    assert rel_err(other, torch.cos(x.float())) < 1e-7


def test_own_cast_is_taken_into_the_region():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    out, report = _compile(OwnCast(), x)
    assert report.counts() == {NAME: 1}
    assert rel_err(out, torch.sin(x.float()) * 2) < 1e-7


def test_missing_cast_under_another_op_is_refused():
    """bf16 sin is not float32 sin: the cast inside sin(...) is checked, not only the output's
    (a trial's casts used to be dropped when the trial was adopted)."""
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    out, report = _compile(NoCast(), x)
    assert report.counts() == {}
    [miss] = report.near_misses
    assert "casts to torch.float32 where the graph has torch.bfloat16" in miss["reason"]
    assert torch.equal(out, torch.sin(x) * 2)


def test_fp32_graph_without_casts_matches():
    x = torch.randn(4, 6)
    out, report = _compile(NoCast(), x)
    assert report.counts() == {NAME: 1}
    assert rel_err(out, torch.sin(x) * 2) < 1e-7


def test_slices_starting_at_zero_are_canonical():
    def f(x):
        return x[..., 0::2] + x[..., 1::2] + x[0:2:1, :3]
    graph = canonicalize(fx.symbolic_trace(f).graph)
    indices = [n.args[1] for n in graph.nodes if n.target is operator.getitem]
    assert indices == [(Ellipsis, slice(None, None, 2)), (Ellipsis, slice(1, None, 2)),
                       (slice(None, 2, None), slice(None, 3, None))]

    def backwards(x):
        return x[0::-1]  # start 0 going backwards is not the default start
    graph = canonicalize(fx.symbolic_trace(backwards).graph)
    [index] = [n.args[1] for n in graph.nodes if n.target is operator.getitem]
    assert index == slice(0, None, -1)
