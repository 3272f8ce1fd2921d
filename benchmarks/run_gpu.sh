#!/usr/bin/env bash
# One command for the GPU machine, from a checkout (see benchmarks/README.md):
#   benchmarks/run_gpu.sh tests                      # pytest -m gpu
#   benchmarks/run_gpu.sh kernels [--ops rms_norm]   # benchmarks/kernels.py
#   benchmarks/run_gpu.sh train [--shapes llama-1b --variants fastlora,inductor]
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
case "$mode" in
  tests)   run python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  kernels) run python3 benchmarks/kernels.py --out "$OUT" "$@" ;;
  train)   run python3 benchmarks/train_step.py --out "$OUT" "$@" ;;
  all)     run python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
           run python3 benchmarks/kernels.py --out "$OUT"
           run python3 benchmarks/train_step.py --out "$OUT" ;;
  *) echo "usage: $0 tests|kernels|train|all [args]"; exit 2 ;;
esac
exit $status
