#!/usr/bin/env bash
# One device session (one H100 / H200, 16 cores), as run for the shipped digits-natural and
# moving-digits backbones and the GPU latency figures of the README (#11, #12, #13):
#
#   bash scripts/gpu_session.sh OUT_DIR        # about 9 minutes; needs torch with CUDA, timm, scikit-*
#
# Two training lanes share the GPU (both models are small: the GPU waits on Python more than on
# arithmetic), then the benchmarks run alone so that their timings are the GPU's. Each step has a
# time limit, so the whole script ends in a known time even when a step is slower than planned;
# a step that fails leaves its log and the others go on. Every run is an ordinary `iared` command:
# the same commands on 2 CPU cores reproduce them, only slower (--prerender matters on a GPU only).
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=${RUNS:-/tmp/iared_runs}
mkdir -p "$R"
iared() { python3 -m iared "$@"; }
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }  # seconds until the script's second $1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm, sklearn, skimage; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.log" 2>&1

# Lane 1, moving-digits: the video backbone inflated from digits_natural_vit, then interpreters on it.
(
  timeout "$(left 260)" python3 -m iared train --task moving-digits --model moving_digits_tsf \
    --init-image digits_natural_vit --steps 3000 --batch-size 64 --lr 5e-4 --warmup 100 --token-drop 0.5 \
    --train-size 60000 --prerender 7 --eval-every 1000 --save-every 500 --no-progress \
    --out "$R/video" --export "$OUT/moving_digits_tsf.safetensors"
  echo "video backbone: exit $?"
  timeout "$(left 420)" python3 -m iared train-interpreters --checkpoint "$R/video/checkpoint.pt" \
    --task moving-digits --out "$R/video_iared" --steps-per-stage 300 --batch-size 32 --finetune-steps 300 \
    --device cuda --prerender 7 --quiet
  echo "video interpreters: exit $?"
  cp "$R/video_iared/pruned.pt" "$OUT/moving_digits_pruned.pt" 2>/dev/null
) > "$OUT/video.log" 2>&1 &

# Lane 2, digits-natural: a longer teacher, then the student's two phases (hints; token drop).
(
  timeout "$(left 150)" python3 -m iared train --task digits-natural --model digits_natural_cnn --steps 3000 \
    --batch-size 256 --lr 2e-3 --warmup 100 --train-size 60000 --prerender 7 --eval-every 1000 --save-every 500 \
    --no-progress --out "$R/nat_teacher"
  echo "teacher: exit $?"
  timeout "$(left 310)" python3 -m iared train --task digits-natural --model digits_natural_vit \
    --teacher "$R/nat_teacher/checkpoint.pt" --steps 2500 --batch-size 256 --lr 1e-3 --warmup 100 \
    --train-size 60000 --prerender 7 --eval-every 1250 --save-every 500 --no-progress --out "$R/nat_a"
  echo "student hints: exit $?"
  timeout "$(left 420)" python3 -m iared train --task digits-natural --model digits_natural_vit \
    --checkpoint "$R/nat_a/checkpoint.pt" --teacher "$R/nat_teacher/checkpoint.pt" --hint 0 --hint-class 0 \
    --token-drop 0.5 --steps 1500 --batch-size 256 --lr 5e-4 --warmup 50 --seed 1 --train-size 60000 \
    --prerender 7 --eval-every 500 --save-every 500 --no-progress --out "$R/nat_b" \
    --export "$OUT/digits_natural_vit.safetensors"
  echo "student token drop: exit $?"
) > "$OUT/natural.log" 2>&1 &

wait
echo "training lanes done at $((SECONDS - start)) s" >> "$OUT/env.log"

# Benchmarks, alone on the GPU: DeiT-S and DeiT-B geometry, random weights, keep 0.7 per stage, bf16.
{
  for model in deit_small_patch16_224 deit_base_patch16_224; do
    timeout "$(left 500)" python3 -m iared bench --model "$model" --device cuda --dtype bfloat16 \
      --batch-sizes 1,64,256 --keep 0.7 --json "$R/bench_$model.json"
    echo "bench $model: exit $?"
  done
  timeout "$(left 540)" python3 -m iared bench --model timesformer_base_patch16_224 --frames 8 --device cuda \
    --dtype bfloat16 --batch-sizes 1,8 --keep 0.7 --json "$R/bench_timesformer.json"
  echo "bench timesformer: exit $?"
} > "$OUT/bench.log" 2>&1

tar -cf "$OUT/runs.tar" -C "$R" --exclude='*.pt' . 2>/dev/null
echo "all done at $((SECONDS - start)) s" >> "$OUT/env.log"
