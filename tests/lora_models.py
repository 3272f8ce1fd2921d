"""Helpers of the LoRA compiled-vs-eager tests (test_lora_linear_models.py, test_lora_grouped.py,
test_lora_mlp_block.py, test_qlora.py): options that fuse only the LoRA patterns, the error of a
step against a float64 or float32 twin, bf16 bases with float32 adapters, and an eager dropout
that draws the fused op's seed and mask."""
import copy

import torch
from torch import nn

import fastlora
from fastlora.kernels import _lora_blocks as K
from helpers import rel_err, rounding_sensitivity, run_step


def only_lora(*names):
    """Options that compile with these patterns only (default: lora_linear; other families are
    tested in their own files)."""
    names = names or ("lora_linear",)
    others = [p.name for p in fastlora.registered_patterns() if p.name not in names]
    return {"compiler": "aot_eager", "strict": True, "disable": others}


def errors_vs(reference, model, inputs, options=None, autocast=None, patterns=()):
    """(eager error, compiled error): max relative error of loss and every LoRA gradient of
    ``model`` eager and compiled against ``reference`` (a float64 or float32 twin). Without
    autocast, the eager error is the larger of eager's own and ``rounding_sensitivity``'s (what
    one rounding of each adapter output may cost), so bounds do not hang on the CPU's luck."""
    def step(m, params, autocast=autocast):
        if autocast is None:
            return run_step(m, inputs, params)
        params.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast):
            loss = m(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.named_parameters()
                               if p.grad is not None}
    loss_r, grads_r = step(reference, reference, autocast=None)
    twin = copy.deepcopy(model)
    loss_e, grads_e = step(model, model)
    compiled = torch.compile(twin, backend="fastlora",
                             options={**only_lora(*patterns), **(options or {})})
    loss_c, grads_c = step(compiled, twin)
    assert set(grads_c) == set(grads_r)

    def worst(loss, grads):
        return max([rel_err(loss, loss_r)] + [rel_err(grads[n], g) for n, g in grads_r.items()])
    err_e = worst(loss_e, grads_e)
    if autocast is None:
        err_e = max(err_e, rounding_sensitivity(model, inputs, loss_r, grads_r))
    return err_e, worst(loss_c, grads_c)


def mixed_dtypes(model):
    """bf16 base weights, float32 adapters: what peft's autocast_adapter_dtype gives a bf16
    model (the targets.md workload)."""
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()
    return model


class SeededDropout(nn.Module):
    """Eager twin of the fused op's dropout: the same seed draw, the same Philox mask."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        seed = torch.randint_like(torch.zeros(1, device=x.device), 0, 2 ** 31 - 1,
                                  dtype=torch.int64)  # the generator of x's device, as the graph
        x2 = x.reshape(-1, x.shape[-1])
        keep = K.keep_mask_reference(int(seed), x2.shape[0], x2.shape[1], 0, self.p, x.device)
        return (x2 * keep / (1 - self.p)).view(x.shape)


def seeded_twin(model, p):
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = SeededDropout(p)
    return twin
