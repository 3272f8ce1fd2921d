"""Fused lm_head + cross-entropy kernels (Triton under the interpreter, and the PyTorch
reference) vs float64, plus the custom op's autograd, reductions, ignore_index and bad input."""
import pytest
import torch
import torch.nn.functional as F

from fastlora.kernels import linear_cross_entropy as K
from helpers import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (rows, hidden, vocab, rows per chunk, vocabulary block): several chunks and several blocks
# per row (online softmax across blocks), a single chunk, a vocabulary not a multiple of 8.
SHAPES = [(37, 24, 101, 16, 32), (5, 72, 37, None, None), (3 * 7, 40, 97, 8, 64)]


def _round_st(t, dtype):
    """Round to ``dtype`` in value, pass the gradient straight through (eager's forward
    rounding, without also rounding the float64 reference gradient)."""
    return t + (t.to(dtype).double() - t).detach()


def reference64(h, w, labels, reduction="mean", cap=0.0, round_dtype=None, ignore_index=-100,
                logit_scale=1.0, bias=None):
    """Loss, dh, dw in float64 through autograd; the logits (and, with ``round_dtype``, each
    scale and softcap step) rounded like eager in the storage dtype. Mean over no valid label
    is 0."""
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    x = _round_st(h64 @ w64.T + (0 if bias is None else bias.double()), h.dtype)
    rnd = (lambda t: _round_st(t, round_dtype)) if round_dtype else (lambda t: t)
    if logit_scale != 1.0:
        x = rnd(x * logit_scale)
    if cap:
        x = rnd(rnd(torch.tanh(rnd(x / cap))) * cap)
    total = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="sum")
    n = (labels != ignore_index).sum().clamp(min=1)
    loss = total / n if reduction == "mean" else total
    dh, dw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), dh, dw


def _inputs(rows, hidden, vocab, dtype, ignore_every=5):
    h = torch.randn(rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden ** 0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[::ignore_every] = -100
    return h, w, labels


def _poisoned(rows, hidden, vocab, dtype, chunk):
    nan = float("nan")
    return {"dh": torch.full((rows, hidden), nan, dtype=dtype),
            "dw": torch.full((vocab, hidden), nan, dtype=dtype),
            "row_loss": torch.full((rows,), nan),
            "buffer": torch.full((min(chunk or rows, rows), vocab), nan, dtype=dtype)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cap,round_softcap", [(0.0, False), (3.0, False), (3.0, True)])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_matches_float64(shape, dtype, reduction, cap, round_softcap, impl):
    rows, hidden, vocab, chunk, block_v = shape
    h, w, labels = _inputs(rows, hidden, vocab, dtype)
    loss, dh, dw = K.linear_cross_entropy_forward(
        h, w, labels, -100, reduction, cap, round_softcap, True, True, impl=impl, chunk=chunk,
        block_v=block_v, **_poisoned(rows, hidden, vocab, dtype, chunk))
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, reduction, cap,
                                           dtype if round_softcap else None)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype]
    assert rel_err(dw, ref_dw) < TOL[dtype]


# Cohere's logit_scale (0.0625), Granite's 1 / logits_scaling (scaling 3: not a power of two,
# so the scaled logits are rounded), and a scale with softcap on top (no HF model has both).
@pytest.mark.parametrize("shape", SHAPES[::2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale,cap", [(0.0625, 0.0), (1 / 3, 0.0), (2.5, 3.0)])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_logit_scale_matches_float64(shape, dtype, logit_scale, cap, impl):
    rows, hidden, vocab, chunk, block_v = shape
    h, w, labels = _inputs(rows, hidden, vocab, dtype)
    loss, dh, dw = K.linear_cross_entropy_forward(
        h, w, labels, -100, "mean", cap, True, True, True, logit_scale, impl=impl, chunk=chunk,
        block_v=block_v, **_poisoned(rows, hidden, vocab, dtype, chunk))
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, "mean", cap, dtype,
                                           logit_scale=logit_scale)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype] and rel_err(dw, ref_dw) < TOL[dtype]
    unscaled, _, _ = K.linear_cross_entropy_forward(h, w, labels, -100, "mean", cap, True,
                                                    False, False, impl=impl, chunk=chunk)
    assert rel_err(unscaled, ref_loss) > 3 * TOL[dtype]  # the scale is not a no-op here


# A frozen lm_head bias (Phi): added to the logits before the loss, no gradient of its own.
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bias_matches_float64(shape, dtype, impl):
    rows, hidden, vocab, chunk, block_v = shape
    h, w, labels = _inputs(rows, hidden, vocab, dtype)
    bias = (torch.randn(vocab) * 2).to(dtype)
    loss, dh, dw = K.linear_cross_entropy_forward(
        h, w, labels, -100, "mean", 0.0, False, True, True, 1.0, bias, impl=impl, chunk=chunk,
        block_v=block_v, **_poisoned(rows, hidden, vocab, dtype, chunk))
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, bias=bias)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype] and rel_err(dw, ref_dw) < TOL[dtype]
    unbiased, _, _ = K.linear_cross_entropy_forward(h, w, labels, -100, "mean", 0.0, False,
                                                    False, False, impl=impl, chunk=chunk)
    assert rel_err(unbiased, ref_loss) > 3 * TOL[dtype]  # the bias is not a no-op here


def test_bias_checked_and_never_silently_untrained():
    h, w, labels = _inputs(4, 8, 11, torch.float32)
    op = torch.ops.fastlora.linear_cross_entropy
    with pytest.raises(ValueError, match="bias must be a torch.float32 vector of 11"):
        op(h, w, labels, -100, "mean", 0.0, False, True, False, 1.0, torch.zeros(10))
    with pytest.raises(ValueError, match="bias must be"):
        op(h, w, labels, -100, "mean", 0.0, False, True, False, 1.0,
           torch.zeros(11, dtype=torch.bfloat16))
    h.requires_grad_()
    with pytest.raises(ValueError, match="computes no bias gradient"):
        op(h, w, labels, -100, "mean", 0.0, False, True, False, 1.0,
           torch.zeros(11, requires_grad=True))
    loss = op(h, w, labels, -100, "mean", 0.0, False, True, False, 1.0, torch.zeros(11))[0]
    loss.backward()
    assert h.grad is not None


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_three_dim_hidden_states_and_dh_only(impl):
    h, w, labels = _inputs(2 * 9, 16, 53, torch.float32)
    h3 = h.view(2, 9, 16)
    loss, dh, dw = K.linear_cross_entropy_forward(h3, w, labels, -100, "mean", 0.0, False,
                                                  True, False, impl=impl, chunk=5)
    ref_loss, ref_dh, _ = reference64(h, w, labels)
    assert dh.shape == (2, 9, 16) and dw.numel() == 0
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(dh.view(-1, 16), ref_dh) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_gradient(impl, reduction):
    h, w, _ = _inputs(11, 16, 29, torch.float32)
    labels = torch.full((11,), -100)
    loss, dh, dw = K.linear_cross_entropy_forward(h, w, labels, -100, reduction, 2.0, False,
                                                  True, True, impl=impl, chunk=4,
                                                  **_poisoned(11, 16, 29, torch.float32, 4))
    assert loss.item() == 0.0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    # Deliberately unlike eager, whose mean over no token is 0/0:
    eager = F.cross_entropy(h @ w.T, labels, reduction=reduction)
    assert eager.isnan().item() == (reduction == "mean")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_other_ignore_index(impl):
    h, w, labels = _inputs(13, 8, 17, torch.float32, ignore_every=100)
    labels[::3] = 4  # a real class id used as ignore_index
    loss, dh, dw = K.linear_cross_entropy_forward(h, w, labels, 4, "mean", 0.0, False, True,
                                                  True, impl=impl)
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, ignore_index=4)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(dh, ref_dh) < 1e-5
    assert rel_err(dw, ref_dw) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_out_of_range_label_is_nan_not_silent(impl):
    h, w, labels = _inputs(6, 8, 11, torch.float32, ignore_every=100)
    labels[2] = 11  # == vocab: out of range
    loss, dh, _ = K.linear_cross_entropy_forward(h, w, labels, -100, "sum", 0.0, False, True,
                                                 False, impl=impl)
    assert loss.isnan().item()
    assert dh[2].isnan().all() and torch.isfinite(dh[[0, 1, 3, 4, 5]]).all()


def test_custom_op_autograd_and_opcheck():
    h = torch.randn(3, 7, 24, requires_grad=True)
    w = torch.randn(45, 24, requires_grad=True)
    labels = torch.randint(0, 45, (21,))
    labels[4] = -100
    loss = torch.ops.fastlora.linear_cross_entropy(h, w, labels, -100, "mean", 0.0, False,
                                                   True, True)[0]
    (loss * 3.5).backward()  # the backward scales by the incoming gradient
    ref_loss, ref_dh, ref_dw = reference64(h.detach().view(21, 24), w.detach(), labels)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(h.grad.view(21, 24), 3.5 * ref_dh) < 1e-5
    assert rel_err(w.grad, 3.5 * ref_dw) < 1e-5
    args = (torch.randn(2, 5, 16, requires_grad=True), torch.randn(19, 16),
            torch.randint(0, 19, (10,)), -100, "sum", 2.0, True, True, False)
    torch.library.opcheck(torch.ops.fastlora.linear_cross_entropy.default, args)
    torch.library.opcheck(torch.ops.fastlora.linear_cross_entropy.default, args + (0.25,))
    torch.library.opcheck(torch.ops.fastlora.linear_cross_entropy.default,
                          args + (0.25, torch.randn(19)))


def test_frozen_weight_gets_no_gradient():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    labels = torch.randint(0, 10, (4,))
    loss = torch.ops.fastlora.linear_cross_entropy(h, w, labels, -100, "mean", 0.0, False,
                                                   True, False)[0]
    loss.backward()
    assert w.grad is None and h.grad is not None


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gradient_accumulation_equals_one_big_batch(impl):
    """Two micro-batches with reduction='sum' / num_items_in_batch (HF's Trainer) give the
    gradient of one batch with reduction='mean'."""
    h, w, labels = _inputs(20, 12, 31, torch.float32, ignore_every=3)
    labels[11:] = torch.where(torch.rand(9) < 0.5, -100, labels[11:])  # unequal counts
    n_items = (labels != -100).sum()
    total, dh_parts, dw_sum = 0.0, [], 0.0
    for part in (slice(0, 11), slice(11, 20)):
        loss, dh, dw = K.linear_cross_entropy_forward(h[part], w, labels[part], -100, "sum",
                                                      0.0, False, True, True, impl=impl)
        total = total + loss / n_items
        dh_parts.append(dh / n_items)
        dw_sum = dw_sum + dw / n_items
    big_loss, big_dh, big_dw = K.linear_cross_entropy_forward(h, w, labels, -100, "mean", 0.0,
                                                              False, True, True, impl=impl)
    assert rel_err(total, big_loss) < 1e-6
    assert rel_err(torch.cat(dh_parts), big_dh) < 1e-6 and rel_err(dw_sum, big_dw) < 1e-6


def test_chunk_rows_heuristic():
    rows = K.chunk_rows(8192, 2048, 128256, 2)  # the 1B row of targets.md
    chunk_bytes = rows * 128256 * 2
    assert 1 <= rows <= 8192 and chunk_bytes <= max(8192 * 2048 * 2, 256 << 20)
    assert chunk_bytes >= (256 << 20) // 2  # big enough for an efficient dh GEMM
    assert K.chunk_rows(7, 16, 97, 4) == 7  # tiny inputs: one chunk


def test_bad_input_errors():
    h, w, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    op = torch.ops.fastlora.linear_cross_entropy
    with pytest.raises(ValueError, match="weight must have shape"):
        op(h, torch.randn(10, 9), labels, -100, "mean", 0.0, False, True, False)
    with pytest.raises(TypeError, match="same dtype"):
        op(h, w.bfloat16(), labels, -100, "mean", 0.0, False, True, False)
    with pytest.raises(TypeError, match="labels must be integers"):
        op(h, w, labels.float(), -100, "mean", 0.0, False, True, False)
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        op(h, w, labels[:3], -100, "mean", 0.0, False, True, False)
    with pytest.raises(ValueError, match="reduction must be"):
        op(h, w, labels, -100, "none", 0.0, False, True, False)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        op(h, w, labels, -100, "mean", 0.0, False, True, False, float("inf"))


# ---------------------------------------------------------------- GPU (run on the H200)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden,vocab,cap,scale", [(1000, 1024, 32003, 0.0, 1.0),
                                                         (2048, 2048, 128256, 0.0, 1.0),
                                                         (777, 640, 50257, 30.0, 1.0),
                                                         (1000, 1024, 49155, 0.0, 1 / 16),
                                                         (777, 640, 50257, 0.0, 0.0625)])
def test_cuda_matches_float64(dtype, rows, hidden, vocab, cap, scale):
    torch.manual_seed(0)
    h, w, labels = (t.cuda() for t in _inputs(rows, hidden, vocab, dtype, ignore_every=7))
    steps = cap > 0 or scale != 1.0
    loss, dh, dw = K.linear_cross_entropy_forward(
        h, w, labels, -100, "mean", cap, steps, True, True, scale, impl="triton", chunk=300,
        **{k: v.cuda() for k, v in _poisoned(rows, hidden, vocab, dtype, 300).items()})
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, "mean", cap, dtype if steps else None,
                                           logit_scale=scale)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype] and rel_err(dw, ref_dw) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bias_matches_float64(dtype):
    """Phi-2's head (hidden 2560, vocabulary 51200) with its frozen bias, several chunks."""
    torch.manual_seed(0)
    h, w, labels = (t.cuda() for t in _inputs(777, 2560, 51200, dtype, ignore_every=7))
    bias = (torch.randn(51200, device="cuda") * 2).to(dtype)
    loss, dh, dw = K.linear_cross_entropy_forward(
        h, w, labels, -100, "mean", 0.0, False, True, True, 1.0, bias, impl="triton", chunk=300,
        **{k: v.cuda() for k, v in _poisoned(777, 2560, 51200, dtype, 300).items()})
    ref_loss, ref_dh, ref_dw = reference64(h, w, labels, bias=bias)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(dh, ref_dh) < TOL[dtype] and rel_err(dw, ref_dw) < TOL[dtype]


@pytest.mark.gpu
def test_cuda_bf16_matches_eager_bitwise_close_and_saves_memory():
    """1B-row shape (8192 tokens, hidden 2048, vocab 128256, bf16): the fused op against
    F.linear + float + F.cross_entropy in eager, and the peak memory of each."""
    torch.manual_seed(0)
    N, H, V = 8192, 2048, 128256
    h0 = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::4] = -100

    def peak(fn):
        h = h0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(h)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), h.grad, (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    eager = lambda h: F.cross_entropy(F.linear(h, w).float(), labels)
    fused = lambda h: torch.ops.fastlora.linear_cross_entropy(h, w, labels, -100, "mean", 0.0,
                                                              False, True, False)[0]
    loss_e, dh_e, gib_e = peak(eager)
    loss_f, dh_f, gib_f = peak(fused)
    print(f"peak above inputs: eager {gib_e:.2f} GiB, fused {gib_f:.2f} GiB")
    assert rel_err(loss_f, loss_e) < 1e-5 and rel_err(dh_f, dh_e) < 1e-2
    assert gib_f < 1.0 and gib_e > 8.0
