#!/usr/bin/env bash
# Download the Unsloth set the GPU machine lacks into .whl_unsloth/ at the repository root
# (Python 3.12, x86-64; ignored by git). Carry it with the run: run_gpu.sh installs it into a
# folder of its own that only the unsloth variant's process sees (Unsloth patches libraries on
# import). The GPU machine already has torch, transformers (<= 5.17, as unsloth 2026.10.9
# needs), peft, accelerate; shared/gpu/wheels.sh brings bitsandbytes and datasets.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
mkdir -p "$root/.whl_unsloth"
grep -qx '/.whl_unsloth/' "$root/.git/info/exclude" 2>/dev/null \
  || echo '/.whl_unsloth/' >> "$root/.git/info/exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$root/.whl_unsloth" \
  "unsloth==2026.10.9" "unsloth_zoo==2026.10.9" torchao tyro docstring-parser typeguard shtab \
  "trl==1.15.0" cut_cross_entropy einops sentencepiece hf_transfer msgspec protobuf "$@"
du -sh "$root/.whl_unsloth"
