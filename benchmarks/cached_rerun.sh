#!/usr/bin/env bash
# A cold start, then a rerun served from the compile caches: compile_profile.py's first training
# step twice, each in its own process, with one fresh inductor cache folder (AOTAutograd's
# cache, inductor's FX graph cache and Triton's kernels all live under it). Arguments go to
# compile_profile.py; --no-cprofile is always given (cProfile slows the compile ~1.5x).
#   benchmarks/cached_rerun.sh --shape llama-1b --layers 0           # on the GPU
#   benchmarks/cached_rerun.sh --shape tiny --layers 2 --options '{"compiler": "inductor"}'
# Prints each run's summary lines (first step s and by phase, second step s, AOTAutograd's cache
# counters) and writes compile_profile_*.json per run under $OUT/cached_rerun/{cold,cached}, and
# each run's whole output (Dynamo's compile_times() table: AOTAutograd's and inductor's phases)
# to $OUT/cached_rerun/{cold,cached}.log.
# PROFILE_CACHED=1: a third run from the same caches under cProfile (where a cached first step
# goes, function by function; ~1.5x slower), its report in $OUT/cached_rerun/profiled.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}/cached_rerun
cache=$(mktemp -d /tmp/fastlora-cached-rerun.XXXXXX)
status=0
mkdir -p "$out"
for run in cold cached; do
  echo "== $run (TORCHINDUCTOR_CACHE_DIR=$cache)"
  TORCHINDUCTOR_CACHE_DIR=$cache python3 benchmarks/compile_profile.py --no-cprofile \
    --out "$out/$run" "$@" > "$out/$run.log" 2>&1 || status=$?
  grep -E "first step|cache bypassed|unable to load|^Traceback|Error" "$out/$run.log"
done
if [ "${PROFILE_CACHED:-0}" = 1 ]; then
  echo "== cached, under cProfile"
  mkdir -p "$out/profiled"
  TORCHINDUCTOR_CACHE_DIR=$cache python3 benchmarks/compile_profile.py --out "$out/profiled" "$@" \
    > "$out/profiled.log" 2>&1 || status=$?
  sed -n '/^self time by place/,$p' "$out/profiled.log"
fi
rm -rf "$cache"
exit $status
