#!/usr/bin/env bash
# One prepared GPU run: the GPU paths a user hits first, in at most about 8 minutes on one GPU.
#
#   bash tools/gpu_check.sh [OUT]          (default OUT: runs/gpu_check/<date>-<time>; needs `make install` first)
#   DEVICE=cpu bash tools/gpu_check.sh     (a dry run of the same steps on the CPU: tiny cost rows, CPU devices)
#
# Steps (each with its own time limit; a failed step is reported and the next one runs):
#   1. the CUDA tests (the same seed gives the same samples on the GPU as on the CPU)
#   2. bench leaderboard on the GPU: the 2D students of data/ sampled and scored there (with their ms per sample)
#   3. notebooks 05, 09, 11 and 13 in smoke mode with the GPU visible
#   4. the cost-table rows not yet measured on a GPU: Hyper-SD's TSCD step beside the LCM-LoRA rows it is priced
#      against (python -m course_lib.scale.cost --table --only lcm-lora,hypersd)
# Results: OUT/summary.txt (one line per step: its exit status and seconds), OUT/<step>.log, OUT/leaderboard.json,
# OUT/cost_table.json, OUT/nb_*.ipynb, OUT/device.txt. Copy what is worth keeping into docs/results with the card's
# name (e.g. docs/results/cost_table_h100.json) and say which card measured it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
[ -x "$PY" ] || { echo "no $PY: run make install first"; exit 2; }

if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "no CUDA device here: nothing to check (DEVICE=cpu bash tools/gpu_check.sh runs the steps on the CPU)"
        exit 1; }
    nvidia-smi > "$OUT/device.txt" 2>&1
    TINY="" LB_MODE=laptop
else
    TINY="--tiny" LB_MODE=smoke        # the dry run: the board's shipped students on few samples
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
    | tee -a "$OUT/device.txt"

step() {   # step NAME LIMIT_S COMMAND...: run it with a time limit, log it, record its status and seconds
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
}

step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_samplers.py -k every_device
step leaderboard 240 "$PY" -m course_lib.bench leaderboard --mode "$LB_MODE" --device "$DEVICE" --out "$OUT/leaderboard.json"
for nb in 05_consistency_models 09_distribution_matching 11_hyper_sd 13_scaling_up; do
    step "nb_$nb" 150 env COURSE_MODE=smoke "$PY" -m jupyter nbconvert --to notebook --execute \
        --ExecutePreprocessor.timeout=140 --output "$OUT/nb_$nb.ipynb" "solutions/$nb.ipynb"
done
step cost-table 240 "$PY" -m course_lib.scale.cost --table --only lcm-lora,hypersd $TINY --device "$DEVICE" \
    --out "$OUT/cost_table.json"

echo "results in $OUT:"
cat "$OUT/summary.txt"
! grep -q "rc=[1-9]" "$OUT/summary.txt"
