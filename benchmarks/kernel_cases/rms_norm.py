"""RMSNorm (Llama spelling) at hidden 4096 and 8192, 8192 rows."""
import torch

from . import Case


def eager(x, w, eps=1e-6):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def fused(x, w, eps=1e-6):
    return torch.ops.fastlora.rms_norm(x, w, eps, 0.0, True)[0]


def cases(dtype=torch.bfloat16):
    out = []
    for rows, hidden in ((8192, 4096), (8192, 8192), (16384, 4096)):
        def make(rows=rows, hidden=hidden):
            x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(hidden, device="cuda", dtype=dtype)  # frozen, as in LoRA
            return {"x": x, "w": w}
        e = torch.tensor([], dtype=dtype).element_size()
        n = rows * hidden
        out.append(Case("rms_norm", f"{rows}x{hidden} {str(dtype)[6:]}", make, eager, fused,
                        bytes_fwd=2 * n * e + 4 * rows,           # read x, write y (+ rstd)
                        bytes_bwd=3 * n * e + 4 * rows))          # read dy, x; write dx
    return out
