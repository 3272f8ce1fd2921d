"""How long Triton takes to compile fastlora's attention forward for the H200 (sm_90), and
whether compiles in threads overlap. Needs no GPU: Triton builds the cubin with its bundled
ptxas for an explicit target.

    python benchmarks/triton_compile_time.py                      # 4 variants, 1 and 2 threads
    python benchmarks/triton_compile_time.py --variants 8 --threads 1,4,8

Why: on the Python launch route (``FASTLORA_LAUNCH=python``) each kernel specialization is
compiled by Triton at its first launch, one after the other, inside the first training step.
The variants here are the attention forward with different constexprs (causal, padding mask,
sliding window, packed documents; bf16, head dim 64, the H200 tiles), each compiled from an
empty Triton cache. A thread pool's wall time against the serial one says whether Triton holds
the GIL while it compiles (if it does not, the step's kernels could be compiled in parallel
before the first launch). Compile time depends on the host's CPU: run it on the GPU machine's
host for the figure that matters there. Prints a table; writes JSON under --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning


def _attention_source(causal: bool, padding: bool, window: bool, documents: bool):
    from triton.compiler import ASTSource

    from fastlora.kernels.flash_attention import _attn_fwd
    strides = "qb qh qm kb kh kn vb vh vn ob oh om db kmb".split()
    signature = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", DS="*i32",
                     DE="*i32", KM="*i8", **{f"stride_{s}": "i32" for s in strides},
                     H="i32", GROUP="i32", S_Q="i32", S_K="i32", sm_scale="fp32",
                     softcap="fp32", window="i32")
    constants = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=128, BLOCK_N=64, CAUSAL=causal,
                     HAS_WINDOW=window, HAS_DOCS=documents, HAS_PAD=padding,
                     EMPTY_UNIFORM=False, HAS_SOFTCAP=False, UPCAST=False, DOT_PREC="tf32",
                     EVEN_D=True)
    signature.update({name: "constexpr" for name in constants})
    return ASTSource(_attn_fwd, signature=signature, constexprs=constants)


def _compile(variant) -> float:
    import triton
    from triton.backends.compiler import GPUTarget
    start = time.perf_counter()
    triton.compile(_attention_source(*variant), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 3})
    return time.perf_counter() - start


def measure(variants, threads: int) -> dict:
    cache = tempfile.mkdtemp(prefix="fastlora-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # empty: every variant really compiles
    try:
        start = time.perf_counter()
        if threads == 1:
            each = [_compile(v) for v in variants]
        else:
            with ThreadPoolExecutor(threads) as pool:
                each = list(pool.map(_compile, variants))
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"threads": threads, "compiles": len(variants), "wall_s": wall,
            "each_min_s": min(each), "each_max_s": max(each)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=4, help="how many constexpr sets (1-16)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not 1 <= args.variants <= 16:
        ap.error("--variants must be in 1..16")
    variants = list(itertools.product([True, False], repeat=4))[:args.variants]
    import triton
    rows = [measure(variants, int(t)) for t in args.threads.split(",")]
    serial = next((r["wall_s"] for r in rows if r["threads"] == 1), None)
    print(f"Triton {triton.__version__}, attention forward for sm_90, {os.cpu_count()} CPUs")
    print(f"{'threads':>7} {'compiles':>8} {'wall s':>8} {'each s':>11} {'vs 1 thread':>11}")
    for r in rows:
        speedup = f"{serial / r['wall_s']:.2f}x" if serial else ""
        print(f"{r['threads']:>7} {r['compiles']:>8} {r['wall_s']:>8.1f} "
              f"{r['each_min_s']:>5.2f}-{r['each_max_s']:<5.2f} {speedup:>11}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_compile_time.json").write_text(json.dumps(
        {"triton": triton.__version__, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
