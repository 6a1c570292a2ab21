#!/usr/bin/env bash
# The fourth device call (one H200, ~4 minutes left): the two fine-tuning runs that
# scripts/gpu_finetune_compare.sh's time limits cut off, with the same settings, so the CPU reruns
# find them in --out: ats+ft on digits-natural, evit+ft on moving-digits. (tome+ft on moving-digits
# ran at 4.5 s per step there and is left out: --finetune-methods iared,evit on video.)
#
#   bash scripts/gpu_finetune_rest.sh OUT_DIR
set -u
OUT=${1:?usage: gpu_finetune_rest.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=6
R=${RUNS:-runs/gpu3}
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }
( timeout "$(left 200)" python3 -m iared compare --task digits-natural --methods ats --train-steps 300 \
    --train-batch 64 --finetune-steps 1000 --out "$R/natural" --device cuda --batch-sizes '' --prerender 7 \
    > "$OUT/natural_rest.log" 2>&1; echo "natural ats+ft: exit $?" >> "$OUT/natural_rest.log" ) &
( timeout "$(left 200)" python3 -m iared compare --task moving-digits --methods evit --train-steps 200 \
    --train-batch 32 --finetune-steps 500 --out "$R/video" --device cuda --batch-sizes '' --prerender 7 \
    > "$OUT/video_rest.log" 2>&1; echo "video evit+ft: exit $?" >> "$OUT/video_rest.log" ) &
wait
tar -cf "$OUT/rest.tar" -C "$R" $(cd "$R" && ls natural/finetune/ats-* video/finetune/evit-* 2>/dev/null)
echo "all done at $((SECONDS - start)) s" >> "$OUT/natural_rest.log"
