#!/usr/bin/env bash
# The DyVTE results of the README on the demo model, end to end: exit labels (sweep) on ShapesVQA
# train questions about images the demo model was never trained on, gates of the three input kinds,
# the accuracy-FLOPs frontier on the first $TEST_QUESTIONS test questions, and its two figures.
#
#   bash benchmarks/exit_frontier.sh                 # = make frontier; about 2 h on 2 cores
#   SWEEP_QUESTIONS=200 TEST_QUESTIONS=60 bash benchmarks/exit_frontier.sh   # a shorter run
#
# The sweep can be stopped at any time (Ctrl-C or kill) and keeps its finished batches; the README's
# run was a sweep of 1200 such questions stopped after the first 560, which the default reproduces.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/exit-demo}
SWEEP_QUESTIONS=${SWEEP_QUESTIONS:-560}
TEST_QUESTIONS=${TEST_QUESTIONS:-240}
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$OUT"

# Every third question about train images 1000 and up (the demo model trained on images below 330).
"$BIN/python" - "$OUT/sweep-questions.jsonl" "$SWEEP_QUESTIONS" <<'PY'
import json, sys
from analysis.demo.job import default_data_root
from analysis.demo.shapes import ensure_split
train = ensure_split(default_data_root(), "train")
ensure_split(default_data_root(), "val"); ensure_split(default_data_root(), "test")
rows = [json.loads(line) for line in open(train / "questions.jsonl")]
chosen = [r for r in rows if int(r["image"].split("/")[-1][:6]) >= 1000][::3][: int(sys.argv[2])]
with open(sys.argv[1], "w") as out:
    out.writelines(json.dumps(r) + "\n" for r in chosen)
PY
SHAPES=.cache/shapesvqa
"$BIN/dyvte-exit" sweep --model demo --questions "$OUT/sweep-questions.jsonl" --image-folder "$SHAPES/train" \
    --out "$OUT/sweep" --features both --batch-size 4
for kind in hidden attention both; do
    "$BIN/dyvte-exit" train --sweep "$OUT/sweep" --model demo --features "$kind" --out "$OUT/gates-$kind" \
        --hidden-width 512 --epochs 40 --batch-size 32 --lr 3e-4
done
"$BIN/dyvte-exit" eval --model demo --questions "$SHAPES/test/questions.jsonl" --image-folder "$SHAPES/test" \
    --limit "$TEST_QUESTIONS" --gates "$OUT/gates-hidden" --out "$OUT/eval" \
    --method none,dyvte:0.9,static:25,vtw,fastv:2:0.5,dyvte:0.5,dyvte:0.99,static:22,static:15,fastv:2:0.75,dyvte+fastv:2:0.5,static:7 \
    --calibration-questions "$SHAPES/val/questions.jsonl" --vtw-samples 16
for kind in attention both; do
    "$BIN/dyvte-exit" eval --model demo --questions "$SHAPES/test/questions.jsonl" --image-folder "$SHAPES/test" \
        --limit "$TEST_QUESTIONS" --gates "$OUT/gates-$kind" --out "$OUT/eval-$kind" --method dyvte:0.9
done
"$BIN/dyvte-exit" figures "$OUT/eval" --out figures
