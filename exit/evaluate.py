"""Answer a question file with an exit method and score it: accuracy, exit layers, FLOPs, time.

``evaluate_method(model, processor, questions, image_folder, method)`` answers every question by
greedy ``generate()`` (the KV cache on) under the method, in batches of the questions about one
image (left padding, each row its own exit), and returns one row per question:

============================  ================================================================
question_id, category         from the question file
answer, prediction, correct   the reference, the model's answer, exact match
                              (:func:`analysis.shapes.exact_match`: case, articles, number words)
exit_layer                    the layer after which the row's last image token left (-1: some
                              stayed to the end, e.g. FastV without an exit)
tokens, image_tokens          the row's prompt length (no padding) and its image tokens
relative_prefill_flops        decoder prefill FLOPs under the method over the stock model's, from
                              the tokens each layer processed for the row
                              (:func:`exit.flops.prefill_flops_for_counts`)
batch, batch_seconds,         the batch the row was answered in, that batch's wall time for
batch_rows                    generate() (prefill and decoding) and its number of rows
prefill_seconds,              the batch's wall time up to the first next-token scores (vision
decode_seconds, decode_steps  tower and prefill), the rest of generate(), and the decoding
                              forwards in that rest (generated length - 1)
============================  ================================================================

Methods (:func:`parse_method`; the baselines are described in :mod:`exit.baselines`):

=====================  =======================================================================
``none``               the stock model
``static:K``           every row exits after layer K
``vtw`` / ``vtw:K``    VTW: a static exit after the layer :func:`calibrate_vtw` picked (``vtw``
                       takes the calibration result; ``vtw:K`` names the calibrated layer)
``fastv:K:R``          FastV: after layer K each row keeps ceil((1 - R) n_image) image tokens
``dyvte``              the gates decide per row during the prefill
``dyvte+fastv:K:R``    FastV after layer K, and every image token left goes when the gate fires
=====================  =======================================================================
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from analysis.adapters import resolve_adapter
from analysis.data import Question, build_prompt, load_image
from analysis.shapes import exact_match
from exit.baselines import FastV, dyvte_fastv, first_layer_within, vtw_kl_curve
from exit.flops import DecoderShape, prefill_flops, prefill_flops_for_counts
from exit.gates import DyVTEGates, dyvte_exit
from exit.surgery import NO_EXIT, VisualExit, visual_token_exit

__all__ = [
    "METHOD_FORMS",
    "ExitMethod",
    "VTWCalibration",
    "calibrate_vtw",
    "encode_questions",
    "gates_with_tau",
    "evaluate_method",
    "evaluate_methods",
    "parse_method",
    "summarize_evaluation",
    "summary_row",
]

METHOD_FORMS = ("none", "static:K", "vtw", "vtw:K", "fastv:K:R", "dyvte", "dyvte:TAU", "dyvte+fastv:K:R")
"""The method specs :func:`parse_method` accepts."""


@dataclass(frozen=True)
class ExitMethod:
    """How image tokens leave the model.

    ``kind`` is "none", "static" (every image token after ``layer``), "vtw" (the same, at a
    calibrated ``layer``), "fastv" (after ``layer`` keep ``ceil((1 - ratio) n_image)``), "dyvte"
    (``gates``) or "dyvte+fastv" (``gates``, ``layer`` and ``ratio``).
    """

    kind: str
    layer: int | None = None
    gates: DyVTEGates | None = None
    ratio: float | None = None
    tau: float | None = None

    @property
    def name(self) -> str:
        """The method as written on the command line (``static:K``, ``fastv:K:R``, ``dyvte:TAU``, ...)."""
        if self.kind == "dyvte" and self.tau is not None:
            return f"dyvte:{self.tau:g}"
        if self.kind in ("static", "vtw"):
            return f"{self.kind}:{self.layer}"
        if self.kind in ("fastv", "dyvte+fastv"):
            return f"{self.kind}:{self.layer}:{self.ratio:g}"
        return self.kind

    def attached(self, model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> AbstractContextManager[VisualExit | FastV | None]:
        """The context that applies the method to one batch; it yields a handle with ``exit_layers``
        and ``tokens_per_layer()`` (None for the stock model)."""
        if self.kind == "dyvte":
            assert self.gates is not None
            return dyvte_exit(model, self.gates, input_ids, attention_mask)
        if self.kind == "dyvte+fastv":
            assert self.gates is not None and self.layer is not None and self.ratio is not None
            return dyvte_fastv(model, self.gates, input_ids, attention_mask, self.layer, self.ratio)
        if self.kind == "fastv":
            assert self.layer is not None and self.ratio is not None
            return FastV(model, self.layer, self.ratio)
        if self.kind in ("static", "vtw"):
            return visual_token_exit(model, exit_layers=[self.layer] * input_ids.shape[0])
        return _no_exit()


@contextmanager
def _no_exit() -> Iterator[None]:
    yield None


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


def _layer(text: str, spec: str, form: str, num_layers: int, what: str) -> int:
    try:
        layer = int(text)
    except ValueError:
        raise ValueError(f"expected {form!r} with an integer layer K, found {spec!r}") from None
    if not 0 <= layer < num_layers:
        raise ValueError(f"expected the {what} layer in 0..{num_layers - 1}, found {layer}")
    return layer


def _layer_and_ratio(argument: str, spec: str, form: str, num_layers: int) -> tuple[int, float]:
    layer_text, colon, ratio_text = argument.partition(":")
    if not colon:
        raise ValueError(f"expected {form!r} (FastV layer K and pruning ratio R), found {spec!r}")
    layer = _layer(layer_text, spec, form, num_layers, "FastV")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise ValueError(f"expected {form!r} with a number R, found {spec!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"expected the FastV pruning ratio R in [0, 1], found {ratio}")
    return layer, ratio


def parse_method(spec: str, num_layers: int, gates: DyVTEGates | None = None,
                 vtw: VTWCalibration | None = None) -> ExitMethod:
    """One of :data:`METHOD_FORMS` (0 <= K < num_layers, 0 <= R <= 1).

    ``dyvte`` and ``dyvte+fastv:K:R`` need ``gates``; ``vtw`` needs ``vtw`` (from
    :func:`calibrate_vtw`), ``vtw:K`` names the calibrated layer itself.

    Raises:
        ValueError: an unknown method, a layer or ratio out of range, or a missing gates/calibration.
    """
    kind, _, argument = spec.partition(":")
    if kind == "none" and not argument:
        return ExitMethod("none")
    if kind == "dyvte":
        if gates is None:
            raise ValueError("expected gates (--gates FOLDER) for the method 'dyvte', found none")
        if not argument:
            return ExitMethod("dyvte", gates=gates)
        try:
            tau = float(argument)
        except ValueError:
            raise ValueError(f"expected 'dyvte:TAU' with a threshold TAU in [0, 1), found {spec!r}") from None
        if not 0 <= tau < 1:
            raise ValueError(f"expected the DyVTE threshold TAU in [0, 1), found {tau}")
        return ExitMethod("dyvte", gates=gates_with_tau(gates, tau), tau=tau)
    if kind == "static" and argument:
        return ExitMethod("static", layer=_layer(argument, spec, "static:K", num_layers, "static exit"))
    if kind == "vtw":
        if argument:
            return ExitMethod("vtw", layer=_layer(argument, spec, "vtw:K", num_layers, "VTW exit"))
        if vtw is None:
            raise ValueError("expected a VTW calibration (calibrate_vtw) for the method 'vtw', or 'vtw:K', found neither")
        if not 0 <= vtw.layer < num_layers:
            raise ValueError(f"expected the calibrated VTW layer in 0..{num_layers - 1}, found {vtw.layer}")
        return ExitMethod("vtw", layer=vtw.layer)
    if kind == "fastv" and argument:
        layer, ratio = _layer_and_ratio(argument, spec, "fastv:K:R", num_layers)
        return ExitMethod("fastv", layer=layer, ratio=ratio)
    if kind == "dyvte+fastv" and argument:
        layer, ratio = _layer_and_ratio(argument, spec, "dyvte+fastv:K:R", num_layers)
        if gates is None:
            raise ValueError("expected gates (--gates FOLDER) for the method 'dyvte+fastv', found none")
        if gates.config.inputs != "hidden":
            raise ValueError(f"expected gates with inputs='hidden' for 'dyvte+fastv', found {gates.config.inputs!r}")
        return ExitMethod("dyvte+fastv", layer=layer, ratio=ratio, gates=gates)
    forms = ", ".join(repr(form) for form in METHOD_FORMS)
    raise ValueError(f"expected a method {forms}, found {spec!r}")


def gates_with_tau(gates: DyVTEGates, tau: float) -> DyVTEGates:
    """The same gates (shared weights) with another threshold on p(exit)."""
    clone = copy.copy(gates)
    clone.config = replace(gates.config, tau=tau)
    return clone


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
        ValueError: no questions, n < 1 or eta < 0.
    """
    if n < 1:
        raise ValueError(f"expected at least one calibration sample, found n={n}")
    if eta < 0:
        raise ValueError(f"expected eta >= 0, found {eta}")
    chosen = list(questions)[:n]
    if not chosen:
        raise ValueError("expected calibration questions for VTW, found none")
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
        ValueError: a question has no reference answer.
    """
    for question in questions:
        if question.answer is None:
            raise ValueError(f"question {question.question_id!r}: expected a reference answer, found none")
    adapter = resolve_adapter(model)
    image_token_id = adapter.image_token_id(model)
    shape = DecoderShape.from_config(model.config)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_layers = len(adapter.decoder_layers(model))
    rows: list[dict[str, Any]] = []
    batches = list(_batches(questions, batch_size))
    for number, batch in enumerate(progress(batches) if progress is not None else batches):
        inputs = encode_questions(processor, batch, image_folder, device, dtype)
        mask = inputs["attention_mask"]
        clock = _FirstScoresClock()
        start = time.perf_counter()
        with torch.no_grad(), method.attached(model, inputs["input_ids"], mask) as surgery:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
        prefill_end = clock.first if clock.first is not None else end
        decode_steps = int(output.shape[1] - inputs["input_ids"].shape[1]) - 1
        exits = surgery.exit_layers if surgery is not None else [None] * len(batch)
        counts = surgery.tokens_per_layer().tolist() if surgery is not None else None
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for row, (question, answer, exit_layer) in enumerate(zip(batch, answers, exits)):
            tokens = int(mask[row].sum())
            image_tokens = int(((inputs["input_ids"][row] == image_token_id) & mask[row].bool()).sum())
            per_layer = counts[row] if counts is not None else [tokens] * num_layers
            relative = prefill_flops_for_counts(shape, per_layer) / prefill_flops(shape, tokens, image_tokens, None)
            rows.append({
                "question_id": question.question_id,
                "category": question.category or "uncategorised",
                "answer": question.answer,
                "prediction": answer.strip(),
                "correct": exact_match(answer, question.answer or ""),
                "exit_layer": NO_EXIT if exit_layer is None else int(exit_layer),
                "tokens": tokens,
                "image_tokens": image_tokens,
                "relative_prefill_flops": relative,
                "batch": number,
                "batch_seconds": end - start,
                "batch_rows": len(batch),
                "prefill_seconds": prefill_end - start,
                "decode_seconds": end - prefill_end,
                "decode_steps": decode_steps,
            })
    frame = pd.DataFrame(rows)
    frame.insert(0, "method", method.name)
    return frame


def summarize_evaluation(frame: pd.DataFrame, num_layers: int) -> dict[str, Any]:
    """Accuracy overall and per category, exit statistics and relative prefill FLOPs of one method.

    The mean exit layer counts a row that never exits as exiting after the last layer
    (``num_layers - 1``), which costs the same. Times are sums over batches; decoding tokens per
    second counts every row's token of each decoding forward.
    """
    if frame.empty:
        raise ValueError("expected evaluated questions to summarise, found none")
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
    """One line of ``summary.parquet``: :func:`summarize_evaluation` flattened (``accuracy_<category>``)."""
    summary = summarize_evaluation(frame, num_layers)
    accuracy = summary.pop("accuracy")
    return {"method": method, "questions": summary.pop("questions"), "num_layers": num_layers,
            **{f"accuracy_{k}": v for k, v in accuracy.items()}, **summary}


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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate several methods on one loaded model; (per-question rows, one summary row per method).

    With ``out_dir`` each method's rows go to ``out_dir/eval-<method>.parquet`` as soon as the
    method is done (written to a temporary name, then renamed), and the summary to
    ``out_dir/summary.parquet``, so a later failure keeps the finished methods.
    """
    from analysis.adapters import resolve_adapter

    num_layers = len(resolve_adapter(model).decoder_layers(model))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    frames, summaries = [], []
    for method in methods:
        frame = evaluate_method(model, processor, questions, image_folder, method, max_new_tokens, batch_size,
                                progress(method.name) if progress is not None else None)
        summaries.append(summary_row(method.name, frame, num_layers))
        frames.append(frame)
        if out is not None:
            _write_parquet(frame, out / f"eval-{method.name.replace(':', '_')}.parquet")
            _write_parquet(pd.DataFrame(summaries), out / "summary.parquet")
    return pd.concat(frames, ignore_index=True), pd.DataFrame(summaries)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    frame.to_parquet(partial, index=False)
    partial.replace(path)
