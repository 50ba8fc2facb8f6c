#!/usr/bin/env bash
# The DyVTE result of the README on the committed demo weights (issue 16), end to end and resumable:
#
#   1. exit tables (`dyvte-exit sweep --answers 4 --features both`): for every question and every
#      exit layer the answer the model generates, the teacher-forced labels and the gate features,
#      on the whole test split and on validation questions (tau and VTW are chosen there, never on
#      test); the labels and features alone on train questions about images the committed weights never read
#      (analysis/demo/weights/training_images.json, replayed from the training config);
#   2. gates of every input kind (hidden, attention, history, hidden+history), each with the
#      paper's labels and with "every answer token's argmax is kept from this layer on"
#      (agreement,monotone: on the test table it reaches as much of the oracle's saving as the
#      generated answer kept, and needs no generated answers in the training table); and one
#      hidden gate shared by every layer (--shared), three seeds and their average;
#   3. VTW's exit layer, calibrated on validation questions;
#   4. the frontier by lookup (`dyvte-exit frontier`): none, every static K, both oracles, VTW,
#      every gate set at several tau, the label-rule study;
#   5. FastV (K=2, R in $FASTV_RATIOS) and DyVTE + FastV (both hidden gate sets, each at the tau
#      validation chose), which remove tokens in ways no exit table holds: real runs
#      (`dyvte-exit eval`) over the same test questions, one folder per method, joining the
#      frontier (`frontier --runs`), which is written again with them, and the figures in figures/;
#   6. wall times from real runs on the first $TIMED_QUESTIONS test questions (`dyvte-exit eval`).
#
#   bash benchmarks/exit_frontier.sh                       # = make frontier (hours on 2 cores; resumable)
#   TEST_QUESTIONS=120 TRAIN_QUESTIONS=300 VAL_QUESTIONS=60 TIMED_QUESTIONS=24 bash benchmarks/exit_frontier.sh
#   TIMED_QUESTIONS=0 bash benchmarks/exit_frontier.sh    # without the timed stage (its file is left as it is)
#
# Every stage keeps what it finished: stop it at any time and run the same command again; each
# exit table resumes (`--resume`) and a finished stage is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/exit-demo}
COMMITTED=${COMMITTED:-benchmarks/results/exit-demo}  # finished tables (labels, answers), committed
FIGURES=${FIGURES:-figures}
TEST_QUESTIONS=${TEST_QUESTIONS:-0}        # 0: the whole test split (1,146 questions)
VAL_QUESTIONS=${VAL_QUESTIONS:-300}
TRAIN_QUESTIONS=${TRAIN_QUESTIONS:-2000}
TIMED_QUESTIONS=${TIMED_QUESTIONS:-120}
FASTV_RATIOS=${FASTV_RATIOS:-0.5,0.75,0.25}  # FastV's R on the whole test split (real runs), in this order
VTW_SAMPLES=${VTW_SAMPLES:-16}             # validation questions VTW's KL calibration reads (31 forwards each)
BATCH=${BATCH:-4}
TAUS=${TAUS:-0.5,0.8,0.9,0.95,0.98,0.99,0.995,0.999}  # DyVTE thresholds looked up; validation picks one per gate set
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
SHAPES=.cache/shapesvqa
mkdir -p "$OUT"

# Questions: the test split (or its first N), the first validation questions, and train
# questions about images no training stage read.
"$BIN/python" - "$OUT" "$TEST_QUESTIONS" "$VAL_QUESTIONS" "$TRAIN_QUESTIONS" <<'PY'
import json, sys
from pathlib import Path
from analysis.demo.job import default_data_root
from analysis.demo.shapes import ensure_split
out, limits = Path(sys.argv[1]), dict(zip(("test", "val", "train"), map(int, sys.argv[2:5])))
read = json.loads(Path("analysis/demo/weights/training_images.json").read_text())
seen = {*read["standardise"], *read["grounding"], *read["questions"]}
for split, limit in limits.items():
    rows = [json.loads(line) for line in open(ensure_split(default_data_root(), split) / "questions.jsonl")]
    if split == "train":
        rows = [r for r in rows if r["image"] not in seen]
    rows = rows[:limit] if limit else rows
    (out / f"{split}-questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{split}: {len(rows)} questions about {len({r['image'] for r in rows})} images")
PY

# test and val: exit tables (every exit layer's answer); train: the teacher-forced labels and the
# gate features only (about two thirds of an exit table's cost), what the gates learn from.
# At the default sizes a split starts from its committed table ($COMMITTED/SPLIT-table: labels and
# answers, no features, which are too big to commit): the sweep finishes the questions it lacks and
# `dyvte-exit features` recomputes the gate features of the committed ones (one forward each).
declare -A DEFAULT=([test]=0 [val]=300 [train]=2000) LIMIT=([test]=$TEST_QUESTIONS [val]=$VAL_QUESTIONS [train]=$TRAIN_QUESTIONS)
for split in test val train; do
    answers=(--answers 4); [ "$split" = train ] && answers=()
    if [ -d "$COMMITTED/$split-table" ] && [ ! -d "$OUT/$split-table" ] && [ "${LIMIT[$split]}" = "${DEFAULT[$split]}" ]; then
        cp -r "$COMMITTED/$split-table" "$OUT/$split-table"
    fi
    "$BIN/dyvte-exit" sweep --model demo --questions "$OUT/$split-questions.jsonl" --image-folder "$SHAPES/$split" \
        --out "$OUT/$split-table" --features both "${answers[@]}" --batch-size "$BATCH" --resume --no-progress
    "$BIN/dyvte-exit" features --model demo --questions "$OUT/$split-questions.jsonl" --image-folder "$SHAPES/$split" \
        --table "$OUT/$split-table" --features both --batch-size "$BATCH" --resume --no-progress
done

GATES=()
for kind in hidden attention history hidden+history; do
    for rule in cached agreement,monotone; do
        name="$kind-${rule%%,*}"
        if [ ! -f "$OUT/gates-$name/gates.safetensors" ]; then
            "$BIN/dyvte-exit" train --sweep "$OUT/train-table" --model demo --features "$kind" --label-rule "$rule" \
                --out "$OUT/gates-$name" --hidden-width 512 --epochs 40 --batch-size 32 --lr 3e-4 --no-progress
        fi
        GATES+=(--gates "$name=$OUT/gates-$name")
    done
done
# one gate shared by every layer (dyvte-exit train --shared), three seeds and their average: it cut
# about 4 points of FLOPs more than the per-layer gates at equal accuracy in the lens_gate_probe run
SHARED=()
for seed in 0 1 2; do
    if [ ! -f "$OUT/gates-hidden-shared-s$seed/gates.safetensors" ]; then
        "$BIN/dyvte-exit" train --sweep "$OUT/train-table" --model demo --features hidden --label-rule agreement,monotone \
            --out "$OUT/gates-hidden-shared-s$seed" --shared --dropout 0.2 --weight-decay 0.01 --hidden-width 256 \
            --epochs 30 --batch-size 16 --lr 1e-3 --seed "$seed" --no-progress
    fi
    GATES+=(--gates "hidden-shared-s$seed=$OUT/gates-hidden-shared-s$seed")
    SHARED+=("$OUT/gates-hidden-shared-s$seed")
done
GATES+=(--gates "hidden-shared-avg3=$(IFS=,; echo "${SHARED[*]}")")

if [ ! -f "$OUT/vtw/summary.parquet" ]; then  # VTW's K: calibrated on validation questions (KL <= eta)
    "$BIN/dyvte-exit" eval --model demo --questions "$OUT/val-questions.jsonl" --image-folder "$SHAPES/val" --limit 1 \
        --method vtw --calibration-questions "$SHAPES/val/questions.jsonl" --vtw-samples "$VTW_SAMPLES" --out "$OUT/vtw" --no-progress
fi
VTW=$("$BIN/python" -c "import pandas as pd, sys; print(pd.read_parquet(sys.argv[1])['method'][0].split(':')[1])" "$OUT/vtw/summary.parquet")

# the lookups first: the taus validation chose, at which the real runs below run DyVTE + FastV
rm -rf "$OUT/frontier-lookups"
"$BIN/dyvte-exit" frontier --table "$OUT/test-table" --tau-table "$OUT/val-table" --vtw-layer "$VTW" "${GATES[@]}" --taus "$TAUS" \
    --out "$OUT/frontier-lookups"
tau() { "$BIN/python" -c "import sys; from analysis.io import read_provenance; \
print(read_provenance(sys.argv[1])['chosen_tau'][sys.argv[2]])" "$OUT/frontier-lookups/summary.parquet" "$1"; }
TAU=$(tau hidden-agreement) SHARED_TAU=$(tau hidden-shared-avg3)
SHARED_GATES=$(IFS=,; echo "${SHARED[*]}")

# FastV and DyVTE + FastV over the same test questions: real runs, one folder per method (each resumes)
RUNS=()
full_run() {  # folder name, gate folder(s), method, the frontier's name for the run ("" keeps the method's)
    "$BIN/dyvte-exit" eval --model demo --questions "$OUT/test-questions.jsonl" --image-folder "$SHAPES/test" \
        --batch-size 8 --gates "$2" --out "$OUT/full-runs/$1" --resume --method "$3" --no-progress
    RUNS+=(--runs "${4:+$4=}$OUT/full-runs/$1")
}
IFS=, read -ra RATIOS <<< "$FASTV_RATIOS"
full_run "fastv-${RATIOS[0]}" "$OUT/gates-hidden-agreement" fastv:2:"${RATIOS[0]}" ""
full_run dyvte+fastv-hidden-agreement "$OUT/gates-hidden-agreement" dyvte+fastv:2:0.5:"$TAU" hidden-agreement
full_run dyvte+fastv-hidden-shared-avg3 "$SHARED_GATES" dyvte+fastv:2:0.5:"$SHARED_TAU" hidden-shared-avg3
for ratio in "${RATIOS[@]:1}"; do
    full_run "fastv-$ratio" "$OUT/gates-hidden-agreement" fastv:2:"$ratio" ""
done

rm -rf "$OUT/frontier"
"$BIN/dyvte-exit" frontier --table "$OUT/test-table" --tau-table "$OUT/val-table" --vtw-layer "$VTW" "${GATES[@]}" --taus "$TAUS" \
    "${RUNS[@]}" --out "$OUT/frontier" --figures "$FIGURES"

if [ "$TIMED_QUESTIONS" -gt 0 ]; then  # wall times (FastV and DyVTE + FastV too): real runs, at the tau validation chose
    timed() {  # folder, batch size, gate folder(s), methods
        "$BIN/dyvte-exit" eval --model demo --questions "$OUT/test-questions.jsonl" --image-folder "$SHAPES/test" \
            --limit "$TIMED_QUESTIONS" --batch-size "$2" --gates "$3" --out "$OUT/$1" --resume --method "$4" --no-progress
    }
    # batches of the questions about one image (at most 8): a batch runs at full length until its last row exits
    timed timed 8 "$OUT/gates-hidden-agreement" \
        none,static:23,vtw:"$VTW",fastv:2:0.5,fastv:2:0.75,dyvte:"$TAU",dyvte+fastv:2:0.5:"$TAU"
    timed timed-shared 8 "$SHARED_GATES" dyvte:"$SHARED_TAU",dyvte+fastv:2:0.5:"$SHARED_TAU"
    # one question per batch: each row pays its own exit
    timed timed-batch1 1 "$OUT/gates-hidden-agreement" none,static:23,dyvte:"$TAU"
    timed timed-batch1-shared 1 "$SHARED_GATES" dyvte:"$SHARED_TAU"
    "$BIN/python" - "$FIGURES/exit_timed_results.md" "$OUT" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from analysis.io import read_provenance
from exit.plots import read_evaluation, results_markdown
out, runs = Path(sys.argv[1]), Path(sys.argv[2])
made = read_provenance(runs / "timed" / "summary.parquet")
questions = read_evaluation(runs / "timed")[0]["question_id"].nunique()
text = [f"# Timed runs on the first {questions} test questions (`dyvte-exit eval`, real runs)", "",
        f"Weights sha256: {made.get('weights_sha256')}; git {made.get('git_revision')}; {made.get('device')}, "
        f"{made.get('dtype')}, {made.get('attention_path')}. One run per method, one after another (make frontier's "
        "timed stage). DyVTE: the per-layer hidden agreement gates, and `(shared)` the shared hidden gates with their "
        "three seeds' p(exit) averaged, each at the tau validation chose. `prefill time vs none` is the method's "
        "prefill seconds over none's in the same table.", ""]
for title, per_layer, shared in (("batches of the questions about one image, at most 8 (a batch runs at full length "
                                  "until its last row exits)", "timed", "timed-shared"),
                                 ("one question per batch (each row pays its own exit)", "timed-batch1",
                                  "timed-batch1-shared")):
    first, second = read_evaluation(runs / per_layer)[1], read_evaluation(runs / shared)[1]
    summary = pd.concat([first, second.assign(method=second["method"] + " (shared)")], ignore_index=True)
    none = float(summary.loc[summary["method"] == "none", "prefill_seconds"].iloc[0])
    table = results_markdown(summary).splitlines()
    ratios = summary["prefill_seconds"] / none
    table = [table[0] + " prefill time vs none |", table[1] + "---|",
             *(line + f" {ratio:.3f} |" for line, ratio in zip(table[2:], ratios))]
    text += [f"## {title}", "", *table, ""]
out.write_text("\n".join(text), encoding="utf-8")
print(f"wrote {out}")
PY
fi

"$BIN/python" benchmarks/exit_table_report.py "$OUT/test-table" "$OUT/frontier" "$FIGURES/exit_table_results.md"
