"""Users' own patterns, near misses with reasons, and Gemma's (1 + w) RMSNorm."""
import torch
from torch import nn

import fastlora
from helpers import compare_compiled, compare_low_precision, rel_err, with_lora

# ---- the worked example of docs/patterns.md --------------------------------------------------


@torch.library.custom_op("mylib::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@quick_gelu.register_fake
def _(x):
    return torch.empty_like(x)


def _quick_gelu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(1.702 * x)
    return grad * (s + 1.702 * x * s * (1 - s))


quick_gelu.register_autograd(_quick_gelu_backward,
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def quick_gelu_spelling(x: torch.Tensor):
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 40), nn.Linear(40, 24)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


def test_user_registered_pattern():
    fastlora.register_pattern(name="quick_gelu", spellings=[quick_gelu_spelling],
                              replacement=lambda x: torch.ops.mylib.quick_gelu(x),
                              anchor=torch.sigmoid)
    try:
        model, x = MLP(), torch.randn(3, 5, 24)
        ref = model(x)
        ref.sum().backward()
        g_ref = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, backend="fastlora",
                                 options={"compiler": "aot_eager", "strict": True})
        out = compiled(x)
        out.sum().backward()
        assert fastlora.last_report().counts() == {"quick_gelu": 1}
        assert rel_err(out, ref) < 1e-6
        for p, g in zip(model.parameters(), g_ref):
            assert rel_err(p.grad, g) < 1e-6
    finally:
        fastlora.unregister_pattern("quick_gelu")
    assert "quick_gelu" not in {p.name for p in fastlora.registered_patterns()}


# ---- near misses ------------------------------------------------------------------------------


class SumNorm(nn.Module):
    """An RMSNorm written with sum / N instead of mean: the same math, another spelling."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.n = nn.Parameter(torch.randn(n)), n

    def forward(self, x):
        return self.weight * (x * torch.rsqrt((x * x).sum(-1, keepdim=True) / self.n + 1e-6))


class LeakyNorm(nn.Module):
    """A norm whose inverse RMS is used elsewhere too (it escapes the region)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * (x * r) + r


def _near_misses(module, x):
    compiled = torch.compile(module, backend="fastlora", options={"compiler": "aot_eager"})
    out = compiled(x)
    assert rel_err(out, module(x)) < 1e-6  # left unfused, still right
    report = fastlora.last_report()
    assert report.counts() == {}
    return report.near_misses


def test_near_miss_other_spelling_has_reason():
    misses = _near_misses(SumNorm(16), torch.randn(4, 16))
    assert len(misses) == 1 and misses[0]["pattern"] == "rms_norm"
    assert "expected torch.mean" in misses[0]["reason"], misses[0]["reason"]
    assert misses[0]["kind"] == "spelling"


def test_near_miss_escaping_intermediate_has_reason():
    misses = _near_misses(LeakyNorm(16), torch.randn(4, 16))
    assert len(misses) == 1
    assert "used outside the pattern" in misses[0]["reason"], misses[0]["reason"]
    assert "rsqrt" in misses[0]["reason"]
    assert misses[0]["kind"] == "escape"
    assert "near misses" in str(fastlora.last_report())


def _tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    cfg = GemmaConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                      max_position_embeddings=128)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "GemmaRMSNorm":
                m.weight.normal_(0, 0.3)  # zeros would hide a wrong offset
    return with_lora(model)


def test_gemma_one_plus_w_rms_norm():
    model = _tiny_gemma()
    ids = torch.randint(0, 97, (2, 9))
    loss_err, grad_errs, _ = compare_compiled(model, {"input_ids": ids, "labels": ids})
    matches = [m for m in fastlora.last_report().matches if m["pattern"] == "rms_norm"]
    assert len(matches) == 5
    assert all(m["params"]["offset"] == 1.0 for m in matches)
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_gemma_bf16_keeps_gemma_cast_order():
    ids = torch.randint(0, 97, (2, 9))
    err_eager, err_compiled = compare_low_precision(_tiny_gemma(), {"input_ids": ids,
                                                                    "labels": ids})
    matches = [m for m in fastlora.last_report().matches if m["pattern"] == "rms_norm"]
    assert [m["params"]["cast_before_weight"] for m in matches] == [False] * 5
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)
