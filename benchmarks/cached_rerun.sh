#!/usr/bin/env bash
# A cold start, then a rerun served from the compile caches: compile_profile.py's first training
# step twice, each in its own process, with one fresh inductor cache folder (AOTAutograd's
# cache, inductor's FX graph cache and Triton's kernels all live under it). Arguments go to
# compile_profile.py; --no-cprofile is always given (cProfile slows the compile ~1.5x).
#   benchmarks/cached_rerun.sh --shape llama-1b --layers 0           # on the GPU
#   benchmarks/cached_rerun.sh --shape tiny --layers 2 --options '{"compiler": "inductor"}'
# Prints each run's summary line (first step s, second step s, AOTAutograd's cache counters) and
# writes compile_profile_*.json per run under $OUT/cached_rerun/{cold,cached}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}/cached_rerun
cache=$(mktemp -d /tmp/fastlora-cached-rerun.XXXXXX)
status=0
for run in cold cached; do
  echo "== $run (TORCHINDUCTOR_CACHE_DIR=$cache)"
  TORCHINDUCTOR_CACHE_DIR=$cache python3 benchmarks/compile_profile.py --no-cprofile \
    --out "$out/$run" "$@" 2>&1 | grep -E "first step|cache bypassed|unable to load|^Traceback|Error" || status=$?
done
rm -rf "$cache"
exit $status
