"""Probe (issue 16): do the seeds of one gate recipe, averaged, beat each seed alone?

The gate-variant study (``benchmarks/gate_variants.sh``) found the training seed moving the test
frontier as much as any setting. This averages p(exit) of several gate sets (a lookup on the exit
tables' cached features, no model run), chooses tau on the validation table as every gate set's tau
is chosen (fewest FLOPs within 1 point, ``exit.frontier.choose_tau``), and prints the test split's
accuracy change (paired 95 % bootstrap interval) and prefill FLOPs at every tau, beside the same
lookups for each set alone. The averaging is the toolkit's own (``exit.gates.AveragedGates``, which
``dyvte-exit eval --gates A,B,C`` runs); this probe only looks it up on the tables.

Run after ``bash benchmarks/gate_variants.sh``::

    .venv/bin/python benchmarks/gate_ensemble_probe.py runs/exit-demo \\
        runs/exit-demo/gates-hidden-agreement runs/exit-demo/variants/gates-seed1 runs/exit-demo/variants/gates-seed2 \\
        > benchmarks/results/gate-variants/gate_ensemble_probe.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from exit.frontier import choose_tau, dyvte_tau_summary, gate_probabilities
from exit.gates import load_gate_set
from exit.sweep import read_exit_answers

TAUS = (0.9, 0.95, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995)


def mean_probabilities(table: Path, folders: list[Path], samples: list[str]) -> pd.DataFrame:
    """p(exit) averaged over the gate sets in ``folders`` (``AveragedGates``), per (sample_id, layer) of ``table``;
    the tau passed only lets sets saved with different taus be averaged (probabilities do not depend on it)."""
    return gate_probabilities(table, load_gate_set(",".join(map(str, folders)), tau=0.5), samples)


def report(name: str, answers: pd.DataFrame, probabilities: pd.DataFrame, chosen: float) -> list[str]:
    """One line per tau: the accuracy change against the full model (paired interval) and the FLOPs."""
    lines = []
    for tau, line in dyvte_tau_summary(answers, probabilities, TAUS, name).iterrows():
        mark = "  <- tau chosen on validation" if abs(tau - chosen) < 1e-12 else ""
        lines.append(f"{name:>10} tau {tau:<7g} {100 * line['difference']:+5.1f} points "
                     f"({100 * line['difference_low']:+.1f} to {100 * line['difference_high']:+.1f})  "
                     f"FLOPs {line['relative_prefill_flops']:.3f}{mark}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the folder of make frontier (val-table, test-table)")
    parser.add_argument("gates", type=Path, nargs="+", help="gate set folders (dyvte-exit train --out) to average")
    args = parser.parse_args()
    tables = {split: args.runs / f"{split}-table" for split in ("val", "test")}
    answers = {split: read_exit_answers(path) for split, path in tables.items()}
    samples = {split: sorted(frame["sample_id"].unique()) for split, frame in answers.items()}
    sets = {"mean": args.gates, **{folder.name: [folder] for folder in args.gates}}
    print(f"# {' '.join(sys.argv)}")
    print(f"# test: {len(samples['test'])} questions; tau chosen on {len(samples['val'])} validation questions")
    for name, folders in sets.items():
        chosen = choose_tau(answers["val"], mean_probabilities(tables["val"], folders, samples["val"]), TAUS)
        print("\n".join(report(name, answers["test"], mean_probabilities(tables["test"], folders, samples["test"]),
                               chosen)))


if __name__ == "__main__":
    main()
