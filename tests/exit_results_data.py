"""Test data for exit figures and the exit notebook: a synthetic evaluation folder in the format of
``exit.evaluate.evaluate_methods`` (``eval-<method>.parquet`` + ``summary.parquet``), with known
exit layers, accuracies and FLOPs, built with pandas in milliseconds (no model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest

from exit.evaluate import summary_row, write_evaluation_rows, write_evaluation_summary
from exit.flops import DecoderShape, fastv_tokens_per_layer, prefill_flops, prefill_flops_for_counts

NUM_LAYERS = 8
QUESTIONS = 12
CATEGORIES = ("colour", "count", "shape")
TOKENS, IMAGE_TOKENS = 80, 64
SHAPE = DecoderShape(layers=NUM_LAYERS, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=300)
METHODS: tuple[str, ...] = (
    "none", "static:1", "static:3", "vtw:4", "fastv:1:0.5", "fastv:1:0.75",
    "dyvte:0.2", "dyvte:0.5", "dyvte:0.8", "dyvte+fastv:1:0.5",
)
"""Every kind of ``exit.methods.METHODS``: dyvte at three thresholds, two static exits, ..."""


def exit_layer(method: str, index: int) -> int:
    """The exit layer of question ``index`` under ``method`` (-1: never).

    static:K and vtw:K: K for every question; none and fastv: never; dyvte:TAU (and dyvte+fastv,
    as TAU 0.5): ``int(TAU * NUM_LAYERS) + index % 3``, except every fourth question never exits
    (index % 4 == 3) and anything past the last layer never exits.
    """
    family, _, argument = method.partition(":")
    if family in ("static", "vtw"):
        return int(argument)
    if family in ("none", "fastv"):
        return -1
    tau = float(argument) if family == "dyvte" else 0.5
    layer = int(tau * NUM_LAYERS) + index % 3
    return -1 if index % 4 == 3 or layer >= NUM_LAYERS else layer


def accuracy(method: str) -> float:
    """The share of correct answers of ``method`` (the first questions are the correct ones)."""
    family, _, argument = method.partition(":")
    if family == "dyvte":
        return 0.4 + 0.4 * float(argument)
    if family == "static":
        return 0.25 + 0.1 * int(argument)
    return {"none": 0.75, "vtw": 0.5, "fastv": 0.5, "dyvte+fastv": 0.5}[family]


def _relative_flops(method: str, layer: int) -> float:
    family, _, argument = method.partition(":")
    full = prefill_flops(SHAPE, TOKENS, IMAGE_TOKENS)
    if family in ("fastv", "dyvte+fastv"):
        k, ratio = argument.split(":")
        counts = fastv_tokens_per_layer(SHAPE, TOKENS, IMAGE_TOKENS, int(k), float(ratio), None if layer < 0 else layer)
        return prefill_flops_for_counts(SHAPE, counts) / full
    return prefill_flops(SHAPE, TOKENS, IMAGE_TOKENS, None if layer < 0 else layer) / full


def synthetic_rows(method: str, questions: int = QUESTIONS) -> pd.DataFrame:
    """One method's per-question rows, as ``exit.evaluate.evaluate_method`` returns them."""
    correct = round(accuracy(method) * questions)
    rows = []
    for index in range(questions):
        layer = exit_layer(method, index)
        rows.append({
            "method": method, "question_id": f"q{index:03d}", "category": CATEGORIES[index % len(CATEGORIES)],
            "answer": "red", "prediction": "red" if index < correct else "blue", "correct": index < correct,
            "exit_layer": layer, "tokens": TOKENS, "image_tokens": IMAGE_TOKENS,
            "relative_prefill_flops": _relative_flops(method, layer), "batch": index // 4, "batch_seconds": 0.5,
            "batch_rows": 4, "prefill_seconds": 0.4 * _relative_flops(method, layer), "decode_seconds": 0.1,
            "decode_steps": 3,
        })
    return pd.DataFrame(rows)


def summary_line(method: str, frame: pd.DataFrame) -> dict[str, object]:
    """The summary line of one method, built as ``exit.evaluate.evaluate_methods`` builds it."""
    return summary_row(method, frame, NUM_LAYERS)


PROVENANCE = {"model": "synthetic (tests/exit_results_data.py)", "seed": 0}
"""The provenance the synthetic folder records (a real one comes from ``analysis.loading.provenance``)."""


def write_results_folder(folder: str | Path, methods: Sequence[str] = METHODS, questions: int = QUESTIONS) -> Path:
    """Write ``eval-<method>.parquet`` for every method and ``summary.parquet`` into ``folder``, with
    the writers of ``exit.evaluate`` (registered tables, provenance in the metadata)."""
    folder = Path(folder)
    lines = []
    for method in methods:
        frame = synthetic_rows(method, questions)
        write_evaluation_rows(frame, folder, PROVENANCE)
        lines.append(summary_line(method, frame))
    write_evaluation_summary(pd.DataFrame(lines), folder, PROVENANCE)
    return folder


@pytest.fixture(scope="session")
def exit_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic evaluation folder with every method of :data:`METHODS` (shared by test modules)."""
    return write_results_folder(tmp_path_factory.mktemp("exit-results"))
