#!/usr/bin/env bash
# The sixth device call (#12): what torch.compile and CUDA graphs buy at small batches on the GPU.
# DeiT-S geometry, random weights, 70 % kept per stage, bfloat16: every configuration eager and
# compiled (mode reduce-overhead: CUDA graphs), interleaved, batch 1 then batch 64, each under its own
# time limit so one slow compilation cannot cost the other's figures.
#
#   bash scripts/gpu_cuda_graphs.sh OUT_DIR          # about 4 minutes on an H200
set -u
OUT=${1:?usage: gpu_cuda_graphs.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for batch in 1 64; do
  timeout "${LIMIT:-170}" python3 -m iared bench --model deit_small_patch16_224 --device cuda --dtype bfloat16 \
      --batch-sizes "$batch" --strategies varlen --keep 0.7 --compile --compile-mode reduce-overhead \
      --json "$OUT/deit_s_cudagraphs_b$batch.json" > "$OUT/deit_s_cudagraphs_b$batch.log" 2>&1
  echo "batch $batch: exit $?" >> "$OUT/deit_s_cudagraphs_b$batch.log"
done
