"""Test data for stages, plots and notebooks: synthetic statistics with known stages, and a
statistics folder dumped from a tiny random LLaVA (built once per test session)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis.io import StatisticsWriter
from analysis.layout import KEY_GROUPS, QUERY_GROUPS
from analysis.schema import arrow_schema
from analysis.vocabulary import GENERATED, GENERATED_KEY_GROUPS, PROMPT_STEP


def step_curve(levels: Sequence[float], boundaries: Sequence[int], n_layers: int) -> np.ndarray:
    """A piecewise-constant curve: ``levels[i]`` from ``boundaries[i-1]`` (0 for i = 0) on."""
    curve = np.full(n_layers, float(levels[0]))
    for level, start in zip(levels[1:], boundaries):
        curve[start:] = level
    return curve


def _masses(text_image: float, head_shift: float) -> dict[tuple[str, str], float]:
    """Group masses of one layer whose text->image mass is ``text_image`` (rows sum to 1)."""
    t = float(np.clip(text_image + head_shift, 0.0, 1.0))
    return {
        ("system", "system"): 1.0, ("system", "image"): 0.0, ("system", "text"): 0.0,
        ("image", "system"): 0.6, ("image", "image"): 0.4, ("image", "text"): 0.0,
        ("text", "system"): 0.3 * (1 - t), ("text", "image"): t, ("text", "text"): 0.7 * (1 - t),
        ("last", "system"): 0.3 * (1 - t), ("last", "image"): t, ("last", "text"): 0.7 * (1 - t),
    }


def synthetic_statistics(curves: np.ndarray, heads: int = 0, sample_ids: Sequence[str] | None = None,
                         answer_steps: int = 0) -> pd.DataFrame:
    """A statistics table whose text->image (and last->image) mass per sample and layer is
    ``curves[sample, layer]``; head-mean rows, and ``heads`` per-head rows whose average is the
    head-mean value. Entropy rises with the text->image mass. ``answer_steps`` adds that many
    generated tokens per sample whose image mass is half the text's (``generated_masses``)."""
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    sample_ids = list(sample_ids or [f"s{i:02d}" for i in range(len(curves))])
    shifts = np.linspace(-0.02, 0.02, heads) if heads > 1 else np.zeros(heads)
    rows = []
    for sample_id, curve in zip(sample_ids, curves):
        for layer, value in enumerate(curve):
            for head, shift in [(-1, 0.0), *enumerate(shifts)]:
                masses = _masses(value, shift)
                for query in QUERY_GROUPS:
                    entropy = 1.0 + value if query in ("text", "last") else 2.0
                    for key in KEY_GROUPS:
                        rows.append((sample_id, layer, head, query, key, masses[query, key], entropy, PROMPT_STEP))
                for step in range(answer_steps):
                    for key, mass in generated_masses(value).items():
                        rows.append((sample_id, layer, head, GENERATED, key, mass, 1.5, step))
    frame = pd.DataFrame(rows, columns=["sample_id", "layer", "head", "query_group", "key_group", "mass", "entropy", "step"])
    n_key = frame["key_group"].map({"system": 5, "image": 16, "text": 8, GENERATED: 1}) + np.where(
        frame["key_group"] == GENERATED, frame["step"], 0)
    n_query = frame["query_group"].map({"system": 5, "image": 16, "text": 8, "last": 1, GENERATED: 1})
    frame["mass_per_key"] = frame["mass"] / n_key
    frame["n_query"], frame["n_key"] = n_query, n_key
    columns = ["sample_id", "layer", "head", "query_group", "key_group", "mass", "mass_per_key", "entropy", "n_query",
               "n_key", "step"]
    return frame[columns]


def generated_masses(text_image: float) -> dict[str, float]:
    """A generated token's masses at a layer whose text->image mass is ``text_image`` (sum 1)."""
    image = text_image / 2
    return dict(zip(GENERATED_KEY_GROUPS, (0.2 * (1 - image), image, 0.5 * (1 - image), 0.3 * (1 - image))))


def write_statistics(frame: pd.DataFrame, folder: Path) -> Path:
    """Write a statistics frame and a matching samples table as one dump folder."""
    statistics = pa.Table.from_pandas(frame, schema=arrow_schema("statistics"), preserve_index=False)
    ids = sorted(frame["sample_id"].unique())
    samples = pa.Table.from_pydict(
        {
            "sample_id": ids, "question_id": ids, "images": [["x.png"]] * len(ids), "question": ["?"] * len(ids),
            "n_tokens": [30] * len(ids), "n_system": [5] * len(ids), "n_image": [16] * len(ids), "n_text": [9] * len(ids),
            "generated": [""] * len(ids),
        },
        schema=arrow_schema("samples"),
    )
    with StatisticsWriter(folder, provenance={"model": "synthetic"}) as writer:
        writer.write(statistics, samples)
    return folder


def dump_tiny_model(root: Path, layers: int = 6) -> Path:
    """Save a tiny random LLaVA, dump every head's statistics of three questions; return the folder."""
    from PIL import Image

    from analysis.cli import main
    from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava

    model = save_tiny_llava(root / "model", TinyLlavaSpec(num_layers=layers, num_kv_heads=2))
    images = root / "images"
    images.mkdir(exist_ok=True)
    entries = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        entries.append({"question_id": f"q{i}", "image": f"{i}.png", "text": f"Is the picture {colour}?"})
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = root / "stats"
    args = ["dump", "--model", str(model), "--questions", str(questions), "--image-folder", str(images),
            "--out", str(out), "--heads", "all", "--batch-size", "3", "--no-progress", "--quiet"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def tiny_dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A statistics folder of a 6-layer tiny random LLaVA (built once per session, shared by modules)."""
    root = tmp_path_factory.getbasetemp() / "tiny-dump"
    if not (root / "stats").is_dir():
        root.mkdir(exist_ok=True)
        dump_tiny_model(root)
    return root / "stats"
