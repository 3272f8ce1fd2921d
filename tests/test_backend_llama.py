"""The spine end to end on a tiny Llama + LoRA: matches, report, options, exact gradients."""
import json

import pytest
import torch

import fastlora
from helpers import checkpointed, compare_compiled, compare_low_precision, tiny_llama, with_lora
from helpers import token_batch


def _inputs():
    return token_batch()


def test_llama_fp32_rms_norm_matched_and_exact():
    model = with_lora(tiny_llama(layers=2))
    loss_err, grad_errs, grads = compare_compiled(model, _inputs())
    report = fastlora.last_report()
    assert report.counts()["rms_norm"] == 2 * 2 + 1  # input + post-attention per layer, final
    assert loss_err < 1e-6
    assert len(grads) == 2 * 7 * 2  # lora_A and lora_B on 7 linears in 2 layers
    assert max(grad_errs.values()) < 1e-5, grad_errs


def test_report_contents_and_api():
    model = with_lora(tiny_llama(layers=1))
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    compiled(**_inputs()).loss.backward()
    report = fastlora.last_report()
    data = json.loads(json.dumps(report.to_dict()))  # plain data
    first = next(m for m in data["matches"] if m["pattern"] == "rms_norm")
    assert first["pattern"] == "rms_norm" and first["class"] == "LlamaRMSNorm"
    assert first["module"].endswith("layers.0.input_layernorm")
    assert "modeling_llama.py:" in first["source"]
    assert first["params"]["eps"] == pytest.approx(1e-6)
    text = str(report)
    assert "rms_norm x3" in text and "LlamaRMSNorm" in text
    assert fastlora.reports(compiled).counts()["rms_norm"] == 3
    assert fastlora.reports(torch.nn.Linear(2, 2)).counts() == {}


def test_the_rewrite_is_timed_among_dynamos_compile_phases():
    """torch._dynamo.utils.compile_times() (and tlparse) list fastlora's rewrite beside Dynamo's,
    AOTAutograd's and inductor's phases: one more entry per graph the backend receives."""
    from torch._dynamo.utils import compilation_time_metrics
    before = len(compilation_time_metrics.get("fastlora_rewrite", []))
    model = with_lora(tiny_llama(layers=1))
    compiled = torch.compile(model, backend="fastlora", options={"compiler": "aot_eager"})
    compiled(**_inputs()).loss.backward()
    timed = compilation_time_metrics.get("fastlora_rewrite", [])[before:]
    assert len(timed) == 1 and timed[0] > 0
    assert "fastlora_rewrite" in torch._dynamo.utils.compile_times(repr="str")


def test_disable_option_and_print(capsys):
    model = with_lora(tiny_llama(layers=1))
    compiled = torch.compile(model, backend="fastlora",
                             options={"compiler": "aot_eager", "disable": ["rms_norm"],
                                      "print_report": True})
    compiled(**_inputs())
    assert "rms_norm" not in fastlora.last_report().counts()
    assert "fastlora rewrite report" in capsys.readouterr().out


@pytest.mark.parametrize("bad,err", [({"nope": 1}, "unknown fastlora option"),
                                     ({"disable": ["rms_nrom"]}, "unknown pattern"),
                                     ({"compiler": "tvm"}, "must be one of"),
                                     ({"mode": "fast"}, "must be one of")])
def test_bad_options_are_clear(bad, err):
    compiled = torch.compile(with_lora(tiny_llama(layers=1)), backend="fastlora", options=bad)
    with pytest.raises(Exception, match=err):
        compiled(**_inputs())


def test_mode_option_reaches_inductor(monkeypatch):
    """options={"mode": ...} stands in for torch.compile's mode=, which it refuses beside
    options=: the rewritten graph goes to inductor with that mode's config patches."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, **kw: (
        seen.append(kw.get("config_patches")), real(gm, inputs, **kw))[1])
    compiled = torch.compile(torch.nn.Linear(3, 2), backend="fastlora",
                             options={"mode": "max-autotune-no-cudagraphs"})
    compiled(torch.randn(4, 3))
    assert seen[0] == torch._inductor.list_mode_options("max-autotune-no-cudagraphs")


def test_llama_bf16_no_worse_than_eager_bf16():
    err_eager, err_compiled = compare_low_precision(with_lora(tiny_llama(layers=2)), _inputs())
    assert fastlora.last_report().counts()["rms_norm"] == 5
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


@pytest.mark.slow
def test_llama_through_inductor():
    model = with_lora(tiny_llama(layers=1))
    loss_err, grad_errs, _ = compare_compiled(model, _inputs(), {"compiler": "inductor"})
    assert fastlora.last_report().counts()["rms_norm"] == 3
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_gradient_checkpointing_subgraphs_are_rewritten():
    model = with_lora(tiny_llama(layers=2))
    inputs = checkpointed(model, _inputs())
    fastlora.clear_reports()
    loss_err, grad_errs, _ = compare_compiled(model, inputs)
    assert fastlora.reports().counts()["rms_norm"] == 5  # 4 inside checkpointed layers
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_backend_name_resolves_without_import_and_after_import():
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
            "out = torch.compile(m, backend='fastlora', options={'compiler': 'eager'})(torch.randn(2, 4))\n"
            "assert 'fastlora' in sys.modules, 'the entry point did not load fastlora'\n"
            "import fastlora\n"
            "torch._dynamo.reset()\n"
            "torch.compile(m, backend='fastlora', options={'compiler': 'eager'})(torch.randn(2, 4))\n"
            "print('ok', len(fastlora.reports()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok 2"


def test_autocast_bf16_no_worse_than_eager_autocast():
    """Under torch.autocast the fused ops may compute more precisely than eager's bf16 matmuls,
    so both are measured against the float32 model without autocast."""
    import copy
    from helpers import lora_grads, rel_err, run_step
    model = with_lora(tiny_llama(layers=2))
    twin, ref = copy.deepcopy(model), copy.deepcopy(model)
    inputs = _inputs()
    loss32, grads32 = run_step(ref, inputs)

    def step(module, params):
        params.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(**inputs).loss
        loss.backward()
        return loss.detach(), lora_grads(params)

    loss_e, grads_e = step(model, model)
    compiled = torch.compile(twin, backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    loss_c, grads_c = step(compiled, twin)
    assert fastlora.last_report().counts()["rms_norm"] == 5
    err_e = max([rel_err(loss_e, loss32)] + [rel_err(grads_e[n], g) for n, g in grads32.items()])
    err_c = max([rel_err(loss_c, loss32)] + [rel_err(grads_c[n], g) for n, g in grads32.items()])
    assert err_c <= 1.25 * err_e + 1e-3, (err_e, err_c)


def test_graph_copy_keeps_module_meta():
    """The rewritten copy keeps each (nested) graph module's meta, e.g. the
    ``_checkpoint_context_fn`` of a selectively checkpointed body."""
    from torch import fx

    from fastlora.backend import _copy

    class Body(torch.nn.Module):
        def forward(self, x):
            return x + 1

    outer = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    body = fx.symbolic_trace(Body())
    body.meta["_checkpoint_context_fn"] = policy = object()
    outer.add_submodule("body", body)
    outer.meta["tag"] = "outer"
    copied = _copy(outer)
    assert copied.meta["tag"] == "outer" and copied.body.meta["_checkpoint_context_fn"] is policy
    assert copied.body is not body


def test_graph_copy_keeps_dynamos_backend_id():
    """Dynamo names each graph's compiled code (``gm._backend_id``); AOTAutograd records the
    compiled graph under that name for Dynamo's precompile (``torch._dynamo.config.
    caching_precompile``), which finds nothing to save ("Backend not found") when the rewritten
    copy drops it."""
    from torch import fx

    from fastlora.backend import _copy

    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    gm._backend_id = "__compiled_fn_3"
    assert _copy(gm)._backend_id == "__compiled_fn_3"
    plain = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    assert not hasattr(_copy(plain), "_backend_id")


def test_graphs_with_user_triton_kernels_get_tritons_float_typing(monkeypatch):
    """A graph that launches a user Triton kernel (TRL's chunked log-prob, captured inside its
    autograd.Function) goes to inductor with float arguments typed float32, as Triton launches
    them; inductor's float64 typing made TRL's kernel fail to compile on the GPU. Other graphs
    keep inductor's defaults. (CPU: the kernel cannot be captured here, so the graph is built
    by hand and not run.)"""
    import torch._inductor.compile_fx as cfx
    from torch import fx

    from fastlora import backend

    def graph(launch: bool, nested: bool) -> fx.GraphModule:
        inner = fx.Graph()
        x = inner.placeholder("x")
        if launch:
            inner.call_function(torch.ops.higher_order.triton_kernel_wrapper_mutation, (),
                                {"kernel_idx": 0, "constant_args_idx": 0, "grid": [(1, 1, 1)],
                                 "tma_descriptor_metadata": {}, "kwargs": {"X": x}})
        inner.output(x)
        if not nested:
            return fx.GraphModule(torch.nn.Module(), inner)
        root = torch.nn.Module()
        root.body = fx.GraphModule(torch.nn.Module(), inner)
        outer = fx.Graph()
        y = outer.placeholder("y")
        body = outer.get_attr("body")
        outer.output(outer.call_function(torch.ops.higher_order.invoke_subgraph,
                                         (body, "body", y)))
        return fx.GraphModule(root, outer)

    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, **kw: (
        seen.append(kw.get("config_patches")), gm.forward)[1])
    for launch, nested in ((True, False), (True, True), (False, False), (False, True)):
        gm = graph(launch, nested)
        assert backend.has_user_triton_kernels(gm) == launch
        backend._inner_compile(gm, [], "inductor", None)
    assert backend.USER_TRITON_KERNEL_PATCHES == {"_use_fp64_for_unbacked_floats": False}
    # a graph with a shared body (invoke_subgraph) also compiles without inductor's buffer reuse
    shared = backend.SHARED_BODY_PATCHES
    assert seen == [backend.USER_TRITON_KERNEL_PATCHES,
                    {**backend.USER_TRITON_KERNEL_PATCHES, **shared}, None, shared]
