#!/usr/bin/env bash
# The LoRA GLU kernels' open questions in one device call (about 7 minutes on an H100):
#   benchmarks/run_gpu.sh exec benchmarks/glu_ab.sh [--quick]
# 1. the GPU tests of the GLU kernels (every code path) and of lora_mlp_block's backward;
# 2. benchmarks/tune_lora.py over the GLU launch keys (row_blocks, one_b, stages) and
#    _glu_grad_a_kernel's tile (--quick: every third candidate);
# 3. the Llama-3.2-1B row with the best configurations found, lora_glu_grad_a off (the default:
#    the GLU forward kernel writes h in backward and dA_down reads it back) and on (h made in
#    registers, never stored), each in its own process, beside Unsloth.
# Writes under $OUT: tune/tune_lora_glu.json, off/ and on/ (train_step rows), gpu_tests_glu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
status=0
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 -p no:logging \
  tests/test_lora_grouped.py::test_cuda_lora_mlp_matches_float64 \
  tests/test_lora_mlp_block.py::test_backward_keeps_two_new_hidden_sized_buffers_cuda \
  "tests/test_launch_gpu.py::test_inductor_route_mlp_block_backward_reuses_h_and_dh" \
  2>&1 | tee "$out/gpu_tests_glu.log" | tail -4 || status=$?
OUT=$out/tune timeout 200 python3 benchmarks/tune_lora.py --kernels glu_grad_a,glu_bwd,glu_fwd \
  --tag _glu "$@" | grep -A3 "^==" || status=$?
best=$(python3 -c "import json; r = json.load(open('$out/tune/tune_lora_glu.json'));
print(json.dumps({'lora_' + x['kernel']: x['best']['config'] for x in r if x['best']}))") \
  || best='{}'
echo "best: $best"
for on in false true; do
  tuning=$(python3 -c "import json; t = json.loads('$best');
t.setdefault('lora_glu_grad_a', {})['on'] = $([ $on = true ] && echo True || echo False);
print(json.dumps(t))")
  variants=fastlora-trainer; [ $on = true ] && variants=fastlora-trainer,unsloth
  OUT=$out/$([ $on = true ] && echo on || echo off) timeout 240 python3 benchmarks/train_step.py \
    --shapes llama-1b --variants $variants --tuning "$tuning" --timeout 110 | tail -4 \
    || status=$?
done
exit $status
