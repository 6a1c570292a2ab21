#!/usr/bin/env bash
# The third device session (one H200): the training half of two `iared compare` runs with
# fine-tuned variants of every method (--finetune-steps), digits-natural (#9, #11) and moving-digits
# (#13), run side by side and untimed (--batch-sizes ''). Their --out folders come back as tarballs;
# the same commands rerun on 2 CPU cores with those folders load everything trained and time it.
# Then explain-eval on digits-natural with the interpreters trained here (#11).
#
#   bash scripts/gpu_finetune_compare.sh OUT_DIR           # about 8 minutes on an H200
#   QUICK=1 DEVICE=cpu bash scripts/gpu_finetune_compare.sh OUT_DIR   # the plumbing, in a minute
set -u
OUT=${1:?usage: gpu_finetune_compare.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=6
R=${RUNS:-runs/gpu3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
mkdir -p "$R"
start=$SECONDS
left() { echo $(( $1 - (SECONDS - start) )); }

# The CPU reruns (README) use exactly these options, with --device cpu and the default batch sizes.
natural=(--task digits-natural --methods iared,dynamicvit,tome,evit,ats,random,pixel --train-steps 300
         --train-batch 64 --finetune-steps 1000 --out "$R/natural")
video=(--task moving-digits --methods iared,tome,evit,random,pixel,framediff --train-steps 200 --train-batch 32
       --finetune-steps 500 --out "$R/video")

( timeout "$(left 420)" python3 -m iared compare "${natural[@]}" $QUICK --device "$DEVICE" --batch-sizes '' \
    --prerender 7 > "$OUT/natural.log" 2>&1
  echo "natural compare: exit $?" >> "$OUT/natural.log"
  timeout "$(left 530)" python3 -m iared explain-eval --checkpoint "$R/natural/iared/pruned.pt" \
    --task digits-natural --limit "${LIMIT:-500}" --device "$DEVICE" --quiet --json "$OUT/explain_natural.json" \
    --plot "$R/natural/explain_natural.png" \
    >> "$OUT/natural.log" 2>&1
  echo "explain-eval: exit $?" >> "$OUT/natural.log" ) &
( timeout "$(left 480)" python3 -m iared compare "${video[@]}" $QUICK --device "$DEVICE" --batch-sizes '' \
    --prerender 7 > "$OUT/video.log" 2>&1
  echo "video compare: exit $?" >> "$OUT/video.log" ) &
wait

# Back in files of at most 16 MiB: checkpoints a rerun needs, grouped (pruned.pt is rewritten by it).
tar -cf "$OUT/natural_iared.tar" -C "$R" natural/iared/train_state.pt natural/iared/config.json natural/iared/log.jsonl
tar -cf "$OUT/natural_ft_a.tar" -C "$R" natural/dynamicvit $(cd "$R" && ls natural/finetune/{iared,evit}-* 2>/dev/null)
tar -cf "$OUT/natural_ft_b.tar" -C "$R" $(cd "$R" && ls natural/finetune/* | grep -v -e /iared- -e /evit-)
tar -cf "$OUT/video_iared.tar" -C "$R" video/iared/train_state.pt video/iared/config.json video/iared/log.jsonl \
  video/compare.json video/compare.md natural/compare.json natural/compare.md natural/explain_natural.png
tar -cf "$OUT/video_ft.tar" -C "$R" video/finetune
ls -la "$OUT" >> "$OUT/natural.log"
echo "all done at $((SECONDS - start)) s" >> "$OUT/natural.log"
