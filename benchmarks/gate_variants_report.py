"""The gate-variant study's results file (issue 16): validation chooses, the test split reports.

Reads two folders of ``dyvte-exit frontier --out`` over the same gate sets: one on the validation
exit table, one on the test table (with ``--tau-table`` the validation table, so each gate set's
tau is chosen there). Per gate set: the tau validation chose and, at it, the validation accuracy
change against the full model and the validation FLOPs; the variant validation prefers is the one
with the fewest validation FLOPs within 1 point. Then the test split's targets table at the chosen
taus (``exit_table_report.targets_markdown``), for every variant, with the chosen one marked.

Run (``benchmarks/gate_variants.sh`` does)::

    .venv/bin/python benchmarks/gate_variants_report.py runs/exit-demo/variants/val runs/exit-demo/variants/test \\
        benchmarks/results/gate-variants/gate_variants.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exit_table_report import targets_markdown  # noqa: E402

from analysis.demo.model import DEMO_WEIGHTS_FILE, sha256_of_file  # noqa: E402
from analysis.io import read_provenance  # noqa: E402
from exit.plots import read_evaluation  # noqa: E402

MAX_DROP_POINTS = 1.0


def validation_choice(summary: pd.DataFrame, chosen_tau: dict[str, float]) -> pd.DataFrame:
    """Per gate set, its validation row at the tau validation chose: accuracy change (points) and FLOPs."""
    by_method = summary.set_index("method")
    full = float(by_method.loc["none", "accuracy_overall"])
    rows = []
    for name, tau in sorted(chosen_tau.items()):
        line = by_method.loc[f"dyvte[{name}]:{tau:g}"]
        rows.append({"gate set": name, "tau": tau, "change": 100 * (float(line["accuracy_overall"]) - full),
                     "flops": float(line["relative_prefill_flops"]), "exit layer": float(line["mean_exit_layer"])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("validation", type=Path, help="dyvte-exit frontier --out on the validation table")
    parser.add_argument("test", type=Path, help="dyvte-exit frontier --out on the test table, --tau-table validation")
    parser.add_argument("out", type=Path, help="the markdown file to write")
    args = parser.parse_args()
    test = read_provenance(args.test / "summary.parquet")
    test_summary = pd.read_parquet(args.test / "summary.parquet")
    chosen_tau = test.get("chosen_tau", {})
    validation_summary = pd.read_parquet(args.validation / "summary.parquet")
    choice = validation_choice(validation_summary, chosen_tau)
    within = choice[choice["change"] >= -MAX_DROP_POINTS]
    preferred = str(within.sort_values("flops").iloc[0]["gate set"]) if len(within) else None
    rows, _ = read_evaluation(args.test)
    lines = [
        "# Gate variants, chosen on validation, reported on the test split",
        "",
        f"- Committed demo weights (`{DEMO_WEIGHTS_FILE.name}`): sha256 {sha256_of_file(DEMO_WEIGHTS_FILE)}.",
        f"- Gate sets: {json.dumps(test.get('gates', {}))}.",
        f"- Validation: `{read_provenance(args.validation / 'summary.parquet').get('command')}` "
        f"({int(validation_summary['questions'].max())} questions).",
        f"- Test: `{test.get('command')}` ({int(test_summary['questions'].max())} "
        "questions).",
        "- Made by `bash benchmarks/gate_variants.sh` (base: hidden inputs, agreement,monotone labels, width 512, "
        "40 epochs, batch 32, lr 3e-4, seed 0; each variant changes one setting).",
        "",
        "## Validation: each gate set at the tau it chose (fewest FLOPs within 1 point of the full model)",
        "",
        "| gate set | tau | accuracy vs none (points) | prefill FLOPs | mean exit layer |",
        "|---|---|---|---|---|",
        *(f"| {r['gate set']}{' (chosen)' if r['gate set'] == preferred else ''} | {r['tau']:g} | {r['change']:+.1f} | "
          f"{r['flops']:.3f} | {r['exit layer']:.1f} |" for _, r in choice.iterrows()),
        "",
        f"Validation prefers: {preferred or 'none (no gate set within 1 point)'}.",
        "",
        *targets_markdown(rows, chosen_tau, int(test_summary["num_layers"].max()), reference_gates="base"),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}; validation prefers {preferred}")


if __name__ == "__main__":
    main()
