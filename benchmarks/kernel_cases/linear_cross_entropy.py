"""lm_head + cross-entropy (HF's causal-LM loss) at the targets.md shapes, 8192 tokens.

eager / inductor: ``F.cross_entropy(F.linear(h, W).float(), labels)`` (Gemma: softcap first;
Granite: the logits divided by logits_scaling first).
fastlora: ``torch.ops.fastlora.linear_cross_entropy``. The fused op runs both GEMMs (logits and
dh) and the softmax/gradient kernel in its forward and only scales dh in its backward, so
compare fwd + bwd totals, not the two columns separately. TFLOP/s use the unfused split:
forward = the logits GEMM (2NHV), backward = the dh GEMM (2NHV); W is frozen, as in LoRA.
Rows ``chunk=...`` force the rows per chunk, to choose the default on the card
(src/fastlora/kernels/linear_cross_entropy.py: chunk_rows).
"""
import torch
import torch.nn.functional as F

from . import Case

SHAPES = [  # name, tokens, hidden, vocab, softcap, logits divided by
    ("llama-1b", 8192, 2048, 128256, 0.0, 1.0),
    ("llama-8b", 8192, 4096, 128256, 0.0, 1.0),
    ("gemma2-2b", 8192, 2304, 256000, 30.0, 1.0),
    ("granite-3-8b", 8192, 4096, 49155, 0.0, 16.0),
]


def eager(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels)


def eager_softcapped(h, w, labels, cap=30.0):
    logits = torch.tanh(F.linear(h, w) / cap) * cap
    return F.cross_entropy(logits.float(), labels)


def eager_scaled(h, w, labels, scaling=16.0):
    return F.cross_entropy((F.linear(h, w) / scaling).float(), labels)


def fused(h, w, labels, cap=0.0, scale=1.0):
    return torch.ops.fastlora.linear_cross_entropy(h, w, labels, -100, "mean", cap,
                                                   cap > 0 or scale != 1.0, True, False,
                                                   scale)[0]


def _with_chunk(rows):
    from fastlora.kernels import tuning

    def run(h, w, labels):
        with tuning.override("linear_cross_entropy", chunk_rows=rows):
            return fused(h, w, labels)
    return run


def cases(dtype=torch.bfloat16):
    out = []
    for name, n, hidden, vocab, cap, scaling in SHAPES:
        def make(n=n, hidden=hidden, vocab=vocab):
            h = torch.randn(n, hidden, device="cuda", dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, hidden, device="cuda") / hidden ** 0.5).to(dtype)
            labels = torch.randint(0, vocab, (n,), device="cuda")
            labels[::8] = -100
            return {"h": h, "w": w, "labels": labels}
        flops = 2 * n * hidden * vocab
        shape = f"{name} {n}x{hidden}x{vocab}"
        if cap:
            out.append(Case("linear_cross_entropy", shape, make, eager_softcapped,
                            lambda h, w, labels, cap=cap: fused(h, w, labels, cap),
                            flops_fwd=flops, flops_bwd=flops))
            continue
        if scaling != 1.0:
            out.append(Case("linear_cross_entropy", shape, make,
                            lambda h, w, labels, s=scaling: eager_scaled(h, w, labels, s),
                            lambda h, w, labels, s=scaling: fused(h, w, labels, scale=1 / s),
                            flops_fwd=flops, flops_bwd=flops))
            continue
        out.append(Case("linear_cross_entropy", shape, make, eager, fused,
                        flops_fwd=flops, flops_bwd=flops))
        if name == "llama-1b":
            for rows in (256, 1024, 4096):
                out.append(Case("linear_cross_entropy", f"{shape} chunk={rows}", make, eager,
                                _with_chunk(rows), flops_fwd=flops, flops_bwd=flops,
                                inductor=False))
    return out
