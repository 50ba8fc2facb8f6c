"""Figures of an evaluation folder (``exit.evaluate.evaluate_methods``, ``dyvte-exit eval --out``).

An evaluation folder holds ``eval-<method>.parquet`` (one row per question and method) and
``summary.parquet`` (one row per method), the registered tables ``evaluation`` and
``evaluation_summary`` (``analysis.schema``); :func:`read_evaluation` reads and checks both. Every
``plot_*`` function draws a new figure from one of the two tables and returns it without showing it.

==============  ===================  ==============================================================
figure          function             what it shows
==============  ===================  ==============================================================
frontier        plot_frontier        overall accuracy against relative decoder prefill FLOPs, one
                                     colour, marker and line per method family (dyvte, vtw, static,
                                     fastv, dyvte+fastv; the stock model as a star), each point
                                     labelled by its settings (the kind's label in
                                     ``exit.methods.METHODS``); the non-dominated points (the
                                     accuracy-cost frontier over all methods) as a grey step line
exit_histogram  plot_exit_histogram  per method, the share of questions whose image tokens left
                                     after each decoder layer, with "never" as its own bar
==============  ===================  ==============================================================

Two more figures come from the exit table (``exit_answers`` of ``dyvte-exit sweep --answers``, one
row per question and exit layer) and from lookups in it (``exit.frontier``):

=======================  ============================  =============================================
figure                   function                      what it shows
=======================  ============================  =============================================
accuracy_by_exit_layer   plot_accuracy_by_exit_layer   accuracy of the static exit after each layer
                                                       (x), one line per category and one overall
oracle_exit_layers       plot_oracle_exit_layers       per category, the share of questions whose
                                                       oracle exit is after each layer ("never" its
                                                       own bar, the median dashed): exit layers
                                                       differ by task
=======================  ============================  =============================================

FLOPs are ``exit.flops``'s count of the decoder's matrix products in the prefill (``relative``:
under the method over the stock model's, mean over questions); the vision tower and the output
head are left out, since no method changes them.

``make_exit_figures(folder, out_dir)`` writes ``frontier.png`` and ``exit_histogram.png``.
``exit`` may import ``analysis`` (the error type is ``analysis.plots.PlotError``); never the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from analysis.errors import DyVTEError, UsageError
from analysis.plots import PlotError
from analysis.schema import SchemaError, validate_arrow_schema
from exit.methods import (
    METHODS,
    ROWS_PATTERN,
    ROWS_TABLE,
    STOCK_MODEL,
    SUMMARY_FILE,
    SUMMARY_TABLE,
    parse_method_spec,
)

__all__ = [
    "save_figure",
    "EvaluationFolderError",
    "FAMILY_STYLES",
    "MethodName",
    "NEVER",
    "ROW_COLUMNS",
    "SUMMARY_COLUMNS",
    "category_accuracy",
    "make_exit_figures",
    "method_name",
    "pareto_front",
    "plot_accuracy_by_exit_layer",
    "plot_exit_histogram",
    "plot_frontier",
    "plot_oracle_exit_layers",
    "read_evaluation",
    "results_markdown",
    "results_table",
]

NEVER = -1
"""``exit_layer`` of a row whose image tokens did not all leave (``exit.surgery.NO_EXIT``)."""
ROW_COLUMNS: tuple[str, ...] = ("method", "question_id", "category", "correct", "exit_layer", "relative_prefill_flops")
"""Columns of the per-question rows that the figures and the notebook need."""
SUMMARY_COLUMNS: tuple[str, ...] = ("method", "questions", "accuracy_overall", "relative_prefill_flops")
"""Columns of the summary that the figures and the notebook need."""


@dataclass(frozen=True)
class FamilyStyle:
    label: str
    colour: str
    marker: str
    offset: tuple[int, int] = (5, 5)
    """Where the settings labels go, in points from the marker (families differ, so labels of
    points at the same place do not overlap)."""


_LOOKS: dict[str, tuple[str, str, tuple[int, int]]] = {
    "none": ("black", "*", (-8, 8)),
    "dyvte": ("tab:red", "o", (5, 5)),
    "dyvte+fastv": ("tab:purple", "D", (5, 14)),
    "vtw": ("tab:green", "s", (5, -12)),
    "static": ("tab:blue", "v", (-5, -12)),
    "fastv": ("tab:orange", "^", (-5, 5)),
}
FAMILY_STYLES: dict[str, FamilyStyle] = {
    kind: FamilyStyle(METHODS[kind].title, *look) for kind, look in _LOOKS.items()
}
"""Legend label (the kind's title in ``exit.methods.METHODS``), colour and marker of each method
family, in legend order (a kind without a look gets the next colour of tab10)."""


class EvaluationFolderError(DyVTEError, ValueError):
    """An evaluation folder is incomplete, unreadable or inconsistent."""


@dataclass(frozen=True)
class MethodName:
    """A method as ``exit.evaluate`` names it, split into its family and a label of its settings."""

    method: str
    family: str
    settings: str

    @property
    def label(self) -> str:
        """The settings, or the family when it has none (``dyvte`` with the gates' own tau)."""
        return self.settings or self.family


def method_name(method: str) -> MethodName:
    """Family and settings of a method name: ``static:6`` -> (static, ``K=6``), ``fastv:2:0.5`` ->
    (fastv, ``K=2 R=0.5``), ``dyvte:0.3`` -> (dyvte, ``tau=0.3``), ``none`` -> (none, ``full model``).

    The family is the method's kind and the settings its label in ``exit.methods.METHODS``; a name
    that is no method of the table keeps the part before the first ``:`` as its family and the
    rest, as written, as its settings.
    """
    try:
        spec = parse_method_spec(method)
    except UsageError:
        family, _, argument = method.partition(":")
        return MethodName(method=method, family=family, settings=argument)
    return MethodName(method=method, family=spec.kind, settings=spec.label)


def _style(family: str, others: list[str]) -> FamilyStyle:
    if family in FAMILY_STYLES:
        return FAMILY_STYLES[family]
    colours = sns.color_palette("tab10").as_hex()
    label = METHODS[family].title if family in METHODS else family
    return FamilyStyle(label, colours[(len(FAMILY_STYLES) + others.index(family)) % len(colours)], "P")


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlotError(
            f"expected {what} with the columns {list(columns)}, found no {missing} in {list(frame.columns)}"
        )
    if frame.empty:
        raise PlotError(f"expected {what} with at least one row, found none")


def pareto_front(summary: pd.DataFrame) -> pd.DataFrame:
    """The methods no other method beats on both axes (at most the FLOPs and at least the accuracy,
    one of them strictly), sorted by relative prefill FLOPs."""
    _require(summary, ("method", "accuracy_overall", "relative_prefill_flops"), "a summary")
    points = summary.sort_values(["relative_prefill_flops", "accuracy_overall"], ascending=[True, False])
    keep, best = [], -math.inf
    for index, accuracy in zip(points.index, points["accuracy_overall"]):
        if accuracy > best:
            keep.append(index)
            best = accuracy
    return points.loc[keep]


def plot_frontier(summary: pd.DataFrame) -> Figure:
    """Overall accuracy against relative decoder prefill FLOPs, one line and marker per method family.

    Within a family the points are joined in order of FLOPs and labelled by their settings (``tau``
    for dyvte, ``K`` for static and vtw, ``K`` and ``R`` for fastv and dyvte+fastv); the stock model
    (``none``) is a star with its accuracy as a dotted line. The grey step line joins the
    non-dominated points of all methods (:func:`pareto_front`).
    """
    _require(summary, SUMMARY_COLUMNS, "a summary (summary.parquet)")
    data = summary.assign(**{"_family": [method_name(m).family for m in summary["method"]],
                             "_label": [method_name(m).label for m in summary["method"]]})
    families = list(dict.fromkeys(data["_family"]))
    unknown = [f for f in families if f not in FAMILY_STYLES]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    front = pareto_front(summary)
    ax.step(front["relative_prefill_flops"], front["accuracy_overall"], where="post", color="0.6", lw=1, ls="--",
            zorder=1, label="frontier (not dominated)")
    labels: list[tuple[float, float, str, FamilyStyle]] = []
    for family in [f for f in FAMILY_STYLES if f in families] + unknown:
        style = _style(family, unknown)
        points = data[data["_family"] == family].sort_values("relative_prefill_flops")
        stock = family == STOCK_MODEL
        line = "none" if stock or len(points) == 1 else "-"
        ax.plot(points["relative_prefill_flops"], points["accuracy_overall"], ls=line, marker=style.marker,
                color=style.colour, markersize=11 if stock else 7, lw=1.2, label=style.label, zorder=3)
        if stock:
            ax.axhline(points["accuracy_overall"].max(), color=style.colour, ls=":", lw=0.8, zorder=0)
        labels += [(x, y, text, style) for x, y, text in
                   zip(points["relative_prefill_flops"], points["accuracy_overall"], points["_label"])]
    ax.set_xlabel("relative decoder prefill FLOPs (exit.flops: matrix products; 1 = full model)")
    ax.set_ylabel("accuracy (exact match, all questions)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    low = min(0.0, float(summary["relative_prefill_flops"].min()))
    ax.set_xlim(low - 0.02, max(1.0, float(summary["relative_prefill_flops"].max())) + 0.08)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    questions = sorted({int(q) for q in summary["questions"]})
    counted = f"{questions[0]} questions" if len(questions) == 1 else f"{questions[0]}-{questions[-1]} questions"
    ax.set_title(f"Accuracy against prefill cost: {len(summary)} methods, {counted}", fontsize=10)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    return fig


LABEL_OFFSETS: tuple[tuple[int, int], ...] = ((6, 5), (6, -11), (-6, 5), (-6, -11), (9, -3), (-9, -3), (0, 10),
                                              (0, -16), (14, 12), (-14, 12), (14, -20), (-14, -20))
"""Where a point's label may go (points from the point), tried in order."""


def _place_labels(fig: Figure, ax: Any, labels: Sequence[tuple[float, float, str, FamilyStyle]]) -> None:
    """Label every point where its text overlaps no label placed before it and no marker (greedy over
    :data:`LABEL_OFFSETS`, the family's own offset first); with no free place, the least overlap."""
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for x, y, _, _ in labels]
    placed: list[Any] = []

    def overlap(box: Any) -> float:
        area = sum(max(0.0, min(box.x1, b.x1) - max(box.x0, b.x0)) * max(0.0, min(box.y1, b.y1) - max(box.y0, b.y0))
                   for b in placed)
        return area + sum(100.0 for mx, my in markers if box.x0 - 4 <= mx <= box.x1 + 4 and box.y0 - 4 <= my <= box.y1 + 4)

    for x, y, text, style in labels:
        best = None
        for offset in (style.offset, *LABEL_OFFSETS):
            note = ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=7, color=style.colour,
                               ha="left" if offset[0] > 0 else "right" if offset[0] < 0 else "center")
            box = note.get_window_extent(renderer).expanded(1.15, 1.3)  # a little air around each label
            cost = overlap(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box)
            else:
                note.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[2])


def plot_exit_histogram(rows: pd.DataFrame, num_layers: int | None = None,
                        methods: Sequence[str] | None = None) -> Figure:
    """Per method (one panel each, in order of appearance or ``methods``), the share of its questions
    whose image tokens left after each decoder layer; ``never`` (exit_layer -1) is its own bar.

    Args:
        num_layers: decoder layers shown (default: the highest exit layer in the rows + 1).
        methods: the methods to show (default: all).
    """
    _require(rows, ("method", "exit_layer"), "per-question rows (eval-*.parquet)")
    order = list(dict.fromkeys(rows["method"])) if methods is None else list(methods)
    absent = [m for m in order if m not in set(rows["method"])]
    if absent or not order:
        raise PlotError(f"expected methods among {sorted(set(rows['method']))}, found {absent or order}")
    layers = rows["exit_layer"].astype(int)
    if (layers < NEVER).any():
        raise PlotError(f"expected exit layers >= 0 or {NEVER} (never), found {sorted(set(layers[layers < NEVER]))}")
    highest = int(layers.max())
    if num_layers is None:
        num_layers = max(highest + 1, 1)
    elif highest >= num_layers:
        raise PlotError(f"expected exit layers below num_layers={num_layers}, found {highest}")
    positions = list(range(num_layers)) + [num_layers + 1]  # a gap before "never"
    columns = min(3, len(order))
    lines = math.ceil(len(order) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.6 * lines + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax, method in zip(axes.flat, order):
        exits = rows.loc[rows["method"] == method, "exit_layer"].astype(int)
        counts = exits.value_counts()
        heights = [counts.get(layer, 0) / len(exits) for layer in [*range(num_layers), NEVER]]
        colour = _style(method_name(method).family, [method_name(method).family]).colour
        colours = [colour] * num_layers + ["0.55"]
        ax.bar(positions, heights, width=0.8, color=colours)
        ax.set_title(f"{method}: {len(exits)} questions, {(exits != NEVER).mean():.0%} exited", fontsize=9)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    step = max(1, math.ceil(num_layers / 10))
    ticks = list(range(0, num_layers, step)) + [num_layers + 1]
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    for column in range(columns):
        lowest = axes[(len(order) - 1 - column) // columns, column]  # the last panel drawn in this column
        lowest.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["never"])
        lowest.tick_params(labelbottom=True)
        lowest.set_xlabel("exit after decoder layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("questions")
    fig.suptitle("Where the image tokens left, per method ('never': some stayed to the end)", fontsize=10)
    fig.tight_layout()
    return fig


def category_accuracy(summary: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per category (columns, ``overall`` last) and method (index) from a summary."""
    _require(summary, ("method", "accuracy_overall"), "a summary (summary.parquet)")
    columns = [c for c in summary.columns if c.startswith("accuracy_") and c != "accuracy_overall"]
    table = summary.set_index("method")[[*columns, "accuracy_overall"]]
    table.columns = [c.removeprefix("accuracy_") for c in table.columns]
    table.columns.name = "category"
    return table


def results_table(summary: pd.DataFrame, reference: str = STOCK_MODEL) -> pd.DataFrame:
    """The results table of an evaluation, one row per method in summary order.

    Columns: ``accuracy`` (%), ``vs <reference>`` (points; absent without that method),
    ``mean exit layer``, ``rows exited`` (%), ``prefill FLOPs`` (relative to the stock model's),
    and, where the summary has them (``exit.evaluate`` since the timing split), the wall time of
    the prefill per question (s) and decoding tokens per second.
    """
    _require(summary, ("method", "questions", "accuracy_overall", "mean_exit_layer", "exited_share",
                       "relative_prefill_flops"), "a summary (summary.parquet)")
    table = pd.DataFrame({"method": summary["method"], "questions": summary["questions"],
                          "accuracy": 100 * summary["accuracy_overall"]})
    base = summary.loc[summary["method"] == reference, "accuracy_overall"]
    if len(base):
        table[f"vs {reference}"] = 100 * (summary["accuracy_overall"] - float(base.iloc[0]))
    table["mean exit layer"] = summary["mean_exit_layer"]
    table["rows exited"] = 100 * summary["exited_share"]
    table["prefill FLOPs"] = summary["relative_prefill_flops"]
    if {"prefill_seconds", "decode_tokens_per_second"} <= set(summary.columns):
        table["prefill s/question"] = summary["prefill_seconds"] / summary["questions"]
        table["decode tokens/s"] = summary["decode_tokens_per_second"]
    return table.reset_index(drop=True)


def results_markdown(summary: pd.DataFrame, reference: str = STOCK_MODEL) -> str:
    """:func:`results_table` as a Markdown table (as in the README)."""
    table = results_table(summary, reference)
    formats = {"accuracy": "{:.1f} %", f"vs {reference}": "{:+.1f}", "mean exit layer": "{:.1f}",
               "rows exited": "{:.0f} %", "prefill FLOPs": "{:.2f}", "prefill s/question": "{:.2f}",
               "decode tokens/s": "{:.1f}"}
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = [formats[c].format(row[c]) if c in formats else str(row[c]) for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _read_parquet(path: Path, columns: Sequence[str], table: str) -> pd.DataFrame:
    """One file of an evaluation folder: readable, with the ``columns`` the figures need, and of the
    registered ``table`` (metadata, schema version, every column's type)."""
    try:
        data = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise EvaluationFolderError(
            f"{path}: expected a parquet file written by exit.evaluate, found unreadable data ({error})"
        ) from error
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise EvaluationFolderError(
            f"{path}: expected the columns {list(columns)} (written by exit.evaluate), found no {missing} "
            f"among {data.column_names}"
        )
    try:
        validate_arrow_schema(data.schema, str(path), expected=table)
    except SchemaError as error:
        raise EvaluationFolderError(f"{error} (write evaluation folders with exit.evaluate)") from error
    return data.to_pandas()


def read_evaluation(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-question rows (all methods, in the summary's order) and the summary of an evaluation folder.

    Raises:
        FileNotFoundError: no folder, or no ``summary.parquet`` or ``eval-*.parquet`` in it.
        EvaluationFolderError: an unreadable file, missing columns, a file that is not of its
            registered table (``evaluation``, ``evaluation_summary``) or schema version, or methods
            in the summary without rows (or rows without a summary line).
    """
    folder = Path(folder)
    hint = "write one with `dyvte-exit eval ... --out FOLDER` (exit.evaluate.evaluate_methods)"
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise FileNotFoundError(f"expected an evaluation folder at {folder}, found {found} there; {hint}")
    summary_path = folder / SUMMARY_FILE
    row_paths = sorted(folder.glob(ROWS_PATTERN))
    if not summary_path.is_file() or not row_paths:
        present = sorted(p.name for p in folder.iterdir())[:8]
        raise FileNotFoundError(
            f"expected {SUMMARY_FILE} and {ROWS_PATTERN} in {folder}, found {present or 'an empty folder'}; {hint}"
        )
    summary = _read_parquet(summary_path, SUMMARY_COLUMNS, SUMMARY_TABLE)
    if summary["method"].duplicated().any():
        raise EvaluationFolderError(f"{summary_path}: expected one line per method, found "
                                    f"{sorted(summary['method'][summary['method'].duplicated()])} twice")
    frames: dict[str, pd.DataFrame] = {}
    for path in row_paths:
        frame = _read_parquet(path, ROW_COLUMNS, ROWS_TABLE)
        methods = list(frame["method"].unique())
        if len(methods) != 1 or methods[0] in frames:
            raise EvaluationFolderError(f"{path}: expected the rows of one method not seen in another file, "
                                        f"found {methods}")
        frames[methods[0]] = frame
    without_rows = [m for m in summary["method"] if m not in frames]
    without_summary = [m for m in frames if m not in set(summary["method"])]
    if without_rows or without_summary:
        raise EvaluationFolderError(
            f"{folder}: expected rows and a summary line for every method, found methods in {SUMMARY_FILE} "
            f"without rows {without_rows} and rows without a summary line {without_summary} (an interrupted run?)"
        )
    rows = pd.concat([frames[m] for m in summary["method"]], ignore_index=True)
    return rows, summary.reset_index(drop=True)


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``figure`` to ``path`` (tight bounding box) and close it; returns the path."""
    return _save(figure, Path(path), dpi)


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    try:
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def make_exit_figures(folder: str | Path, out_dir: str | Path, num_layers: int | None = None,
                      dpi: int = 150) -> list[Path]:
    """``<out_dir>/frontier.png``, ``<out_dir>/exit_histogram.png`` and the results table
    ``<out_dir>/exit_results.md`` (:func:`results_markdown`) of one evaluation folder; returns the
    paths written.

    Raises:
        FileNotFoundError, EvaluationFolderError: as :func:`read_evaluation`.
        PlotError: tables a figure cannot be drawn from.
    """
    rows, summary = read_evaluation(folder)
    if num_layers is None and "num_layers" in summary.columns:  # written by exit.evaluate.evaluate_methods
        num_layers = int(summary["num_layers"].max())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _save(plot_frontier(summary), out_dir / "frontier.png", dpi),
        _save(plot_exit_histogram(rows, num_layers), out_dir / "exit_histogram.png", dpi),
        _write_text(results_markdown(summary), out_dir / "exit_results.md"),
    ]


def _write_text(text: str, path: Path) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def plot_accuracy_by_exit_layer(answers: pd.DataFrame) -> Figure:
    """Accuracy of the static exit after each decoder layer, one line per category and one (black,
    thicker) over all questions, from the exit table (``exit_answers``: one row per question and
    layer; the last layer is the full model)."""
    _require(answers, ("sample_id", "layer", "category", "correct"), "an exit table (exit_answers)")
    data = answers.assign(layer=answers["layer"].astype(int), correct=answers["correct"].astype(float))
    by_category = data.groupby(["layer", "category"])["correct"].mean().unstack("category").sort_index()
    overall = data.groupby("layer")["correct"].mean().sort_index()
    questions = data.groupby("category")["sample_id"].nunique()
    colours = sns.color_palette("tab10", max(1, len(by_category.columns))).as_hex()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for colour, category in zip(colours, by_category.columns):
        ax.plot(by_category.index, by_category[category], marker=".", lw=1.2, color=colour,
                label=f"{category} ({questions[category]})")
    ax.plot(overall.index, overall.to_numpy(), color="black", lw=2.4, label=f"all ({data['sample_id'].nunique()})")
    ax.set_xlabel("all image tokens leave after decoder layer (the last = the full model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (exact match)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="category (questions)", title_fontsize=8)
    ax.set_title("Accuracy of a static exit after each layer, per question type", fontsize=10)
    fig.tight_layout()
    return fig


def plot_oracle_exit_layers(exits: pd.DataFrame, num_layers: int | None = None) -> Figure:
    """The distribution of an oracle's exit layers per question type: one panel per category (in
    order of the median exit layer), the share of its questions exiting after each layer, "never"
    (exit_layer -1, kept the image to the end) as its own bar, the median as a dashed line.

    Args:
        exits: one row per question with ``category`` and ``exit_layer`` (the oracle's evaluation
            rows, e.g. ``exit.frontier.lookup_rows``).
        num_layers: decoder layers shown (default: the highest exit layer + 1).
    """
    _require(exits, ("category", "exit_layer"), "exit layers with categories")
    layers = exits["exit_layer"].astype(int)
    highest = int(layers.max())
    if (layers < NEVER).any() or (num_layers is not None and highest >= num_layers):
        raise PlotError(f"expected exit layers in 0..{'L-1' if num_layers is None else num_layers - 1} or {NEVER}, "
                        f"found {sorted({int(v) for v in layers})}")
    num_layers = max(highest + 1, 1) if num_layers is None else num_layers
    # "never" costs what an exit after the last layer costs, so it sorts and medians as L-1
    as_cost = layers.where(layers != NEVER, num_layers - 1)
    order = list(as_cost.groupby(exits["category"]).median().sort_values(kind="stable").index)
    columns = min(3, len(order))
    lines = math.ceil(len(order) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.4 * lines + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    positions = [*range(num_layers), num_layers + 1]  # a gap before "never"
    for ax, category in zip(axes.flat, order):
        chosen = layers[exits["category"] == category]
        counts = chosen.value_counts()
        ax.bar(positions, [counts.get(k, 0) / len(chosen) for k in [*range(num_layers), NEVER]], width=0.8,
               color=["tab:red"] * num_layers + ["0.55"])
        median = float(as_cost[exits["category"] == category].median())
        # a median of L-1 means "never": draw it on that bar
        ax.axvline(median if median < num_layers - 1 else num_layers + 1, color="black", ls="--", lw=0.9)
        ax.set_title(f"{category}: {len(chosen)} questions, median {median:g}", fontsize=9)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.tick_params(labelbottom=True)
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    step = max(1, math.ceil(num_layers / 10))
    ticks = [*range(0, num_layers, step), num_layers + 1]
    for ax in axes.flat[:len(order)]:
        ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["never"])
    fig.supxlabel("the oracle's exit layer (all image tokens leave after it)", fontsize=9)
    fig.suptitle("Where the oracle exits, per question type", fontsize=10)
    fig.tight_layout()
    return fig
