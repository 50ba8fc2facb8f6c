#!/usr/bin/env bash
# Gate training variants for issue 16, judged on the validation exit table only.
#
# Runs after `make frontier` (it reads runs/exit-demo: the train table's features, the val and test
# exit tables, the base gate set gates-hidden-agreement). Each variant is the base recipe
# (hidden inputs, agreement,monotone labels, width 512, 40 epochs, batch 32, lr 3e-4, seed 0) with
# one setting changed; two more seeds of the base recipe give the training noise. Validation picks
# the variant (fewest prefill FLOPs within 1 point of the full model at its own chosen tau); the
# test split is looked up once, for every variant, after that choice, by `dyvte-exit frontier`.
#
#   bash benchmarks/gate_variants.sh          # about 2 min per variant on 2 cores, nothing else running
#
# Resumable: a variant whose gates.safetensors exists is not retrained.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/exit-demo}
RESULTS=${RESULTS:-benchmarks/results/gate-variants}
TAUS=${TAUS:-0.5,0.8,0.9,0.95,0.98,0.99,0.993,0.995,0.997,0.998,0.999,0.9995}
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
BASE=(--features hidden --label-rule agreement,monotone --hidden-width 512 --epochs 40 --batch-size 32 --lr 3e-4)
declare -A VARIANTS=(
    [seed1]="--seed 1"
    [seed2]="--seed 2"
    [wd0.05]="--weight-decay 0.05"
    [epochs10]="--epochs 10"
    [width128]="--hidden-width 128"
    [width2048]="--hidden-width 2048"
    [lr1e-4]="--lr 1e-4"
    [agreement]="--label-rule agreement"
)
GATES=(--gates "base=$OUT/gates-hidden-agreement")
for name in $(printf '%s\n' "${!VARIANTS[@]}" | sort); do
    folder="$OUT/variants/gates-$name"
    if [ ! -f "$folder/gates.safetensors" ]; then
        # shellcheck disable=SC2086  # a variant's settings are several words, appended after the base's (argparse: last wins)
        "$BIN/dyvte-exit" train --sweep "$OUT/train-table" --model demo "${BASE[@]}" ${VARIANTS[$name]} \
            --out "$folder" --no-progress
    fi
    GATES+=(--gates "$name=$folder")
done
mkdir -p "$RESULTS"
rm -rf "$OUT/variants/val" "$OUT/variants/test"
"$BIN/dyvte-exit" frontier --table "$OUT/val-table" "${GATES[@]}" --taus "$TAUS" --out "$OUT/variants/val"
"$BIN/dyvte-exit" frontier --table "$OUT/test-table" --tau-table "$OUT/val-table" "${GATES[@]}" --taus "$TAUS" \
    --out "$OUT/variants/test"
"$BIN/python" benchmarks/gate_variants_report.py "$OUT/variants/val" "$OUT/variants/test" "$RESULTS/gate_variants.md"
