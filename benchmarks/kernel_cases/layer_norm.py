"""LayerNorm (nn.LayerNorm: weight and bias, frozen as in LoRA; and OLMo's weightless one) at
hidden 2048 / 4096 / 8192, 8192 rows."""
import torch
import torch.nn.functional as F

from . import Case


def eager(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def fused(x, w, b, eps=1e-5):
    return torch.ops.fastlora.layer_norm(x, w, b, eps)[0]


def cases(dtype=torch.bfloat16):
    e = torch.tensor([], dtype=dtype).element_size()
    out = []
    for rows, hidden, affine in ((8192, 2048, True), (8192, 4096, True), (8192, 8192, True),
                                 (8192, 4096, False)):
        def make(rows=rows, hidden=hidden, affine=affine):
            x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(hidden, device="cuda", dtype=dtype) if affine else None
            b = torch.randn(hidden, device="cuda", dtype=dtype) if affine else None
            return {"x": x, "w": w, "b": b}
        n = rows * hidden
        out.append(Case("layer_norm", f"{rows}x{hidden}{'' if affine else ' no-affine'} "
                                      f"{str(dtype)[6:]}", make, eager, fused,
                        bytes_fwd=2 * n * e + 8 * rows,    # read x, write y (+ mean, rstd)
                        bytes_bwd=3 * n * e + 8 * rows))   # read dy, x; write dx
    return out
