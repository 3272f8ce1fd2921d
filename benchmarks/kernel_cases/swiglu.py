"""SwiGLU silu(gate) * up at the MLP widths of Llama-3.2-1B (8192) and Llama-3-8B (14336),
8192 tokens, and Phi-3's packed form (one gate_up tensor split in two)."""
import torch
import torch.nn.functional as F

from . import Case


def eager(gate, up):
    return F.silu(gate) * up


def fused(gate, up):
    return torch.ops.fastlora.swiglu(gate, up)


def eager_packed(x):
    gate, up = x.chunk(2, dim=-1)
    return up * F.silu(gate)


def fused_packed(x):
    return torch.ops.fastlora.swiglu_packed(x)


def cases(dtype=torch.bfloat16):
    e = torch.tensor([], dtype=dtype).element_size()
    out = []
    for tokens, ffn in ((8192, 8192), (8192, 14336)):
        def make(tokens=tokens, ffn=ffn):
            g = torch.randn(tokens, ffn, device="cuda", dtype=dtype, requires_grad=True)
            u = torch.randn(tokens, ffn, device="cuda", dtype=dtype, requires_grad=True)
            return {"gate": g, "up": u}
        n = tokens * ffn
        out.append(Case("swiglu", f"{tokens}x{ffn} {str(dtype)[6:]}", make, eager, fused,
                        bytes_fwd=3 * n * e,    # read gate, up; write y
                        bytes_bwd=5 * n * e))   # read dy, gate, up; write dgate, dup

    def make_packed(tokens=8192, ffn=8192):
        return {"x": torch.randn(tokens, 2 * ffn, device="cuda", dtype=dtype,
                                 requires_grad=True)}
    n = 8192 * 8192
    out.append(Case("swiglu", f"packed 8192x2x8192 {str(dtype)[6:]}", make_packed,
                    eager_packed, fused_packed, bytes_fwd=3 * n * e, bytes_bwd=5 * n * e))
    return out
