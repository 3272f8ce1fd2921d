"""Attention when the sequence length changes every step: what a never-seen length costs.

    python benchmarks/attention_lengths.py [--heads 32 --kv-heads 8 --head-dim 64 --batch 4]

Causal attention forward + backward (bf16, GQA, the Llama-3.2-1B shape by default) through each
implementation, called at a series of lengths: first every length once (each call at a new
length), then the same lengths again (each seen before). Per implementation it prints the mean
wall time of a call at a new length and at a seen one (synchronised, host included) and the GPU
time of a seen call (CUDA events). cuDNN's SDPA builds an execution graph per new shape, flash
and the Triton kernel compile nothing per length; the difference is what a variable-length
training step pays per attention shape. Writes JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))


def sdpa_with(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def triton_causal(q, k, v):
    import fastlora  # noqa: F401  (registers torch.ops.fastlora.*)
    return torch.ops.fastlora.flash_attention(q, k, v, None, q.shape[-1] ** -0.5, True, 0,
                                              0.0)[0]


IMPLS = {"sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
         "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
         "sdpa_efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
         "triton": triton_causal}


def call(fn, args, seq):
    B, H, HK, D = args.batch, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(B, H, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, HK, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, HK, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, seq, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    fn(q, k, v).backward(g)
    end.record()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t), start.elapsed_time(end)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    lengths = [1037 + 61 * i for i in range(16)]  # 1037..1952, none a multiple of 16
    rows = []
    for name in args.impls.split(","):
        fn = IMPLS[name]
        try:
            call(fn, args, 512)  # warm the implementation (and the Triton compile) at 512
            call(fn, args, 515)
            new = [call(fn, args, s) for s in lengths]
            seen = [call(fn, args, s) for s in lengths]
        except Exception as e:  # a backend this card or shape does not support
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
            continue
        row = {"impl": name, "new_ms": sum(w for w, _ in new) / len(new),
               "seen_ms": sum(w for w, _ in seen) / len(seen),
               "seen_gpu_ms": sum(g for _, g in seen) / len(seen), "lengths": lengths}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "lengths"}, flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_lengths.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'impl':<16}{'new length ms':>15}{'seen ms':>10}{'seen GPU ms':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16}  n/a: {r['error'][:80]}")
        else:
            print(f"{r['impl']:<16}{r['new_ms']:>15.2f}{r['seen_ms']:>10.2f}"
                  f"{r['seen_gpu_ms']:>13.2f}")


if __name__ == "__main__":
    main()
