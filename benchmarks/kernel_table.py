"""GPU time per step by kind of kernel, per variant, from the rows train_step.py wrote (each row
keeps its profiled steps' top kernels, ``top_kernels``), so two variants' steps compare where
their GPU time goes:

    python benchmarks/kernel_table.py benchmarks/results/train_step.jsonl [--kernels 12]

Kinds are read off kernel names: 4-bit dequantization, hand-written Triton kernels (``_name``:
fastlora's in a fastlora row, the peer's in a peer's row), attention (flash, cuDNN), cuBLAS and
CUTLASS GEMMs, the optimizer, inductor's generated kernels (``triton_...``), PyTorch's own
elementwise and reduction kernels, the rest. Only the top kernels of each row are kept, so
each table's last line says how much of the step's GPU time they cover.
"""
from __future__ import annotations

import argparse
import json
import re

KINDS = [  # (kind, pattern on the kernel's name), first match wins
    ("4-bit dequantization", r"dequant"),
    # Triton kernels written by hand: fastlora's in a fastlora row, the peer's in a peer's row
    ("library Triton", r"^_\w+$"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cudnn"),
    ("GEMM", r"gemm|sm\d+_xmma|cutlass|cublas|matmul|nvjet"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("inductor", r"^triton_"),
    ("PyTorch elementwise", r"elementwise|vectorized|reduce_kernel|index"),
]


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def table(row: dict, top: int) -> str:
    kernels = row.get("top_kernels") or []
    by_kind: dict[str, float] = {}
    for k in kernels:
        label = kind(k["kernel"])
        by_kind[label] = by_kind.get(label, 0.0) + k["ms"]
    gpu_ms = row.get("gpu_ms") or 0
    lines = [f"{row['shape']} {row['variant']}: step {row.get('step_ms', 0):.1f} ms, "
             f"GPU {gpu_ms:.1f} ms"]
    lines += [f"  {label:20s} {ms:8.2f} ms" for label, ms in
              sorted(by_kind.items(), key=lambda item: -item[1])]
    covered = sum(by_kind.values())
    lines.append(f"  {'(top kernels cover)':20s} {covered:8.2f} ms of {gpu_ms:.1f}")
    lines += [f"    {k['ms']:7.2f} ms {k['calls']:6.1f} calls  {k['kernel']}"
              for k in kernels[:top]]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--kernels", type=int, default=12, help="kernels listed per row")
    args = ap.parse_args(argv)
    for path in args.jsonl:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("top_kernels"):
                    print(table(row, args.kernels), end="\n\n")


if __name__ == "__main__":
    main()
