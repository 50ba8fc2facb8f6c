"""Figures of attention statistics and their stages: one function per figure (matplotlib, seaborn).

Every ``plot_*`` function takes a statistics table (``analysis.io.read_statistics``) and, where it
shows stages, the result of ``analysis.stages.detect_dataset_stages`` (computed with default
settings when not given); it draws a new figure and returns it without showing it.

=============  ================  ==================================================================
kind           function          what it shows
=============  ================  ==================================================================
stages         plot_stages       per-layer mass of each query->key pair, mean and 95% bootstrap
                                 confidence band over samples, consensus stages shaded and labelled
heads          plot_heads        layer x head heatmap of the text->image mass (mean over samples);
                                 needs per-head rows (a dump with ``--heads all``)
boundaries     plot_boundaries   distribution over samples of each stage boundary, consensus dashed
entropy        plot_entropy      mean entropy of the attention rows by layer and query group
=============  ================  ==================================================================

``save_plot`` writes one kind to a .png or .svg file (``dyvte-stats plot``); ``make_figures``
writes every figure of one dump into a folder (``dyvte-stats figures``, behind ``make figures``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.errors import DyVTEError
from analysis.stages import (
    STAGE_LABELS,
    DatasetStages,
    Stage,
    StageError,
    StageSettings,
    answer_curves,
    detect_dataset_stages,
    format_stages,
    long_curves,
    prompt_rows,
    sample_curves,
)
from analysis.vocabulary import GENERATED, GENERATED_KEY_GROUPS

STAGE_PAIRS: tuple[str, ...] = ("text->image", "text->text", "text->system", "last->image", "image->image")
"""The query->key pairs of the stage plot (the pairs a dump lacks are skipped)."""
STAGE_SHADES: dict[str, str] = {"early_fusion": "0.85", "intra_modality": "0.95", "multimodal_reasoning": "0.78"}
"""Grey backgrounds of the stages (greys, so that they never look like one of the curves)."""
BOUNDARY_COLOURS: dict[str, str] = {"intra_modality": "tab:blue", "multimodal_reasoning": "tab:green"}
"""Colour of each boundary (named after the stage it opens) in the boundary plot."""
CONFIDENCE = ("ci", 95)
BOOTSTRAP_SAMPLES = 500


class PlotError(DyVTEError, ValueError):
    """A figure cannot be drawn from the given statistics or written to the given file."""


def _stages_of(statistics: pd.DataFrame, stages: DatasetStages | None) -> DatasetStages:
    return stages if stages is not None else detect_dataset_stages(statistics, StageSettings())


def shade_stages(ax: Axes, stages: Sequence[Stage]) -> None:
    """Shade each present stage's layers on an axis whose x is the layer, with its name on top."""
    for stage in stages:
        if not stage.present or stage.first_layer is None or stage.last_layer is None:
            continue
        ax.axvspan(stage.first_layer - 0.5, stage.last_layer + 0.5, color=STAGE_SHADES[stage.name], lw=0, zorder=0)
        ax.text(
            (stage.first_layer + stage.last_layer) / 2, 0.99, STAGE_LABELS[stage.name].replace(" ", "\n", 1),
            transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8, color="0.2",
        )


def absent_note(stages: Sequence[Stage]) -> str:
    """One line naming the absent stages and why (empty when all are present)."""
    absent = [f"{STAGE_LABELS[s.name]} ({s.reason_code})" for s in stages if not s.present]
    return f"absent: {', '.join(absent)}" if absent else ""


def _curve_lines(ax: Axes, data: pd.DataFrame, hue_order: Sequence[str]) -> None:
    sns.lineplot(
        data=data, x="layer", y="value", hue="curve", hue_order=list(hue_order), errorbar=CONFIDENCE,
        n_boot=BOOTSTRAP_SAMPLES, seed=0, marker="o", markersize=3, ax=ax,
    )


def _layer_axis(ax: Axes, n_layers: int) -> None:
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole: no 0.5 ticks on a 4-layer model
    ax.set_xlabel("decoder layer")


def _title(ax: Axes, title: str, stages: Sequence[Stage]) -> None:
    note = absent_note(stages)
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=10)


def plot_stages(
    statistics: pd.DataFrame, stages: DatasetStages | None = None, pairs: Sequence[str] = STAGE_PAIRS
) -> Figure:
    """Per-layer mass of each query->key pair (mean, 95% CI over samples) with the stages shaded."""
    result = _stages_of(statistics, stages)
    curves = sample_curves(statistics)
    shown = [p for p in pairs if p in curves.columns]
    if not shown:
        raise PlotError(f"expected one of the pairs {list(pairs)} in the statistics, found {list(curves.columns)}")
    fig, ax = plt.subplots(figsize=(9, 4.8))
    consensus = result.consensus_stages()
    shade_stages(ax, consensus)
    _curve_lines(ax, long_curves(curves, shown), shown)
    _layer_axis(ax, result.n_layers)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("attention mass (mean over heads and queries)")
    ax.legend(title="query->key", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    n = curves.index.get_level_values("sample_id").nunique()
    _title(ax, f"Attention mass by layer: mean and 95% CI over {n} samples", consensus)
    fig.tight_layout()
    return fig


def plot_heads(statistics: pd.DataFrame, stages: DatasetStages | None = None, pair: str = "text->image") -> Figure:
    """Layer x head heatmap of one pair's mass (mean over samples); each present stage is named at
    its first layer, with a white line where a stage starts after the first."""
    query, _, key = pair.partition("->")
    statistics = prompt_rows(statistics)
    selected = (statistics["head"] >= 0) & (statistics["query_group"] == query) & (statistics["key_group"] == key)
    rows = statistics[selected]
    if rows.empty:
        raise PlotError(
            f"expected per-head rows (head >= 0) of {pair} for a layer x head heatmap (dump with --heads all), "
            f"found heads {sorted(int(h) for h in statistics['head'].unique())}"
        )
    table = rows.groupby(["layer", "head"])["mass"].mean().unstack("head").sort_index()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * table.shape[1] + 2.5), max(3.0, 0.28 * table.shape[0] + 1.5)))
    sns.heatmap(table, cmap="viridis", vmin=0, ax=ax, cbar_kws={"label": f"{pair} mass"})
    consensus = _stages_of(statistics, stages).consensus_stages()
    layers = list(table.index)
    for index, stage in enumerate(consensus):
        if stage.present and stage.first_layer in layers:
            row = layers.index(stage.first_layer)
            if index > 0:
                ax.axhline(row, color="white", lw=1.5, ls="--")
            ax.text(0.1, row + 0.1, STAGE_LABELS[stage.name], va="top", ha="left", fontsize=7, color="white")
    ax.set_xlabel("head")
    ax.set_ylabel("decoder layer")
    n = rows["sample_id"].nunique()
    _title(ax, f"{pair} mass by layer and head (mean over {n} samples)", consensus)
    fig.tight_layout()
    return fig


def plot_boundaries(statistics: pd.DataFrame, stages: DatasetStages | None = None) -> Figure:
    """Distribution over samples of the first layer of intra-modality modelling and of reasoning."""
    result = _stages_of(statistics, stages)
    consensus = result.consensus_stages()
    n_samples = result.per_sample["sample_id"].nunique()
    fig, ax = plt.subplots(figsize=(8, 4))
    data = result.boundaries.copy()
    labels = {b: f"first layer of {STAGE_LABELS[b]}" for b in ("intra_modality", "multimodal_reasoning")}
    counts = data["boundary"].value_counts()
    labels = {b: f"{label} ({counts[b]} of {n_samples} samples)" for b, label in labels.items() if b in counts}
    data["boundary"] = data["boundary"].map(labels)
    if data.empty:
        message = f"no stage boundary in any of the {n_samples} samples"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center")
    else:
        palette = {label: BOUNDARY_COLOURS[b] for b, label in labels.items()}
        sns.histplot(data=data, x="layer", hue="boundary", palette=palette, discrete=True, shrink=0.8, ax=ax)
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.18), title=None, frameon=False)
    for stage in consensus[1:]:
        if stage.present and stage.first_layer is not None and (stage.name != "intra_modality" or consensus[0].present):
            ax.axvline(stage.first_layer, color=BOUNDARY_COLOURS[stage.name], ls="--", lw=1.2)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _layer_axis(ax, result.n_layers)
    ax.set_ylabel("samples")
    _title(ax, f"Stage boundaries over {n_samples} samples (dashed: consensus, the median)", consensus)
    fig.tight_layout()
    return fig


def plot_entropy(statistics: pd.DataFrame, stages: DatasetStages | None = None) -> Figure:
    """Mean entropy (nats) of the attention rows by layer and query group, stages shaded."""
    result = _stages_of(statistics, stages)
    curves = sample_curves(statistics)
    groups = [c for c in curves.columns if c.startswith("entropy:")]
    data = long_curves(curves, groups)
    data["curve"] = data["curve"].str.removeprefix("entropy:")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    consensus = result.consensus_stages()
    shade_stages(ax, consensus)
    _curve_lines(ax, data, [g.removeprefix("entropy:") for g in groups])
    _layer_axis(ax, result.n_layers)
    ax.set_ylim(0, data["value"].max() * 1.2 if not data.empty else 1)
    ax.set_ylabel("entropy of attention rows (nats)")
    ax.legend(title="query group", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _title(ax, "Attention entropy by layer and query group: mean and 95% CI over samples", consensus)
    fig.tight_layout()
    return fig


def plot_answer_attention(statistics: pd.DataFrame, stages: DatasetStages | None = None) -> Figure:
    """Where the generated answer tokens look (``dyvte-stats dump --generate N``): per layer, the
    mass of a generated token's attention over the system, image and text tokens of the prompt
    and over the answer so far (mean and 95% CI over samples and answer tokens), with the prompt's
    stages shaded.

    Raises:
        PlotError: the statistics hold no generated tokens' rows.
    """
    try:
        curves = answer_curves(statistics)
    except StageError as error:
        raise PlotError(str(error)) from error
    result = _stages_of(statistics, stages)
    shown = [f"{GENERATED}->{key}" for key in GENERATED_KEY_GROUPS if f"{GENERATED}->{key}" in curves.columns]
    data = long_curves(curves, shown)
    data["curve"] = data["curve"].str.removeprefix(f"{GENERATED}->")
    fig, ax = plt.subplots(figsize=(9, 4.8))
    consensus = result.consensus_stages()
    shade_stages(ax, consensus)
    _curve_lines(ax, data, [name.removeprefix(f"{GENERATED}->") for name in shown])
    _layer_axis(ax, result.n_layers)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("attention mass of a generated token (mean over heads)")
    ax.legend(title="key group", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    samples = curves.index.get_level_values("sample_id").nunique()
    tokens = len(curves) // max(1, result.n_layers)
    _title(ax, f"Where the answer tokens look: mean and 95% CI over {samples} samples and {tokens} answer tokens", consensus)
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[..., Figure]] = {
    "stages": plot_stages,
    "heads": plot_heads,
    "boundaries": plot_boundaries,
    "entropy": plot_entropy,
    "answer": plot_answer_attention,
}
FORMATS = (".png", ".svg")


def save_plot(
    statistics: pd.DataFrame, kind: str, out: str | Path, stages: DatasetStages | None = None, dpi: int = 150
) -> Path:
    """Draw one kind of figure and write it to ``out`` (.png or .svg); returns the path.

    Raises:
        PlotError: unknown kind or file type, or statistics that cannot give this figure.
    """
    out = Path(out)
    if kind not in PLOTS:
        raise PlotError(f"expected a plot kind in {list(PLOTS)}, found {kind!r}")
    if out.suffix.lower() not in FORMATS:
        raise PlotError(f"expected an output file ending in {' or '.join(FORMATS)}, found {out.name!r}")
    figure = PLOTS[kind](statistics, stages)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return out


@dataclass
class Figures:
    """What ``make_figures`` wrote, and the kinds it skipped with the reason."""

    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    stages: DatasetStages | None = None


def make_figures(stats: str | Path, out_dir: str | Path, settings: StageSettings = StageSettings()) -> Figures:
    """Every figure of one dump as ``<out_dir>/<kind>.png``, and the stage table as ``stages.txt``.

    A kind the dump cannot give (``heads`` without per-head rows, ``answer`` without
    ``--generate``) is skipped with its reason.

    Raises:
        FileNotFoundError: no statistics at ``stats`` (run `make demo` first for the demo's).
    """
    from analysis.io import read_statistics

    stats, out_dir = Path(stats), Path(out_dir)
    if not stats.exists():
        raise FileNotFoundError(
            f"expected attention statistics (a dump folder) at {stats}, found nothing there; "
            "run `make demo` first, or pass the folder of another dump"
        )
    statistics = read_statistics(stats)
    result = Figures(stages=detect_dataset_stages(statistics, settings))
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in PLOTS:
        try:
            result.files.append(save_plot(statistics, kind, out_dir / f"{kind}.png", result.stages))
        except PlotError as error:
            result.skipped[kind] = str(error)
    table = out_dir / "stages.txt"
    table.write_text(f"statistics: {stats}\n{format_stages(result.stages)}\n")
    result.files.append(table)
    return result
