#!/usr/bin/env bash
# The fifth device session (one H200): the probability reward on moving-digits (#13). Three
# interpreter runs side by side (`--reward probability`, tau 5 / 10 / 20, 300 REINFORCE steps per
# stage at batch 32), then for each an untimed `iared compare` on all 1000 test clips with the
# backbone fine-tuned under IA-RED² (500 steps at threshold 0.5; the first lane also fine-tunes
# under EViT), so the top-1 of every knob comes back. The --out folders come back as tarballs; the
# same compare command rerun on 2 CPU cores with one of them loads everything and times it.
#
#   bash scripts/gpu_video_probability.sh OUT_DIR            # on an H200: about 130 s of training, then up to 200 s of compares
#   QUICK=1 DEVICE=cpu STEPS=2 FT=2 PRE=0 bash scripts/gpu_video_probability.sh OUT_DIR   # the plumbing only
set -u
OUT=${1:?usage: gpu_video_probability.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=5
R=${RUNS:-runs/gpu5}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
FT=${FT:-500}
PRE=${PRE:-4}  # workers rendering the training split up front (0: render on the fly)
QUICK=${QUICK:+--quick}
mkdir -p "$R"
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }

lane() {  # lane TAU METHODS FINETUNE_METHODS
  local tau=$1 dir="$R/p$1"
  [ -f "$dir/iared/pruned.pt" ] || timeout "$(left 270)" python3 -m iared train-interpreters --task moving-digits --reward probability --tau "$tau" \
      --steps-per-stage "$STEPS" --batch-size 32 --device "$DEVICE" --prerender "$PRE" --quiet --out "$dir/iared" \
      > "$OUT/p$tau.log" 2>&1
  echo "train-interpreters tau $tau: exit $? at $((SECONDS - start)) s" >> "$OUT/p$tau.log"
  timeout "$(left ${COMPARE_LIMIT:-540})" python3 -m iared compare --task moving-digits --methods "$2" \
      --iared-checkpoint "$dir/iared/pruned.pt" --finetune-steps "$FT" --finetune-methods "$3" $QUICK \
      --device "$DEVICE" --batch-sizes '' --prerender "$PRE" --out "$dir" >> "$OUT/p$tau.log" 2>&1
  echo "compare tau $tau: exit $? at $((SECONDS - start)) s" >> "$OUT/p$tau.log"
}

lane 5 iared,evit,random,pixel,framediff iared,evit &
lane 10 iared,random,pixel,framediff iared &
lane 20 iared,random,pixel,framediff iared &
wait

# Back in files of at most 16 MiB each.
# (train_state.pt is left out: the reruns read pruned.pt; the EViT fine-tune goes in its own file.)
for tau in 5 10 20; do
  tar -cf "$OUT/p$tau.tar" -C "$R" $(cd "$R" && ls -d p$tau/iared/{pruned.pt,config.json,log.jsonl} \
      p$tau/compare.* p$tau/finetune/iared-* 2>/dev/null)
done
tar -cf "$OUT/evit.tar" -C "$R" $(cd "$R" && ls p5/finetune/evit-* 2>/dev/null)
ls -la "$OUT" > "$OUT/files.txt"
echo "all done at $((SECONDS - start)) s" >> "$OUT/files.txt"
