#!/usr/bin/env bash
# The second device session (one H200): the varlen packed-attention path checked and timed on CUDA
# (#12), and the moving-digits backbone trained dense from the inflated image model (#13), after
# scripts/gpu_session.sh showed both the nested path's overhead and the video lane held back by it.
#
#   bash scripts/gpu_varlen_video.sh OUT_DIR      # about 4 minutes
set -u
OUT=${1:?usage: gpu_varlen_video.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=${RUNS:-/tmp/iared_runs}
mkdir -p "$R"
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }

{
  timeout 40 python3 -m pytest -q -p no:warnings -p no:cacheprovider tests/test_tokens.py -k varlen
  echo "varlen tests: exit $?"
  for model in deit_small_patch16_224 deit_base_patch16_224; do
    timeout "$(left 110)" python3 -m iared bench --model "$model" --device cuda --dtype bfloat16 \
      --batch-sizes 1,64,256 --keep 0.7 --strategies bucket,nested,varlen --repeats 5 --json "$R/bench2_$model.json"
    echo "bench $model: exit $?"
  done
} > "$OUT/bench.log" 2>&1

{
  timeout "$(left 175)" python3 -m iared train --task moving-digits --model moving_digits_tsf \
    --init-image digits_natural_vit --steps 1000 --batch-size 64 --lr 5e-4 --warmup 50 --train-size 30000 \
    --prerender 15 --eval-every 500 --save-every 250 --no-progress --out "$R/video_a" \
    --export "$OUT/moving_digits_tsf_dense.safetensors"
  echo "video dense: exit $?"
  timeout "$(left 235)" python3 -m iared train --task moving-digits --model moving_digits_tsf \
    --checkpoint "$R/video_a/checkpoint.pt" --steps 300 --batch-size 64 --lr 2e-4 --warmup 20 --seed 1 \
    --token-drop 0.5 --train-size 30000 --prerender 15 --eval-every 150 --save-every 100 --no-progress \
    --out "$R/video_b" --export "$OUT/moving_digits_tsf.safetensors"
  echo "video token drop: exit $?"
} > "$OUT/video.log" 2>&1

tar -cf "$OUT/runs.tar" -C "$R" --exclude='*.pt' . 2>/dev/null
echo "all done at $((SECONDS - start)) s" >> "$OUT/bench.log"
