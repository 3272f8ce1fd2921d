"""LoRA ops at the targets.md shapes: 8192 tokens (4 x 2048), r = 16, bf16 base weights and
float32 adapters (what peft gives a bf16 model), vs peft's eager spelling and inductor's code
for it. ``python benchmarks/kernels.py --ops lora``.

Rows: every LoRA'd linear of a Llama-3.2-1B layer (hidden 2048, ffn 8192) and a Llama-3-8B layer
(hidden 4096, ffn 14336), the gate/up + SwiGLU block as one ``lora_mlp``, q/k/v as one
``lora_qkv``, and the 4-bit (NF4,
double quant) base of QLoRA when bitsandbytes is importable. TFLOP/s count the matmul FLOPs the
op must do (base + adapter; backward: dx and the adapter gradients, no dW).
"""
import torch
import torch.nn.functional as F

from . import Case

TOKENS, RANK, SCALE = 8192, 16, 2.0
SHAPES = {"1B": (2048, 8192), "8B": (4096, 14336)}


def peft_lora(x, w, a, b):
    """peft's lora.Linear forward on a bf16 base with float32 adapters."""
    result = F.linear(x, w)
    lora = F.linear(F.linear(x.to(a.dtype), a), b) * SCALE
    return (result + lora).to(result.dtype)


def fused_lora(x, w, a, b):
    return torch.ops.fastlora.lora_linear(x, w, None, None, a, b, None, SCALE, 0.0, x.dtype)[0]


def peft_mlp(x, wg, ag, bg, wu, au, bu):
    return F.silu(peft_lora(x, wg, ag, bg)) * peft_lora(x, wu, au, bu)


def fused_mlp(x, wg, ag, bg, wu, au, bu):
    return torch.ops.fastlora.lora_mlp(x, wg, None, ag, bg, wu, None, au, bu, None, SCALE, SCALE,
                                       0.0, "silu", x.dtype)[0]


# The runner differentiates one output: q, k, v are concatenated (the same copy in both rows).
def peft_qkv(x, wq, aq, bq, wk, ak, bk, wv, av, bv):
    return torch.cat([peft_lora(x, wq, aq, bq), peft_lora(x, wk, ak, bk),
                      peft_lora(x, wv, av, bv)], -1)


def fused_qkv(x, wq, aq, bq, wk, ak, bk, wv, av, bv):
    return torch.cat(torch.ops.fastlora.lora_qkv(x, wq, None, aq, bq, wk, None, ak, bk, wv, None,
                                                 av, bv, None, SCALE, SCALE, SCALE, 0.0,
                                                 x.dtype)[:3], -1)


def _adapter(k, n):
    a = (torch.randn(RANK, k, device="cuda") / k ** 0.5).requires_grad_()
    b = (torch.randn(n, RANK, device="cuda") * 0.01).requires_grad_()
    return a, b


def _linear_case(name, k, n, dtype):
    def make(k=k, n=n):
        x = torch.randn(TOKENS, k, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        a, b = _adapter(k, n)
        return {"x": x, "w": w, "a": a, "b": b}
    m = TOKENS
    return Case("lora_linear", f"{name} {m}x{k}->{n}", make, peft_lora, fused_lora,
                flops_fwd=2 * m * k * n + 2 * m * RANK * (k + n),
                flops_bwd=2 * m * k * n + 4 * m * RANK * (k + n))


def _mlp_case(name, k, f, dtype):
    def make(k=k, f=f):
        x = torch.randn(TOKENS, k, device="cuda", dtype=dtype, requires_grad=True)
        wg = torch.randn(f, k, device="cuda", dtype=dtype) / k ** 0.5
        wu = torch.randn(f, k, device="cuda", dtype=dtype) / k ** 0.5
        ag, bg = _adapter(k, f)
        au, bu = _adapter(k, f)
        return {"x": x, "wg": wg, "ag": ag, "bg": bg, "wu": wu, "au": au, "bu": bu}
    m = TOKENS
    return Case("lora_mlp", f"{name} {m}x{k}->2x{f}", make, peft_mlp, fused_mlp,
                flops_fwd=2 * (2 * m * k * f + 2 * m * RANK * (k + f)),
                flops_bwd=2 * (2 * m * k * f + 4 * m * RANK * (k + f)))


def _qkv_case(name, k, kv, dtype):
    def make(k=k, kv=kv):
        x = torch.randn(TOKENS, k, device="cuda", dtype=dtype, requires_grad=True)
        out = {"x": x}
        for p, n in (("q", k), ("k", kv), ("v", kv)):
            out["w" + p] = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
            out["a" + p], out["b" + p] = _adapter(k, n)
        return out
    m, n = TOKENS, k + 2 * kv
    return Case("lora_qkv", f"{name} {m}x{k}->{k}+2x{kv}", make, peft_qkv, fused_qkv,
                flops_fwd=2 * m * k * n + 2 * m * RANK * (3 * k + n),
                flops_bwd=2 * m * k * n + 4 * m * RANK * (3 * k + n))


def _qlora_case(name, k, n, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    def make(k=k, n=n):
        x = torch.randn(TOKENS, k, device="cuda", dtype=dtype, requires_grad=True)
        packed, qs = BF.quantize_4bit(torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5,
                                      blocksize=64, compress_statistics=True, quant_type="nf4")
        a, b = _adapter(k, n)
        return {"x": x, "packed": packed, "qs": qs, "a": a, "b": b}

    def eager(x, packed, qs, a, b):  # peft's bnb Linear4bit layer over bitsandbytes' matmul
        result = bnb.matmul_4bit(x, packed.t(), quant_state=qs).clone()
        return result + (F.linear(F.linear(x.to(a.dtype), a), b) * SCALE).to(result.dtype)

    def fused(x, packed, qs, a, b):
        return torch.ops.fastlora.lora_linear_4bit(
            x, packed, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, None, a, b, None,
            n, k, 64, "nf4", SCALE, 0.0, x.dtype, x.dtype)[0]
    m = TOKENS
    return Case("lora_linear_4bit", f"{name} {m}x{k}->{n}", make, eager, fused,
                flops_fwd=2 * m * k * n + 2 * m * RANK * (k + n),
                flops_bwd=2 * m * k * n + 4 * m * RANK * (k + n),
                inductor=False)  # Dynamo graph-breaks on the quant state object


def cases(dtype=torch.bfloat16):
    out = []
    for name, (hidden, ffn) in SHAPES.items():
        out += [_linear_case(f"{name} q/o", hidden, hidden, dtype),
                _linear_case(f"{name} gate/up", hidden, ffn, dtype),
                _linear_case(f"{name} down", ffn, hidden, dtype),
                _mlp_case(name, hidden, ffn, dtype),
                _qkv_case(name, hidden, hidden // 4, dtype)]  # 32 query, 8 kv heads
    try:
        import bitsandbytes  # noqa: F401
        out += [_qlora_case("8B gate/up", 4096, 14336, dtype),
                _qlora_case("8B down", 14336, 4096, dtype)]
    except ImportError:
        pass
    return out
