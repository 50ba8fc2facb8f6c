"""Question files (LLaVA's JSONL format), images and prompts built with the chat template.

A question file holds one JSON object per line with at least ``question_id``, ``image`` (a
path relative to the image folder; a list of paths for several images) and ``text``. Any
literal "<image>" in the text is removed: images are placed by the chat template, one image part
per image, before the question text. A text that carries "<image>" placeholders must carry one per
image (``check_question``); a text without any is fine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from analysis.errors import DyVTEError, UsageError

IMAGE_PLACEHOLDER = "<image>"


class DataError(DyVTEError, ValueError):
    """A question file, question or image is not what the toolkit expects."""


@dataclass(frozen=True)
class Question:
    """One line of a question file."""

    question_id: str
    images: tuple[str, ...]
    text: str
    answer: str | None = None
    category: str | None = None
    placeholders: int = 0  # literal "<image>" placeholders in the file's text (removed from ``text``)


def parse_question(line: str, where: str, require_image: bool = True) -> Question:
    """Parse one JSONL line; ``where`` names the file and line for error messages.

    With ``require_image=False`` a question without an image is returned with ``images=()``
    (``check_question`` then rejects it as one bad sample) instead of failing the whole file.
    """
    try:
        entry: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: expected a JSON object, found invalid JSON ({error})") from error
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(entry).__name__}")
    missing = [key for key in ("question_id", "text") if key not in entry]
    if missing:
        raise DataError(f"{where}: expected keys question_id, image and text, missing {missing}")
    images = entry.get("image")
    if images is None or images == "" or images == []:
        if require_image:
            raise DataError(f"{where}: {_no_image_reason(str(entry['question_id']))}")
        images = ()
    images = (images,) if isinstance(images, str) else tuple(images)
    raw_text = str(entry["text"])
    text = raw_text.replace(IMAGE_PLACEHOLDER, "").strip()
    answer = entry.get("answer")
    return Question(
        question_id=str(entry["question_id"]),
        images=tuple(str(i) for i in images),
        text=text,
        answer=None if answer is None else str(answer),
        category=entry.get("category") or entry.get("question_type"),
        placeholders=raw_text.count(IMAGE_PLACEHOLDER),
    )


def _no_image_reason(question_id: str) -> str:
    return (
        f"question {question_id!r} has no image; expected an 'image' path "
        "(or a list of paths) relative to the image folder"
    )


def check_question(question: Question) -> None:
    """Reject a question that cannot become a sample: no image, or "<image>" placeholders in its
    text that do not match its images one to one.

    Raises:
        DataError: saying what was expected and what was found.
    """
    if not question.images:
        raise DataError(_no_image_reason(question.question_id))
    if question.placeholders and question.placeholders != len(question.images):
        raise DataError(
            f"question {question.question_id!r}: expected one <image> placeholder per image (or none), "
            f"found {question.placeholders} placeholder(s) for {len(question.images)} image(s)"
        )


def read_questions(path: str | Path, limit: int | None = None, require_image: bool = True) -> list[Question]:
    """Read a LLaVA-format question file (JSONL); blank lines are skipped.

    ``require_image=False`` lets questions without an image through (see ``parse_question``), for
    callers that reject bad samples one by one. A UTF-8 byte-order mark is accepted.

    Raises:
        UsageError: ``limit`` below 1.
        FileNotFoundError: no file at ``path``.
        DataError: a line is not a valid question, or the file holds no question.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise UsageError(f"expected a limit of at least 1 question, found {limit}")
    if not path.is_file():
        raise FileNotFoundError(f"expected a question file (JSONL) at {path}, found nothing there")
    questions: list[Question] = []
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a UTF-8 byte-order mark some editors write
        for number, line in enumerate(handle, start=1):
            if line.strip():
                questions.append(parse_question(line, f"{path}:{number}", require_image))
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise DataError(f"{path}: expected at least one question (one JSON object per line), found none")
    return questions


def load_image(image_folder: str | Path, name: str) -> Image.Image:
    """Open an image as RGB.

    Raises:
        DataError: the file is missing or not a readable image.
    """
    path = Path(image_folder) / name
    if not path.is_file():
        raise DataError(f"expected an image at {path} (image folder {image_folder}, name {name!r}), found no file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"expected a readable image at {path}, found an unreadable file ({error})") from error


def conversation(question: Question) -> list[dict[str, Any]]:
    """The chat-template conversation of a question: its images, then its text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in question.images]
    content.append({"type": "text", "text": question.text})
    return [{"role": "user", "content": content}]


def build_prompt(processor: Any, question: Question) -> str:
    """The prompt text of a question, rendered with the processor's chat template.

    Raises:
        DataError: the processor has no chat template.
    """
    if not getattr(processor, "chat_template", None):
        raise DataError(
            f"expected a processor with a chat template, found {type(processor).__name__} without one; "
            "set processor.chat_template or use a checkpoint that ships one"
        )
    return processor.apply_chat_template(conversation(question), add_generation_prompt=True)


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


@dataclass
class PreparedBatch:
    """Model inputs of the good questions of one batch, and the bad ones with their errors."""

    questions: list[Question]
    inputs: dict[str, Any] | None  # the processor's tensors
    failed: list[tuple[Question, Exception]]


def load_question(processor: Any, question: Question, image_folder: str | Path) -> tuple[list[Image.Image], str]:
    """A question's images (RGB) and its chat-template prompt.

    Raises:
        DataError: naming the question: it has no image, its placeholders do not match its images,
            an image is missing or unreadable, or the processor has no chat template.
    """
    check_question(question)
    try:
        images = [load_image(image_folder, name) for name in question.images]
    except DataError as error:
        raise DataError(f"question {question.question_id!r}: {error}") from error
    return images, build_prompt(processor, question)


def prepare_batch(
    processor: Any,
    batch: Sequence[Question],
    image_folder: str | Path,
    image_token_id: int,
    max_tokens: int | None,
    **processor_options: Any,
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
            images, prompt = load_question(processor, question, image_folder)
            good.append((question, images, prompt))
        except DataError as error:
            failed.append((question, error))
    while good:
        try:
            inputs = processor(
                images=[images for _, images, _ in good],  # per prompt: a flat list is one sample to some families
                text=[prompt for _, _, prompt in good],
                return_tensors="pt",
                padding=True,
                **processor_options,
            )
        except (ValueError, TypeError, OSError) as error:
            if len(good) == 1:
                failed.append((good[0][0], DataError(f"question {good[0][0].question_id!r}: the processor rejected it: {error}")))
                good = []
                break
            kept = []
            for item in good:  # find the culprit(s) one by one
                one = prepare_batch(processor, [item[0]], image_folder, image_token_id, max_tokens, **processor_options)
                if one.failed:
                    failed.extend(one.failed)
                else:
                    kept.append(item)
            if len(kept) == len(good):  # each question alone is fine, the batch is not: never retry it
                reason = (f"the processor takes it alone but rejected its batch of {len(good)}: {error}; "
                          "run with --batch-size 1")
                failed.extend((q, DataError(f"question {q.question_id!r}: {reason}")) for q, _, _ in good)
                good = []
                break
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
    real = mask.bool() if mask is not None else ids == ids
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


def encode_questions(processor: Any, questions: Sequence[Question], image_folder: str | Path,
                     device: Any = "cpu", dtype: Any = None) -> dict[str, Any]:
    """Model inputs for ``questions`` as one left-padded batch: chat-template prompts
    (:func:`build_prompt`) and their images, on ``device``, with ``pixel_values`` in ``dtype``
    (None: the processor's, float32).

    Raises:
        DataError: an image is missing or unreadable, or the processor has no chat template.
    """
    images = [[load_image(image_folder, name) for name in question.images] for question in questions]  # per prompt
    prompts = [build_prompt(processor, question) for question in questions]
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = {key: value.to(device) for key, value in inputs.items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
