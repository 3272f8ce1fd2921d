"""options["offload_activations"] (experimental): saved activations copied to CPU memory between
forward and backward by PyTorch's partitioner pass, the tensors chosen by fastlora's marking pass.
On the CPU the copies are CPU-to-CPU, so these tests check the plumbing and the exactness; what
the offload saves on a GPU is measured by benchmarks/train_step.py (variant fastlora-offload)."""
import json

import pytest
import torch

import fastlora
from helpers import checkpointed, compare_compiled, tiny_llama, token_batch, with_lora


def _inputs():
    return token_batch(batch=2, seq=16)


@pytest.fixture
def no_cache():
    """A cached graph would skip the passes: every compile of these tests must run them."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _checkpointed_step(layers: int, mib: float) -> list[dict]:
    """A checkpointed tiny Llama trained one step, compiled with the offload and eagerly: loss
    and LoRA gradients must agree. Returns what the reports say was offloaded."""
    fastlora.clear_reports()
    model = with_lora(tiny_llama(layers=layers))
    inputs = checkpointed(model, _inputs())
    loss_err, grad_errs, _ = compare_compiled(
        model, inputs, {"compiler": "inductor", "offload_activations": mib})
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
    assert fastlora.reports(), "nothing compiled"
    return [o for r in fastlora.reports() for o in r.offloaded]


def test_checkpointed_layer_inputs_are_offloaded_and_gradients_unchanged(no_cache):
    offloaded = _checkpointed_step(layers=3, mib=0)
    # the inputs of layers 2 and 3 (residual adds, [batch, seq, hidden]); what the partitioner
    # cannot move (an item of a multi-output op, a view) stays on the device
    assert len(offloaded) >= 2, [str(r) for r in fastlora.reports()]
    assert all(o["shape"] == [2, 16, 40] for o in offloaded), offloaded
    assert "offloaded to CPU memory: " in str(fastlora.reports())
    plain = [json.loads(json.dumps(r.to_dict()))["offloaded"] for r in fastlora.reports()]
    assert sum(plain, []) == offloaded


def test_threshold_leaves_smaller_tensors_alone(no_cache):
    # 2 x 16 x 40 float32 = 5 KiB: a 1 MiB threshold offloads nothing
    assert _checkpointed_step(layers=2, mib=1) == []


@pytest.mark.parametrize("value,error,message", [
    (-1, fastlora.OptionsError, "a size in MiB"),
    ("16", fastlora.OptionsError, "a size in MiB"),
    (True, fastlora.OptionsError, "a size in MiB"),
])
def test_bad_values_are_refused(value, error, message):
    with pytest.raises(error, match=message):
        fastlora.Options.parse({"offload_activations": value})


def test_needs_inductor():
    with pytest.raises(ValueError, match="needs compiler='inductor'"):
        fastlora.Options.parse({"offload_activations": 16, "compiler": "aot_eager"})


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
