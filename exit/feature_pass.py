"""Gate features for an exit table whose labels were computed (and committed) without them.

An exit table's labels cost the full forward plus every exit branch (and its answers the decoding
of every branch); its gate features cost the full forward alone, but at 4-byte floats per layer
and feature they are far bigger than the labels (on the demo model about 150 KB per question
against about 2 KB). So the labels of a long sweep can be committed and the features recomputed
where the gates are trained: :func:`run_feature_pass` runs the sweep's own teacher-forced forward
(prompt + reference answer, the features over the prompt only) for every question of the table
and writes ``features-pass-NNNNN.safetensors`` shards into the table's folder, each holding the
table's own labels, which every reader of a sweep's feature shards (``exit.train``,
``exit.frontier.gate_probabilities``) takes as it takes the sweep's.

The forward is the one ``exit.sweep.exit_sweep`` runs with ``answers``: the position ids that
generate() gives the left-padded prompts (families with 1-D positions), so the features equal
that sweep's exactly; a labels-only sweep's default positions differ only in padded rows, by a
constant RoPE phase (the same scores up to rounding).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.layout import PADDING, token_layout
from exit.answers import generation_position_ids
from exit.gates import GATE_INPUTS, GateFeatureBuilder, ModelSignature, gate_recording
from exit.sweep import (
    FEATURES_PREFIX,
    SweepError,
    _checked_answer_mask,
    _SweepErrors,
    prompt_layout,
    read_sweep,
    teacher_forced_inputs,
    write_feature_file,
)

FEATURE_PASS_PREFIX = f"{FEATURES_PREFIX}-pass"


def sweep_features(model: nn.Module, inputs: dict[str, torch.Tensor], answer_mask: torch.Tensor, features: str,
                   adapter: ModelAdapter | None = None) -> torch.Tensor:
    """(batch, layers, F) float32 gate features of ``features`` kind for every row of ``inputs``
    (prompt + teacher-forced answer, ``answer_mask`` marking the answer), over the prompt only:
    what ``exit.sweep.exit_sweep(..., features=features, answers=N)`` returns, from one forward.

    Raises:
        SweepError: an unknown feature kind, or an answer mask that does not mark each row's tail.
    """
    if features not in GATE_INPUTS:
        raise SweepError(f"expected features to be one of {list(GATE_INPUTS)}, found {features!r}")
    adapter = adapter or resolve_adapter(model)
    device = next(model.parameters()).device
    layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    answer_mask = _checked_answer_mask(layout, answer_mask)
    extra: dict[str, Any] = {"use_cache": True}
    if adapter.positions == "1d":
        extra["position_ids"] = generation_position_ids(layout.group != PADDING).to(device)
    with torch.no_grad(), gate_recording(model, prompt_layout(layout, answer_mask), features, adapter=adapter) as recording:
        model(**inputs, **extra, logits_to_keep=1)
    builder = GateFeatureBuilder(features, ModelSignature.of(model))
    return torch.stack([builder(record) for record in recording.records], dim=1).float().cpu()


SUFFIX_ROWS = 16
"""At most this many questions about one image share one run of its prefix (one suffix batch)."""


def prefix_sharing_refusal(model: nn.Module, adapter: ModelAdapter | None = None) -> str | None:
    """Why the questions about one image cannot share its prefix on this model, or None.

    Sharing needs the SDPA fast path (the recorder reads the suffix's queries against the cached
    keys), 1-D positions (the suffix continues the prefix's) and no sliding-window layer (whose
    masks over a cache this pass does not rebuild)."""
    from analysis.attention import path_of_model

    adapter = adapter or resolve_adapter(model)
    text = adapter.text_config(model)
    refusals = {
        "the eager path": path_of_model(model, adapter).hook_kind != "attention_observer",
        f"{adapter.positions!r} positions": adapter.positions != "1d",
        "sliding-window layers": "sliding_attention" in (getattr(text, "layer_types", None) or ())
        or getattr(text, "sliding_window", None) is not None,
    }
    found = [reason for reason, applies in refusals.items() if applies]
    return ", ".join(found) if found else None


def shared_prefix_features(model: nn.Module, processor: Any, prompts: Sequence[str], images: Sequence[Any], features: str,
                           adapter: ModelAdapter | None = None) -> torch.Tensor | None:
    """(rows, layers, F) gate features of ``prompts`` about the same ``images``, with their common
    prefix (every token up to the last image token) run once: the prefix alone with the KV cache,
    then every prompt's rest as one right-padded batch over a copy of that cache per row, recorded
    after the cached prefix (``record_attention(cached_prefix=...)``). The image tokens do not see
    the question, so these are the features of :func:`sweep_features` up to rounding (the gates
    read only the text and last queries and the text states, all after the prefix).

    Returns None where the prompts do not share that prefix or the cache cannot be copied per row
    (a cache other than transformers' ``DynamicCache``); the caller runs them in full instead.
    """
    from transformers import DynamicCache

    from exit.sweep import PER_TOKEN_INPUTS

    adapter = adapter or resolve_adapter(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    image_token_id = adapter.image_token_id(model)
    encoded = processor(images=[list(images) for _ in prompts], text=list(prompts), padding=True, padding_side="right",
                        return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    image_positions = (ids[0] == image_token_id).nonzero().flatten()
    if image_positions.numel() == 0:
        return None
    prefix = int(image_positions[-1]) + 1
    shared = bool((ids[:, :prefix] == ids[:1, :prefix]).all()) and bool(mask[:, :prefix].all())
    if not shared or prefix >= int(mask.sum(1).min()):  # no common prefix, or a prompt that ends in it
        return None
    first = processor(images=[list(images)], text=[prompts[0]], return_tensors="pt")
    head = {k: (v[:, :prefix] if k in PER_TOKEN_INPUTS else v).to(device) for k, v in first.items()}
    if "pixel_values" in head:
        head["pixel_values"] = head["pixel_values"].to(dtype)
    with torch.no_grad():
        cache = model(**head, use_cache=True, logits_to_keep=1).get("cache")
    if type(cache) is not DynamicCache:
        return None
    cache.batch_repeat_interleave(len(prompts))
    rows, length = ids.shape
    tail = {k: encoded[k][:, prefix:].to(device) for k in PER_TOKEN_INPUTS if k in encoded and k != "attention_mask"}
    positions = torch.arange(prefix, length, device=device).expand(rows, -1)
    layout = token_layout(ids, mask, image_token_id)
    with torch.no_grad(), gate_recording(model, layout, features, adapter=adapter, cached_prefix=prefix) as recording:
        model(**tail, attention_mask=mask.to(device), position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    builder = GateFeatureBuilder(features, ModelSignature.of(model))
    return torch.stack([builder(record) for record in recording.records], dim=1).float().cpu()


def _image_groups(questions: Sequence[Any], rows: int) -> list[list[Any]]:
    """The questions grouped by their images (in order of first appearance), at most ``rows`` a group."""
    by_images: dict[tuple[str, ...], list[Any]] = {}
    for question in questions:
        by_images.setdefault(tuple(question.images), []).append(question)
    return [group[i : i + rows] for group in by_images.values() for i in range(0, len(group), rows)]


@dataclass(frozen=True)
class FeaturePassPlan:
    """What a features pass over a table folder has left to do (:func:`feature_pass_plan`).

    Attributes:
        todo: the questions without features yet, in their order.
        labels: per sample id of the table, its (layers,) int64 labels (the sweep's ``label``).
        next_file: the number of the next ``features-pass-NNNNN`` file.
        shards: (path, sample ids, kind) of every feature shard already in the folder.
    """

    todo: list[Any]
    labels: dict[str, torch.Tensor]
    next_file: int
    shards: list[tuple[Path, list[str], str]]


def _feature_files(table_dir: Path) -> list[tuple[Path, list[str], str]]:
    """(path, sample ids, kind) of every feature shard of the folder, read from the metadata only."""
    found = []
    for path in sorted(table_dir.glob(f"{FEATURES_PREFIX}-*.safetensors")):
        with safe_open(str(path), "pt") as shard:
            metadata = shard.metadata() or {}
        found.append((path, json.loads(metadata.get("sample_ids", "[]")), metadata.get("features_kind", "")))
    return found


def feature_pass_plan(table_dir: str | Path, questions: Sequence[Any], features: str, resume: bool = False) -> FeaturePassPlan:
    """Check a features pass before any model loads and say what it has left to do.

    Raises:
        SweepError: the folder holds no exit table; a question is neither in the table nor among
            the questions the sweep failed; the folder holds features of another kind; or it
            holds features of these questions already and ``resume`` is off.
    """
    table_dir = Path(table_dir)
    if features not in GATE_INPUTS:
        raise SweepError(f"expected features to be one of {list(GATE_INPUTS)}, found {features!r}")
    try:
        sweep = read_sweep(table_dir)
    except (FileNotFoundError, ValueError) as error:
        raise SweepError(f"expected an exit table (dyvte-exit sweep) in {table_dir}, found none ({error})") from None
    table = sweep.pivot(index="sample_id", columns="layer", values="label").sort_index(axis=1)
    labels = {str(sample): torch.tensor(row.to_numpy(dtype="int64")) for sample, row in table.iterrows()}
    failed = {json.loads(line)["sample_id"] for path in table_dir.glob("_errors*.jsonl")
              for line in path.read_text().splitlines() if line.strip()}  # questions the sweep left out
    missing = [q.question_id for q in questions if q.question_id not in labels and q.question_id not in failed]
    if missing:
        raise SweepError(f"expected every question in the exit table of {table_dir}, found {len(missing)} that are not "
                         f"(first: {missing[:3]}); sweep them first (dyvte-exit sweep --resume)")
    files = _feature_files(table_dir)
    kinds = {kind for _, _, kind in files}
    if kinds - {features}:
        raise SweepError(f"expected the features in {table_dir} to be of kind {features!r} like this pass, "
                         f"found {sorted(kinds)}")
    have = {sample for _, ids, _ in files for sample in ids}
    todo = [q for q in questions if q.question_id in labels and q.question_id not in have]
    if not resume and any(q.question_id in have for q in questions):
        raise SweepError(f"expected a table without features of these questions, found them in {table_dir} for "
                         f"{sum(q.question_id in have for q in questions)} of them; add --resume to fill in the rest")
    numbers = [int(path.stem.rsplit("-", 1)[1]) for path, _, _ in files if path.stem.startswith(FEATURE_PASS_PREFIX + "-")]
    return FeaturePassPlan(todo, labels, max(numbers, default=-1) + 1, files)


@dataclass(frozen=True)
class FeaturePassRun:
    """What :func:`run_feature_pass` wrote: the feature shards, the samples in them, the questions left out."""

    files: list[Path]
    samples: int
    errors: int


def run_feature_pass(model: nn.Module, processor: Any, questions: Sequence[Any], image_folder: str | Path,
                     table_dir: str | Path, *, features: str = "hidden", batch_size: int = 1, progress: bool = True,
                     resume: bool = False, share_prefix: bool = True) -> FeaturePassRun:
    """Write the gate features of every question of the exit table in ``table_dir`` that has none
    yet (:func:`feature_pass_plan`), one feature shard per batch, so a stopped pass loses at most
    the batch it was in and ``resume`` continues it. Questions that cannot be loaded are listed
    in the folder's errors file, as the sweep lists them.

    ``share_prefix`` (where :func:`prefix_sharing_refusal` allows it): the questions about one
    image make a batch (up to :data:`SUFFIX_ROWS`) whose image prefix runs once
    (:func:`shared_prefix_features`), which on ShapesVQA (about 6 questions per image, the image
    tokens most of each prompt) saves most of the cost; else batches of ``batch_size`` in full."""
    from tqdm import tqdm

    table_dir = Path(table_dir)
    plan = feature_pass_plan(table_dir, questions, features, resume)
    adapter = resolve_adapter(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    errors = _SweepErrors(table_dir, "")
    files, samples, number = [], 0, plan.next_file
    share = share_prefix and prefix_sharing_refusal(model, adapter) is None
    batches = (_image_groups(plan.todo, SUFFIX_ROWS) if share else
               [plan.todo[i : i + batch_size] for i in range(0, len(plan.todo), batch_size)])
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
        good = errors.loadable(processor, batch, image_folder)
        if not good:
            continue
        found = shared_prefix_features(model, processor, [prompt for _, prompt, _ in good], good[0][2], features,
                                       adapter) if share else None
        if found is None:
            inputs, answer_mask = teacher_forced_inputs(processor, [prompt for _, prompt, _ in good],
                                                        [images for _, _, images in good],
                                                        [str(q.answer) for q, _, _ in good])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            found = sweep_features(model, inputs, answer_mask, features, adapter)
        ids = [q.question_id for q, _, _ in good]
        path = table_dir / f"{FEATURE_PASS_PREFIX}-{number:05d}.safetensors"
        files.append(write_feature_file(path, found, torch.stack([plan.labels[i] for i in ids]), ids, features))
        samples, number = samples + len(ids), number + 1
    return FeaturePassRun(files, samples, errors.new_entries)


# the analysis half's statistics as gate inputs --------------------------------------------------

STATISTICS_FEATURES_PREFIX = f"{FEATURES_PREFIX}-stats"
SAMPLES_PER_FILE = 256


def statistics_features(statistics: pd.DataFrame) -> tuple[list[str], torch.Tensor, str]:
    """The gate inputs held in a ``dyvte-stats dump`` statistics table (its prompt rows):
    (sample ids, (samples, layers, F) float32 features, their kind).

    With every head's rows (``dump --heads all``) the kind is "attention": per head, the text and
    last queries' masses over system, image and text keys, then their entropies, in the order of
    ``exit.gates.gate_features`` (which also serves the history kinds, ``exit.gates.select_features``).
    With the head-mean rows alone (``--heads mean``, the default) it is "history": the same eight
    statistics averaged over heads, layer after layer (``exit.gates.history_of``). An empty query
    group (no rows, or NaN) gives 0, as the gates' own features do.

    Raises:
        SweepError: the table has neither every head's rows nor head-mean rows of the prompt.
    """
    from analysis.vocabulary import HEAD_MEAN, PROMPT_STEP
    from exit.gates import ATTENTION_KEYS, ATTENTION_QUERIES, history_of

    rows = statistics[(statistics["step"] == PROMPT_STEP) & statistics["query_group"].isin(ATTENTION_QUERIES)
                      & statistics["key_group"].isin(ATTENTION_KEYS)]
    heads = sorted(h for h in rows["head"].unique() if h >= 0)
    per_head = bool(heads) and heads == list(range(len(heads)))
    rows = rows[rows["head"] >= 0] if per_head else rows[rows["head"] == HEAD_MEAN]
    if rows.empty:
        raise SweepError("expected the prompt rows of every head (dump --heads all) or of the head mean (--heads mean) "
                         "in the statistics, found neither")
    samples = sorted(rows["sample_id"].unique())
    layers = int(rows["layer"].max()) + 1
    index = {name: {value: i for i, value in enumerate(values)} for name, values in
             (("sample_id", samples), ("query_group", ATTENTION_QUERIES), ("key_group", ATTENTION_KEYS))}
    s, q, k = (rows[name].map(index[name]).to_numpy() for name in ("sample_id", "query_group", "key_group"))
    layer, head = rows["layer"].to_numpy(), (rows["head"].to_numpy() if per_head else np.zeros(len(rows), dtype=int))
    width = len(heads) if per_head else 1
    mass = np.zeros((len(samples), layers, width, len(ATTENTION_QUERIES), len(ATTENTION_KEYS)), dtype=np.float32)
    entropy = np.zeros((len(samples), layers, width, len(ATTENTION_QUERIES)), dtype=np.float32)
    mass[s, layer, head, q, k] = rows["mass"].to_numpy()
    entropy[s, layer, head, q] = rows["entropy"].to_numpy()  # the same for every key group of the row
    features = torch.from_numpy(np.concatenate([mass.reshape(len(samples), layers, -1),
                                                entropy.reshape(len(samples), layers, -1)], axis=-1))
    features = torch.nan_to_num(features, nan=0.0)
    return samples, (features if per_head else history_of(features)), ("attention" if per_head else "history")


def join_statistics(statistics_dir: str | Path, table_dir: str | Path) -> list[Path]:
    """Gate features out of a ``dyvte-stats dump`` folder (:func:`statistics_features`) joined by
    sample id with the labels of the exit table in ``table_dir``, written there as
    ``features-stats-NNNNN.safetensors`` shards for ``exit.train`` and ``exit.frontier`` (the
    exit module consuming the analysis half's parquet). Samples of the dump outside the table are
    left out; returns the files written.

    Raises:
        SweepError: no table in ``table_dir``; no dump sample in the table; the table folder holds
            features of another kind, or statistics features already.
    """
    from analysis.io import read_statistics

    table_dir = Path(table_dir)
    samples, features, kind = statistics_features(read_statistics(statistics_dir))
    plan = feature_pass_plan(table_dir, [], kind)
    if any(path.name.startswith(STATISTICS_FEATURES_PREFIX) for path, _, _ in plan.shards):
        raise SweepError(f"expected a table without statistics features, found {STATISTICS_FEATURES_PREFIX}-* files in "
                         f"{table_dir}; remove them to join another dump")
    have = {sample for _, ids, _ in plan.shards for sample in ids}
    keep = [i for i, sample in enumerate(samples) if sample in plan.labels and sample not in have]
    if not keep:
        raise SweepError(f"expected samples of the statistics in the exit table of {table_dir} without features, "
                         f"found none of {len(samples)} (the sample ids are the question ids of both)")
    written = []
    for number, start in enumerate(range(0, len(keep), SAMPLES_PER_FILE)):
        part = keep[start : start + SAMPLES_PER_FILE]
        ids = [samples[i] for i in part]
        path = table_dir / f"{STATISTICS_FEATURES_PREFIX}-{number:05d}.safetensors"
        written.append(write_feature_file(path, features[part], torch.stack([plan.labels[i] for i in ids]), ids, kind))
    return written


__all__ = ["FEATURE_PASS_PREFIX", "STATISTICS_FEATURES_PREFIX", "SUFFIX_ROWS", "FeaturePassPlan", "FeaturePassRun",
           "feature_pass_plan", "join_statistics", "prefix_sharing_refusal", "run_feature_pass", "shared_prefix_features",
           "statistics_features", "sweep_features"]
