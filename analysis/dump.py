"""The dump job: attention statistics of a question file to parquet, batch by batch.

``dump_statistics`` runs the questions through a loaded model (``analysis.loading.load_model``)
inside ``record_attention`` and streams one row group per batch into shard files; ``summarize``
turns statistics into a per-layer table.

Scale-out and robustness: a ``Shard`` (``analysis.distributed``) takes every n-th question, and
each shard writes its own files into one folder; ``resume=True`` skips the samples a folder
already holds; a bad sample is listed in the errors files with its reason and the run goes on
(``fail_fast=True`` stops instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.data import DataError, Question, check_questions, check_unique_ids, prepare_batch
from analysis.distributed import Shard, barrier
from analysis.io import (
    StatisticsWriter,
    clean_incomplete,
    finished_samples,
    read_provenance,
    shard_files,
    tag_count,
)
from analysis.layout import token_layout
from analysis.loading import provenance
from analysis.recorder import record_attention
from analysis.schema import samples_table
from analysis.vocabulary import GENERATED, HEAD_MAX, HEAD_MEAN


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


RESUME_KEYS = ("model", "model_type", "dtype", "attention_path", "heads", "generate")


def check_resumable(out_dir: Path, provenance: dict[str, Any]) -> None:
    """Raise DataError if the folder's statistics were written with other settings than ``provenance``."""
    for path, table, _, _ in shard_files(out_dir):
        if table != "statistics":
            continue
        found = read_provenance(path)
        different = {key: (found.get(key), provenance.get(key)) for key in RESUME_KEYS
                     if _setting(key, found.get(key)) != _setting(key, provenance.get(key))}
        if different:
            raise DataError(
                f"expected --resume to continue a dump with the same settings, found {path.name} written with "
                + ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in different.items())
            )
        return


def _setting(key: str, value: Any) -> Any:
    """A resume setting as compared: a model given as a folder by its resolved path, so that
    ``./ckpt`` and ``/abs/ckpt`` are the same model."""
    if key == "model" and isinstance(value, str) and Path(value).is_dir():
        return str(Path(value).resolve())
    if key == "generate":
        return value or 0  # a dump from before --generate existed recorded no answer tokens
    return value


def _error_entry(question: Question, error: Exception) -> dict[str, Any]:
    return {
        "sample_id": question.question_id,
        "question_id": question.question_id,
        "images": list(question.images),
        "error": type(error).__name__,
        "reason": str(error),
    }


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
    generate: int = 0,
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
        generate: also record the attention of up to this many greedy answer tokens per sample
            (``generate()`` with the KV cache, left padding): each is a ``generated`` query at its
            ``step``; the answer is the samples table's ``generated`` column. A row's steps end
            at its end-of-sequence token.

    Raises:
        DataError: repeated question ids; a bad sample under ``fail_fast``; a folder holding another
            dump (without ``resume``) or one with other settings (with ``resume``); every sample of a
            single-process run failed (the folder holds no sample at all).
        SchemaError: ``resume`` on a folder with corrupt or foreign parquet.
    """
    adapter = adapter or resolve_adapter(model)
    out_dir = Path(out_dir)
    check_unique_ids(questions)
    mine = shard.select(questions)
    if fail_fast:
        check_questions(mine, image_folder)
    info = {**provenance(model_id, model, attention, heads, seed), "generate": generate}
    if resume:
        check_resumable(out_dir, info)  # before anything in the folder is touched
    finished = prepare_owned_folder(out_dir, shard, resume)
    if shard.count > 1:
        barrier()  # under torchrun no process writes before every process has looked at the folder
    todo = [q for q in mine if q.question_id not in finished]
    torch.manual_seed(seed)
    run = _DumpRun(model, processor, adapter, image_folder, attention, heads, fail_fast, generate)
    writer = StatisticsWriter(out_dir, info, batches_per_file, tag=shard.tag, seconds_per_shard=seconds_per_file)
    with writer:
        run.dump_all(todo, writer, batch_size, progress, f"dump {shard.index}/{shard.count}" if shard.count > 1 else "dump")
    nothing_dumped = writer.samples_written == 0 and not any(t == "samples" for _, t, _, _ in shard_files(out_dir))
    if shard.count == 1 and run.first_error is not None and nothing_dumped:
        raise DataError(
            f"expected at least one sample to dump, found all {len(todo)} failing (listed in {out_dir}/_errors-*.jsonl); "
            f"the first: {run.first_error}"
        )
    return DumpResult(
        out_dir, writer.samples_written, writer.rows_written, writer.files,
        errors=writer.errors_written, skipped=len(mine) - len(todo), assigned=len(mine),
    )


class _DumpRun:
    """One batch of a dump: prepare it, list its bad questions, record the good ones, write both."""

    def __init__(self, model: Any, processor: Any, adapter: ModelAdapter, image_folder: str | Path, attention: str,
                 heads: str, fail_fast: bool, generate: int = 0) -> None:
        self.model, self.processor, self.adapter = model, processor, adapter
        self.image_folder, self.attention, self.heads, self.fail_fast = image_folder, attention, heads, fail_fast
        self.generate = generate
        self.image_token_id = adapter.image_token_id(model)
        self.max_tokens = context_length(model, adapter)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.first_error: Exception | None = None

    def dump_all(self, todo: Sequence[Question], writer: StatisticsWriter, batch_size: int, progress: bool,
                 desc: str) -> None:
        bar = tqdm(total=len(todo), desc=desc, unit="sample", disable=not progress)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            self.dump_batch(batch, writer)
            bar.update(len(batch))
            if progress:
                bar.set_postfix(failed=writer.errors_written, refresh=False)
        bar.close()

    def dump_batch(self, batch: Sequence[Question], writer: StatisticsWriter) -> None:
        padding = {"padding_side": "left"} if self.generate else {}  # generate() continues every row at the end
        prepared = prepare_batch(self.processor, batch, self.image_folder, self.image_token_id, self.max_tokens, **padding)
        for question, error in prepared.failed:
            if self.fail_fast:
                raise error
            self.first_error = self.first_error or error
            writer.record_error(_error_entry(question, error))
        if prepared.inputs is None:
            return
        inputs = {k: v.to(self.device) for k, v in prepared.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), self.image_token_id)
        with torch.no_grad(), record_attention(self.model, layout, attention=self.attention, adapter=self.adapter,
                                               generated=self.generate > 0) as recording:
            if self.generate:
                # one more token than recorded: the query of the N-th answer token runs in the N-th decoding step
                sequences = self.model.generate(**inputs, max_new_tokens=self.generate + 1, do_sample=False)
            else:
                self.model(**inputs, logits_to_keep=1)
        ids = [q.question_id for q in prepared.questions]
        steps, answers = None, None
        if self.generate:
            new = sequences[:, layout.seq_len :].cpu()
            steps = [min(self.generate, n) for n in answer_lengths(new, stop_token_ids(self.model))]
            answers = [self.processor.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                       for row, n in zip(new.tolist(), steps)]
        statistics = recording.to_table(ids, self.heads, steps=steps)
        samples = samples_table(layout, ids, ids, [q.images for q in prepared.questions],
                                [q.text for q in prepared.questions], answers)
        writer.write(statistics, samples)


def stop_token_ids(model: Any) -> set[int]:
    """The tokens that end a greedy answer: the generation config's end-of-sequence and padding ids."""
    config = model.generation_config
    found: set[int] = set()
    for value in (config.eos_token_id, config.pad_token_id):
        found.update([value] if isinstance(value, int) else list(value or ()))
    return found


def answer_lengths(new_tokens: torch.Tensor, stop_ids: set[int]) -> list[int]:
    """Per row of (batch, new) generated ids, how many tokens come before the first stop token."""
    lengths = []
    for row in new_tokens.tolist():
        stops = [i for i, token in enumerate(row) if token in stop_ids]
        lengths.append(stops[0] if stops else len(row))
    return lengths


SUMMARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("text", "image"),
    ("text", "text"),
    ("text", "system"),
    ("last", "image"),
    ("image", "image"),
    (GENERATED, "image"),
    (GENERATED, "text"),
    (GENERATED, GENERATED),
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
