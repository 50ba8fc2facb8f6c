"""The results file of an exit-table frontier, with what made it (issue 16).

Writes one markdown file: which weights made the exit table (the sha256 of the committed demo
weights file and of every weight file of the model folder, from the table's provenance), the
command lines, how many questions, then the frontier (``frontier.md`` of ``dyvte-exit
frontier --out``, real runs such as FastV included), the targets, DyVTE + FastV against FastV
alone, and the label-rule study (``label_rules.md``).

Run::

    .venv/bin/python benchmarks/exit_table_report.py runs/exit-demo/test-table runs/exit-demo/frontier \\
        figures/exit_table_results.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from analysis.demo.model import DEMO_WEIGHTS_FILE, sha256_of_file
from analysis.io import read_provenance
from exit.frontier import (
    CATEGORY_ORACLE,
    CATEGORY_STATIC,
    FRONTIER_FILE,
    INFORMED_ORACLE,
    LABEL_STUDY_FILE,
    ORACLE,
    chance_agreement,
    exit_table_layers,
    frontier_summary,
    informed_oracle_exits,
    lookup_rows,
    oracle_exits,
    paired_difference_interval,
)
from exit.plots import read_evaluation
from exit.sweep import read_exit_answers


def targets_markdown(rows: pd.DataFrame, chosen_tau: dict[str, float], num_layers: int,
                     reference_gates: str = "hidden-agreement") -> list[str]:
    """The issue's targets, per gate set at the tau the validation table chose: the accuracy change
    against the full model (paired interval), the FLOPs cut, its share of the oracle's cut, the static
    exit nearest in FLOPs, and each gate set's paired accuracy difference to ``reference_gates``."""
    by_method = {method: frame for method, frame in rows.groupby("method", sort=False)}
    summary = frontier_summary(by_method, num_layers).set_index("method")
    statics = summary[summary.index.str.startswith("static:")]
    lines = ["## The targets, at the tau chosen on the validation table", "",
             "| gate set | tau | accuracy | vs none (paired 95 %) | prefill FLOPs | FLOPs cut | share of the oracle's cut "
             f"| share of {INFORMED_ORACLE}'s cut | static exit nearest in FLOPs | vs {reference_gates} (paired 95 %) |",
             "|" + "---|" * 10]
    informed_cut = (1 - summary.loc[INFORMED_ORACLE, "relative_prefill_flops"]) if INFORMED_ORACLE in summary.index else math.nan
    reference = f"dyvte[{reference_gates}]:{chosen_tau[reference_gates]:g}" if reference_gates in chosen_tau else None
    for name, tau in sorted(chosen_tau.items()):
        method = f"dyvte[{name}]:{tau:g}"
        if method not in summary.index:
            continue
        line = summary.loc[method]
        nearest = statics.iloc[(statics["relative_prefill_flops"] - line["relative_prefill_flops"]).abs().argmin()]
        versus = "-"
        if reference is not None and method != reference:
            a = by_method[method].set_index("question_id")["correct"].astype(float)
            b = by_method[reference].set_index("question_id")["correct"].astype(float).reindex(a.index)
            low, high = paired_difference_interval(a.to_numpy(), b.to_numpy())
            versus = f"{100 * (a.mean() - b.mean()):+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"
        lines.append(
            f"| {name} | {tau:g} | {100 * line['accuracy_overall']:.1f} % | {100 * line['difference']:+.1f} "
            f"({100 * line['difference_low']:+.1f} to {100 * line['difference_high']:+.1f}) | "
            f"{line['relative_prefill_flops']:.2f} | {100 * (1 - line['relative_prefill_flops']):.0f} % | "
            f"{100 * line['share_of_oracle_saving']:.0f} % | {_share(1 - line['relative_prefill_flops'], informed_cut)} | "
            f"{nearest.name}: {100 * nearest['accuracy_overall']:.1f} % at "
            f"{nearest['relative_prefill_flops']:.2f} | {versus} |")
    lines += ["", "Targets: a FLOPs cut of at least 45 % within 1 point of the full model, and at least 80 % of the "
              "oracle's cut at that accuracy.", ""]
    return lines


def _share(cut: float, of: float) -> str:
    return "-" if math.isnan(of) or of <= 0 else f"{100 * cut / of:.0f} %"


CATEGORY_RULES = {
    CATEGORY_STATIC: "one static exit layer per question type, the layers chosen on the validation table within 1 point "
                     "(a baseline that knows the task type)",
    CATEGORY_ORACLE: "the same rule with the layers chosen on this table (the most a rule that sees only the question "
                     "type saves within 1 point)",
}


def category_markdown(rows: pd.DataFrame, num_layers: int, layers_by_method: dict[str, dict[str, int]]) -> list[str]:
    """One line per category-static method of the frontier: accuracy against the full model
    (paired interval), FLOPs, share of the oracle's cut, and its layers (``layers_by_method``, from
    the frontier's provenance)."""
    # only what the lines read (and the reference and oracle the summary measures against): the
    # bootstrap of every method is the frontier's own work, done once there
    needed = {"none", ORACLE, *CATEGORY_RULES}
    summary = frontier_summary({m: f for m, f in rows.groupby("method", sort=False) if m in needed},
                               num_layers).set_index("method")
    lines = [f"- `{method}`, {what}: {100 * summary.loc[method, 'accuracy_overall']:.1f} % "
             f"({100 * summary.loc[method, 'difference']:+.1f}, paired 95 % {100 * summary.loc[method, 'difference_low']:+.1f} "
             f"to {100 * summary.loc[method, 'difference_high']:+.1f}) at {summary.loc[method, 'relative_prefill_flops']:.2f} "
             f"of the prefill FLOPs, {100 * summary.loc[method, 'share_of_oracle_saving']:.0f} % of the oracle's cut; layers "
             + ", ".join(f"{category} {layer}" for category, layer in layers_by_method.get(method, {}).items()) + "."
             for method, what in CATEGORY_RULES.items() if method in summary.index]
    return ["## Task-type static exits", "", *lines, ""] if lines else []


CHANCE_LAYERS = (0, 6, 12, 17, 20, 21, 22, 23)
INFORMED_MARGINS = (0.0, 0.05, 0.1, 0.2)


def chance_markdown(answers: pd.DataFrame) -> list[str]:
    """How much of the oracle's cut an answer that ignores the image would also get: per category,
    the share of questions whose exit answer equals the full model's beside the share two
    independent answers would agree (``exit.frontier.chance_agreement``), at a few layers; then the
    oracle restricted to cells above chance by a margin (``informed_oracle_exits``) at several margins."""
    cells = chance_agreement(answers).set_index(["category", "layer"])
    layers = [k for k in CHANCE_LAYERS if k in cells.index.get_level_values("layer")]
    lines = ["## How much of the oracle's cut is coincidence", "",
             "Per question type, the share of questions whose answer after exit layer k equals the full model's, "
             "and (after the slash) the share expected if the two answers were independent draws from their "
             "answer distributions in that type. Where they are equal the exit's answer ignores the image (a prior "
             "such as \"red\" or \"small\") and the oracle's exit there keeps the answer by coincidence, which no "
             "gate reading that layer can foresee.", "",
             "| type | " + " | ".join(f"k={k}" for k in layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for category in sorted(set(cells.index.get_level_values("category"))):
        lines.append(f"| {category} | " + " | ".join(
            f"{cells.loc[(category, k), 'same_as_full']:.2f} / {cells.loc[(category, k), 'chance']:.2f}" for k in layers) + " |")
    oracle = lookup_rows(answers, ORACLE, oracle_exits(answers))
    lines += ["", f"The oracle: {oracle['relative_prefill_flops'].mean():.2f} of the prefill FLOPs. The oracle that exits "
              "only where the type's answers at that layer agree with the full model's more than chance by a margin "
              "(`oracle[informed]`; the frontier above uses 0.05), by margin:", "",
              "| margin | prefill FLOPs | mean exit layer |", "|---|---|---|"]
    for margin in INFORMED_MARGINS:
        exits = informed_oracle_exits(answers, margin)
        rows = lookup_rows(answers, f"{ORACLE}[informed]", exits)
        lines.append(f"| {margin:g} | {rows['relative_prefill_flops'].mean():.2f} | {exits.mean():.1f} |")
    return [*lines, ""]


def fastv_markdown(rows: pd.DataFrame, num_layers: int) -> list[str]:
    """Each DyVTE + FastV run of the frontier against FastV alone at the same K and R (real runs over
    the same questions): the paired accuracy difference, and both methods' FLOPs."""
    by_method = {method: frame for method, frame in rows.groupby("method", sort=False)}
    pairs = []
    for method in by_method:
        kind, *settings = method.split(":")
        if kind.split("[")[0] == "dyvte+fastv" and len(settings) == 3 and f"fastv:{settings[0]}:{settings[1]}" in by_method:
            pairs.append((method, f"fastv:{settings[0]}:{settings[1]}"))
    if not pairs:
        return []
    lines = ["## DyVTE + FastV against FastV alone (real runs, the same questions)", "",
             "| DyVTE + FastV | accuracy | its prefill FLOPs | FastV alone | accuracy | its prefill FLOPs "
             "| difference (paired 95 %) |", "|" + "---|" * 7]
    for method, alone in pairs:  # the frontier's summary with FastV alone as the reference gives the paired difference
        pair = frontier_summary({method: by_method[method], alone: by_method[alone]}, num_layers,
                                reference=alone).set_index("method")
        both, line = pair.loc[alone], pair.loc[method]
        lines.append(f"| {method} | {100 * line['accuracy_overall']:.1f} % | {line['relative_prefill_flops']:.2f} | {alone} | "
                     f"{100 * both['accuracy_overall']:.1f} % | {both['relative_prefill_flops']:.2f} | "
                     f"{100 * line['difference']:+.1f} ({100 * line['difference_low']:+.1f} to "
                     f"{100 * line['difference_high']:+.1f}) |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="the exit table folder (dyvte-exit sweep --answers)")
    parser.add_argument("frontier", type=Path, help="the folder of dyvte-exit frontier --out")
    parser.add_argument("out", type=Path, help="the markdown file to write")
    args = parser.parse_args()
    answers = read_exit_answers(args.table)
    table_files = sorted(args.table.glob("exit_answers-*.parquet"))
    table = read_provenance(table_files[0])
    frontier = read_provenance(args.frontier / "summary.parquet")
    rows, _ = read_evaluation(args.frontier)
    questions = int(pd.read_parquet(args.frontier / "summary.parquet")["questions"].max())
    lines = [
        "# The exit table's frontier on the demo model",
        "",
        f"- Questions: {questions} (the exit table at {args.table} holds {answers['sample_id'].nunique()} now, "
        f"in {len(table_files)} committed shards).",
        f"- Committed demo weights (`{DEMO_WEIGHTS_FILE.name}`): sha256 {sha256_of_file(DEMO_WEIGHTS_FILE)}.",
        f"- Model folder weights: {json.dumps(table.get('weights_sha256', 'not recorded'))}.",
        f"- Exit table: `dyvte-exit sweep --answers 4 --features {str(table.get('features', 'both')).lower()}` (git "
        f"{table.get('git_revision')}, {table.get('attention_path')}, {table.get('dtype')}, {table.get('device')}); "
        "gate features " + ("of the sweep itself." if table.get("features") not in (None, "None", "none") else
                            "recomputed by `dyvte-exit features --features both` (one forward per question)."),
        f"- Gates: {json.dumps(frontier.get('gates', {}))}; tau chosen on the validation table: "
        f"{json.dumps(frontier.get('chosen_tau', {}))}.",
        f"- Frontier: `{frontier.get('command')}`.",
        f"- Exit layers per question: {answers['layer'].nunique()} (the last one is the full model).",
        "",
        "## Frontier",
        "",
        (args.frontier / FRONTIER_FILE).read_text(encoding="utf-8"),
        *(targets_markdown(rows, frontier.get("chosen_tau", {}), exit_table_layers(answers))
          if frontier.get("chosen_tau") else []),
        *fastv_markdown(rows, exit_table_layers(answers)),
        *category_markdown(rows, exit_table_layers(answers), frontier.get("category_layers", {})),
        *chance_markdown(answers),
        "## Label rules: the earliest layer each rule calls safe",
        "",
        (args.frontier / LABEL_STUDY_FILE).read_text(encoding="utf-8"),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out} ({questions} questions)")


if __name__ == "__main__":
    main()
