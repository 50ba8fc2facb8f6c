"""The accuracy-FLOPs frontier from the exit table, by lookup.

The exit table (``exit_answers``, written by ``dyvte-exit sweep --answers N``) holds, for every
question and every decoder layer k = 0..L-1, the greedy answer generated when all image tokens
leave after layer k (k = L-1: no exit, the full model), whether it is correct, whether it equals
the full model's answer, and the static exit's relative prefill FLOPs. Any method that removes
all image tokens after one layer per question is then a lookup: choose each question's exit
layer (a pd.Series sample_id -> layer) and read the row at that layer (:func:`lookup_rows`). No
model runs, so a whole frontier, oracles and label studies included, costs seconds.

=============================  ==============================================================
exit-layer rule                the layer each question's image tokens leave after
=============================  ==============================================================
:func:`static_exits`           K for every question (``static:K``; K = L-1 is ``none``)
:func:`oracle_exits`           the earliest layer whose answer equals the full model's
                               (``oracle``, keep="same") or is correct (``oracle[correct]``,
                               keep="correct"; L-1 when no layer is)
:func:`first_exit_over`        the first layer whose p(exit) > tau (how the DyVTE gates decide)
:func:`rule_exits`             the earliest layer a label rule of :data:`LABEL_RULES` calls safe
                               (``oracle[RULE]``), optionally with monotone labels ("safe from
                               this layer on", ``oracle[RULE,monotone]``)
:func:`informed_oracle_exits`  the earliest layer whose answer equals the full model's where that
                               layer's answers in the question's category agree with the full
                               model's more often than chance (:func:`chance_agreement`) by a
                               margin (``oracle[informed]``): the oracle without the exits that
                               an answer independent of the image would have matched as often
:func:`category_static_exits`  one static layer per question category, the layers of
                               :func:`category_static_layers`: chosen on a validation table
                               (``static[category]``, a baseline that knows the task type) or on
                               the table itself (``oracle[category]``, the most any rule that
                               sees only the category can save)
=============================  ==============================================================

The label rules need the teacher-forced sweep (``exit_sweep``) beside the exit table; join them
with :func:`join_exit_tables`. :func:`frontier_methods` builds the usual set of lookups,
:func:`frontier_summary` adds bootstrap intervals (questions resampled with replacement) to
``exit.evaluate.summary_row``, and :func:`write_frontier_folder` writes an evaluation folder
(``eval-<method>.parquet``, ``summary.parquet``) that ``exit.plots.read_evaluation`` and
``make_exit_figures`` read as they read ``dyvte-exit eval --out``, plus ``frontier.md``.

A lookup row is not timed: its ``batch`` and the other timing columns of the ``evaluation`` table
are -1 (integers) or NaN (floats), and so are the summary's times.

Methods that remove tokens in ways no exit table holds (FastV, DyVTE + FastV) come from real runs:
:func:`run_methods` reads an evaluation folder (``dyvte-exit eval --out``) over the table's
questions, and ``frontier_of_tables(runs=...)`` puts its methods beside the lookups (their rows keep
their own times; the summary shows none, as for a lookup).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.errors import UsageError
from analysis.schema import EVALUATION
from exit.evaluate import EvaluationFolder, summary_row, write_evaluation_rows, write_evaluation_summary
from exit.methods import STOCK_MODEL
from exit.plots import category_accuracy
from exit.surgery import NO_EXIT
from exit.sweep import LabelRule

__all__ = [
    "DEFAULT_TAUS",
    "TableFrontier",
    "LABEL_STUDY_FILE",
    "choose_tau",
    "dyvte_lookups",
    "frontier_of_tables",
    "gate_probabilities",
    "write_frontier",
    "ANSWER_COLUMNS",
    "FRONTIER_COLUMNS",
    "FRONTIER_FILE",
    "ANSWER_LABEL_RULES",
    "LABEL_RULES",
    "ORACLE",
    "ORACLE_KEEPS",
    "UNTIMED",
    "CATEGORY_ORACLE",
    "CATEGORY_STATIC",
    "INFORMED_ORACLE",
    "bootstrap_interval",
    "category_static_exits",
    "category_static_layers",
    "chance_agreement",
    "informed_oracle_exits",
    "exit_table_layers",
    "first_exit_over",
    "frontier_markdown",
    "frontier_methods",
    "frontier_summary",
    "join_exit_tables",
    "lookup_rows",
    "monotone",
    "named_method",
    "oracle_exits",
    "paired_difference_interval",
    "rule_exits",
    "rule_method_name",
    "run_methods",
    "static_exits",
    "write_frontier_folder",
]

KEYS: tuple[str, str] = ("sample_id", "layer")
ANSWER_COLUMNS: tuple[str, ...] = ("sample_id", "layer", "category", "answer", "prediction", "correct",
                                   "same_as_full", "tokens", "image_tokens", "relative_prefill_flops")
"""Columns of the exit table that a lookup reads."""
ROW_ORDER: tuple[str, ...] = tuple(column.name for column in EVALUATION.columns)
_FIRST_TIMED = ROW_ORDER.index("batch")
UNTIMED: dict[str, float] = {
    column.name: -1 if pa.types.is_integer(column.dtype) else math.nan for column in EVALUATION.columns[_FIRST_TIMED:]
}
"""The timing columns of the ``evaluation`` table as a lookup fills them: -1 or NaN, "not timed"."""
UNTIMED_SUMMARY: tuple[str, ...] = ("seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second")
FRONTIER_COLUMNS: tuple[str, ...] = ("accuracy_low", "accuracy_high", "difference", "difference_low",
                                     "difference_high", "share_of_oracle_saving")
"""What :func:`frontier_summary` adds to ``summary_row``: the accuracy's bootstrap interval, the
accuracy minus the reference's with its paired interval, and the share of the oracle's FLOPs saving."""
FRONTIER_FILE = "frontier.md"
ORACLE = "oracle"
"""The oracle that :func:`frontier_summary` measures FLOPs savings against (keep="same")."""
ORACLE_KEEPS: dict[str, tuple[str, str]] = {
    "same": ("same_as_full", ORACLE),
    "correct": ("correct", f"{ORACLE}[correct]"),
}
"""keep -> (the exit-table column that must be true at the exit layer, the lookup method's name)."""
CATEGORY_STATIC = "static[category]"
"""One static exit layer per question category, the layers chosen on a validation exit table."""
INFORMED_ORACLE = f"{ORACLE}[informed]"
"""The oracle restricted to (category, layer) cells whose answers agree with the full model's more than chance."""
CATEGORY_ORACLE = f"{ORACLE}[category]"
"""One static exit layer per question category, the layers chosen on the table looked up itself."""

_PAPER = LabelRule()
LabelFunction = Callable[[pd.DataFrame], pd.Series]


def _ce_increase_below(delta: float) -> LabelFunction:
    return lambda frame: (frame["ce_exit"] - frame["ce_full"]) < delta


LABEL_RULES: dict[str, LabelFunction] = {
    "paper": lambda f: (f["agreement"] > _PAPER.min_agreement) & (f["ce_ratio"] < _PAPER.max_ce_ratio),
    "agreement": lambda f: f["agreement"] > _PAPER.min_agreement,
    "ce+0.05": _ce_increase_below(0.05),
    "ce+0.2": _ce_increase_below(0.2),
    "answer": lambda f: f["same_as_full"].astype(bool),
}
"""Label rule -> (joined sweep and exit table -> bool label per row: exiting there is safe).
``paper``: agreement > 0.99 and ce_ratio < 1.03 (``exit.sweep.LabelRule``, the sweep's ``label``);
``agreement``: agreement > 0.99 alone; ``ce+D``: the answer cross-entropy rises by less than D nats
per token; ``answer``: the generated answer equals the full model's."""

ANSWER_LABEL_RULES: frozenset[str] = frozenset({"answer"})
"""The label rules that read the generated answers (the exit table); the others read only the
teacher-forced sweep."""


# the exit table ----------------------------------------------------------------------------------

def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UsageError(f"expected {what} with the columns {list(columns)}, found no {missing} in {list(frame.columns)}")
    if frame.empty:
        raise UsageError(f"expected {what} with at least one row, found none")


def exit_table_layers(table: pd.DataFrame) -> int:
    """The decoder layers L of an exit table (or a frame joined to one), after checking that every
    sample has one row at each layer 0..L-1.

    Raises:
        UsageError: no rows, no sample_id or layer column, or a sample with a missing or repeated layer.
    """
    _require_columns(table, KEYS, "an exit table (exit_answers)")
    layers = table["layer"].astype("int64")
    num_layers = int(layers.max()) + 1
    per_sample = layers.groupby(table["sample_id"], sort=False).agg(["size", "nunique", "min"])
    bad = per_sample[(per_sample["size"] != num_layers) | (per_sample["nunique"] != num_layers) | (per_sample["min"] != 0)]
    if len(bad):
        first = bad.iloc[0]
        raise UsageError(
            f"expected every sample at layers 0..{num_layers - 1} once each, found {len(bad)} sample(s) that are not, "
            f"e.g. {bad.index[0]!r} with {first['size']} rows over {first['nunique']} layers from {first['min']}"
        )
    return num_layers


def _samples(table: pd.DataFrame) -> pd.Index:
    return pd.Index(pd.unique(table["sample_id"]), name="sample_id")


def join_exit_tables(sweep: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """The exit table with the sweep's teacher-forced columns (agreement, ce_exit, ce_full,
    ce_ratio, label) joined on (sample_id, layer), in the exit table's row order.

    Raises:
        UsageError: a (sample_id, layer) of the exit table that the sweep lacks.
    """
    taught = ["agreement", "ce_exit", "ce_full", "ce_ratio", "label"]
    _require_columns(sweep, [*KEYS, *taught], "an exit sweep (exit_sweep)")
    exit_table_layers(answers)
    left = answers.assign(layer=answers["layer"].astype("int64"))
    right = sweep[[*KEYS, *taught]].assign(layer=sweep["layer"].astype("int64"))
    joined = left.merge(right, on=list(KEYS), how="left", validate="one_to_one", indicator=True)
    lacking = joined[joined["_merge"] != "both"]
    if len(lacking):
        raise UsageError(f"expected a sweep row for every (sample_id, layer) of the exit table, found {len(lacking)} "
                         f"without, e.g. {tuple(lacking.iloc[0][list(KEYS)])}")
    return joined.drop(columns="_merge")


# exit-layer rules --------------------------------------------------------------------------------

def _labels(table: pd.DataFrame, values: Any) -> pd.Series:
    """A bool label per (sample_id, layer) row of ``table``."""
    index = pd.MultiIndex.from_arrays([table["sample_id"], table["layer"].astype("int64")], names=list(KEYS))
    return pd.Series(np.asarray(values, dtype=bool), index=index, name="label")


def _earliest(labels: pd.Series, samples: pd.Index, num_layers: int) -> pd.Series:
    """Per sample the lowest layer whose label is true; L-1 (no exit) where none is."""
    found = labels[labels.to_numpy()].index.to_frame(index=False).groupby("sample_id", sort=False)["layer"].min()
    return found.reindex(samples).fillna(num_layers - 1).astype("int64").rename("exit_layer")


def static_exits(answers: pd.DataFrame, k: int) -> pd.Series:
    """Layer ``k`` for every sample of the exit table (``static:K``; k = L-1 keeps the image)."""
    num_layers = exit_table_layers(answers)
    if not 0 <= k < num_layers:
        raise UsageError(f"expected a static exit layer in 0..{num_layers - 1}, found {k}")
    return pd.Series(k, index=_samples(answers), name="exit_layer", dtype="int64")


def oracle_exits(answers: pd.DataFrame, keep: str = "same") -> pd.Series:
    """Per sample the earliest layer whose answer equals the full model's (``keep="same"``; layer
    L-1 always does) or is correct (``keep="correct"``; L-1 when no layer is)."""
    if keep not in ORACLE_KEEPS:
        raise UsageError(f"expected keep in {list(ORACLE_KEEPS)}, found {keep!r}")
    column = ORACLE_KEEPS[keep][0]
    _require_columns(answers, [*KEYS, column], "an exit table (exit_answers)")
    num_layers = exit_table_layers(answers)
    return _earliest(_labels(answers, answers[column]), _samples(answers), num_layers)


def first_exit_over(probabilities: pd.DataFrame, tau: float, num_layers: int) -> pd.Series:
    """Per sample the first layer whose ``p_exit`` > ``tau``; L-1 (no exit) when none is, as the
    DyVTE gates decide (a layer without a row has no gate, so it never fires).

    Raises:
        UsageError: missing columns, or a layer outside 0..num_layers-1.
    """
    _require_columns(probabilities, [*KEYS, "p_exit"], "exit probabilities")
    layers = probabilities["layer"].astype("int64")
    outside = sorted({int(v) for v in layers[(layers < 0) | (layers >= num_layers)]})
    if outside:
        raise UsageError(f"expected layers in 0..{num_layers - 1}, found {outside}")
    fires = probabilities["p_exit"].to_numpy(dtype=float) > tau
    return _earliest(_labels(probabilities, fires), _samples(probabilities), num_layers)


def monotone(labels: pd.Series) -> pd.Series:
    """"Safe from this layer on": the label at layer k is true only if it is true at every layer
    >= k of the same sample. ``labels`` is indexed by (sample_id, layer); the result keeps its order."""
    if list(labels.index.names) != list(KEYS):
        raise UsageError(f"expected labels indexed by {list(KEYS)}, found an index of {list(labels.index.names)}")
    backwards = labels.astype(bool).sort_index(level=list(KEYS), ascending=[True, False])
    # cummin over the layers from the last one down: one false layer makes every earlier one false
    safe = backwards.astype("int8").groupby(level="sample_id", sort=False).cummin().astype(bool)
    return safe.reindex(labels.index)


def rule_exits(frame: pd.DataFrame, rule: str, monotone_labels: bool = False) -> pd.Series:
    """Per sample the earliest layer that label rule ``rule`` (:data:`LABEL_RULES`) calls safe, in
    the joined sweep and exit table (:func:`join_exit_tables`); L-1 where no layer is safe.

    Args:
        monotone_labels: take the earliest layer safe from there on (:func:`monotone`) instead.
    """
    if rule not in LABEL_RULES:
        raise UsageError(f"expected a label rule in {list(LABEL_RULES)}, found {rule!r}")
    num_layers = exit_table_layers(frame)
    labels = _labels(frame, LABEL_RULES[rule](frame))
    return _earliest(monotone(labels) if monotone_labels else labels, _samples(frame), num_layers)


def chance_agreement(answers: pd.DataFrame) -> pd.DataFrame:
    """Per question category and exit layer: ``same_as_full``, the share of questions whose answer
    after that exit equals the full model's, and ``chance``, the share expected if the two answers
    were drawn independently from their distributions in that category (sum over answers a of
    P(exit answer = a) P(full answer = a)). Where the two are equal, the exit's answers carry no
    information about the full model's (a prior, e.g. always "red"), and an exit there keeps the
    answer by coincidence: no gate reading that layer can tell which questions it will keep.
    Columns: category, layer, questions, same_as_full, chance, above_chance."""
    _require_columns(answers, ["category", "prediction", "same_as_full", *KEYS], "an exit table (exit_answers)")
    num_layers = exit_table_layers(answers)
    table = answers.assign(layer=answers["layer"].astype("int64"), prediction=answers["prediction"].astype(str))
    full = table[table["layer"] == num_layers - 1].set_index("sample_id")["prediction"]
    table = table.assign(full=table["sample_id"].map(full))
    rows = []
    for (category, layer), cell in table.groupby(["category", "layer"], sort=True):
        exit_share = cell["prediction"].value_counts(normalize=True)
        full_share = cell["full"].value_counts(normalize=True).reindex(exit_share.index, fill_value=0.0)
        same = float(cell["same_as_full"].astype(bool).mean())
        chance = float((exit_share * full_share).sum())
        rows.append({"category": str(category), "layer": int(layer), "questions": len(cell),
                     "same_as_full": same, "chance": chance, "above_chance": same - chance})
    return pd.DataFrame(rows)


def informed_oracle_exits(answers: pd.DataFrame, margin: float = 0.05) -> pd.Series:
    """Per sample the earliest layer whose answer equals the full model's at a (category, layer)
    cell whose ``same_as_full`` exceeds :func:`chance_agreement`'s ``chance`` by more than
    ``margin``; L-1 where there is none. The full model's own layer always counts."""
    _require_columns(answers, [*KEYS, "category", "same_as_full"], "an exit table (exit_answers)")
    num_layers = exit_table_layers(answers)
    cells = chance_agreement(answers)
    informed = cells.loc[cells["above_chance"] > margin, ["category", "layer"]].assign(informed=True)
    table = answers[[*KEYS, "category", "same_as_full"]].assign(layer=answers["layer"].astype("int64"),
                                                                category=answers["category"].astype(str))
    flagged = table.merge(informed, on=["category", "layer"], how="left")["informed"].fillna(False).astype(bool).to_numpy()
    keep = table["same_as_full"].astype(bool).to_numpy() & (flagged | (table["layer"].to_numpy() == num_layers - 1))
    return _earliest(_labels(table, keep), _samples(answers), num_layers)


def category_static_layers(answers: pd.DataFrame, max_drop: float = 1.0) -> dict[str, int]:
    """Per question category of the exit table, the static exit layer such that, all categories
    together, the prefill FLOPs are fewest with the accuracy within ``max_drop`` points of the full
    model's on ``answers``. Exact: a knapsack over the number of correct answers (each category
    picks one layer; the array is indexed by correct answers so far and holds the fewest FLOPs),
    so its cost is categories x layers x questions. Ties keep the lower layer.

    This is what a rule that sees only the task type can do: chosen on a validation table it is a
    baseline (:data:`CATEGORY_STATIC`), chosen on the table it is applied to it is that rule's
    ceiling (:data:`CATEGORY_ORACLE`)."""
    _require_columns(answers, ["category", "correct", "relative_prefill_flops", *KEYS], "an exit table (exit_answers)")
    if max_drop < 0:
        raise UsageError(f"expected max_drop >= 0 points, found {max_drop}")
    num_layers = exit_table_layers(answers)
    per = (answers.assign(layer=answers["layer"].astype("int64"), correct=answers["correct"].astype("int64"))
           .groupby(["category", "layer"], sort=True)
           .agg(correct=("correct", "sum"), flops=("relative_prefill_flops", "sum")))
    questions = int(_samples(answers).size)
    full_correct = int(per.xs(num_layers - 1, level="layer")["correct"].sum())
    needed = max(0, math.ceil(full_correct - max_drop / 100 * questions - 1e-9))
    fewest = np.full(questions + 1, np.inf)
    fewest[0] = 0.0
    picks: list[tuple[str, np.ndarray, dict[int, int]]] = []
    for category, rows in per.groupby(level="category", sort=True):
        after = np.full(questions + 1, np.inf)
        pick = np.full(questions + 1, -1, dtype=np.int64)
        correct_at = {}
        for (_, layer), (correct, flops) in rows.iterrows():
            correct = int(correct)
            correct_at[int(layer)] = correct
            shifted = np.full(questions + 1, np.inf)
            shifted[correct:] = fewest[:questions + 1 - correct] + flops
            better = shifted < after
            after[better], pick[better] = shifted[better], int(layer)
        fewest = after
        picks.append((str(category), pick, correct_at))
    total = needed + int(np.argmin(fewest[needed:]))
    layers = {}
    for category, pick, correct_at in reversed(picks):
        layers[category] = int(pick[total])
        total -= correct_at[layers[category]]
    return dict(sorted(layers.items()))


def category_static_exits(answers: pd.DataFrame, layers: Mapping[str, int]) -> pd.Series:
    """Per sample of the exit table the static layer of its category in ``layers``
    (:func:`category_static_layers`); no exit (L-1) for a category ``layers`` lacks."""
    _require_columns(answers, ["category", *KEYS], "an exit table (exit_answers)")
    num_layers = exit_table_layers(answers)
    outside = sorted({f"{c}: {k}" for c, k in layers.items() if not 0 <= int(k) < num_layers})
    if outside:
        raise UsageError(f"expected category exit layers in 0..{num_layers - 1}, found {outside}")
    category = answers.groupby("sample_id", sort=False)["category"].first().reindex(_samples(answers)).astype(str)
    return category.map(lambda c: int(layers.get(c, num_layers - 1))).astype("int64").rename("exit_layer")


def rule_method_name(rule: str, monotone_labels: bool = False) -> str:
    """The lookup method of a label rule's earliest safe exit: ``oracle[paper]``, ``oracle[paper,monotone]``."""
    return f"{ORACLE}[{rule}{',monotone' if monotone_labels else ''}]"


# lookups -----------------------------------------------------------------------------------------

def _checked_exit_layers(exit_layers: pd.Series, num_layers: int) -> np.ndarray:
    """The exit layers as int64, NO_EXIT written as L-1 (the row of the full model)."""
    twice = sorted({str(v) for v in exit_layers.index[exit_layers.index.duplicated()]})
    if twice:
        raise UsageError(f"expected one exit layer per sample, found {twice} more than once")
    values = exit_layers.to_numpy()
    if not (np.issubdtype(values.dtype, np.integer) or (values == np.round(values)).all()):
        raise UsageError(f"expected integer exit layers, found dtype {values.dtype}")
    values = values.astype(np.int64)
    outside = sorted({int(v) for v in values[(values != NO_EXIT) & ((values < 0) | (values >= num_layers))]})
    if outside:
        raise UsageError(f"expected exit layers in 0..{num_layers - 1} or {NO_EXIT} (no exit), found {outside}")
    return np.where(values == NO_EXIT, num_layers - 1, values)


def lookup_rows(answers: pd.DataFrame, method: str, exit_layers: pd.Series) -> pd.DataFrame:
    """The ``evaluation`` rows of ``method`` for the samples of ``exit_layers`` (sample_id ->
    layer; L-1 or NO_EXIT: no exit), read from the exit table at each sample's layer, in the order
    of ``exit_layers``. ``exit_layer`` is NO_EXIT for a sample that kept its image to the end, as in
    the evaluation table; the timing columns are :data:`UNTIMED`.

    Raises:
        UsageError: a bad exit table, a layer out of range, or a sample the exit table lacks.
    """
    _require_columns(answers, ANSWER_COLUMNS, "an exit table (exit_answers)")
    num_layers = exit_table_layers(answers)
    keys = pd.DataFrame({"sample_id": exit_layers.index.astype(str),
                         "layer": _checked_exit_layers(exit_layers, num_layers)})
    table = answers[list(ANSWER_COLUMNS)].assign(layer=answers["layer"].astype("int64"))
    picked = keys.merge(table, on=list(KEYS), how="left", validate="one_to_one", indicator=True)
    unknown = picked.loc[picked["_merge"] != "both", "sample_id"].tolist()
    if unknown:
        raise UsageError(f"expected exit layers of samples in the exit table, found {len(unknown)} others, e.g. {unknown[:3]}")
    rows = pd.DataFrame({
        "method": method,
        "question_id": picked["sample_id"].astype(str),
        "category": picked["category"].astype(str),
        "answer": picked["answer"].astype(str),
        "prediction": picked["prediction"].astype(str),
        "correct": picked["correct"].astype(bool),
        "exit_layer": picked["layer"].where(picked["layer"] < num_layers - 1, NO_EXIT).astype("int64"),
        "tokens": picked["tokens"].astype("int64"),
        "image_tokens": picked["image_tokens"].astype("int64"),
        "relative_prefill_flops": picked["relative_prefill_flops"].astype("float64"),
    })
    for name, value in UNTIMED.items():
        rows[name] = value
    return rows[list(ROW_ORDER)]


def frontier_methods(answers: pd.DataFrame, sweep: pd.DataFrame | None = None,
                     static_layers: Sequence[int] | None = None) -> dict[str, pd.DataFrame]:
    """The usual lookups: ``none``, ``static:K`` for each K (default every layer but the last),
    both oracles (:data:`ORACLE_KEEPS`) and, with the sweep, every label rule's earliest safe exit
    with and without monotone labels (:func:`rule_method_name`)."""
    num_layers = exit_table_layers(answers)
    exits = {STOCK_MODEL: static_exits(answers, num_layers - 1)}
    for k in range(num_layers - 1) if static_layers is None else static_layers:
        exits[f"static:{k}"] = static_exits(answers, k)
    for keep, (_, name) in ORACLE_KEEPS.items():
        exits[name] = oracle_exits(answers, keep)
    if sweep is not None:
        joined = join_exit_tables(sweep, answers)
        for rule in LABEL_RULES:
            for flag in (False, True):
                exits[rule_method_name(rule, flag)] = rule_exits(joined, rule, flag)
    return {name: lookup_rows(answers, name, layers) for name, layers in exits.items()}


# intervals ---------------------------------------------------------------------------------------

def bootstrap_interval(values: np.ndarray, rounds: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (one per question): ``rounds``
    resamples of the questions with replacement (``numpy.random.default_rng(seed)``).

    Raises:
        UsageError: no values, rounds < 1 or level outside (0, 1).
    """
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0:
        raise UsageError("expected values to bootstrap, found none")
    if rounds < 1 or not 0.0 < level < 1.0:
        raise UsageError(f"expected rounds >= 1 and a level in (0, 1), found rounds={rounds}, level={level}")
    generator = np.random.default_rng(seed)
    means = np.empty(rounds)
    chunk = max(1, 2_000_000 // values.size)  # at most about 2M drawn indices at a time
    for start in range(0, rounds, chunk):
        picks = generator.integers(0, values.size, size=(min(chunk, rounds - start), values.size))
        means[start:start + len(picks)] = values[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0,
                               level: float = 0.95) -> tuple[float, float]:
    """The bootstrap interval of mean(a) - mean(b) for two methods on the same questions (a[i] and
    b[i] belong to question i): each round resamples the question index once for both, which is
    the bootstrap of the per-question differences a - b.

    Raises:
        UsageError: a and b of different lengths, or as :func:`bootstrap_interval`.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise UsageError(f"expected the same questions for both methods, found {a.size} and {b.size} values")
    return bootstrap_interval(a - b, rounds, seed, level)


def _correct_by_question(rows_by_method: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """question_id x method: 1.0 where correct, checking that every method answered the same questions."""
    columns = {}
    for method, frame in rows_by_method.items():
        _require_columns(frame, ("question_id", "correct"), f"evaluation rows of {method!r}")
        columns[method] = frame.set_index("question_id")["correct"].astype(float)
    first = next(iter(columns))
    for method, column in columns.items():
        if not column.index.is_unique or set(column.index) != set(columns[first].index):
            raise UsageError(f"expected every method to answer the same questions once each, found {method!r} with "
                             f"{len(column)} rows ({column.index.nunique()} questions) and {first!r} with {len(columns[first])}")
    return pd.DataFrame(columns).reindex(columns[first].index)


def frontier_summary(rows_by_method: Mapping[str, pd.DataFrame], num_layers: int, reference: str = STOCK_MODEL,
                     oracle: str = ORACLE, rounds: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One line per method: ``exit.evaluate.summary_row`` (per-category accuracy included; times
    NaN, a lookup is not timed), then :data:`FRONTIER_COLUMNS`: the accuracy's bootstrap interval,
    ``difference`` = accuracy - ``reference``'s with its paired interval (NaN without it), and
    ``share_of_oracle_saving`` = (1 - FLOPs) / (1 - ``oracle``'s FLOPs) (NaN without the oracle, or
    when it saves nothing).

    Raises:
        UsageError: no methods, or methods that did not answer the same questions.
    """
    if not rows_by_method:
        raise UsageError("expected the rows of at least one method, found none")
    correct = _correct_by_question(rows_by_method)
    saving = math.nan
    if oracle in rows_by_method:
        saving = 1.0 - float(rows_by_method[oracle]["relative_prefill_flops"].mean())
    lines = []
    for method, frame in rows_by_method.items():
        line = {**summary_row(method, frame, num_layers), **dict.fromkeys(UNTIMED_SUMMARY, math.nan)}
        low, high = bootstrap_interval(correct[method].to_numpy(), rounds, seed, level)
        difference = (math.nan,) * 3
        if reference in correct:
            a, b = correct[method].to_numpy(), correct[reference].to_numpy()
            difference = (float(a.mean() - b.mean()), *paired_difference_interval(a, b, rounds, seed, level))
        share = (1.0 - line["relative_prefill_flops"]) / saving if saving > 0 else math.nan
        lines.append({**line, **dict(zip(FRONTIER_COLUMNS, (low, high, *difference, share)))})
    return pd.DataFrame(lines)


# the folder --------------------------------------------------------------------------------------

_FORMATS: dict[str, str] = {"accuracy": "{:.1f} %", "95 % interval": "{:.1f} to {:.1f}", "difference": "{:+.1f}",
                            "difference 95 %": "{:+.1f} to {:+.1f}", "mean exit layer": "{:.1f}",
                            "rows exited": "{:.0f} %", "prefill FLOPs": "{:.2f}", "share of oracle saving": "{:.0f} %"}


def _cell(value: Any, form: str) -> str:
    """One table cell; a missing number (NaN) is written as a dash."""
    numbers = value if isinstance(value, tuple) else (value,)
    if any(isinstance(n, float) and math.isnan(n) for n in numbers):
        return "-"
    return form.format(*numbers)


def _markdown(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = [_cell(row[c], _FORMATS.get(str(c), "{:.1f}" if isinstance(row[c], float) else "{}")) for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def frontier_markdown(summary: pd.DataFrame, reference: str = STOCK_MODEL, real_runs: Sequence[str] = ()) -> str:
    """:func:`frontier_summary` as Markdown: the results table (accuracy with its 95 % interval,
    the difference to ``reference`` in points with its paired interval, exit statistics, FLOPs and
    the share of the oracle's saving), then the accuracy per category (%). ``real_runs``: the
    methods whose rows come from real runs (:func:`run_methods`), named as such in the notes."""
    percent = 100 * summary[["accuracy_overall", *FRONTIER_COLUMNS[:5]]]
    table = pd.DataFrame({
        "method": summary["method"], "questions": summary["questions"], "accuracy": percent["accuracy_overall"],
        "95 % interval": list(zip(percent["accuracy_low"], percent["accuracy_high"])),
        "difference": percent["difference"],
        "difference 95 %": list(zip(percent["difference_low"], percent["difference_high"])),
        "mean exit layer": summary["mean_exit_layer"], "rows exited": 100 * summary["exited_share"],
        "prefill FLOPs": summary["relative_prefill_flops"], "share of oracle saving": 100 * summary["share_of_oracle_saving"],
    })
    by_category = (100 * category_accuracy(summary.drop(columns=list(FRONTIER_COLUMNS)))).reset_index()
    source = "Rows are lookups in the exit table (not timed)"
    if real_runs:
        source += (f", except {', '.join(real_runs)}: real runs (`dyvte-exit eval`) over the same questions, with "
                   "their own answers and FLOPs (their times are not shown here)")
    notes = [f"Accuracy (exact match) with 95 % bootstrap intervals over questions; difference = accuracy - "
             f"{reference}'s, in points, paired. {source}.", ""]
    return "\n".join([*notes, *_markdown(table), "", "Accuracy per category (%):", "", *_markdown(by_category)]) + "\n"


def write_frontier_folder(out_dir: str | Path, rows_by_method: Mapping[str, pd.DataFrame], provenance: Mapping[str, Any],
                          num_layers: int, rounds: int = 2000, seed: int = 0,
                          real_runs: Mapping[str, str | Path] | None = None) -> list[Path]:
    """Write the lookups as an evaluation folder: ``eval-<method>.parquet`` per method and
    ``summary.parquet`` (``exit.evaluate``'s writers and tables, so ``exit.plots.read_evaluation``
    and ``make_exit_figures`` read it), and ``frontier.md`` (:func:`frontier_markdown`). Returns
    the paths written. ``real_runs``: method -> the evaluation folder its rows were read from (a
    real run, not a lookup), said in that method's provenance and in the Markdown.

    Raises:
        UsageError: a folder that holds an evaluation already, rows whose ``method`` is not their
            key, or as :func:`frontier_summary`.
    """
    for name, frame in rows_by_method.items():
        found = sorted(set(frame["method"]))
        if found != [name]:
            raise UsageError(f"expected the rows of {name!r} to be of method {name!r}, found {found}")
    EvaluationFolder(out_dir, "new").check(list(rows_by_method))
    summary = frontier_summary(rows_by_method, num_layers, rounds=rounds, seed=seed)
    real_runs = dict(real_runs or {})
    base = {**provenance, "rows": "lookup in the exit table (exit.frontier), not timed"}
    paths = [write_evaluation_rows(frame, out_dir, base if name not in real_runs else
                                   {**base, "rows": f"real run (dyvte-exit eval) read from {real_runs[name]}"})
             for name, frame in rows_by_method.items()]
    paths.append(write_evaluation_summary(summary.drop(columns=list(FRONTIER_COLUMNS)), out_dir, base))
    markdown = Path(out_dir) / FRONTIER_FILE
    markdown.write_text(frontier_markdown(summary, real_runs=list(real_runs)), encoding="utf-8")
    return [*paths, markdown]


# real runs beside the lookups --------------------------------------------------------------------

def named_method(method: str, name: str | None) -> str:
    """``method`` labelled with a run's name, in brackets after the method's kind as the gate sets'
    lookups are (``dyvte[NAME]:tau``): ``dyvte+fastv:2:0.5:0.99`` of run ``shared`` is
    ``dyvte+fastv[shared]:2:0.5:0.99``. Without a name the method keeps its own."""
    if not name:
        return method
    kind, separator, settings = method.partition(":")
    return f"{kind}[{name}]{separator}{settings}"


def run_methods(folder: str | Path, samples: Sequence[str], name: str | None = None) -> dict[str, pd.DataFrame]:
    """The methods of an evaluation folder (``dyvte-exit eval --out``: real runs, for what no exit
    table holds, such as FastV and DyVTE + FastV) as frontier rows: method (:func:`named_method`
    with ``name``) -> its ``evaluation`` rows, which must answer exactly ``samples`` (the exit
    table's questions), each once.

    Raises:
        UsageError: a method that answered other questions (or some twice), as such; as
            ``exit.plots.read_evaluation`` for a folder that is no evaluation.
    """
    from exit.plots import read_evaluation

    rows, summary = read_evaluation(folder)
    wanted = {str(sample) for sample in samples}
    methods = {}
    for method in summary["method"]:
        frame = rows[rows["method"] == method]
        found = set(frame["question_id"].astype(str))
        if found != wanted or len(frame) != len(found):
            missing, others = sorted(wanted - found), sorted(found - wanted)
            raise UsageError(
                f"expected {method!r} in {folder} to answer the exit table's {len(wanted)} questions once each, found "
                f"{len(frame)} rows ({len(missing)} of the table's questions missing, e.g. {missing[:3]}; {len(others)} "
                f"others, e.g. {others[:3]}); finish it with `dyvte-exit eval --resume` on the table's question file")
        label = named_method(method, name)
        methods[label] = frame.assign(method=label)[list(ROW_ORDER)].reset_index(drop=True)
    return methods


# gates, by lookup ---------------------------------------------------------------------------------

def gate_probabilities(folder: str | Path, gates: Any, samples: Sequence[str] | None = None) -> pd.DataFrame:
    """p(exit) of ``gates`` (an ``exit.gates.DyVTEGates``) at every layer of every sample of a sweep
    folder, from its cached features (``features-*.safetensors``, taken as the gates' input kind
    with ``exit.gates.select_features``): columns sample_id, layer, p_exit. ``samples``: only these."""
    import torch

    from exit.gates import select_features
    from exit.sweep import feature_shards, read_shard

    wanted = None if samples is None else set(samples)
    frames = []
    for path in feature_shards(folder):
        features, _, ids, kind = read_shard(path)
        keep = [i for i, sample in enumerate(ids) if wanted is None or sample in wanted]
        if not keep:
            continue
        features = select_features(features[keep], kind, gates.config.inputs, gates.signature)
        with torch.no_grad():
            p = torch.stack([gates.p_exit(layer, features[:, layer]) for layer in range(features.shape[1])], dim=1)
        layers = p.shape[1]
        frames.append(pd.DataFrame({"sample_id": np.repeat([ids[i] for i in keep], layers),
                                    "layer": np.tile(np.arange(layers), len(keep)), "p_exit": p.reshape(-1).numpy()}))
    if not frames:
        raise UsageError(f"expected cached features of the exit table's samples in {folder}, found none")
    return pd.concat(frames, ignore_index=True).drop_duplicates(["sample_id", "layer"], keep="last")


def dyvte_lookups(answers: pd.DataFrame, probabilities: pd.DataFrame, taus: Sequence[float],
                  name: str = "dyvte") -> dict[str, pd.DataFrame]:
    """DyVTE at each tau as lookups: each question exits after the first layer whose p(exit) > tau
    (:func:`first_exit_over`); methods named ``NAME:TAU``."""
    num_layers = exit_table_layers(answers)
    samples = _samples(answers)
    probabilities = probabilities[probabilities["sample_id"].isin(samples)]
    return {f"{name}:{tau:g}": lookup_rows(answers, f"{name}:{tau:g}",
                                           first_exit_over(probabilities, tau, num_layers).reindex(samples))
            for tau in taus}


def dyvte_tau_summary(answers: pd.DataFrame, probabilities: pd.DataFrame, taus: Sequence[float],
                      name: str = "dyvte") -> pd.DataFrame:
    """:func:`frontier_summary` of DyVTE at each tau (:func:`dyvte_lookups`), against the full model
    and the oracle: one line per tau, in the order of ``taus``, indexed by tau."""
    num_layers = exit_table_layers(answers)
    lookups = dyvte_lookups(answers, probabilities, taus, name)
    rows = {STOCK_MODEL: lookup_rows(answers, STOCK_MODEL, static_exits(answers, num_layers - 1)),
            ORACLE: lookup_rows(answers, ORACLE, oracle_exits(answers)), **lookups}
    summary = frontier_summary(rows, num_layers).set_index("method")
    return summary.loc[list(lookups)].set_index(pd.Index(list(taus), name="tau"))


def choose_tau(answers: pd.DataFrame, probabilities: pd.DataFrame, taus: Sequence[float], max_drop: float = 1.0) -> float:
    """The tau of ``taus`` with the fewest prefill FLOPs whose accuracy is within ``max_drop``
    points of the full model's on ``answers`` (a validation exit table: never the test split);
    the largest tau when none is."""
    rows = dyvte_lookups(answers, probabilities, taus)
    full = float(lookup_rows(answers, STOCK_MODEL, static_exits(answers, exit_table_layers(answers) - 1))["correct"].mean())
    within = [(float(frame["relative_prefill_flops"].mean()), tau) for tau, frame in zip(taus, rows.values())
              if 100 * (full - float(frame["correct"].mean())) <= max_drop]
    return min(within)[1] if within else max(taus)


# the whole frontier of an exit table -------------------------------------------------------------

LABEL_STUDY_FILE = "label_rules.md"
DEFAULT_TAUS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class TableFrontier:
    """Every lookup of one exit table (:func:`frontier_of_tables`).

    Attributes:
        answers: the exit table itself (``exit_answers``).
        methods: the frontier's methods -> their evaluation rows.
        study: the label study's methods (none, the oracle, each label rule plain and monotone).
        chosen_tau: per gate set, the tau a validation table chose (empty without one).
        category_layers: per category-static method (``oracle[category]``, and with a validation
            table ``static[category]``), its exit layer per question category.
        real_runs: per method read from an evaluation folder (:func:`run_methods`), that folder.
    """

    answers: pd.DataFrame
    methods: dict[str, pd.DataFrame]
    study: dict[str, pd.DataFrame]
    chosen_tau: dict[str, float]
    category_layers: dict[str, dict[str, int]] = field(default_factory=dict)
    real_runs: dict[str, str] = field(default_factory=dict)


def frontier_of_tables(table: str | Path, gates: Mapping[str, Any] | None = None, taus: Sequence[float] = DEFAULT_TAUS,
                       tau_table: str | Path | None = None, vtw_layer: int | None = None,
                       runs: Sequence[tuple[str | None, str | Path]] = ()) -> TableFrontier:
    """Every lookup of one exit table folder (``dyvte-exit sweep --answers``).

    The frontier: none, static at every K, both oracles, the informed oracle
    (:data:`INFORMED_ORACLE`), the category oracle (one static layer per question category,
    chosen on this table: :data:`CATEGORY_ORACLE`), ``vtw:K`` when ``vtw_layer`` (calibrated
    elsewhere, on validation questions) is given, and for each gate set ``gates[name]`` DyVTE at
    every tau of ``taus`` (``dyvte[name]:tau``); with a validation exit table ``tau_table``, the
    tau each gate set would choose there (:func:`choose_tau`) and the category layers chosen there
    (:data:`CATEGORY_STATIC`), each within 1 point. ``runs``: (name or None, evaluation folder)
    pairs whose real runs over the table's questions join the frontier (:func:`run_methods`). The
    label study: the earliest layer each label rule of :data:`LABEL_RULES` calls safe, plain and
    monotone, beside none and the oracle.

    Raises:
        UsageError: a run's method named like a lookup or another run's (name the run), or as
            :func:`run_methods`.
    """
    from exit.sweep import read_exit_answers, read_sweep

    answers = read_exit_answers(table)
    # the runs first: a folder that does not fit the table is refused before any lookup is computed
    run_rows = [(folder, run_methods(folder, list(_samples(answers)), name)) for name, folder in runs]
    everything = frontier_methods(answers, read_sweep(table))
    rules = {rule_method_name(rule, flag) for rule in LABEL_RULES for flag in (False, True)}
    methods = {name: rows for name, rows in everything.items() if name not in rules}
    study = {name: rows for name, rows in everything.items() if name in rules or name in (STOCK_MODEL, ORACLE)}
    if vtw_layer is not None:
        methods[f"vtw:{vtw_layer}"] = lookup_rows(answers, f"vtw:{vtw_layer}", static_exits(answers, vtw_layer))
    chosen = {}
    validation = read_exit_answers(tau_table) if tau_table is not None else None
    methods[INFORMED_ORACLE] = lookup_rows(answers, INFORMED_ORACLE, informed_oracle_exits(answers))
    category_layers = {CATEGORY_ORACLE: category_static_layers(answers)}
    if validation is not None:
        category_layers[CATEGORY_STATIC] = category_static_layers(validation)
    for name, layers in category_layers.items():
        methods[name] = lookup_rows(answers, name, category_static_exits(answers, layers))
    for name, gate_set in (gates or {}).items():
        probabilities = gate_probabilities(table, gate_set, list(_samples(answers)))
        if validation is not None:
            chosen[name] = choose_tau(validation, gate_probabilities(tau_table, gate_set, list(_samples(validation))), taus)
        methods.update(dyvte_lookups(answers, probabilities, taus, f"dyvte[{name}]"))
    real_runs = {}
    for folder, found in run_rows:
        for method, rows in found.items():
            if method in methods:
                raise UsageError(f"expected the methods of {folder} to be named unlike the frontier's others, found "
                                 f"{method!r} twice; name the run (--runs NAME={folder})")
            methods[method], real_runs[method] = rows, str(folder)
    return TableFrontier(answers, methods, study, chosen, category_layers, real_runs)


def write_frontier(table: str | Path, out_dir: str | Path, figures: str | Path | None, provenance: Mapping[str, Any],
                   **options: Any) -> list[Path]:
    """:func:`frontier_of_tables` written out: the frontier as an evaluation folder in ``out_dir``
    (:func:`write_frontier_folder`), the label study as ``out_dir/label_rules.md``, and with
    ``figures`` the figures there (``exit.plots.make_exit_figures``, ``accuracy_by_exit_layer.png``,
    ``oracle_exit_layers.png``). Returns the paths written."""
    from exit.plots import make_exit_figures, plot_accuracy_by_exit_layer, plot_oracle_exit_layers, save_figure

    found = frontier_of_tables(table, **options)
    num_layers = exit_table_layers(found.answers)
    base = {**provenance, "exit_table": str(table), "chosen_tau": found.chosen_tau, "category_layers": found.category_layers,
            "real_runs": found.real_runs}
    paths = write_frontier_folder(out_dir, found.methods, base, num_layers, real_runs=found.real_runs)
    study_md = Path(out_dir) / LABEL_STUDY_FILE
    study_md.write_text(frontier_markdown(frontier_summary(found.study, num_layers), reference=STOCK_MODEL), encoding="utf-8")
    paths.append(study_md)
    if figures is not None:
        Path(figures).mkdir(parents=True, exist_ok=True)
        paths += make_exit_figures(out_dir, figures, num_layers)
        paths.append(save_figure(plot_accuracy_by_exit_layer(found.answers), Path(figures) / "accuracy_by_exit_layer.png"))
        paths.append(save_figure(plot_oracle_exit_layers(found.methods[ORACLE], num_layers),
                                 Path(figures) / "oracle_exit_layers.png"))
    return paths
