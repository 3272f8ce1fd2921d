"""Padding masks (HF's ``attention_mask`` with zeros) fused into the attention kernel: every
family's attention proven with its key padding, exact losses and LoRA gradients against eager
for right and left padding (the pad rows included: labels on the pads make them reach the
loss), a user's mask with holes, bf16, and the masks that must still be refused, with reasons."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from helpers import compare_compiled, compare_low_precision, rel_err, tiny_llama, with_lora
from test_attention_pattern import _attention, _exact, _inputs, only_attention, tiny_gemma2
from test_attention_pattern import tiny_mistral


def padding(side, batch=2, seq=12, pads=(3, 7)):
    """HF's ``attention_mask`` for a padded batch: rows of different lengths, pads on ``side``;
    ``holes``: a user's mask whose kept tokens are no single run, and a row with none kept."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        if side == "right":
            mask[b, seq - pads[b % 2]:] = 0
        elif side == "left":
            mask[b, :pads[b % 2]] = 0
        elif side == "holes":
            if b % 2:
                mask[b] = 0
            else:
                mask[b, [0, 4, 5, 10]] = 0
    return mask


FAMILIES = {  # name: (model, attention's mask kinds, what a row that sees no key gets)
    "llama": (lambda: tiny_llama(layers=1), ["causal+padding"], "zero"),
    "llama_eager": (lambda: tiny_llama(layers=1, attn_implementation="eager"),
                    ["causal+padding"], "uniform"),
    "mistral": (lambda: tiny_mistral(window=4, layers=1), ["causal+window+padding"], "zero"),
    "gemma2": (tiny_gemma2, ["causal+window+padding", "causal+padding"], "uniform"),
}


def padded_inputs(side, ignore_pads=False, seq=12, pads=(3, 7)):
    """Labels are the ids (the pad rows' logits reach the loss, so their attention must be
    eager's too) or -100 on the pads, as collators set them."""
    mask = padding(side, seq=seq, pads=pads)
    inputs = _inputs(seq=seq, attention_mask=mask)
    if ignore_pads:
        inputs["labels"] = inputs["input_ids"].masked_fill(mask == 0, -100)
    return inputs


def _kinds():
    return [(p["kernel"], p["mask"], p["empty_rows"]) for p in _attention()]


@pytest.mark.parametrize("ignore_pads", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_mask_fused_exact(family, side, ignore_pads):
    make, kinds, empty_rows = FAMILIES[family]
    _exact(with_lora(make()), padded_inputs(side, ignore_pads))
    assert _kinds() == [("triton", kind, empty_rows) for kind in kinds]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_mask_with_holes_and_a_row_that_sees_nothing(family):
    """A user's mask: kept tokens in several runs (every block masked, chosen on the device),
    and a batch row without any kept token, whose every row sees no key. No NaN anywhere."""
    make, kinds, empty_rows = FAMILIES[family]
    loss_err, grad_errs, grads = compare_compiled(with_lora(make()), padded_inputs("holes"),
                                                  only_attention())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-5, (loss_err, grad_errs)
    assert _kinds() == [("triton", kind, empty_rows) for kind in kinds]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padding_bf16_no_worse_than_eager_bf16(family):
    make, kinds, empty_rows = FAMILIES[family]
    err_eager, err_compiled = compare_low_precision(with_lora(make()), padded_inputs("left"),
                                                    options=only_attention())
    assert _kinds() == [("triton", kind, empty_rows) for kind in kinds]
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_eager, err_compiled)


def test_batch_size_changing_recompiles_fused():
    """After a new batch size Dynamo recompiles with a dynamic batch, where the mask's batch
    size and the activations' are different symbols (equal only at run time): still fused, the
    mask's rows read as eager reads them."""
    model = with_lora(tiny_llama(layers=1))
    compiled_model = __import__("copy").deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora",
                             options=only_attention(compiler="aot_eager", strict=True))
    for batch in (4, 2, 3):
        mask = torch.cat([padding("right"), padding("left")])[:batch]
        inputs = {**_inputs(batch=batch), "attention_mask": mask}
        assert rel_err(compiled(**inputs).loss, model(**inputs).loss) < 1e-5
        assert _kinds() == [("triton", "causal+padding", "zero")], batch


def test_padding_with_dynamic_lengths():
    """One dynamic graph for two lengths: the padding mask's shape is symbolic and still
    proven (its key dimension is the keys'), and both steps are exact."""
    model = with_lora(tiny_llama(layers=1))
    compiled_model = __import__("copy").deepcopy(model)
    compiled = torch.compile(compiled_model, backend="fastlora", dynamic=True,
                             options=only_attention(compiler="aot_eager", strict=True))
    fastlora.clear_reports()
    for seq in (12, 17):
        inputs = {**_inputs(seq=seq), "attention_mask": padding("left", seq=seq)}
        loss_e = model(**inputs).loss
        loss_c = compiled(**inputs).loss
        assert rel_err(loss_c, loss_e) < 1e-5
    found = [m["params"]["mask"] for r in fastlora.reports() for m in r.matches
             if m["pattern"] == "attention"]
    assert found == ["causal+padding"], found


# ---------------------------------------------------------------- what must still be refused


def test_forced_sdpa_leaves_padded_attention_alone(monkeypatch):
    monkeypatch.setenv("FASTLORA_ATTENTION", "sdpa")
    _exact(with_lora(tiny_llama(layers=1)), padded_inputs("left"))
    reasons = [n["reason"] for n in fastlora.last_report().near_misses
               if n["pattern"] == "attention"]
    assert _attention() == [] and reasons == \
        ["FASTLORA_ATTENTION=sdpa keeps masked attention as the model wrote it"]


class PaddedAttention(nn.Module):
    """SDPA or eager attention with a mask built in forward by ``build(i, j, pad)`` from query /
    key indices and a (batch, S) boolean ``pad``; ``neg``: the additive mask's value (eager)."""

    def __init__(self, build, neg=None):
        super().__init__()
        self.build, self.neg = build, neg
        self.proj = nn.Linear(16, 48)

    def forward(self, x, pad):
        B, S, _ = x.shape
        q, k, v = self.proj(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        mask = self.build(i, j, pad)
        if self.neg is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        w = torch.matmul(q, k.transpose(2, 3)) * 8 ** -0.5
        w = w + torch.where(mask, torch.zeros((), dtype=x.dtype), self.neg)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(F.dropout(w, p=0.0, training=self.training), v)


def _compile_padded(module, x, pad):
    compiled = torch.compile(module, backend="fastlora",
                             options=only_attention(compiler="aot_eager"))
    out = compiled(x, pad)
    assert rel_err(out, module(x, pad)) < 1e-5
    report = fastlora.last_report()
    return _attention(report), [n["reason"] for n in report.near_misses
                                if n["pattern"] == "attention"]


def _pad():
    return padding("left", batch=2, seq=10).bool()


@pytest.mark.parametrize("build", [
    lambda i, j, pad: (j <= i) & pad[:, None, None, :],
    # any run-time (batch, keys) boolean read at [b, kv] is a key mask: the kernel reads it
    lambda i, j, pad: (j <= i) & pad.roll(1, -1)[:, None, None, :],
])
def test_handwritten_padding_masks_are_proven(build):
    params, misses = _compile_padded(PaddedAttention(build), torch.randn(2, 10, 16), _pad())
    assert misses == [] and [(p["mask"], p["empty_rows"], p["key_mask_rows"])
                             for p in params] == [("causal+padding", "zero", "batch")]


def test_first_rows_padding_for_every_batch_row():
    """``pad[0]`` for every batch row: the kernel reads row 0 of the mask for all of them (a
    kernel reading row b would be silently wrong for b = 1)."""
    params, misses = _compile_padded(
        PaddedAttention(lambda i, j, pad: (j <= i) & pad[0][None, None, None, :]),
        torch.randn(2, 10, 16), _pad())
    assert misses == [] and [(p["mask"], p["key_mask_rows"]) for p in params] == \
        [("causal+padding", "first")]


def test_longer_padding_mask_reads_its_first_keys():
    """A mask longer than the keys (HF pads or slices it to the keys it reads): eager reads keys
    0..S_k-1 of it, and so does the kernel."""
    pad = torch.cat([_pad(), torch.zeros(2, 3, dtype=torch.bool)], 1)
    params, misses = _compile_padded(
        PaddedAttention(lambda i, j, pad: (j <= i) & pad[torch.arange(2)[:, None, None, None],
                                                         j[None, None]]),
        torch.randn(2, 10, 16), pad)
    assert misses == [] and [p["mask"] for p in params] == ["causal+padding"]


def test_handwritten_additive_padding_mask_is_uniform_on_rows_that_see_nothing():
    neg = torch.finfo(torch.float32).min
    params, misses = _compile_padded(
        PaddedAttention(lambda i, j, pad: (j <= i) & pad[:, None, None, :], neg),
        torch.randn(2, 10, 16), _pad())
    assert misses == [] and [(p["mask"], p["empty_rows"]) for p in params] == \
        [("causal+padding", "uniform")]


@pytest.mark.parametrize("build,neg,reason", [
    # padding of the queries, not the keys
    (lambda i, j, pad: (j <= i) & pad[:, None, :, None], None,
     "at [b, q] (b: batch, q: query index, kv: key index), which is not a key-padding"),
    # a padding mask read one key further on (a longer mask, an offset key index)
    (lambda i, j, pad: (j <= i) & torch.cat([pad, pad[:, :1]], 1)[
        torch.arange(2)[:, None, None, None], (j + 1)[None, None]], None,
     "at [b, kv + 1] (b: batch, q: query index, kv: key index), which is not a key-padding"),
    # an additive value that does not swallow the scores: rows that see nothing
    (lambda i, j, pad: (j <= i) & pad[:, None, None, :], -1e9, "does not swallow the scores"),
])
def test_unprovable_padding_masks_are_left_alone(build, neg, reason):
    params, misses = _compile_padded(PaddedAttention(build, neg), torch.randn(2, 10, 16), _pad())
    assert params == [] and len(misses) == 1 and reason in misses[0], misses


def test_two_padding_masks_are_left_alone():
    def build(i, j, pad):
        return (j <= i) & pad[:, None, None, :] & pad.flip(0)[:, None, None, :]
    params, misses = _compile_padded(PaddedAttention(build), torch.randn(2, 10, 16), _pad())
    assert params == [] and len(misses) == 1 and "two different padding masks" in misses[0], \
        misses


# ---------------------------------------------------------------- on the GPU


def _cuda(batch):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_padding_exact_fp32(family, side):
    """Also pins what the GPU's own SDPA gives a row that sees no key (0, as on the CPU): the
    left-padded rows' logits reach the loss here."""
    make, kinds, empty_rows = FAMILIES[family]
    fastlora.clear_reports()
    _exact(with_lora(make()).cuda(), _cuda(padded_inputs(side, seq=300, pads=(37, 170))))
    found = [(m["params"]["kernel"], m["params"]["mask"], m["params"]["empty_rows"])
             for r in fastlora.reports() for m in r.matches if m["pattern"] == "attention"]
    assert found == [("triton", kind, empty_rows) for kind in kinds], found


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gpu_padding_bf16_no_worse_than_eager(family):
    make, kinds, _ = FAMILIES[family]
    errs = []
    for seed in range(3):
        torch.manual_seed(seed)
        torch._dynamo.reset()
        errs.append(compare_low_precision(with_lora(make()).cuda(),
                                          _cuda(padded_inputs("left", seq=300, pads=(37, 170))),
                                          options=only_attention()))
    err_eager, err_compiled = (sum(e) / len(errs) for e in zip(*errs))
    assert err_compiled <= 1.25 * err_eager + 1e-3, errs
