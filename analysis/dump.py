"""Dump attention statistics of a question file to parquet, batch by batch.

``load_model`` loads any supported checkpoint (a hub id or a local folder) with its processor;
``dump_statistics`` runs the questions through it inside ``record_attention`` and streams one
row group per batch into shard files; ``summarize`` turns statistics into a per-layer table.

Scale-out and robustness: a ``Shard`` (``--shard i/n``, or torchrun's RANK / WORLD_SIZE through
``distributed``) takes every n-th question, and each shard writes its own files into one folder;
``resume=True`` skips the samples a folder already holds; a bad sample is listed in the errors
files with its reason and the run goes on (``fail_fast=True`` stops instead).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm

import analysis
from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.data import DataError, Question, build_prompt, check_question, load_image
from analysis.io import (
    StatisticsWriter,
    clean_incomplete,
    finished_samples,
    read_provenance,
    shard_files,
    shard_tag,
    tag_count,
)
from analysis.layout import token_layout
from analysis.recorder import record_attention
from analysis.schema import samples_table
from analysis.stats import HEAD_MAX, HEAD_MEAN

T = TypeVar("T")

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
    """What one ``dump_statistics`` call did.

    Attributes:
        out_dir: the output folder. samples / rows: samples and statistics rows written by this call.
        files: the shard and errors files this call committed.
        errors: samples that failed in this call (listed in the errors files).
        skipped: samples of this shard left out because the folder already held them (``resume``).
        assigned: questions this shard was given (all of them for a single process).
    """

    out_dir: Path
    samples: int
    rows: int
    files: list[Path]
    errors: int = 0
    skipped: int = 0
    assigned: int = 0


@dataclass(frozen=True)
class Shard:
    """Which part of a question file one process handles: every ``count``-th question from ``index``.

    The split is strided by position in the file, so the union of the shards 0..count-1 is the whole
    file whatever the count, and each shard writes files named with its own ``tag``.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"expected a shard i/n with 0 <= i < n, found {self.index}/{self.count}")

    @property
    def tag(self) -> str:
        """The file-name tag of this shard's files (empty for a single process)."""
        return shard_tag(self.index, self.count)

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items: positions index, index + count, index + 2 count, ..."""
        return list(items[self.index :: self.count])

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (0-based i), as given to ``--shard``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"expected a shard as i/n (e.g. 0/4), found {text!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls) -> Shard | None:
        """The shard of this process under torchrun (``RANK`` / ``WORLD_SIZE``), or None outside it."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


@contextmanager
def distributed(backend: str = "gloo") -> Iterator[Shard]:
    """Join torchrun's process group for the block (gloo by default: CPU, and CUDA tensors for the
    small reductions this toolkit does) and yield this process's shard; outside torchrun (no
    ``RANK`` / ``WORLD_SIZE``) yield the single shard 0/1 and start nothing.

    The group is destroyed at the end of the block if this block created it.
    """
    import torch.distributed as dist

    shard = Shard.from_environment()
    if shard is None or shard.count == 1 or not dist.is_available():
        yield shard or Shard()
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    try:
        yield Shard(dist.get_rank(), dist.get_world_size())
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the torch.distributed group; nothing outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[int | float]) -> list[float]:
    """Element-wise sum of ``values`` over the torch.distributed group (the values themselves outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def check_questions(questions: Sequence[Question], image_folder: str | Path) -> None:
    """Fail before any model work if question ids repeat or an image file is missing."""
    check_unique_ids(questions)
    for question in questions:
        check_question(question)
        for name in question.images:
            if not (Path(image_folder) / name).is_file():
                raise DataError(
                    f"question {question.question_id!r}: expected an image at {Path(image_folder) / name}, found no file"
                )


def check_unique_ids(questions: Sequence[Question]) -> None:
    """Raise DataError if a question id repeats (sample ids must be unique across all shards)."""
    seen: set[str] = set()
    for question in questions:
        if question.question_id in seen:
            raise DataError(f"expected unique question ids, found {question.question_id!r} twice")
        seen.add(question.question_id)


def context_length(model: Any, adapter: ModelAdapter) -> int | None:
    """The longest prompt the text decoder takes (``max_position_embeddings``), or None if unknown."""
    value = getattr(adapter.text_config(model), "max_position_embeddings", None)
    return int(value) if value else None


def prepare_owned_folder(out_dir: Path, shard: Shard, resume: bool) -> set[str]:
    """Check the output folder before a dump and return the ids it already holds.

    Without ``resume`` the folder must hold no shard that this process could collide with (its own
    tag, or a run with another shard count); with ``resume`` the leftovers of interrupted writers
    of those tags are removed and the finished samples (samples shards and errors files) returned.
    Shards of sibling processes (same count, other index) are never touched: they may be running.
    """

    def owns(tag: str) -> bool:
        return tag == shard.tag or tag_count(tag) != shard.count

    if not resume:
        clashing = [path for path, table, tag, _ in shard_files(out_dir) if owns(tag)]
        if clashing:
            raise DataError(
                f"expected a new or empty output folder, found {len(clashing)} shard file(s) in {out_dir} such as "
                f"{clashing[0].name} (a second dump there would mix two runs); pass --resume to continue that dump, "
                "or choose another --out"
            )
        return set()
    clean_incomplete(out_dir, owns)
    return finished_samples(out_dir)


RESUME_KEYS = ("model", "model_type", "dtype", "attention_path", "heads")


def check_resumable(out_dir: Path, provenance: dict[str, Any]) -> None:
    """Raise DataError if the folder's statistics were written with other settings than ``provenance``."""
    for path, table, _, _ in shard_files(out_dir):
        if table != "statistics":
            continue
        found = read_provenance(path)
        different = {key: (found.get(key), provenance.get(key)) for key in RESUME_KEYS if found.get(key) != provenance.get(key)}
        if different:
            raise DataError(
                f"expected --resume to continue a dump with the same settings, found {path.name} written with "
                + ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in different.items())
            )
        return


def _error_entry(question: Question, error: Exception) -> dict[str, Any]:
    return {
        "sample_id": question.question_id,
        "question_id": question.question_id,
        "images": list(question.images),
        "error": type(error).__name__,
        "reason": str(error),
    }


@dataclass
class PreparedBatch:
    """Model inputs of the good questions of one batch, and the bad ones with their errors."""

    questions: list[Question]
    inputs: dict[str, torch.Tensor] | None
    failed: list[tuple[Question, Exception]]


def prepare_batch(
    processor: Any,
    batch: Sequence[Question],
    image_folder: str | Path,
    image_token_id: int,
    max_tokens: int | None,
) -> PreparedBatch:
    """Load, render and tokenize a batch; set aside each question that cannot become a sample.

    A question fails on its own (``DataError``) when it has no image, its placeholders do not match
    its images, an image is missing or unreadable, the processor rejects it, its prompt holds no
    image token, or its prompt is longer than ``max_tokens``; the rest of the batch goes on.
    """
    failed: list[tuple[Question, Exception]] = []
    good: list[tuple[Question, list[Any], str]] = []
    for question in batch:
        try:
            check_question(question)
            try:
                images = [load_image(image_folder, name) for name in question.images]
            except DataError as error:
                raise DataError(f"question {question.question_id!r}: {error}") from error
            good.append((question, images, build_prompt(processor, question)))
        except DataError as error:
            failed.append((question, error))
    while good:
        try:
            inputs = processor(
                images=[image for _, images, _ in good for image in images],
                text=[prompt for _, _, prompt in good],
                return_tensors="pt",
                padding=True,
            )
        except (ValueError, TypeError, OSError) as error:
            if len(good) == 1:
                failed.append((good[0][0], DataError(f"question {good[0][0].question_id!r}: the processor rejected it: {error}")))
                good = []
                break
            kept = []
            for item in good:  # find the culprit(s) one by one
                one = prepare_batch(processor, [item[0]], image_folder, image_token_id, max_tokens)
                if one.failed:
                    failed.extend(one.failed)
                else:
                    kept.append(item)
            good = kept
            continue
        bad = _row_problems(inputs, [q for q, _, _ in good], image_token_id, max_tokens)
        if not bad:
            return PreparedBatch([q for q, _, _ in good], dict(inputs), failed)
        failed.extend((good[row][0], error) for row, error in bad)
        rows = {row for row, _ in bad}
        good = [item for row, item in enumerate(good) if row not in rows]
    return PreparedBatch([], None, failed)


def _row_problems(
    inputs: Any, questions: Sequence[Question], image_token_id: int, max_tokens: int | None
) -> list[tuple[int, DataError]]:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    problems = []
    for row, question in enumerate(questions):
        n_tokens = int(real[row].sum())
        n_image = int(((ids[row] == image_token_id) & real[row]).sum())
        if n_image == 0:
            problems.append((row, DataError(
                f"question {question.question_id!r} has no image token: expected at least one token with the image "
                f"token id {image_token_id}, found none among its {n_tokens} tokens; the processor did not expand an "
                "image placeholder into that id")))
        elif max_tokens is not None and n_tokens > max_tokens:
            problems.append((row, DataError(
                f"question {question.question_id!r}: expected a prompt of at most {max_tokens} tokens (the model's "
                f"context, max_position_embeddings), found {n_tokens} tokens")))
    return problems


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
    shard: Shard = Shard(),
    resume: bool = False,
    fail_fast: bool = False,
    batches_per_file: int = 64,
    seconds_per_file: float | None = 600.0,
) -> DumpResult:
    """Record the statistics of this shard's questions and stream them to parquet shards in ``out_dir``.

    One row group per batch; a shard file is committed (written under a hidden name, then renamed)
    every ``batches_per_file`` batches or ``seconds_per_file`` seconds, and at the end, also after an
    exception: finished batches stay on disk whatever happens later in the run.

    Args:
        shard: which questions this process handles (``Shard(rank, world_size)`` under torchrun);
            every shard writes its own files into the same folder, read back as one table.
        resume: continue a dump in ``out_dir``: samples already there (finished or failed) are
            skipped, leftovers of a killed writer are removed. Without it the folder must be new.
        fail_fast: stop at the first bad sample (and check every image file before any model work);
            by default a bad sample is listed with its reason in ``_errors-*.jsonl`` and the run goes on.

    Raises:
        DataError: repeated question ids; a bad sample under ``fail_fast``; a folder holding another
            dump (without ``resume``) or one with other settings (with ``resume``); every sample of a
            single-process run failed (the folder holds no sample at all).
        SchemaError: ``resume`` on a folder with corrupt or foreign parquet.
    """
    adapter = adapter or resolve_adapter(model)
    image_token_id = adapter.image_token_id(model)
    max_tokens = context_length(model, adapter)
    out_dir = Path(out_dir)
    check_unique_ids(questions)
    mine = shard.select(questions)
    if fail_fast:
        check_questions(mine, image_folder)
    info = provenance(model_id, model, attention, heads, seed)
    if resume:
        check_resumable(out_dir, info)  # before anything in the folder is touched
    finished = prepare_owned_folder(out_dir, shard, resume)
    if shard.count > 1:
        barrier()  # under torchrun no process writes before every process has looked at the folder
    todo = [q for q in mine if q.question_id not in finished]
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    first_error: Exception | None = None
    writer = StatisticsWriter(out_dir, info, batches_per_file, tag=shard.tag, seconds_per_shard=seconds_per_file)
    with writer:
        bar = tqdm(total=len(todo), desc=f"dump {shard.index}/{shard.count}" if shard.count > 1 else "dump",
                   unit="sample", disable=not progress)
        for batch in batches:
            prepared = prepare_batch(processor, batch, image_folder, image_token_id, max_tokens)
            for question, error in prepared.failed:
                if fail_fast:
                    raise error
                first_error = first_error or error
                writer.record_error(_error_entry(question, error))
            if prepared.inputs is not None:
                inputs = {k: v.to(device) for k, v in prepared.inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), image_token_id)
                with torch.no_grad(), record_attention(model, layout, attention=attention, adapter=adapter) as recording:
                    model(**inputs, logits_to_keep=1)
                ids = [q.question_id for q in prepared.questions]
                statistics = recording.to_table(ids, heads)
                samples = samples_table(layout, ids, ids, [q.images for q in prepared.questions],
                                        [q.text for q in prepared.questions])
                writer.write(statistics, samples)
            bar.update(len(batch))
            if progress:
                bar.set_postfix(failed=writer.errors_written, refresh=False)
        bar.close()
    nothing_dumped = writer.samples_written == 0 and not any(t == "samples" for _, t, _, _ in shard_files(out_dir))
    if shard.count == 1 and first_error is not None and nothing_dumped:
        raise DataError(
            f"expected at least one sample to dump, found all {len(todo)} failing (listed in {out_dir}/_errors-*.jsonl); "
            f"the first: {first_error}"
        )
    return DumpResult(
        out_dir, writer.samples_written, writer.rows_written, writer.files,
        errors=writer.errors_written, skipped=len(mine) - len(todo), assigned=len(mine),
    )


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
