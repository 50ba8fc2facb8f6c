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

import json
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
from analysis.data import DataError, Question, encode_questions, prepare_batch
from analysis.errors import UsageError
from analysis.io import ParquetShard, atomic_write_text, read_provenance, read_table
from analysis.schema import TABLES, SchemaError
from analysis.scoring import exact_match
from exit.baselines import first_layer_within, vtw_kl_curve
from exit.flops import DecoderShape
from exit.methods import (
    METHOD_FORMS,
    ROWS_PATTERN,
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
    "ERRORS_FILE",
    "FOLDER_MODES",
    "EvaluationFolder",
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


def calibrate_vtw(
    model: nn.Module,
    processor: Any,
    questions: Sequence[Question],
    image_folder: str | Path,
    eta: float,
    n: int = 20,
    batch_size: int = 8,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
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
    shown = progress(batches) if progress is not None else batches
    curve = vtw_kl_curve(model, (encode_questions(processor, batch, image_folder, device, dtype) for batch in shown))
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
    *,
    done: pd.DataFrame | None = None,
    on_rows: Callable[[pd.DataFrame], None] | None = None,
    on_error: Callable[[Question, Exception], None] | None = None,
) -> pd.DataFrame:
    """One row per question (see the module docstring), answered under ``method``.

    Args:
        done: rows of this method from an earlier run (``resume``): their questions are skipped,
            and they lead the returned frame.
        on_rows: called with all rows so far after every batch (how a folder keeps them on disk).
        on_error: called with each question that cannot be answered (a missing or unreadable
            image, a prompt the processor rejects); without it such a question stops the method.

    Raises:
        DataError: a question has no reference answer; a bad question when ``on_error`` is None.
    """
    require_answers(questions)
    facts = _Model.of(model)
    finished = set(done["question_id"]) if done is not None and not done.empty else set()
    rows: list[dict[str, Any]] = done.drop(columns="method").to_dict("records") if finished else []
    first = int(done["batch"].max()) + 1 if finished else 0
    batches = list(_batches([q for q in questions if q.question_id not in finished], batch_size))
    for number, batch in enumerate(progress(batches) if progress is not None else batches, start=first):
        answered, failed = _answer_batch(model, processor, batch, image_folder, method, facts, max_new_tokens, number)
        for question, error in failed:
            if on_error is None:
                raise error
            on_error(question, error)
        rows += answered
        if on_rows is not None and answered:
            on_rows(_method_frame(rows, method.name))
    return _method_frame(rows, method.name)


def _method_frame(rows: list[dict[str, Any]], name: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.insert(0, "method", name)
    return frame


def _answer_batch(model: nn.Module, processor: Any, batch: Sequence[Question], image_folder: str | Path,
                  method: ExitMethod, facts: _Model, max_new_tokens: int,
                  number: int) -> tuple[list[dict[str, Any]], list[tuple[Question, Exception]]]:
    """Answer one batch under ``method``: its rows of the evaluation table (without ``method``), and
    the questions that could not become model inputs, with their errors."""
    prepared = prepare_batch(processor, batch, image_folder, facts.image_token_id, None, padding_side="left")
    if prepared.inputs is None:
        return [], prepared.failed
    batch = prepared.questions
    inputs = {key: value.to(facts.device) for key, value in prepared.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(facts.dtype)
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
    return rows, prepared.failed


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


FOLDER_MODES: tuple[str, ...] = ("new", "resume", "add")
"""How :func:`evaluate_methods` treats an output folder that holds an evaluation already."""
ERRORS_FILE = "_errors.jsonl"
"""The questions an evaluation could not answer (one JSON object per line), beside its rows."""


class EvaluationFolder:
    """An evaluation's output folder, and how a new run may join it.

    ``new``: the folder must hold no evaluation. ``resume``: the same run again: the questions
    each method already answered are skipped (finished and unfinished methods alike) and the
    summary covers every method of the folder. ``add``: new methods beside the old ones (a method
    already in the folder is refused: resume it instead).
    """

    def __init__(self, out_dir: str | Path, mode: str = "new") -> None:
        if mode not in FOLDER_MODES:
            raise UsageError(f"expected an evaluation folder mode in {list(FOLDER_MODES)}, found {mode!r}")
        self.out_dir, self.mode = Path(out_dir), mode

    def methods(self) -> dict[str, Path]:
        """The methods whose rows the folder holds: method name -> rows file."""
        found = {}
        for path in sorted(self.out_dir.glob(ROWS_PATTERN)) if self.out_dir.is_dir() else []:
            found[str(read_provenance(path).get("method", path.stem.removeprefix("eval-")))] = path
        return found

    def check(self, names: Sequence[str]) -> None:
        """Raise UsageError if running ``names`` in this mode would mix or replace work."""
        held = self.methods()
        if self.mode == "new" and (held or (self.out_dir / SUMMARY_FILE).exists()):
            raise UsageError(
                f"expected a new or empty evaluation folder, found {len(held)} method(s) in {self.out_dir} "
                f"({', '.join(sorted(held)) or SUMMARY_FILE}); pass --resume to finish that run, --add to evaluate "
                "other methods beside it, or choose another --out"
            )
        again = sorted(set(names) & set(held)) if self.mode == "add" else []
        if again:
            raise UsageError(f"expected --add to bring new methods, found {again} already in {self.out_dir}; "
                             "use --resume to finish them")

    def done(self, name: str) -> pd.DataFrame | None:
        """The rows of method ``name`` that an earlier run left (``resume``), or None."""
        path = self.methods().get(name) if self.mode == "resume" else None
        return read_table(path, ROWS_TABLE) if path is not None else None

    def failed(self) -> set[str]:
        """Question ids listed in the errors file."""
        path = self.out_dir / ERRORS_FILE
        if not path.is_file():
            return set()
        return {json.loads(line)["question_id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}

    def record_error(self, question: Question, error: Exception) -> None:
        """List a question that could not be answered (once, whatever the method)."""
        if question.question_id in self.failed():
            return
        path = self.out_dir / ERRORS_FILE
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        entry = {"question_id": question.question_id, "images": list(question.images),
                 "error": type(error).__name__, "reason": str(error)}
        atomic_write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")

    def summary(self, num_layers: int, order: Sequence[str] = ()) -> pd.DataFrame:
        """One summary line per method the folder holds: those of the folder's earlier summary
        first, then ``order``, then any other, each once."""
        held = self.methods()
        path = self.out_dir / SUMMARY_FILE
        earlier = list(read_provenance(path).get("methods", [])) if path.is_file() else []
        names = [n for n in dict.fromkeys([*earlier, *order, *held]) if n in held]
        return pd.DataFrame([summary_row(name, read_table(held[name], ROWS_TABLE), num_layers) for name in names])


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
    mode: str = "new",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate several methods on one loaded model; (per-question rows, one summary row per method).

    With ``out_dir`` each method's rows go to ``out_dir/eval-<method>.parquet`` after every batch,
    and the summary of every method in the folder to ``out_dir/summary.parquet`` after every
    method, each committed atomically (:func:`write_evaluation_rows`), so a stop loses at most
    the batch being answered. A question that cannot be answered (a missing or unreadable image)
    is listed in ``out_dir/_errors.jsonl`` and the run goes on. ``mode`` (:class:`EvaluationFolder`)
    says whether the folder must be new, is resumed or gets more methods.

    Args:
        provenance: what produced the files (``analysis.loading.provenance``); default: that of
            ``model`` with its current attention path and seed 0. Each file adds its method(s).

    Raises:
        UsageError: two methods of the same name (they would write the same file); a folder that
            ``mode`` does not allow.
    """
    names = [method.name for method in methods]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"expected each method once, found {twice} more than once")
    num_layers = len(resolve_adapter(model).decoder_layers(model))
    base = dict(provenance) if provenance is not None else _default_provenance(model)
    folder = EvaluationFolder(out_dir, mode) if out_dir is not None else None
    if folder is not None:
        folder.check(names)
        failed = folder.failed()
        questions = [q for q in questions if q.question_id not in failed]
    frames = []
    for method in methods:
        keep = (lambda rows, m=method: write_evaluation_rows(rows, out_dir, {**base, **m.provenance()})) if folder else None
        frames.append(evaluate_method(
            model, processor, questions, image_folder, method, max_new_tokens, batch_size,
            progress(method.name) if progress is not None else None,
            done=folder.done(method.name) if folder else None, on_rows=keep,
            on_error=folder.record_error if folder else None,
        ))
        if folder is not None:
            write_evaluation_summary(folder.summary(num_layers, names), out_dir, base)
    summary = pd.DataFrame([summary_row(m.name, f, num_layers) for m, f in zip(methods, frames)])
    return pd.concat(frames, ignore_index=True), summary


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
