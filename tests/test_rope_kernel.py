"""RoPE kernels (Triton under the interpreter, and the PyTorch reference) vs float64, the custom
op's autograd, packed sequences and partial rotary end to end, and GPU checks (`-m gpu`)."""
import pytest
import torch

import fastlora
from fastlora.kernels import rope as K
from helpers import compare_compiled, rel_err, tiny_llama, with_lora

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rotary_tables(position_ids, rot, base=10000.0, interleaved=False):
    """cos/sin as HF builds them ([B, T, rot], float32), unsqueezed for [B, H, T, D] q/k."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = position_ids[..., None].double() * inv
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().float().unsqueeze(1), emb.sin().float().unsqueeze(1)


def reference64(x, cos, sin, rot, interleaved=False):
    """HF's formula in float64: x * cos + rotate(x) * sin on the first ``rot`` features."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        rotated = torch.stack([-xr[..., 1::2], xr[..., ::2]], -1).flatten(-2)
    else:
        rotated = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def grads64(q, k, cos, sin, rot, dq_out, dk_out, interleaved=False):
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    outs = (reference64(q64, cos, sin, rot, interleaved), reference64(k64, cos, sin, rot,
                                                                      interleaved))
    torch.autograd.backward(outs, (dq_out.double(), dk_out.double()))
    return outs[0].detach(), outs[1].detach(), q64.grad, k64.grad


def make_inputs(B, Hq, Hk, T, D, rot, dtype, transposed=True, packed=False, interleaved=False):
    if transposed:  # as HF passes them: [B, T, H, D] projections viewed as [B, H, T, D]
        q = torch.randn(B, T, Hq, D, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, dtype=dtype).transpose(1, 2)
    else:
        q, k = torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hk, T, D, dtype=dtype)
    if packed:  # documents of random lengths packed in each row: positions restart
        pos = torch.stack([torch.cat([torch.arange(n) for n in _lengths(T)]) for _ in range(B)])
    else:
        pos = torch.arange(T).expand(B, T)
    cos, sin = rotary_tables(pos, rot, interleaved=interleaved)
    return q, k, cos.to(dtype), sin.to(dtype)


def _lengths(T):
    out, left = [], T
    while left:
        n = int(torch.randint(1, left + 1, ()))
        out.append(n)
        left -= n
    return out


CASES = [  # B, Hq, Hk, T, D, rot
    (3, 5, 1, 37, 72, 72),    # odd shapes, MQA
    (2, 4, 2, 9, 10, 6),      # partial rotary (Phi-3 style 0.6)
    (1, 3, 3, 17, 128, 32),   # partial rotary 0.25 (StableLM / GPT-NeoX)
    (2, 2, 1, 5, 8, 8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rope_matches_float64(case, dtype, interleaved, impl):
    B, Hq, Hk, T, D, rot = case
    q, k, cos, sin = make_inputs(B, Hq, Hk, T, D, rot, dtype, packed=True,
                                 interleaved=interleaved)
    dq_out, dk_out = torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hk, T, D, dtype=dtype)
    q_ref, k_ref, dq_ref, dk_ref = grads64(q, k, cos, sin, rot, dq_out, dk_out, interleaved)
    if impl == "triton":
        poison = lambda t: torch.full_like(t, float("nan"))
        qo, ko = K.rope_forward_triton(q, k, cos, sin, rot, interleaved, q_out=poison(q),
                                       k_out=poison(k))
        dq, dk = K.rope_backward_triton(dq_out, dk_out, cos, sin, rot, interleaved, dtype, dtype,
                                        dq=poison(dq_out), dk=poison(dk_out))
    else:
        qo, ko = K.rope_forward_reference(q, k, cos, sin, rot, interleaved)
        dq, dk = K.rope_backward_reference(dq_out, dk_out, cos, sin, rot, interleaved, dtype,
                                           dtype)
    for got, want in ((qo, q_ref), (ko, k_ref), (dq, dq_ref), (dk, dk_ref)):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < TOL[dtype]
    if rot < D:  # the features partial rotary passes through are copied exactly
        assert torch.equal(qo[..., rot:], q[..., rot:]) and torch.equal(dq[..., rot:],
                                                                        dq_out[..., rot:])


def test_rope_backward_is_exact_transpose_when_sin_halves_differ():
    """The backward is the transpose of the forward for any cos/sin, not only HF's (whose two
    halves are equal, where the transpose is the rotation by -sin)."""
    q, k = torch.randn(2, 3, 5, 12), torch.randn(2, 1, 5, 12)
    cos, sin = torch.randn(1, 1, 5, 12), torch.randn(1, 1, 5, 12)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    _, _, dq_ref, dk_ref = grads64(q, k, cos, sin, 12, dq_out, dk_out)
    dq, dk = K.rope_backward_triton(dq_out, dk_out, cos, sin, 12, False, q.dtype, k.dtype)
    assert rel_err(dq, dq_ref) < 1e-6 and rel_err(dk, dk_ref) < 1e-6


@pytest.mark.parametrize("tile", [None, (64, 2, 2), (128, 1, 4), (4096, 32, 8)])
def test_rope_tiles_and_layouts(tile, tuned):
    """Every launch configuration the tuner may set (benchmarks/tune_rope_ln.py), on layouts
    where cos/sin vary per head, broadcast over batch, or q/k have 2 or 3 dimensions."""
    tuned("rope", tile=tile)
    T, D = 7, 12
    layouts = [  # q, k, cos, sin, rot
        (torch.randn(2, 5, T, D), torch.randn(2, 5, T, D), torch.randn(2, 5, T, D),
         torch.randn(2, 5, T, D), D),  # cos/sin differ per head
        (torch.randn(3, 4, T, D), torch.randn(3, 1, T, D), torch.randn(1, 1, T, 6),
         torch.randn(1, 1, T, 6), 6),
        (torch.randn(4, T, D), torch.randn(4, T, D), torch.randn(T, D), torch.randn(T, D), D),
        (torch.randn(T, D), torch.randn(T, D), torch.randn(T, 8), torch.randn(T, 8), 8),
    ]
    nan = lambda t: torch.full_like(t, float("nan"))
    for q, k, cos, sin, rot in layouts:
        dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
        for interleaved in (False, True):
            want = grads64(q, k, cos, sin, rot, dq_out, dk_out, interleaved)
            got = (*K.rope_forward_triton(q, k, cos, sin, rot, interleaved, nan(q), nan(k)),
                   *K.rope_backward_triton(dq_out, dk_out, cos, sin, rot, interleaved, q.dtype,
                                           k.dtype, nan(q), nan(k)))
            assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))


def test_rope_in_place_into_an_owned_buffer():
    q, k, cos, sin = make_inputs(2, 4, 2, 7, 16, 16, torch.float32, transposed=False)
    want_q, want_k = reference64(q, cos, sin, 16), reference64(k, cos, sin, 16)
    q_buf, k_buf = q.clone(), k.clone()
    K.rope_forward_triton(q_buf, k_buf, cos, sin, 16, q_out=q_buf, k_out=k_buf)
    assert rel_err(q_buf, want_q) < 1e-6 and rel_err(k_buf, want_k) < 1e-6


def test_op_autograd_output_layout_and_opcheck():
    q, k, cos, sin = make_inputs(2, 4, 2, 7, 16, 10, torch.float32)
    q.requires_grad_(), k.requires_grad_()
    qo, ko = torch.ops.fastlora.rope(q, k, cos, sin, 10, False)
    assert qo.stride() == q.stride()  # the projection's layout is kept, as eager keeps it
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq_out, dk_out))
    q_ref, k_ref, dq_ref, dk_ref = grads64(q, k, cos, sin, 10, dq_out, dk_out)
    assert rel_err(qo, q_ref) < 1e-6 and rel_err(ko, k_ref) < 1e-6
    assert rel_err(q.grad, dq_ref) < 1e-6 and rel_err(k.grad, dk_ref) < 1e-6
    for interleaved in (False, True):
        args = make_inputs(2, 4, 2, 7, 16, 10, torch.float32)
        torch.library.opcheck(torch.ops.fastlora.rope.default, (*args, 10, interleaved))


def test_cos_sin_gradients_when_they_require_grad():
    q, k, cos, sin = make_inputs(2, 4, 2, 7, 16, 16, torch.float32)
    cos.requires_grad_(), sin.requires_grad_()
    qo, ko = torch.ops.fastlora.rope(q, k, cos, sin, 16, False)
    (qo.square().sum() + ko.sum()).backward()
    c64, s64 = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
    (reference64(q, c64, s64, 16).square().sum() + reference64(k, c64, s64, 16).sum()).backward()
    assert rel_err(cos.grad, c64.grad) < 1e-5 and rel_err(sin.grad, s64.grad) < 1e-5


def test_bad_input_errors():
    q, k, cos, sin = make_inputs(1, 2, 2, 3, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="rot_dim must be even"):
        torch.ops.fastlora.rope(q, k, cos, sin, 7, False)
    with pytest.raises(ValueError, match="ending in rot_dim"):
        torch.ops.fastlora.rope(q, k, cos, sin, 4, False)
    with pytest.raises(ValueError, match="do not broadcast"):
        torch.ops.fastlora.rope(q, k, cos.expand(1, 3, 3, 8), sin.expand(1, 3, 3, 8), 8, False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.fastlora.rope(q.double(), k, cos, sin, 8, False)


# ---- through the backend ----------------------------------------------------------------------


def test_packed_sequences_compiled_vs_eager():
    """Position ids that restart inside a row (padding-free packing): cos/sin are gathered per
    token, and the fused rotation must follow them exactly."""
    model = with_lora(tiny_llama(layers=2))
    ids = torch.randint(0, 97, (2, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4],
                                 [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    loss_err, grad_errs, _ = compare_compiled(model, {"input_ids": ids, "labels": ids,
                                                      "position_ids": position_ids})
    assert fastlora.last_report().counts()["rope"] == 2
    assert loss_err < 1e-6 and max(grad_errs.values()) < 1e-5, grad_errs


def test_rope_disabled_by_option():
    model = with_lora(tiny_llama(layers=1))
    ids = torch.randint(0, 97, (2, 5))
    compare_compiled(model, {"input_ids": ids, "labels": ids}, {"disable": ["rope"]})
    assert "rope" not in fastlora.last_report().counts()


class RotateHalves(torch.nn.Module):
    """GPT-OSS's rotation: each half of q and k with cos/sin of one half (rope_halves)."""

    def forward(self, q, k, cos, sin):
        def rotate(x):
            x1, x2 = torch.chunk(x, 2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotate(q), rotate(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_of_two_halves_with_half_tables(dtype):
    q = torch.randn(2, 4, 7, 10, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 7, 10, dtype=dtype, requires_grad=True)
    cos, sin = (t.to(dtype) for t in rotary_tables(torch.arange(7)[None], 10))
    cos, sin = cos[..., :5], sin[..., :5]  # one half: both halves use the same frequencies
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    compiled = torch.compile(RotateHalves(), backend="fastlora",
                             options={"compiler": "aot_eager", "strict": True})
    qo, ko = compiled(q, k, cos, sin)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_out, dk_out))
    report = fastlora.last_report()
    assert report.counts() == {"rope": 1}
    assert report.matches[0]["spelling"] == "rope_halves"
    full = lambda t: torch.cat((t, t), -1)  # noqa: E731
    want = grads64(q.detach(), k.detach(), full(cos), full(sin), 10, dq_out, dk_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, ref in zip((qo, ko, dq, dk), want):
        assert got.dtype == dtype and rel_err(got, ref) < tol


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class QOnly(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return q * cos + _rotate_half(q) * sin, k


class SwappedPairs(torch.nn.Module):
    """An interleaved rotation with the pair members' order swapped: not a rotation we fuse."""

    def forward(self, q, k, cos, sin):
        rot = lambda x: torch.stack([x[..., ::2], -x[..., 1::2]], dim=-1).flatten(-2)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class Rotate(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


q4, k4 = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
cs = torch.randn(1, 1, 5, 8)
wide = torch.randn(1, 3, 5, 8)  # 3 "heads" of cos/sin for q, k with 1 head: broadcasts q


@pytest.mark.parametrize("module,args,reason", [
    (QOnly(), (q4, k4, cs, cs),
     "spelling `rope_rotate_half`: no partner found for output 1 of the pattern"),
    (SwappedPairs(), (q4, k4, cs, cs), "no spelling of `rope` leads to this torch.neg"),
    (Rotate(), (q4[:, :1], k4[:, :1], wide, wide),
     "cos/sin of shape (1, 3, 5, 8) would broadcast q of shape (2, 1, 5, 8); the kernel "
     "rotates each q vector once"),
])
def test_near_misses_are_left_alone_with_their_reason(module, args, reason):
    compiled = torch.compile(module, backend="fastlora", options={"compiler": "aot_eager"})
    out, ref = compiled(*args), module(*args)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    report = fastlora.last_report()
    assert "rope" not in report.counts()
    reasons = [n["reason"] for n in report.near_misses if n["pattern"] == "rope"]
    assert reasons and all(r.startswith(reason) for r in reasons), reasons


# ---- GPU (run with `pytest -m gpu` on the H200) --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(4, 32, 8, 2048, 128, 128), (2, 32, 32, 4096, 96, 96),
                                  (4, 32, 8, 2048, 128, 96), (3, 5, 1, 37, 72, 72)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_cuda_matches_float64(case, dtype, interleaved):
    B, Hq, Hk, T, D, rot = case
    q, k, cos, sin = make_inputs(B, Hq, Hk, T, D, rot, dtype, packed=True,
                                 interleaved=interleaved)
    dq_out, dk_out = torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hk, T, D, dtype=dtype)
    q_ref, k_ref, dq_ref, dk_ref = grads64(q, k, cos, sin, rot, dq_out, dk_out, interleaved)
    cuda = lambda *ts: [t.cuda() for t in ts]
    qc, kc, cc, sc, dqc, dkc = cuda(q, k, cos, sin, dq_out, dk_out)
    nan = lambda t: torch.full_like(t, float("nan"))
    qo, ko = K.rope_forward_triton(qc, kc, cc, sc, rot, interleaved, q_out=nan(qc), k_out=nan(kc))
    dq, dk = K.rope_backward_triton(dqc, dkc, cc, sc, rot, interleaved, dtype, dtype,
                                    dq=nan(dqc), dk=nan(dkc))
    for got, want in ((qo, q_ref), (ko, k_ref), (dq, dq_ref), (dk, dk_ref)):
        assert rel_err(got.cpu(), want) < TOL[dtype]


@pytest.mark.gpu
def test_packed_sequences_cuda_inductor():
    model = with_lora(tiny_llama(layers=2)).cuda()
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    pos = torch.cat([torch.arange(17), torch.arange(23)]).expand(2, 40).cuda()
    loss_err, grad_errs, _ = compare_compiled(
        model, {"input_ids": ids, "labels": ids, "position_ids": pos}, {"compiler": "inductor"})
    assert fastlora.last_report().counts()["rope"] == 2
    assert loss_err < 1e-5 and max(grad_errs.values()) < 1e-4, grad_errs
