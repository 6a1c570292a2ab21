#!/usr/bin/env bash
# The prepared GPU benchmark (#27): one call on a device machine, one JSON back (scripts/gpu_bench.py
# says what it times). Under 8 minutes: the script stops compiling after --budget-s and the whole run
# is cut at LIMIT seconds; the JSON is rewritten after every geometry, so a cut run keeps what it did.
#
#   bash scripts/gpu_bench.sh OUT_DIR        # writes OUT_DIR/gpu-bench.json and OUT_DIR/gpu-bench.log
set -u
OUT=${1:?usage: gpu_bench.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu-bench.log" 2>&1
timeout "${LIMIT:-460}" python3 scripts/gpu_bench.py --json "$OUT/gpu-bench.json" --budget-s "${BUDGET:-330}" \
    >> "$OUT/gpu-bench.log" 2>&1
echo "exit $?" >> "$OUT/gpu-bench.log"
