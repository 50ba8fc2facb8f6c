"""Find the three inference stages of the DyVTE paper in per-layer attention curves.

The paper (method.md, section 1) describes three stages of a multimodal LLM's decoder:

1. ``early_fusion``: text tokens attend strongly to the image in the first layers;
2. ``intra_modality``: tokens then attend mostly within their own modality; text->image
   attention is near its minimum;
3. ``multimodal_reasoning``: text->image attention rises again in the deep layers.

The stages are an OUTPUT of this module: nothing here knows a layer number or a model, and the
paper's shape is a template that a curve may or may not follow.

Algorithm for one sample (``detect_stages``), on its *boundary curve* (``text->image`` mass by
layer unless ``StageSettings.boundary_curve`` says otherwise):

1. Refuse to guess: a curve with fewer than 3 layers (``too_short``), with a NaN (``nan``), or
   whose smoothed range is below ``min_contrast`` (``flat``) yields three absent stages, each
   with that reason.
2. Smooth with a centred running median of ``smoothing`` layers (truncated at both ends): it
   removes one-layer spikes and, unlike a moving average, leaves a step exactly where it is.
3. Search every pair of boundaries ``0 <= b1 < b2 <= L``: layers ``[0, b1)`` are early fusion,
   ``[b1, b2)`` intra-modality modelling, ``[b2, L)`` multimodal reasoning; ``b1 = 0`` or
   ``b2 = L`` leaves that outer stage empty. A pair is admissible when the intra-modality stage
   is the low one: each non-empty outer stage's mean (smoothed) level is at least
   ``min_contrast`` above the intra-modality stage's, and every non-empty stage has at least
   ``min_stage_layers`` layers. Among admissible pairs the one with the smallest squared error
   of the piecewise-constant fit (one level per stage) wins; when no pair is admissible, all
   three stages are absent (``no_low_stage``).
4. Quality score in [0, 1]: ``1 - SSE(stages) / SSE(straight line)`` on the raw (unsmoothed)
   curve, i.e. the share of what a straight-line fit leaves unexplained that the stages explain.
   A sharp drop gives close to 1; a ramp, where any boundary would be arbitrary, gives close to
   0; pure noise scores below about 0.25. Below ``min_quality`` all three stages are reported
   absent (``no_stages``).
5. An outer stage that the best fit leaves empty is absent with a reason: ``no_drop`` (the first
   layers do not attend to the image more than the intra-modality stage) or ``no_rise`` (the
   curve does not rise again after it). A curve that falls and stays low (as the demo model's)
   thus gets early fusion and intra-modality modelling, and no reasoning stage.

Every stage also carries a profile: the mean of each curve (text->image, last->image,
text->text, image->image, the entropies, ...) over its layers, so a table shows whether, for
example, text attends mostly to text in the intra-modality stage.

Data set (``detect_dataset_stages``): the algorithm runs on every sample; the per-sample
boundaries (first layer of intra-modality, first layer of reasoning) form the boundary
distribution. A stage is present in the consensus when it is present in at least
``min_present_fraction`` of the samples (else absent, with the samples' most common reason); a
consensus boundary is the median (rounded to a layer) over the samples that have it. Per-sample
and consensus stages are written to one parquet table by ``write_stages`` (``scope`` =
``sample`` or ``dataset``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.errors import DyVTEError
from analysis.vocabulary import GENERATED, HEAD_MAX, HEAD_MEAN, PROMPT_STEP

STAGES: tuple[str, ...] = ("early_fusion", "intra_modality", "multimodal_reasoning")
STAGE_LABELS: dict[str, str] = {
    "early_fusion": "early fusion",
    "intra_modality": "intra-modality modelling",
    "multimodal_reasoning": "multimodal reasoning",
}
BOUNDARIES: tuple[str, ...] = ("intra_modality", "multimodal_reasoning")
"""A boundary is named after the stage it opens: its layer is that stage's first layer."""

PROFILE_CURVES: tuple[str, ...] = (
    "text->image",
    "last->image",
    "text->text",
    "text->system",
    "image->image",
    "entropy:text",
    "entropy:last",
)
"""Curves whose per-stage means go into the stage tables (those a dump does not have are skipped)."""

DATASET = "*"
"""``sample_id`` of the consensus rows of a stage table."""
STAGES_METADATA_KEY = b"dyvte.stages"


class StageError(DyVTEError, ValueError):
    """Input that stage detection cannot work on (wrong settings, missing curves or columns)."""


@dataclass(frozen=True)
class StageSettings:
    """Settings of stage detection; the defaults suit head-mean attention mass curves.

    Attributes:
        boundary_curve: the curve whose levels define the stages: ``"query->key"`` (a mass,
            default ``text->image``, the paper's) or ``"entropy:query"``.
        smoothing: width in layers of the centred running median applied before the boundary
            search (odd; 1 = none). 3 removes one-layer spikes without moving a step.
        min_contrast: how much higher (in the boundary curve's unit; mass for the default) an
            outer stage's mean level must be than the intra-modality stage's for the outer stage
            to exist; also the smallest smoothed range a curve needs to have any stage. 0.05 is
            well above the sample-to-sample noise of head-mean masses and below the drops the
            literature reports (0.68 -> 0.07 in LLaVA-1.5).
        min_quality: below this quality score (see the module docstring) the curve is treated
            as having no distinct stages. At 0.3 the stages must explain 30% of what a straight
            line leaves unexplained: above what noise alone reaches (< 0.25 on 32 layers of pure
            noise), below a sharp drop with noise (> 0.8).
        min_stage_layers: the fewest layers a present stage may have.
        min_present_fraction: (data sets) the share of samples in which a stage must be present
            to be present in the consensus.
    """

    boundary_curve: str = "text->image"
    smoothing: int = 3
    min_contrast: float = 0.05
    min_quality: float = 0.3
    min_stage_layers: int = 1
    min_present_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not _is_curve_name(self.boundary_curve):
            raise StageError(
                f"expected boundary_curve like 'text->image' or 'entropy:text', found {self.boundary_curve!r}"
            )
        if self.smoothing < 1 or self.smoothing % 2 == 0:
            raise StageError(f"expected smoothing to be an odd number of layers >= 1, found {self.smoothing}")
        if not self.min_contrast > 0:
            raise StageError(f"expected min_contrast > 0, found {self.min_contrast}")
        if not 0 <= self.min_quality <= 1:
            raise StageError(f"expected min_quality in [0, 1], found {self.min_quality}")
        if self.min_stage_layers < 1:
            raise StageError(f"expected min_stage_layers >= 1, found {self.min_stage_layers}")
        if not 0 < self.min_present_fraction <= 1:
            raise StageError(f"expected min_present_fraction in (0, 1], found {self.min_present_fraction}")


def _is_curve_name(name: str) -> bool:
    if name.startswith("entropy:"):
        return len(name) > len("entropy:")
    parts = name.split("->")
    return len(parts) == 2 and all(parts)


@dataclass(frozen=True)
class Stage:
    """One stage of one curve: its layers when present, else the reason why it is absent.

    ``level`` is the stage's mean smoothed boundary-curve value (NaN when absent); ``profile``
    the mean of every curve over the stage's layers.
    """

    name: str
    present: bool
    first_layer: int | None = None
    last_layer: int | None = None
    reason: str = ""
    level: float = float("nan")
    profile: Mapping[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        if not self.present or self.first_layer is None or self.last_layer is None:
            return 0
        return self.last_layer - self.first_layer + 1

    @property
    def reason_code(self) -> str:
        """The reason's keyword (``flat``, ``no_rise``, ...); empty for a present stage."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class StageResult:
    """The three stages of one curve, the quality score of the fit and the curves it used."""

    stages: tuple[Stage, ...]
    quality: float
    layers: tuple[int, ...]
    smoothed: np.ndarray

    def stage(self, name: str) -> Stage:
        if name not in STAGES:
            raise StageError(f"expected a stage name in {list(STAGES)}, found {name!r}")
        return self.stages[STAGES.index(name)]

    @property
    def boundaries(self) -> dict[str, int | None]:
        """First layer of intra-modality (after early fusion) and of reasoning; None when absent."""
        early, intra, reasoning = self.stages
        return {
            "intra_modality": intra.first_layer if early.present and intra.present else None,
            "multimodal_reasoning": reasoning.first_layer if reasoning.present and intra.present else None,
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per stage (see ``STAGE_COLUMNS``)."""
        return _stage_rows(self.stages, quality=self.quality, present_fraction=None)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred running median over ``window`` layers, truncated at both ends (window 1: a copy).

    A median removes a spike narrower than half the window and leaves a step exactly where it
    is (a moving average would smear the step into its neighbours).
    """
    values = np.asarray(values, dtype=np.float64)
    half = min(window, len(values)) // 2
    if half == 0:
        return values.copy()
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def _segment_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([[0.0], np.cumsum(values)]), np.concatenate([[0.0], np.cumsum(values**2)])


def _segments(
    values: np.ndarray, b1: np.ndarray, b2: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Sizes, means (NaN if empty) and total squared error of the three segments for each (b1, b2)."""
    sums, squares = _segment_sums(values)
    edges = [(np.zeros_like(b1), b1), (b1, b2), (b2, np.full_like(b2, len(values)))]
    sizes, means, sse = [], [], np.zeros(np.broadcast(b1, b2).shape)
    for start, stop in edges:
        size = stop - start
        total = sums[stop] - sums[start]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(size > 0, total / np.maximum(size, 1), np.nan)
        sse = sse + np.where(size > 0, squares[stop] - squares[start] - total * np.nan_to_num(mean), 0.0)
        sizes.append(size)
        means.append(mean)
    return sizes, means, np.maximum(sse, 0.0)


def _best_boundaries(smoothed: np.ndarray, settings: StageSettings) -> tuple[int, int] | None:
    """The admissible (b1, b2) with the smallest piecewise-constant squared error, or None."""
    n = len(smoothed)
    b1, b2 = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    (n_early, n_intra, n_late), (early, intra, late), sse = _segments(smoothed, b1, b2)
    tolerance = 1e-9
    long_enough = [(size == 0) | (size >= settings.min_stage_layers) for size in (n_early, n_late)]
    admissible = (
        (b2 > b1)
        & (n_intra >= settings.min_stage_layers)
        & long_enough[0]
        & long_enough[1]
        & ((n_early > 0) | (n_late > 0))
        & ((n_early == 0) | (early - intra >= settings.min_contrast - tolerance))
        & ((n_late == 0) | (late - intra >= settings.min_contrast - tolerance))
    )
    if not admissible.any():
        return None
    best = np.argmin(np.where(admissible, sse, np.inf))
    return int(b1.flat[best]), int(b2.flat[best])


def fit_quality(values: np.ndarray, b1: int, b2: int) -> float:
    """``1 - SSE(three-level fit with boundaries b1, b2) / SSE(straight line)``, clipped to [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    x = np.arange(len(values), dtype=np.float64)
    slope, intercept = np.polyfit(x, values, 1)
    sse_line = float(np.sum((values - (slope * x + intercept)) ** 2))
    sse_total = float(np.sum((values - values.mean()) ** 2))
    if sse_line <= 1e-12 * max(sse_total, 1e-300):
        return 0.0
    _, _, sse_stages = _segments(values, np.array(b1), np.array(b2))
    return float(np.clip(1.0 - float(sse_stages) / sse_line, 0.0, 1.0))


def _absent_all(reason: str) -> tuple[Stage, ...]:
    return tuple(Stage(name, False, reason=reason) for name in STAGES)


Curves = pd.DataFrame | Mapping[str, Sequence[float]] | Sequence[float] | np.ndarray
"""What ``detect_stages`` takes: curves by layer, or just the boundary curve's values."""


def _as_curves(curves: Curves, settings: StageSettings) -> pd.DataFrame:
    if isinstance(curves, pd.DataFrame):
        frame = curves
    elif isinstance(curves, Mapping):
        frame = pd.DataFrame({name: np.asarray(values, dtype=np.float64) for name, values in curves.items()})
    else:
        values = np.asarray(curves, dtype=np.float64)
        if values.ndim != 1:
            raise StageError(f"expected a 1-D curve (one value per layer), found an array of shape {values.shape}")
        frame = pd.DataFrame({settings.boundary_curve: values})
    if settings.boundary_curve not in frame.columns:
        raise StageError(
            f"expected a {settings.boundary_curve!r} curve (the boundary curve), found curves {list(frame.columns)}"
        )
    return frame.sort_index()


def detect_stages(curves: Curves, settings: StageSettings = StageSettings()) -> StageResult:
    """Find the three stages of one sample (algorithm: module docstring).

    Args:
        curves: per-layer curves of one sample: a DataFrame indexed by layer with one column per
            curve (as ``sample_curves`` makes), a mapping curve name -> values (layers 0, 1, ...),
            or just the boundary curve's values.
        settings: smoothing, thresholds and the boundary curve.

    Returns:
        Three contiguous stages in order; an absent stage has no layers and a reason. Never
        raises for the values themselves (flat, monotone, short, NaN): those give absent stages.

    Raises:
        StageError: the boundary curve is missing, or the input is not one curve per layer.
    """
    frame = _as_curves(curves, settings)
    layers = tuple(int(layer) for layer in frame.index)
    raw = frame[settings.boundary_curve].to_numpy(dtype=np.float64)
    name = settings.boundary_curve
    empty = np.full(len(raw), np.nan)
    if len(raw) < 3:
        reason = f"too_short: {len(raw)} layer(s); at least 3 are needed to place three stages"
        return StageResult(_absent_all(reason), 0.0, layers, empty)
    if np.isnan(raw).any():
        missing = [layers[i] for i in np.flatnonzero(np.isnan(raw))]
        return StageResult(_absent_all(f"nan: {name} is NaN at layer(s) {missing}"), 0.0, layers, empty)
    smoothed = smooth(raw, settings.smoothing)
    spread = float(smoothed.max() - smoothed.min())
    if spread < settings.min_contrast:
        reason = f"flat: smoothed {name} varies by {spread:.3f} < min_contrast {settings.min_contrast}"
        return StageResult(_absent_all(reason), 0.0, layers, smoothed)
    found = _best_boundaries(smoothed, settings)
    if found is None:
        reason = f"no_low_stage: no run of layers is at least min_contrast {settings.min_contrast} below its neighbours"
        return StageResult(_absent_all(reason), 0.0, layers, smoothed)
    b1, b2 = found
    quality = fit_quality(raw, b1, b2)
    if quality < settings.min_quality:
        reason = (
            f"no_stages: stage levels explain {quality:.0%} of what a straight line leaves unexplained "
            f"(< min_quality {settings.min_quality:.0%}); the curve is closer to a ramp than to steps"
        )
        return StageResult(_absent_all(reason), quality, layers, smoothed)
    spans = {"early_fusion": (0, b1), "intra_modality": (b1, b2), "multimodal_reasoning": (b2, len(raw))}
    intra_level = float(smoothed[b1:b2].mean())
    reasons = {
        "early_fusion": f"no_drop: the first layers do not attend to the image more than the intra-modality stage "
        f"(layers {layers[b1]}-{layers[b2 - 1]}, level {intra_level:.3f}) by min_contrast {settings.min_contrast}",
        "multimodal_reasoning": f"no_rise: {name} does not rise again after the intra-modality stage "
        f"(layers {layers[b1]}-{layers[b2 - 1]}, level {intra_level:.3f}) by min_contrast {settings.min_contrast}",
    }
    stages = []
    for stage_name, (start, stop) in spans.items():
        if stop <= start:
            stages.append(Stage(stage_name, False, reason=reasons[stage_name]))
            continue
        profile = {c: float(frame[c].iloc[start:stop].mean()) for c in frame.columns if _is_curve_name(str(c))}
        level = float(smoothed[start:stop].mean())
        stages.append(Stage(stage_name, True, layers[start], layers[stop - 1], level=level, profile=profile))
    return StageResult(tuple(stages), quality, layers, smoothed)


def prompt_rows(statistics: pd.DataFrame) -> pd.DataFrame:
    """The prompt's (prefill) rows of a statistics table: the stages are the prompt's; a dump with
    ``--generate`` also holds the generated tokens' rows (``step`` >= 0), which these leave out."""
    return statistics[statistics["step"] == PROMPT_STEP] if "step" in statistics.columns else statistics


def generated_rows(statistics: pd.DataFrame) -> pd.DataFrame:
    """The generated answer tokens' rows of a statistics table (``dump --generate``); none otherwise."""
    if "step" not in statistics.columns:
        return statistics.iloc[:0]
    return statistics[(statistics["step"] != PROMPT_STEP) & (statistics["query_group"] == GENERATED)]


def select_head_rows(statistics: pd.DataFrame, rows: str = "prompt") -> tuple[pd.DataFrame, str]:
    """The rows that stand for "all heads" and how: head-mean rows, else the per-head rows
    (averaged later), else the max-over-heads rows; of the prompt (``rows="prompt"``) or of the
    generated tokens (``rows="generated"``)."""
    needed = ("sample_id", "layer", "head", "query_group", "key_group", "mass", "entropy")
    missing = [c for c in needed if c not in statistics.columns]
    if missing:
        raise StageError(f"expected a statistics table (analysis.io.read_statistics), found no columns {missing}")
    statistics = ROW_KINDS[rows](statistics)
    if statistics.empty:
        raise StageError(f"expected statistics rows{' of generated tokens (dump --generate N)' if rows == 'generated' else ''}, "
                         "found an empty table")
    head = statistics["head"]
    preference = ((head == HEAD_MEAN, "mean over heads"), (head >= 0, "mean of the per-head rows"),
                  (head == HEAD_MAX, "max over heads"))
    for mask, how in preference:
        if mask.any():
            return statistics[mask], how
    raise StageError(f"expected head values -1, -2 or >= 0, found {sorted(set(head))}")


def sample_curves(statistics: pd.DataFrame) -> pd.DataFrame:
    """Per-sample curves: index (sample_id, layer); columns ``query->key`` (mass) and ``entropy:query``.

    Heads are reduced as ``select_head_rows`` says.
    """
    rows, _ = select_head_rows(statistics)
    keys = ["sample_id", "layer"]
    pairs = ["query_group", "key_group"]
    mass = rows.groupby([*keys, *pairs], observed=True)["mass"].mean().unstack(pairs)
    mass.columns = [f"{query}->{key}" for query, key in mass.columns]
    entropy = rows.groupby([*keys, "query_group"], observed=True)["entropy"].mean().unstack("query_group")
    entropy.columns = [f"entropy:{query}" for query in entropy.columns]
    curves = mass.join(entropy).sort_index()
    curves.index = curves.index.set_levels(curves.index.levels[1].astype(int), level="layer")
    return curves


ROW_KINDS: dict[str, Any] = {"prompt": prompt_rows, "generated": generated_rows}
"""Which rows of a statistics table a curve is made of: the prompt's or the generated tokens'."""


def answer_curves(statistics: pd.DataFrame) -> pd.DataFrame:
    """Where the generated answer tokens look: index (sample_id, step, layer); columns
    ``generated->KEY`` (mass over each key group of GENERATED_KEY_GROUPS) and ``entropy:generated``.

    Raises:
        StageError: the table holds no generated tokens' rows (dump without ``--generate``).
    """
    rows, _ = select_head_rows(statistics, rows="generated")
    keys = ["sample_id", "step", "layer"]
    mass = rows.groupby([*keys, "key_group"], observed=True)["mass"].mean().unstack("key_group")
    mass.columns = [f"{GENERATED}->{key}" for key in mass.columns]
    entropy = rows.groupby(keys, observed=True)["entropy"].mean().rename(f"entropy:{GENERATED}")
    return mass.join(entropy).sort_index()


def long_curves(curves: pd.DataFrame, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-sample curves in long form: columns sample_id, layer, curve, value (for seaborn)."""
    names = [c for c in (names or curves.columns) if c in curves.columns]
    frame = curves[names].rename_axis(columns="curve").stack(future_stack=True).rename("value").reset_index()
    return frame.dropna(subset=["value"])


STAGE_COLUMNS: tuple[str, ...] = (
    "scope",
    "sample_id",
    "stage",
    "present",
    "first_layer",
    "last_layer",
    "n_layers",
    "reason",
    "quality",
    "present_fraction",
)
"""Leading columns of a stage table; the profile curves (``PROFILE_CURVES``) follow as ``mean <curve>``."""


def _stage_rows(stages: Sequence[Stage], quality: float, present_fraction: Sequence[float] | None) -> pd.DataFrame:
    rows = []
    for index, stage in enumerate(stages):
        row: dict[str, Any] = {
            "stage": stage.name,
            "present": stage.present,
            "first_layer": stage.first_layer,
            "last_layer": stage.last_layer,
            "n_layers": stage.n_layers,
            "reason": stage.reason,
            "quality": quality,
            "present_fraction": float(stage.present) if present_fraction is None else present_fraction[index],
        }
        row.update({f"mean {c}": stage.profile.get(c, np.nan) for c in PROFILE_CURVES})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("first_layer", "last_layer"):
        frame[column] = frame[column].astype("Int32")
    return frame


@dataclass(frozen=True)
class DatasetStages:
    """Stages of every sample of a data set and their consensus.

    Attributes:
        per_sample: one row per (sample, stage), columns ``STAGE_COLUMNS`` + profile means.
        consensus: one row per stage (``sample_id`` = ``DATASET``), same columns.
        boundaries: the boundary distribution: sample_id, boundary (the stage it opens), layer;
            one row per sample that has that boundary.
        n_layers: decoder layers the curves span, 0 .. the last recorded layer (the layers of the
            curves, unless the table has no rows for some: a hybrid decoder's recurrent layers).
        settings: the settings used.
    """

    per_sample: pd.DataFrame
    consensus: pd.DataFrame
    boundaries: pd.DataFrame
    n_layers: int
    settings: StageSettings

    def table(self) -> pd.DataFrame:
        """Per-sample rows followed by the consensus rows (what ``write_stages`` stores)."""
        return pd.concat([self.per_sample, self.consensus], ignore_index=True)

    def sample_table(self) -> pd.DataFrame:
        """One row per sample: each stage's layers ``first-last`` or ``absent (reason code)``, and the quality."""
        cells = self.per_sample.assign(
            layers=[
                f"{row.first_layer}-{row.last_layer}" if row.present else f"absent ({row.reason.split(':', 1)[0]})"
                for row in self.per_sample.itertuples()
            ]
        )
        table = cells.pivot(index="sample_id", columns="stage", values="layers")[list(STAGES)]
        table["quality"] = cells.groupby("sample_id")["quality"].first()
        return table.rename(columns=STAGE_LABELS)

    def boundary_summary(self) -> pd.DataFrame:
        """Per boundary: samples that have it, median, quartiles, range (layers)."""
        rows = []
        n_samples = self.per_sample["sample_id"].nunique()
        for boundary in BOUNDARIES:
            layers = self.boundaries.loc[self.boundaries["boundary"] == boundary, "layer"].to_numpy(dtype=float)
            stats = np.percentile(layers, [0, 25, 50, 75, 100]) if len(layers) else np.full(5, np.nan)
            row = {"boundary": f"first layer of {STAGE_LABELS[boundary]}", "samples": f"{len(layers)}/{n_samples}"}
            rows.append(row | dict(zip(("min", "q25", "median", "q75", "max"), stats)))
        return pd.DataFrame(rows)

    def consensus_stages(self) -> tuple[Stage, ...]:
        """The consensus as ``Stage`` objects (for plots)."""
        return tuple(
            Stage(row.stage, bool(row.present),
                  None if pd.isna(row.first_layer) else int(row.first_layer),
                  None if pd.isna(row.last_layer) else int(row.last_layer), reason=row.reason)
            for row in self.consensus.itertuples()
        )


def _consensus(
    per_sample: pd.DataFrame, boundaries: pd.DataFrame, dataset_curves: pd.DataFrame, settings: StageSettings
) -> pd.DataFrame:
    n_samples = per_sample["sample_id"].nunique()
    layers = [int(layer) for layer in dataset_curves.index]
    fractions = per_sample.groupby("stage")["present"].mean().reindex(list(STAGES)).fillna(0.0)
    present = {stage: bool(fractions[stage] >= settings.min_present_fraction) for stage in STAGES}
    cut = {}
    for boundary in BOUNDARIES:
        values = boundaries.loc[boundaries["boundary"] == boundary, "layer"]
        cut[boundary] = int(np.floor(np.median(values) + 0.5)) if len(values) else None
    reasons = {stage: "" for stage in STAGES}
    for stage in STAGES:
        if not present[stage]:
            absent = per_sample.loc[(per_sample["stage"] == stage) & ~per_sample["present"], "reason"]
            codes = Counter(reason.split(":", 1)[0] for reason in absent)
            common = ", ".join(f"{code} in {count}" for code, count in codes.most_common())
            reasons[stage] = (
                f"{codes.most_common(1)[0][0]}: present in {n_samples - len(absent)} of {n_samples} samples "
                f"(< min_present_fraction {settings.min_present_fraction:.0%}); absent as {common}"
            )
    # Contiguous spans from the consensus boundaries; a crossing pair keeps the earlier stages.
    start = layers[0]
    spans: dict[str, tuple[int, int] | None] = {}
    intra_start = cut["intra_modality"] if present["early_fusion"] and cut["intra_modality"] is not None else start
    reasoning_start = cut["multimodal_reasoning"] if present["multimodal_reasoning"] else None
    if reasoning_start is not None and reasoning_start <= intra_start:
        reasoning_start = None
        present["multimodal_reasoning"] = False
        reasons["multimodal_reasoning"] = (
            "crossing: the median reasoning boundary lies before the median intra-modality boundary"
        )
    spans["early_fusion"] = (start, intra_start - 1) if present["early_fusion"] and intra_start > start else None
    intra_stop = reasoning_start if reasoning_start is not None else layers[-1] + 1
    spans["intra_modality"] = (intra_start, intra_stop - 1) if present["intra_modality"] else None
    spans["multimodal_reasoning"] = (reasoning_start, layers[-1]) if reasoning_start is not None else None
    stages = []
    for stage in STAGES:
        span = spans[stage]
        if span is None:
            reason = reasons[stage] or "empty: the consensus boundaries leave no layer"
            stages.append(Stage(stage, False, reason=reason))
            continue
        window = dataset_curves.loc[span[0] : span[1]]
        profile = {c: float(window[c].mean()) for c in window.columns}
        stages.append(Stage(stage, True, span[0], span[1], profile=profile))
    quality = float(per_sample.groupby("sample_id")["quality"].first().median())
    frame = _stage_rows(stages, quality=quality, present_fraction=[float(fractions[s]) for s in STAGES])
    frame.insert(0, "sample_id", DATASET)
    frame.insert(0, "scope", "dataset")
    return frame


def detect_dataset_stages(statistics: pd.DataFrame, settings: StageSettings = StageSettings()) -> DatasetStages:
    """Stages of every sample of a statistics table, the boundary distribution and the consensus.

    Raises:
        StageError: the table is not statistics, is empty, or lacks the boundary curve.
    """
    curves = sample_curves(statistics)
    frames, boundary_rows = [], []
    for sample_id, sample in curves.groupby(level="sample_id", sort=True):
        result = detect_stages(sample.droplevel("sample_id"), settings)
        frame = result.to_frame()
        frame.insert(0, "sample_id", str(sample_id))
        frame.insert(0, "scope", "sample")
        frames.append(frame)
        boundary_rows += [
            {"sample_id": str(sample_id), "boundary": boundary, "layer": layer}
            for boundary, layer in result.boundaries.items()
            if layer is not None
        ]
    per_sample = pd.concat(frames, ignore_index=True)
    boundaries = pd.DataFrame(boundary_rows, columns=["sample_id", "boundary", "layer"]).astype({"layer": "int64"})
    dataset_curves = curves.groupby(level="layer").mean()
    consensus = _consensus(per_sample, boundaries, dataset_curves, settings)
    # The layers span 0..the last recorded one: a hybrid decoder's table has no rows for its recurrent layers.
    return DatasetStages(per_sample, consensus, boundaries, int(dataset_curves.index.max()) + 1, settings)


def write_stages(result: DatasetStages, path: str | Path, source: str | Path | None = None) -> Path:
    """Write per-sample and consensus stages to one parquet file (settings in its metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(result.table(), preserve_index=False)
    metadata = json.dumps(
        {"settings": asdict(result.settings), "source": None if source is None else str(source), "n_layers": result.n_layers}
    )
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STAGES_METADATA_KEY: metadata.encode()})
    pq.write_table(table, path)
    return path


def read_stages(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A stage table written by ``write_stages`` and its metadata (settings, source, n_layers).

    Raises:
        StageError: the file is not a stage table.
    """
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise StageError(
            f"{path}: expected a readable stage table (parquet), found a corrupt or foreign file ({error})"
        ) from error
    raw = (table.schema.metadata or {}).get(STAGES_METADATA_KEY)
    if raw is None:
        key = STAGES_METADATA_KEY.decode()
        raise StageError(f"{path}: expected a stage table (metadata key {key}), found other parquet")
    return table.to_pandas(), json.loads(raw)


def format_stages(result: DatasetStages) -> str:
    """The consensus and the boundary distribution as plain text (what the CLI prints)."""
    n_samples = result.per_sample["sample_id"].nunique()
    curve = result.settings.boundary_curve
    lines = [f"stages of {n_samples} samples, {result.n_layers} layers (boundary curve {curve})"]
    for row in result.consensus.itertuples():
        label = f"{STAGE_LABELS[row.stage]:<25}"
        if row.present:
            share = f"present in {row.present_fraction:.0%} of samples"
            lines.append(f"  {label} layers {row.first_layer}-{row.last_layer}, {share}")
        else:
            lines.append(f"  {label} absent ({row.reason})")
    lines.append(f"median quality {result.consensus['quality'].iloc[0]:.2f}")
    lines.append("boundary distribution (layers):")
    lines.append(result.boundary_summary().to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return "\n".join(lines)
