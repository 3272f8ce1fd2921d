"""Flash attention with sinks (GPT-OSS: one learned logit per head joins each row's softmax, with
no value): the Triton kernels under the interpreter and the PyTorch reference against a float64
attention written as GPT-OSS's eager code computes it, gradients of the sinks included."""
import pytest
import torch

from fastlora.kernels import flash_attention as K
from fastlora.kernels import flash_attention_backward as KB
from helpers import rel_err
from test_flash_attention_kernel import TOL, make, mask64, pads_for

FEATURES = {  # name: (causal, window, padding)
    "causal": (True, 0, None),
    "full": (False, 0, None),
    "window": (True, 7, None),
    "pad_left": (True, 0, "left"),  # pad queries that see no key: output 0, as eager's
    "pad_right_window": (True, 5, "right"),
    "pad_empty_row": (True, 0, "empty"),
}


def attention_with_sinks64(q, k, v, sinks, dout, scale, causal, window, key_mask,
                           dtype=torch.float64):
    """out, dq, dk, dv, dsinks in float64 (or ``dtype``: eager's own rounding) through
    autograd: the scores, masked, concatenated with the sinks, softmax, the sink column
    dropped, times v (GPT-OSS's eager attention)."""
    q64, k64, v64, s64 = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, sinks))
    group = q.shape[1] // k.shape[1]
    s = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) * scale
    vis = mask64(q.shape[0], q.shape[2], k.shape[2], causal, window, None, q.device, key_mask)
    s = s.masked_fill(~vis, float("-inf"))
    column = s64.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    p = torch.softmax(torch.cat([s, column], -1), -1)[..., :-1]
    out = p @ v64.repeat_interleave(group, 1)
    grads = torch.autograd.grad(out, (q64, k64, v64, s64), dout.to(dtype))
    return (out.detach(),) + grads


def _case(feature, dtype, B=2, H=4, H_KV=2, S=37, D=24):
    causal, window, pad = FEATURES[feature]
    torch.manual_seed(list(FEATURES).index(feature))
    q, k, v = make(B, H, H_KV, S, D, dtype)
    sinks = (torch.randn(H) * 2).to(dtype)
    key_mask = pads_for(B, S, pad) if pad else None
    return q, k, v, sinks, torch.randn(B, H, S, D, dtype=dtype), D ** -0.5, causal, window, \
        key_mask


def _dsinks(sinks, dout, out, lse):
    """What the op's autograd formula computes for the sinks (flash_attention.py)."""
    delta = (dout.float() * out.float()).sum(-1)
    return -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum((0, 2))


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_sinks_match_float64(feature, dtype, impl):
    q, k, v, sinks, dout, scale, causal, window, key_mask = _case(feature, dtype)
    want = attention_with_sinks64(q, k, v, sinks, dout, scale, causal, window, key_mask)
    if impl == "triton":  # every output buffer poisoned
        nan = float("nan")
        out, lse = K.flash_attention_forward_triton(
            q, k, v, None, scale, causal, window, 0.0, key_mask, False, sinks,
            out=K._output_like(q).fill_(nan), lse=torch.full(q.shape[:3], nan))
        grads = KB.flash_attention_backward_triton(
            dout, q, k, v, out, lse, None, scale, causal, window, 0.0, key_mask, False,
            *(torch.empty_like(t).fill_(nan) for t in (q, k, v)))
    else:
        out, lse = K.flash_attention_forward_reference(q, k, v, None, scale, causal, window, 0.0,
                                                       key_mask, False, sinks)
        grads = KB.flash_attention_backward_reference(dout, q, k, v, out, lse, None, scale,
                                                      causal, window, 0.0, key_mask, False, sinks)
    got = (out, *grads, _dsinks(sinks, dout, out, lse))
    # dsinks sums terms of both signs over every row from the stored (rounded) output, so in a
    # low precision the rounding can cancel into a larger relative error than the other
    # gradients': at most three times eager's own in that dtype (bf16: 0.3x to 2.8x here)
    eager = attention_with_sinks64(q, k, v, sinks, dout, scale, causal, window, key_mask, dtype)
    for name, g, w, e in zip(("out", "dq", "dk", "dv", "dsinks"), got, want, eager):
        err = rel_err(g, w)
        limit = max(TOL[dtype], 3 * rel_err(e, w)) if name == "dsinks" else TOL[dtype]
        assert err < limit, f"{feature} {name}: relative error {err:.2e} (limit {limit:.2e})"
    assert torch.isfinite(lse).all()  # the sink is in every row's sum


def test_the_op_and_its_autograd_with_trained_sinks():
    q, k, v, sinks, dout, scale, causal, window, key_mask = _case("pad_right_window",
                                                                 torch.float32)
    q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    out, _ = torch.ops.fastlora.flash_attention(q, k, v, None, scale, causal, window, 0.0,
                                                key_mask, True, sinks)
    out.backward(dout)
    want = attention_with_sinks64(q, k, v, sinks, dout, scale, causal, window, key_mask)
    for g, w in zip((out, q.grad, k.grad, v.grad, sinks.grad), want):
        assert rel_err(g, w) < 1e-5
    args = [t.detach() for t in make(1, 2, 1, 9, 16, torch.float32)]
    torch.library.opcheck(torch.ops.fastlora.flash_attention.default,
                          (*args, None, 0.25, True, 3, 0.0, None, False, torch.randn(2)))


def test_bad_sinks_are_refused():
    q, k, v = make(1, 4, 2, 9, 16, torch.float32)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        torch.ops.fastlora.flash_attention(q, k, v, None, 0.25, True, 0, 0.0, None, False,
                                           torch.randn(2))


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["causal", "window", "pad_left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sinks_match_float64(feature, dtype):
    """GPT-OSS's shape of head (64 features, 64 query heads over 8 kv heads), on the GPU."""
    causal, window, pad = FEATURES[feature]
    torch.manual_seed(0)
    q, k, v = make(2, 64, 8, 300, 64, dtype, "cuda")
    sinks = (torch.randn(64, device="cuda") * 2).to(dtype)
    key_mask = pads_for(2, 300, pad, "cuda") if pad else None
    dout = torch.randn_like(q)
    want = attention_with_sinks64(q, k, v, sinks, dout, 0.125, causal, window, key_mask)
    out, lse = K.flash_attention_forward_triton(q, k, v, None, 0.125, causal, window, 0.0,
                                                key_mask, False, sinks)
    grads = KB.flash_attention_backward_triton(dout, q, k, v, out, lse, None, 0.125, causal,
                                               window, 0.0, key_mask, False)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert rel_err(g, w) < TOL[dtype], name
