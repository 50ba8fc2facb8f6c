"""Dump attention statistics of a question file to parquet, batch by batch.

``load_model`` loads any supported checkpoint (a hub id or a local folder) with its processor;
``dump_statistics`` runs the questions through it inside ``record_attention`` and streams one
row group per batch into shard files; ``summarize`` turns statistics into a per-layer table.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

import analysis
from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.data import DataError, Question, build_prompt, load_image
from analysis.io import StatisticsWriter
from analysis.layout import token_layout
from analysis.recorder import record_attention
from analysis.schema import samples_table
from analysis.stats import HEAD_MAX, HEAD_MEAN

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ATTENTION_PATH_DESCRIPTIONS = {
    "sdpa": "sdpa: decoder runs the registered attention function dyvte_observed_sdpa (SDPA output); "
    "statistics recomputed on the side from query and key in fp32 query chunks",
    "eager": "eager: decoder runs eager attention; statistics reduced from the weights returned by each self_attn",
}


def load_model(
    model_id: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    attention: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a supported image-text model and its processor with ``from_pretrained``.

    The family is checked from the config before any weights are read, so an unsupported model
    fails in a second with the list of supported families. ``"demo"`` names the demo model
    (:mod:`analysis.demo_model`): it resolves to the folder where the assembled model is cached
    (built on first use), which then loads exactly like any checkpoint folder.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from analysis.demo import DEMO_MODEL_ID, demo_model_folder  # late: analysis.demo imports this module

    if str(model_id) == DEMO_MODEL_ID:
        model_id = demo_model_folder()
    if dtype not in DTYPES:
        raise ValueError(f"expected dtype to be one of {list(DTYPES)}, found {dtype!r}")
    config = AutoConfig.from_pretrained(model_id)
    adapter = resolve_adapter(config.model_type)
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, dtype=DTYPES[dtype], attn_implementation="eager" if attention == "eager" else "sdpa"
    )
    adapter.image_token_id(model)
    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def git_revision() -> str | None:
    """The git revision of the toolkit's checkout, or None outside a checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def provenance(model_id: str, model: Any, attention: str, heads: str, seed: int) -> dict[str, Any]:
    """What produced a dump: model, library versions, git revision, attention path, dtype, seed."""
    import pyarrow
    import transformers

    return {
        "model": str(model_id),
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "attention_path": attention,
        "attention_path_description": ATTENTION_PATH_DESCRIPTIONS[attention],
        "heads": heads,
        "seed": seed,
        "dyvte_version": analysis.__version__,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class DumpResult:
    out_dir: Path
    samples: int
    rows: int
    files: list[Path]


def check_questions(questions: Sequence[Question], image_folder: str | Path) -> None:
    """Fail before any model work if question ids repeat or an image file is missing."""
    seen: set[str] = set()
    for question in questions:
        if question.question_id in seen:
            raise DataError(f"expected unique question ids, found {question.question_id!r} twice")
        seen.add(question.question_id)
        for name in question.images:
            if not (Path(image_folder) / name).is_file():
                raise DataError(
                    f"question {question.question_id!r}: expected an image at {Path(image_folder) / name}, found no file"
                )


def dump_statistics(
    model: Any,
    processor: Any,
    questions: Sequence[Question],
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    model_id: str = "",
    heads: str = "mean",
    attention: str = "sdpa",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    adapter: ModelAdapter | None = None,
) -> DumpResult:
    """Record the statistics of every question and stream them to parquet shards in ``out_dir``.

    One row group per batch; finished batches stay on disk whatever happens later in the run.
    """
    adapter = adapter or resolve_adapter(model)
    image_token_id = adapter.image_token_id(model)
    check_questions(questions, image_folder)
    existing = sorted(Path(out_dir).glob("statistics-*.parquet"))
    if existing:
        raise DataError(
            f"expected a new or empty output folder, found {len(existing)} statistics shard(s) in {out_dir} "
            "(a second dump there would mix two runs); choose another --out or remove the folder"
        )
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
    with StatisticsWriter(out_dir, provenance(model_id, model, attention, heads, seed)) as writer:
        for batch in tqdm(batches, desc="dump", unit="batch", disable=not progress):
            images = [load_image(image_folder, name) for question in batch for name in question.images]
            prompts = [build_prompt(processor, question) for question in batch]
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), image_token_id)
            with torch.no_grad(), record_attention(model, layout, attention=attention, adapter=adapter) as recording:
                model(**inputs, logits_to_keep=1)
            ids = [q.question_id for q in batch]
            statistics = recording.to_table(ids, heads)
            samples = samples_table(layout, ids, ids, [q.images for q in batch], [q.text for q in batch])
            writer.write(statistics, samples)
    return DumpResult(Path(out_dir), len(questions), writer.rows_written, writer.files)


SUMMARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("text", "image"),
    ("text", "text"),
    ("text", "system"),
    ("last", "image"),
    ("image", "image"),
)


def summarize(statistics: pd.DataFrame) -> pd.DataFrame:
    """Per-layer mean mass of the main query->key pairs, averaged over samples.

    Uses the head-mean rows (head == -1) when present, else averages the individual heads
    (head >= 0); max-over-heads rows are only used when nothing else is there.
    """
    if (statistics["head"] == HEAD_MEAN).any():
        rows = statistics[statistics["head"] == HEAD_MEAN]
    elif (statistics["head"] >= 0).any():
        rows = statistics[statistics["head"] >= 0]
    else:
        rows = statistics[statistics["head"] == HEAD_MAX]
    per_sample = rows.groupby(["sample_id", "layer", "query_group", "key_group"], observed=True)["mass"].mean()
    per_layer = per_sample.groupby(["layer", "query_group", "key_group"], observed=True).mean().reset_index()
    per_layer["pair"] = per_layer["query_group"] + "->" + per_layer["key_group"]
    table = per_layer.pivot(index="layer", columns="pair", values="mass")
    return table[[f"{q}->{k}" for q, k in SUMMARY_PAIRS if f"{q}->{k}" in table.columns]]
