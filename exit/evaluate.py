"""Answer a question file with an exit method and score it: accuracy, exit layers, FLOPs, time.

``evaluate_method(model, processor, questions, image_folder, method)`` answers every question by
greedy ``generate()`` (the KV cache on) under the method, in batches of the questions about one
image (left padding, each row its own exit), and returns one row per question (the registered
table ``evaluation``, see ``dyvte-stats schema``):

============================  ================================================================
question_id, category         from the question file
answer, prediction, correct   the reference, the model's answer, exact match
                              (:func:`analysis.scoring.exact_match`: case, articles, number words)
exit_layer                    the layer after which the row's last image token left (-1: some
                              stayed to the end, e.g. FastV without an exit)
tokens, image_tokens          the row's prompt length (no padding) and its image tokens
relative_prefill_flops        decoder prefill FLOPs under the method over the stock model's: the
                              method's FLOPs rule (``exit.methods``, from ``exit.flops``) on the
                              row's tokens, image tokens and exit layer
batch, batch_seconds,         the batch the row was answered in, that batch's wall time for
batch_rows                    generate() (prefill and decoding) and its number of rows
prefill_seconds,              the batch's wall time up to the first next-token scores (vision
decode_seconds, decode_steps  tower and prefill), the rest of generate(), and the decoding
                              forwards in that rest (generated length - 1)
============================  ================================================================

The methods (``none``, ``static:K``, ``vtw``, ``fastv:K:R``, ``dyvte:TAU``, ...) are the table of
:mod:`exit.methods`; :func:`parse_method` reads one for a loaded model, and the baselines are
described in :mod:`exit.baselines`. :func:`evaluate_methods` evaluates several on one model and
writes ``eval-<method>.parquet`` and ``summary.parquet`` (table ``evaluation_summary``) through
``analysis.io.ParquetShard``, with the provenance (``analysis.loading.provenance`` and the method)
in each file's metadata.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from analysis.adapters import resolve_adapter
from analysis.data import DataError, Question, build_prompt, load_image
from analysis.errors import UsageError
from analysis.io import ParquetShard
from analysis.schema import TABLES, SchemaError
from analysis.scoring import exact_match
from exit.baselines import first_layer_within, vtw_kl_curve
from exit.flops import DecoderShape
from exit.methods import (
    METHOD_FORMS,
    ROWS_TABLE,
    SUMMARY_FILE,
    SUMMARY_TABLE,
    ExitMethod,
    gates_with_tau,
    parse_method,
    rows_file_name,
)
from exit.surgery import NO_EXIT

__all__ = [
    "METHOD_FORMS",
    "ExitMethod",
    "VTWCalibration",
    "calibrate_vtw",
    "encode_questions",
    "evaluate_method",
    "evaluate_methods",
    "gates_with_tau",
    "parse_method",
    "require_answers",
    "summarize_evaluation",
    "summary_row",
    "write_evaluation_rows",
    "write_evaluation_summary",
]


@dataclass(frozen=True)
class VTWCalibration:
    """VTW's calibration: ``layer`` = the first layer whose mean KL is <= ``eta``.

    Attributes:
        kl: mean over the samples of KL(full || exit after layer k), one value per layer (nats).
        question_ids: the calibration samples, in order.
    """

    layer: int
    eta: float
    kl: tuple[float, ...]
    question_ids: tuple[str, ...]

    @property
    def samples(self) -> int:
        return len(self.question_ids)


def require_answers(questions: Iterable[Question]) -> None:
    """Raise DataError naming the first question without a reference answer."""
    for question in questions:
        if question.answer is None:
            raise DataError(f"question {question.question_id!r}: expected a reference answer, found none")


class _FirstScoresClock(LogitsProcessor):
    """Notes the time generate() first asks for next-token scores: the end of the prefill."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def _batches(questions: Sequence[Question], batch_size: int) -> Iterator[list[Question]]:
    """The questions grouped by their images (in file order), at most ``batch_size`` per batch."""
    groups: dict[tuple[str, ...], list[Question]] = {}
    for question in questions:
        groups.setdefault(question.images, []).append(question)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def encode_questions(processor: Any, questions: Sequence[Question], image_folder: str | Path,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Model inputs for ``questions`` as one left-padded batch (chat-template prompts, their images)."""
    images = [load_image(image_folder, name) for question in questions for name in question.images]
    prompts = [build_prompt(processor, question) for question in questions]
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = {key: value.to(device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def calibrate_vtw(
    model: nn.Module,
    processor: Any,
    questions: Sequence[Question],
    image_folder: str | Path,
    eta: float,
    n: int = 20,
    batch_size: int = 8,
) -> VTWCalibration:
    """VTW's exit layer: the first layer K whose mean KL(full || exit after K) of the last prompt
    token's next-token distribution over the first ``n`` questions is <= ``eta`` (see
    :func:`exit.baselines.vtw_kl_curve`; one full forward and one per layer for each batch).

    Raises:
        UsageError: no questions, n < 1 or eta < 0.
    """
    if n < 1:
        raise UsageError(f"expected at least one calibration sample, found n={n}")
    if eta < 0:
        raise UsageError(f"expected eta >= 0, found {eta}")
    chosen = list(questions)[:n]
    if not chosen:
        raise UsageError("expected calibration questions for VTW, found none")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = list(_batches(chosen, batch_size))
    curve = vtw_kl_curve(model, (encode_questions(processor, batch, image_folder, device, dtype) for batch in batches))
    mean = curve.mean(dim=0)
    return VTWCalibration(
        layer=first_layer_within(mean, eta),
        eta=float(eta),
        kl=tuple(float(v) for v in mean),
        question_ids=tuple(question.question_id for batch in batches for question in batch),
    )


@dataclass(frozen=True)
class _Model:
    """What answering a batch needs to know about the model, looked up once per method."""

    image_token_id: int
    shape: DecoderShape
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> _Model:
        parameter = next(model.parameters())
        return cls(resolve_adapter(model).image_token_id(model), DecoderShape.from_config(model.config),
                   parameter.device, parameter.dtype)


def evaluate_method(
    model: nn.Module,
    processor: Any,
    questions: Sequence[Question],
    image_folder: str | Path,
    method: ExitMethod,
    max_new_tokens: int = 4,
    batch_size: int = 8,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> pd.DataFrame:
    """One row per question (see the module docstring), answered under ``method``.

    Raises:
        DataError: a question has no reference answer.
    """
    require_answers(questions)
    facts = _Model.of(model)
    rows: list[dict[str, Any]] = []
    batches = list(_batches(questions, batch_size))
    for number, batch in enumerate(progress(batches) if progress is not None else batches):
        rows += _answer_batch(model, processor, batch, image_folder, method, facts, max_new_tokens, number)
    frame = pd.DataFrame(rows)
    frame.insert(0, "method", method.name)
    return frame


def _answer_batch(model: nn.Module, processor: Any, batch: Sequence[Question], image_folder: str | Path,
                  method: ExitMethod, facts: _Model, max_new_tokens: int, number: int) -> list[dict[str, Any]]:
    """Answer one batch under ``method``: its rows of the evaluation table (without ``method``)."""
    inputs = encode_questions(processor, batch, image_folder, facts.device, facts.dtype)
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    clock = _FirstScoresClock()
    start = time.perf_counter()
    with torch.no_grad(), method.attached(model, input_ids, mask) as handle:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([clock]))
    end = time.perf_counter()
    prefill_end = clock.first if clock.first is not None else end
    exits = handle.exit_layers if handle is not None else [None] * len(batch)
    answers = processor.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    timing = {"batch": number, "batch_seconds": end - start, "batch_rows": len(batch),
              "prefill_seconds": prefill_end - start, "decode_seconds": end - prefill_end,
              "decode_steps": int(output.shape[1] - input_ids.shape[1]) - 1}
    rows = []
    for row, (question, answer, exit_layer) in enumerate(zip(batch, answers, exits)):
        tokens = int(mask[row].sum())
        image_tokens = int(((input_ids[row] == facts.image_token_id) & mask[row].bool()).sum())
        rows.append({
            "question_id": question.question_id,
            "category": question.category or "uncategorised",
            "answer": question.answer,
            "prediction": answer.strip(),
            "correct": exact_match(answer, question.answer or ""),
            "exit_layer": NO_EXIT if exit_layer is None else int(exit_layer),
            "tokens": tokens,
            "image_tokens": image_tokens,
            "relative_prefill_flops": method.relative_prefill_flops(facts.shape, tokens, image_tokens, exit_layer),
            **timing,
        })
    return rows


def summarize_evaluation(frame: pd.DataFrame, num_layers: int) -> dict[str, Any]:
    """Accuracy overall and per category, exit statistics and relative prefill FLOPs of one method.

    The mean exit layer counts a row that never exits as exiting after the last layer
    (``num_layers - 1``), which costs the same. Times are sums over batches; decoding tokens per
    second counts every row's token of each decoding forward.
    """
    if frame.empty:
        raise UsageError("expected evaluated questions to summarise, found none")
    layers = frame["exit_layer"].where(frame["exit_layer"] != NO_EXIT, num_layers - 1)
    accuracy = frame.groupby("category")["correct"].mean().to_dict()
    batches = frame.groupby("batch").first()
    timing = {}
    if "prefill_seconds" in frame:
        decoded = float((batches["decode_steps"] * batches["batch_rows"]).sum())
        decode_seconds = float(batches["decode_seconds"].sum())
        timing = {"prefill_seconds": float(batches["prefill_seconds"].sum()), "decode_seconds": decode_seconds,
                  "decode_tokens_per_second": decoded / decode_seconds if decode_seconds > 0 else float("nan")}
    return {
        "questions": int(len(frame)),
        "accuracy": {**{k: float(v) for k, v in sorted(accuracy.items())}, "overall": float(frame["correct"].mean())},
        "mean_exit_layer": float(layers.mean()),
        "exited_share": float((frame["exit_layer"] != NO_EXIT).mean()),
        "relative_prefill_flops": float(frame["relative_prefill_flops"].mean()),
        "seconds": float(batches["batch_seconds"].sum()),
        **timing,
    }


def summary_row(method: str, frame: pd.DataFrame, num_layers: int) -> dict[str, Any]:
    """One line of ``summary.parquet``: :func:`summarize_evaluation` flattened, in the column order
    of the ``evaluation_summary`` table (its fixed columns, then ``accuracy_<category>``; times
    missing from an old frame are NaN)."""
    summary = {"method": method, "num_layers": num_layers, **summarize_evaluation(frame, num_layers)}
    accuracy = summary.pop("accuracy")
    summary["accuracy_overall"] = accuracy.pop("overall")
    fixed = [column.name for column in TABLES[SUMMARY_TABLE].columns]
    return {**{name: summary.get(name, math.nan) for name in fixed}, **{f"accuracy_{k}": v for k, v in accuracy.items()}}


def evaluate_methods(
    model: nn.Module,
    processor: Any,
    questions: Sequence[Question],
    image_folder: str | Path,
    methods: Sequence[ExitMethod],
    out_dir: str | Path | None = None,
    max_new_tokens: int = 4,
    batch_size: int = 8,
    progress: Callable[[str], Callable[[Iterable[Any]], Iterable[Any]]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate several methods on one loaded model; (per-question rows, one summary row per method).

    With ``out_dir`` each method's rows go to ``out_dir/eval-<method>.parquet`` as soon as the
    method is done, and the summary so far to ``out_dir/summary.parquet``, each committed
    atomically (:func:`write_evaluation_rows`), so a later failure keeps the finished methods.

    Args:
        provenance: what produced the files (``analysis.loading.provenance``); default: that of
            ``model`` with its current attention path and seed 0. Each file adds its method(s).

    Raises:
        UsageError: two methods of the same name (they would write the same file).
    """
    names = [method.name for method in methods]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"expected each method once, found {twice} more than once")
    num_layers = len(resolve_adapter(model).decoder_layers(model))
    base = dict(provenance) if provenance is not None else _default_provenance(model)
    frames, summaries = [], []
    for method in methods:
        frame = evaluate_method(model, processor, questions, image_folder, method, max_new_tokens, batch_size,
                                progress(method.name) if progress is not None else None)
        summaries.append(summary_row(method.name, frame, num_layers))
        frames.append(frame)
        if out_dir is not None:
            write_evaluation_rows(frame, out_dir, {**base, **method.provenance()})
            write_evaluation_summary(pd.DataFrame(summaries), out_dir, base)
    return pd.concat(frames, ignore_index=True), pd.DataFrame(summaries)


def _default_provenance(model: nn.Module) -> dict[str, Any]:
    from analysis.attention import path_of_model
    from analysis.loading import provenance

    name = getattr(model, "name_or_path", "") or type(model).__name__
    return provenance(str(name), model, path_of_model(model, resolve_adapter(model)).name, "none", 0)


def write_evaluation_rows(frame: pd.DataFrame, out_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write one method's rows (:func:`evaluate_method`) to ``out_dir/eval-<method>.parquet``.

    The file is of the registered table ``evaluation`` and carries ``provenance`` with the method
    name added (``dyvte.provenance``); it is written under a hidden name and renamed when complete.

    Raises:
        UsageError: the rows are not those of exactly one method. SchemaError: a column is missing
            or of the wrong type.
    """
    methods = list(dict.fromkeys(frame["method"])) if "method" in frame else []
    if len(methods) != 1:
        raise UsageError(f"expected the rows of exactly one method, found {methods}")
    path = Path(out_dir) / rows_file_name(methods[0])
    return _write_table(frame, path, ROWS_TABLE, {**provenance, "method": methods[0]})


def write_evaluation_summary(summary: pd.DataFrame, out_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write the summary lines (:func:`summary_row`) to ``out_dir/summary.parquet`` (table
    ``evaluation_summary``, ``provenance`` with the list of methods added), replacing it atomically."""
    methods = [str(method) for method in summary["method"]]
    return _write_table(summary, Path(out_dir) / SUMMARY_FILE, SUMMARY_TABLE, {**provenance, "methods": methods})


def _column(frame: pd.DataFrame, field: pa.Field, path: Path) -> pa.Array:
    try:
        return pa.array(frame[field.name].tolist(), field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SchemaError(f"{path}: expected column {field.name!r} of type {field.type}, found {error}") from error


def _write_table(frame: pd.DataFrame, path: Path, table: str, provenance: Mapping[str, Any]) -> Path:
    spec = TABLES[table]
    fixed = [column.name for column in spec.columns]
    schema = spec.arrow_schema(dict(provenance), extra=[c for c in frame.columns if c not in fixed])
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise UsageError(f"{path}: expected {table} columns {schema.names}, found no {missing} in {list(frame.columns)}")
    data = pa.Table.from_pydict({f.name: _column(frame, f, path) for f in schema}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    shard = ParquetShard(path, schema)
    try:
        shard.write(data)
    except BaseException:
        shard.file.discard()
        raise
    committed = shard.close()
    assert committed is not None
    return committed
