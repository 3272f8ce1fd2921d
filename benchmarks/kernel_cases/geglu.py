"""GeGLU gelu(gate) * up, tanh and exact GELU, at Gemma-2-2B (9216) and Gemma-2-9B (14336)
MLP widths, 8192 tokens."""
import torch
import torch.nn.functional as F

from . import Case


def make_eager(approximate):
    def eager(gate, up):
        return F.gelu(gate, approximate=approximate) * up
    return eager


def make_fused(approximate):
    def fused(gate, up):
        return torch.ops.fastlora.geglu(gate, up, approximate)
    return fused


def cases(dtype=torch.bfloat16):
    e = torch.tensor([], dtype=dtype).element_size()
    out = []
    for approximate, shapes in (("tanh", ((8192, 9216), (8192, 14336))),
                                ("none", ((8192, 14336),))):
        for tokens, ffn in shapes:
            def make(tokens=tokens, ffn=ffn):
                g = torch.randn(tokens, ffn, device="cuda", dtype=dtype, requires_grad=True)
                u = torch.randn(tokens, ffn, device="cuda", dtype=dtype, requires_grad=True)
                return {"gate": g, "up": u}
            n = tokens * ffn
            out.append(Case("geglu", f"{approximate} {tokens}x{ffn} {str(dtype)[6:]}", make,
                            make_eager(approximate), make_fused(approximate),
                            bytes_fwd=3 * n * e, bytes_bwd=5 * n * e))
    return out
