"""The backend's options: a bad one is one clear line (OptionsError), from compile_for_trainer
at once and from torch.compile at the first call; compiler="auto" picks inductor for GPU graphs
and aot_eager on the CPU."""
import types

import pytest
import torch

import fastlora
from fastlora.options import Options, backend_options


def test_compile_for_trainer_checks_pattern_names():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(fastlora.OptionsError, match="did you mean 'rms_norm'"):
        fastlora.compile_for_trainer(model, disable=["rms_nrom"])
    assert getattr(model, "_compiled_call_impl", None) is None  # refused before compiling


@pytest.mark.parametrize("options,phrase", [
    ({"compiler": "inductr"}, "options['compiler'] must be one of"),
    ({"disable": ["rms_nrom"]}, "did you mean 'rms_norm'?"),
    ({"disable": [3]}, "must be a pattern name or a list of pattern names"),
    ({"print_report": "yes"}, "options['print_report'] must be True or False"),
    ({"nope": 1}, "unknown fastlora option(s) ['nope']"),
])
def test_bad_backend_option_is_one_line_at_the_first_call(options, phrase):
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="fastlora", options=options)
    with pytest.raises(fastlora.OptionsError) as e:
        compiled(torch.randn(1, 2))
    first = str(e.value).splitlines()[0]
    assert phrase in first and "BackendCompilerFailed" not in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)



def test_auto_compiler_is_inductor_on_a_gpu_and_aot_eager_on_the_cpu():
    assert Options.parse({}).compiler == "auto"
    names = {"rms_norm"}
    cpu, gpu = torch.zeros(1), types.SimpleNamespace(device=torch.device("cuda", 0))
    assert backend_options(None, names, [cpu, 3]).compiler == "aot_eager"
    assert backend_options(None, names, [cpu, gpu]).compiler == "inductor"
    assert backend_options(None, names, [cpu], mode="max-autotune").compiler == "inductor"
    assert backend_options({"mode": "reduce-overhead"}, names, [cpu]).compiler == "inductor"
    assert backend_options({"offload_activations": 8}, names, [cpu]).compiler == "inductor"
    assert backend_options({"compiler": "eager"}, names, [gpu]).compiler == "eager"
    with pytest.raises(fastlora.OptionsError, match="needs compiler='inductor'"):
        Options.parse({"offload_activations": 8, "compiler": "aot_eager"})


def test_report_says_whether_cuda_graphs_are_on():
    """Issue 17: the report says when CUDA graphs are off and why (a graph on a GPU that
    inductor compiles); nothing on the CPU or under aot_eager, where there are none."""
    from fastlora.backend import cuda_graphs_note

    cpu, gpu = torch.zeros(1), types.SimpleNamespace(device=torch.device("cuda", 0))
    off = cuda_graphs_note([cpu, gpu, 3], "inductor", None)
    assert off.startswith("CUDA graphs off") and "'reduce-overhead'" in off, off
    assert cuda_graphs_note([gpu], "inductor", "max-autotune").startswith("CUDA graphs off")
    on = cuda_graphs_note([gpu], "inductor", "reduce-overhead")
    assert on.startswith("CUDA graphs on") and "cudagraph_mark_step_begin" in on, on
    assert cuda_graphs_note([cpu, 3], "inductor", "reduce-overhead") is None
    assert cuda_graphs_note([gpu], "aot_eager", None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("mode,says", [(None, "CUDA graphs off"),
                                       ("reduce-overhead", "CUDA graphs on")])
def test_report_of_a_graph_on_the_gpu_says_whether_cuda_graphs_are_on(mode, says):
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 8).cuda()
    options = {"mode": mode} if mode else None
    torch.compile(model, backend="fastlora", options=options)(torch.randn(2, 8, device="cuda"))
    notes = fastlora.last_report().notes
    assert [n for n in notes if n.startswith("CUDA graphs")] == [
        n for n in notes if n.startswith(says)] and any(n.startswith(says) for n in notes), notes


def test_report_records_the_compiler_used():
    torch.compile(torch.nn.Linear(2, 2), backend="fastlora")(torch.randn(1, 2))
    assert fastlora.last_report().options["compiler"] == "aot_eager"
