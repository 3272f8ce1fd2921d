"""options["offload_activations"] (on by default under gradient checkpointing) and
options["memory_budget"].

On the CPU the copies are CPU-to-CPU and there are no streams, so these tests check what can be
seen without a GPU: which tensors are offloaded (report.offloaded), where the copies and their
waits sit in inductor's generated code (copy issued right after the tensor is made, wait after
its last use; reloads issued one ahead of their waits), exactness against eager, and the
options. The overlap itself and what it saves are measured on a GPU by
benchmarks/train_step.py."""
import json
import re

import pytest
import torch
from torch import fx

import fastlora
from fastlora import offload
from fastlora.offload import offload_mode
from helpers import checkpointed, compare_compiled, tiny_llama, token_batch, with_lora


def _inputs():
    return token_batch(batch=2, seq=16)


@pytest.fixture
def no_cache():
    """A cached graph would skip the passes: every compile of these tests must run them."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _step(layers: int, options: dict, gc: bool = True) -> list[str]:
    """A tiny Llama (checkpointed when ``gc``) trained one step compiled with ``options`` and
    eagerly: loss and every LoRA gradient must agree. Returns inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    fastlora.clear_reports()
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=layers))
    inputs = checkpointed(model, _inputs()) if gc else _inputs()
    (loss_err, grad_errs, _), code = run_and_get_code(
        compare_compiled, model, inputs, {"compiler": "inductor", **options})
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
    assert fastlora.reports(), "nothing compiled"
    return code


def _offloaded() -> list[dict]:
    return [o for r in fastlora.reports() for o in r.offloaded]


def _calls(code: str, *ops: str) -> list[tuple[int, str]]:
    """(line, op) of every call of ``torch.ops.fastlora.<op>`` in generated code, in order."""
    return [(i, m.group(1)) for i, line in enumerate(code.splitlines())
            for m in [re.search(r"torch\.ops\.fastlora\.(\w+)\.default\(", line)]
            if m and m.group(1) in ops]


def test_checkpointed_layer_inputs_are_offloaded_by_default(no_cache):
    code = _step(layers=4, options={})
    # the inputs of layers 2 and 3 (the residual stream); layer 1's is a graph input here (the
    # embedding is compiled apart) and layer 4's, the last, stays on the device
    offloaded = _offloaded()
    assert [o["shape"] for o in offloaded] == [[2, 16, 40]] * 2, offloaded
    assert "offloaded to CPU memory: 2 saved activations" in str(fastlora.reports())
    assert sum((json.loads(json.dumps(r.to_dict()))["offloaded"] for r in fastlora.reports()),
               []) == offloaded

    forward = next(c for c in code if "fastlora.offload.default" in c)
    order = [op for _, op in _calls(forward, "offload", "offload_wait", "rms_norm_lora_qkv")]
    # each copy is issued before the layer that reads the tensor; the compute stream waits for
    # it once the next copy is issued (a whole layer later), the last one after its last use
    assert order == ["rms_norm_lora_qkv", "offload", "rms_norm_lora_qkv", "offload",
                     "offload_wait", "rms_norm_lora_qkv", "offload_wait", "rms_norm_lora_qkv"], \
        order
    backward = next(c for c in code if "fastlora.reload.default" in c)
    order = [op for _, op in _calls(backward, "reload", "reload_wait")]
    assert order == ["reload", "reload", "reload_wait", "reload_wait"], order  # one ahead


def test_off_and_size_threshold(no_cache):
    _step(layers=3, options={"offload_activations": False})
    assert _offloaded() == []
    # 2 x 16 x 40 float32 = 5 KiB: a 4 KiB threshold offloads such activations, 1 MiB none
    _step(layers=2, options={"offload_activations": 4 / 1024})
    assert _offloaded() and all(o["shape"] == [2, 16, 40] for o in _offloaded()), _offloaded()
    _step(layers=2, options={"offload_activations": 1})
    assert _offloaded() == []


def _graph_with_checkpoint() -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.higher_order.tag_activation_checkpoint, (x,)))
    return fx.GraphModule(torch.nn.Module(), graph)


def _plain_graph() -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.call_function(torch.relu, (graph.placeholder("x"),)))
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("options,checkpointed_graph,expected", [
    ({"compiler": "inductor"}, True, "layers"),           # the default under checkpointing
    ({"compiler": "inductor"}, False, None),              # no checkpointing: nothing
    ({"compiler": "aot_eager"}, True, None),              # auto offloads only with inductor
    ({"compiler": "inductor", "offload_activations": False}, True, None),
    ({"compiler": "inductor", "offload_activations": None}, True, None),
    ({"compiler": "inductor", "offload_activations": True}, True, "layers"),
    ({"compiler": "inductor", "offload_activations": 16}, False, 16.0),
    ({"compiler": "inductor", "mode": "reduce-overhead"}, True, None),  # CUDA graphs: off
    ({"compiler": "inductor", "mode": "reduce-overhead", "offload_activations": True}, True,
     "layers"),
])
def test_what_the_option_means_for_a_graph(options, checkpointed_graph, expected):
    gm = _graph_with_checkpoint() if checkpointed_graph else _plain_graph()
    opts = fastlora.Options.parse(options)
    assert offload_mode(opts, gm, opts.mode) == expected


def test_the_default_is_one_constant(monkeypatch):
    monkeypatch.setattr(offload, "OFFLOAD_WHEN_CHECKPOINTING", False)
    opts = fastlora.Options.parse({"compiler": "inductor"})
    assert offload_mode(opts, _graph_with_checkpoint()) is None
    opts = fastlora.Options.parse({"compiler": "inductor", "offload_activations": True})
    assert offload_mode(opts, _graph_with_checkpoint()) == "layers"


def test_layer_inputs_are_marked_but_the_last_one():
    """MarkLayerInputs on a hand-built joint graph: three checkpointed regions; x feeds region
    1, a (made in region 1) feeds region 2, b feeds region 3 (the last); cos feeds all."""
    from torch.utils.checkpoint import CheckpointPolicy

    graph = fx.Graph()
    x, cos = graph.placeholder("x"), graph.placeholder("cos")
    value = torch.empty(2, 3)

    def op(*args, region=None):
        node = graph.call_function(torch.add, args)
        node.meta["val"] = value
        if region is not None:
            node.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=region)
        return node

    emb = op(x, x)
    a = op(op(emb, cos, region=1), emb, region=1)
    b = op(op(a, cos, region=2), a, region=2)
    graph.output(op(op(b, cos, region=3), b, region=3))
    offload.MarkLayerInputs()(graph)
    marked = [n for n in graph.nodes if n.meta.get("should_offload")]
    assert marked == [emb, a], marked


@pytest.mark.parametrize("value,message", [
    (-1, "'auto', True, False, None or a size in MiB"),
    ("16", "'auto', True, False, None or a size in MiB"),
    ("on", "'auto', True, False, None or a size in MiB"),
])
def test_bad_offload_values_are_refused(value, message):
    with pytest.raises(fastlora.OptionsError, match=re.escape(message)):
        fastlora.Options.parse({"offload_activations": value})


@pytest.mark.parametrize("value", [-0.1, 1.5, "4TiB", "4", True, [0.5]])
def test_bad_memory_budgets_are_refused(value):
    with pytest.raises(fastlora.OptionsError, match="memory_budget'] must be a fraction"):
        fastlora.Options.parse({"memory_budget": value})


@pytest.mark.parametrize("options", [{"offload_activations": 16}, {"offload_activations": True},
                                     {"memory_budget": 0.5}])
def test_explicit_settings_need_inductor(options):
    with pytest.raises(fastlora.OptionsError, match="needs compiler='inductor'"):
        fastlora.Options.parse({**options, "compiler": "aot_eager"})
    fastlora.Options.parse({**options, "compiler": "auto"})  # auto picks inductor for them


def test_the_default_leaves_aot_eager_alone():
    fastlora.Options.parse({"compiler": "aot_eager"})  # offload "auto": no error


def test_refuses_to_replace_a_users_inductor_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Mine(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "mine"

    model = with_lora(tiny_llama(layers=1))
    compiled = torch.compile(model, backend="fastlora",
                             options={"compiler": "inductor", "offload_activations": 16})
    with torch._inductor.config.patch(joint_custom_post_pass=Mine()), \
            pytest.raises(Exception, match="joint_custom_post_pass, which is already set"):
        compiled(**_inputs())


class _SavedBytes:
    """Post-grad pass recording the bytes a forward graph returns (outputs + saved tensors)."""

    def __init__(self):
        self.forward_bytes = []

    def __call__(self, graph):
        names = [n.name for n in graph.find_nodes(op="placeholder")]
        if any(n.startswith("tangents") for n in names):
            return  # the backward
        outputs = graph.find_nodes(op="output")[0].args[0]
        self.forward_bytes.append(sum(
            o.meta["val"].numel() * o.meta["val"].element_size() for o in outputs
            if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)))

    def uuid(self):
        return None


def test_a_lower_memory_budget_saves_less_for_backward(no_cache):
    """Without checkpointing the partitioner chooses what to save; budget 0 keeps only what it
    cannot recompute, and the gradients stay exact."""
    saved = {}
    for budget in (None, 0.0):
        recorder = _SavedBytes()
        with torch._inductor.config.patch(post_grad_custom_post_pass=recorder):
            _step(layers=1, options={"memory_budget": budget}, gc=False)
        saved[budget] = max(recorder.forward_bytes)
    assert saved[0.0] < saved[None], saved


def test_compile_for_trainer_offloads_with_dynamic_shapes(no_cache):
    """compile_for_trainer's default dynamic=True: sizes are symbolic, the offload is the same
    and the report stays plain data. With reuse_layers=True too (the default on a GPU) the
    offload wins: inside a shared layer body a layer's input cannot be offloaded, so the
    checkpointed layers are compiled one by one and the report says why."""
    import copy

    from fastlora import regions
    from helpers import run_step

    fastlora.clear_reports()
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=3))
    inputs = checkpointed(model, _inputs())
    compiled = fastlora.compile_for_trainer(copy.deepcopy(model), compiler="inductor",
                                            reuse_layers=True)
    loss_e, grads_e = run_step(model, inputs)
    loss_c, grads_c = run_step(compiled, inputs)
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    assert all(torch.allclose(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-6) for k in grads_e)
    offloaded = _offloaded()
    assert len(offloaded) == 1 and offloaded[0]["shape"][-1] == 40, offloaded
    reports = fastlora.reports(compiled)
    assert all(m.get("calls", 1) == 1 for r in reports for m in r.matches)  # no shared body
    assert regions.OFFLOADED in " ".join(n for r in reports for n in r.notes)
    json.dumps([r.to_dict() for r in fastlora.reports()])


@pytest.mark.gpu
def test_cuda_compile_for_trainer_defaults_offload_checkpointed_layer_inputs(no_cache):
    """compile_for_trainer with its defaults on a GPU (reuse_layers="auto" marks the layers on
    the inductor route): with gradient checkpointing the layers run unmarked so that their
    inputs are offloaded, the note says why, and loss and every LoRA gradient are eager's."""
    import copy

    from fastlora import regions
    from helpers import rel_err, run_step

    torch.manual_seed(0)
    fastlora.clear_reports()
    model = with_lora(tiny_llama(layers=4)).cuda()
    inputs = checkpointed(model, token_batch(batch=2, seq=64, device="cuda"))
    compiled = fastlora.compile_for_trainer(copy.deepcopy(model))
    loss_e, grads_e = run_step(model, inputs)
    loss_c, grads_c = run_step(compiled, inputs)
    assert rel_err(loss_c, loss_e) < 1e-5
    assert max(rel_err(grads_c[k], g) for k, g in grads_e.items()) < 1e-4
    reports = fastlora.reports(compiled)
    assert len([o for r in reports for o in r.offloaded]) == 2, [str(r) for r in reports]
    assert all(m.get("calls", 1) == 1 for r in reports for m in r.matches)
    # before torch 2.13 checkpointed layers with dynamic shapes run unmarked anyway
    why = regions.OFFLOADED if regions.CHECKPOINTED_SHARED else regions.CHECKPOINT_DYNAMIC
    assert why in " ".join(n for r in reports for n in r.notes)


@pytest.mark.parametrize("options,on_gpu,offloaded", [
    ({}, True, True),                                  # the defaults: inductor on a GPU
    ({}, False, False),                                # the CPU's aot_eager: no offload
    ({"compiler": "inductor"}, False, True),
    ({"compiler": "aot_eager"}, True, False),
    ({"offload_activations": False}, True, False),
    ({"offload_activations": True}, False, True),      # forces inductor
    ({"offload_activations": 16}, True, False),        # a size: large tensors, not layer inputs
    ({"mode": "reduce-overhead"}, True, False),        # CUDA graphs: "auto" stays off
    ({"memory_budget": 0.5}, False, True),             # forces inductor
])
def test_whether_layer_inputs_are_offloaded_is_known_before_tracing(options, on_gpu, offloaded):
    """offload.offloads_layer_inputs, which compile_for_trainer asks before Dynamo traces (a
    checkpointed layer whose input is offloaded is not compiled once), agrees with what the
    backend decides for a checkpointed graph (offload_mode on the resolved options)."""
    from fastlora.options import backend_options

    opts = fastlora.Options.parse(options)
    assert offload.offloads_layer_inputs(opts, on_gpu) == offloaded
    example = [torch.empty(0, device="meta" if on_gpu else "cpu")]  # meta: "not the CPU"
    resolved = backend_options(options, {"rms_norm"}, example)
    assert (offload_mode(resolved, _graph_with_checkpoint(), resolved.mode) == "layers") \
        == offloaded


@pytest.mark.gpu
def test_cuda_checkpointed_llama_offloads_by_default_and_matches_eager(no_cache):
    """On the GPU: the copies run on the side stream (every wait consumed its copy), the
    layer inputs come back bit for bit (loss and LoRA gradients as eager's), and a second step
    reuses the compiled graphs."""
    from fastlora import offload_ops

    torch.manual_seed(0)
    fastlora.clear_reports()
    model = with_lora(tiny_llama(layers=4)).cuda()
    inputs = checkpointed(model, token_batch(batch=2, seq=64, device="cuda"))
    loss_err, grad_errs, _ = compare_compiled(model, inputs, {"compiler": "inductor"})
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
    assert len(_offloaded()) == 2, [str(r) for r in fastlora.reports()]
    assert offload_ops._pending == {}, "a copy was never waited for"
    assert offload_ops._side_streams, "no copy ran on a side stream"
