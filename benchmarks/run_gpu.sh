#!/usr/bin/env bash
# One command for the GPU machine, from a checkout (see benchmarks/README.md):
#   benchmarks/run_gpu.sh tests                      # pytest -m gpu (over 10 minutes on an H200)
#   benchmarks/run_gpu.sh tests-attention|tests-kernels|tests-models   # one third of it each
#   TESTS_TIMEOUT=250 benchmarks/run_gpu.sh tests-models   # stop pytest after 250 s, keep its summary
#   benchmarks/run_gpu.sh kernels [--ops rms_norm]   # benchmarks/kernels.py
#   benchmarks/run_gpu.sh train [--shapes llama-1b --variants fastlora,inductor]
#   benchmarks/run_gpu.sh varlen [--modes padded,padfree --variants fastlora-trainer,unsloth]
#   benchmarks/run_gpu.sh exec python3 benchmarks/compile_profile.py   # any command, same set-up
#   benchmarks/run_gpu.sh curve [--points gc-offload,gc,no-gc]      # benchmarks/memory_curve.py
#   benchmarks/run_gpu.sh parts [--load-4bit --kbit-recipe bf16 --variants fastlora]  # memory_parts.py
#   benchmarks/run_gpu.sh probe                      # versions and what this torch can do (seconds)
#   benchmarks/run_gpu.sh all                        # tests, kernels, then train with defaults
# Installs carried wheels from .whl/ (shared/gpu/wheels.sh), uses fastlora from src/ without
# installing it, and writes logs and results under $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# .whl: bitsandbytes, liger, trl, datasets...
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# .whl_unsloth (optional): the trimmed Unsloth set, in its own folder that train_step.py puts
# on the path of the unsloth variant's process only (Unsloth patches libraries on import).
if ls .whl_unsloth/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth \
    .whl_unsloth/*.whl && export FASTLORA_UNSLOTH_SITE=/tmp/site_unsloth
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mode=${1:-all}; shift || true
status=0
run() { echo "== $*"; "$@" || status=$?; }
group() {  # the GPU tests in three groups that each fit a 10-minute device call
  case "$1" in
    attention) echo tests/test_flash_attention_kernel.py tests/test_attention_pattern.py \
               tests/test_attention_padding.py ;;
    kernels) echo tests/test_glu_kernels.py tests/test_layer_norm_kernel.py \
               tests/test_linear_cross_entropy_kernel.py tests/test_lora_grouped.py \
               tests/test_lora_linear.py tests/test_lora_linear_models.py tests/test_rope_kernel.py ;;
    models) echo tests/test_gpu_spine.py tests/test_cli.py tests/test_trl.py tests/test_qlora.py tests/test_qlora_recipes.py \
              tests/test_linear_cross_entropy_pattern.py tests/test_options.py \
              tests/test_lora_moe_experts.py tests/test_launch_gpu.py tests/test_offload.py \
              tests/test_offload_embeddings_gpu.py tests/test_offload_lm_head_gpu.py tests/test_warmup_gpu.py \
              tests/test_flash_attention_sinks.py tests/test_compile_cache.py ;;
  esac
}
case "$mode" in
  tests-attention|tests-kernels|tests-models)
           # TESTS_TIMEOUT=N (seconds): interrupt pytest itself (SIGINT) after N s, so it still
           # prints which tests passed and failed (a timeout around this script loses that)
           name=${mode#tests-}
           run timeout -s INT "${TESTS_TIMEOUT:-0}" python3 -m pytest -q -m gpu -p no:cacheprovider \
             -rfEsp --durations=10 $(group "$name") "$@" 2>&1 | tee "$OUT/gpu_tests_$name.log" ;;
  tests)   run python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  kernels) run python3 benchmarks/kernels.py --out "$OUT" "$@" ;;
  train)   run python3 benchmarks/train_step.py --out "$OUT" "$@" ;;
  varlen)  run python3 benchmarks/train_varlen.py --out "$OUT" "$@" ;;
  exec)    run "$@" ;;  # any command, in this environment (wheels installed, src on the path)
  probe)   run python3 benchmarks/probe.py ;;
  curve)   run python3 benchmarks/memory_curve.py --out "$OUT" "$@" ;;
  parts)   run python3 benchmarks/memory_parts.py --out "$OUT" "$@" ;;
  all)     run python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
           run python3 benchmarks/kernels.py --out "$OUT"
           run python3 benchmarks/train_step.py --out "$OUT" ;;
  *) echo "usage: $0 tests|tests-attention|tests-kernels|tests-models|kernels|train|varlen|exec|probe|curve|parts|all [args]"
     exit 2 ;;
esac
exit $status
