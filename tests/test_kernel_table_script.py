"""benchmarks/kernel_table.py sorts a profiled step's kernels into kinds by name, so fastlora's
and a peer's GPU time compare kind by kind. The names here are the ones the H100 profiles
show (cuBLAS, cuDNN and PyTorch's flash attention, fastlora's and inductor's Triton kernels, Unsloth's
Triton kernels, bitsandbytes' dequantization, the fused AdamW)."""
from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _script():
    spec = importlib.util.spec_from_file_location("kernel_table", BENCHMARKS / "kernel_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_kinds_and_table(tmp_path, capsys):
    script = _script()
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "GEMM",
             "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NTN": "GEMM",
             "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": "attention",
             "_lora_glu_bwd_kernel": "library Triton",
             "_dequant_4bit_rows_kernel": "4-bit dequantization",
             "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>": "4-bit dequantization",
             "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "inductor",
             "_rms_layernorm_backward": "library Triton",
             "_fl_flash_p_kernel": "library Triton",
             "void at::native::(anonymous namespace)::fused_adam_kernel": "optimizer",
             "void at::native::vectorized_elementwise_kernel<4, ...>": "PyTorch elementwise",
             "Memcpy DtoH (Device -> Pinned)": "other"}
    assert {name: script.kind(name) for name in names} == names
    row = {"shape": "llama-1b", "variant": "fastlora-trainer", "step_ms": 110.0, "gpu_ms": 100.0,
           "top_kernels": [{"kernel": name, "ms": 2.0, "calls": 16.0} for name in names]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "top_kernels": []}) + "\n")
    script.main([str(path), "--kernels", "3"])
    out = capsys.readouterr().out
    assert out.count("llama-1b fastlora-trainer") == 1, out  # a row without kernels is skipped
    assert "GEMM                     4.00 ms" in out and "24.00 ms of 100.0" in out, out
    assert out.count(" calls  ") == 3, out
