"""Compile the LoRA GLU kernels for sm_90 (H100/H200) with Triton's real compiler and ptxas, on
a machine without a GPU; run by tests/test_sm90_compile.py in a process of its own (the suite's
Triton interpreter replaces @triton.jit functions, which then cannot be compiled). Prints one
JSON line: {case id: shared memory bytes, or the error}."""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlora.kernels import _glu_grad_a, lora_mlp

COMMON = {"M": "i32", "N": "i32", "RG": "i32", "RU": "i32", "stride_bg": "i32",
          "stride_bu": "i32", "stride_xa": "i32", "stride_wbg": "i32", "stride_wbu": "i32",
          "sg": "fp32", "su": "fp32", "XA": "*fp32", "WBG": "*fp32", "WBU": "*fp32"}
BWD = {"DA_PART": "*fp32", "stride_dh": "i32", "stride_d": "i32", "cols_per_split": "i32"}
GRAD_A = {"DA": "*fp32", "PART": "*fp32", "RD": "i32", "stride_da": "i32",
          "rows_per_split": "i32"}
# (kernel, its argument types besides COMMON (the rest: activation pointers), constexprs besides
# ACT / MODE / FIX / BLOCK_RG / BLOCK_RU): every code path the launchers can pick
CASES = [
    (lora_mlp._lora_glu_fwd_kernel, {"stride_h": "i32"},
     {"BLOCK_M": 32, "BLOCK_N": 128, "ROW_BLOCKS": 1}),
    (lora_mlp._lora_glu_fwd_kernel, {"stride_h": "i32"},
     {"BLOCK_M": 32, "BLOCK_N": 128, "ROW_BLOCKS": 4}),
    (lora_mlp._lora_glu_bwd_kernel, BWD, {"BLOCK_M": 64, "BLOCK_N": 64, "ONE_B": False}),
    (lora_mlp._lora_glu_bwd_kernel, BWD, {"BLOCK_M": 64, "BLOCK_N": 64, "ONE_B": True}),
    (_glu_grad_a._glu_grad_a_kernel, GRAD_A, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_RD": 16}),
]
# activation pointer type and dot MODE (kernels/_dot_precision.py): bfloat16 parts (3) for
# bfloat16 models, tf32x3 (1) for float32 and float16 ones
PRECISIONS = [("*bf16", 3), ("*fp32", 1), ("*fp16", 1)]


def compile_sm90(fn, act, types, constexprs):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, COMMON.get(n, act))
                 for n in names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 3})


def main():
    out = {}
    for fn, types, extra in CASES:
        for act, mode in PRECISIONS:
            consts = {"ACT": 0, "MODE": mode, "FIX": False, "BLOCK_RG": 16, "BLOCK_RU": 16,
                      **extra}
            case = f"{fn.__name__} {act} {sorted(extra.items())}"
            try:
                compiled = compile_sm90(fn, act, types, consts)
                out[case] = {"shared": compiled.metadata.shared,
                             "cubin": bool(compiled.asm.get("cubin"))}
            except Exception as e:  # reported, and the test fails on it
                out[case] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
