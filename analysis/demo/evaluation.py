"""Evaluation of the demo model on ShapesVQA: greedy answers, accuracy per question type, chance levels.

:func:`evaluate_demo` is greedy decoding of a few tokens for single-turn questions (as the
command line prompts); the key/value cache of the shared prefix (system turn, image tokens) is
computed once per image and all its questions continue from it as one batch
(:func:`predict_demo`), which gives the same tokens as ``generate()`` on each full prompt
(tested) at a fraction of the cost. :func:`chance_by_type` gives the reference levels (uniform
guessing, always the most frequent answer) of the same questions.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.data import Question, build_prompt, load_image, read_questions
from analysis.demo.inputs import cache_keyword, expand_image_tokens, image_seq_length, pad_token_id, tokenize
from analysis.scoring import accuracy_by_type

__all__ = ["chance_by_type", "evaluate_demo", "predict_demo"]


def _padded_suffixes(suffixes: Sequence[list[int]], prefix_length: int,
                     pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask (prefix included) and position ids of left-padded suffixes."""
    rows, width = len(suffixes), max(len(suffix) for suffix in suffixes)
    step_ids = torch.full((rows, width), pad_token_id)
    mask = torch.zeros((rows, prefix_length + width), dtype=torch.long)
    mask[:, :prefix_length] = 1
    positions = torch.full((rows, width), prefix_length)
    for row, suffix in enumerate(suffixes):
        step_ids[row, width - len(suffix):] = torch.tensor(suffix)
        mask[row, prefix_length + width - len(suffix):] = 1
        positions[row, width - len(suffix):] = prefix_length + torch.arange(len(suffix))
    return step_ids, mask, positions


@torch.inference_mode()
def _greedy_branches(model: nn.Module, prefill_cache: Any, prefix_length: int, suffixes: Sequence[list[int]],
                     max_new_tokens: int, eos: set[int], keyword: str, pad_token_id: int) -> list[list[int]]:
    """Greedy continuations of several prompts that share a prefilled prefix, as one batch.

    The suffixes are left-padded after the prefix; their position ids are given explicitly
    (the prefix length plus the token's index in its own suffix) and the pads are masked, so
    each row sees the same keys at the same positions as its prompt alone would (the causal
    mask follows the cache's slots, the rotary phases the position ids).
    """
    rows = len(suffixes)
    cache = copy.deepcopy(prefill_cache)
    cache.batch_repeat_interleave(rows)
    step_ids, mask, positions = _padded_suffixes(suffixes, prefix_length, pad_token_id)
    next_position = torch.tensor([prefix_length + len(suffix) for suffix in suffixes])
    tokens: list[list[int]] = [[] for _ in suffixes]
    finished = [False] * rows
    for _ in range(max_new_tokens):
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{keyword: cache})
        cache = output.past_key_values
        chosen = output.logits[:, -1].argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not finished[row]:
                finished[row] = token in eos
                if not finished[row]:
                    tokens[row].append(token)
        if all(finished):
            break
        step_ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], dim=1)
        positions = next_position[:, None].clone()
        next_position += 1
    return tokens


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    eos_ids = model.generation_config.eos_token_id
    return set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}


def _group_by_image(questions: Sequence[Question], blank_image: bool) -> dict[str, list[Question]]:
    """Questions by their image (all in one group with ``blank_image``).

    Raises:
        ValueError: a question has other than one image.
    """
    groups: dict[str, list[Question]] = {}
    for question in questions:
        if len(question.images) != 1:
            raise ValueError(f"question {question.question_id!r}: expected one image, found {len(question.images)}")
        groups.setdefault("blank" if blank_image else question.images[0], []).append(question)
    return groups


def _shared_prefix(encoded: Sequence[list[int]], image_token_id: int) -> int:
    """The length of the prefix up to and including the last image token, which all prompts share.

    Raises:
        ValueError: the prompts differ before the end of the image tokens.
    """
    prefix_length = max(i for i, t in enumerate(encoded[0]) if t == image_token_id) + 1
    prefix = encoded[0][:prefix_length]
    for ids in encoded:
        if ids[:prefix_length] != prefix:
            raise ValueError("expected the prompts of one image to share the prefix up to the image tokens")
    return prefix_length


@torch.inference_mode()
def predict_demo(model: nn.Module, processor: Any, questions: Sequence[Question], image_folder: str | Path,
                 blank_image: bool = False, max_new_tokens: int = 4, progress: bool = True,
                 batch_size: int = 32) -> dict[str, str]:
    """Greedy answers (``max_new_tokens`` at most) to single-turn questions, keyed by question_id.

    Questions about the same image share one prefill of the prompt up to the image tokens; they
    continue from it in batches of at most ``batch_size`` (:func:`_greedy_branches`), which gives
    the tokens of ``generate()`` on each full prompt (tested). With ``blank_image`` every image is
    replaced by a plain white square of the same size (one prefill for all questions).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    image_token_id = int(model.config.image_token_id)
    n_image_tokens = image_seq_length(model, processor)
    eos = _eos_ids(model, processor.tokenizer)
    pad = pad_token_id(processor.tokenizer)
    keyword = cache_keyword(model)
    groups = _group_by_image(questions, blank_image)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(questions), desc="blank" if blank_image else "eval", disable=not progress)
    for group in groups.values():
        image = load_image(image_folder, group[0].images[0])
        if blank_image:
            image = Image.new("RGB", image.size, (255, 255, 255))
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        encoded = [expand_image_tokens(tokenize(processor, build_prompt(processor, q)), image_token_id,
                                       n_image_tokens) for q in group]
        prefix_length = _shared_prefix(encoded, image_token_id)
        prefill = model(input_ids=torch.tensor([encoded[0][:prefix_length]]), pixel_values=pixels, use_cache=True)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            answers = _greedy_branches(model, prefill.past_key_values, prefix_length,
                                       [ids[prefix_length:] for ids in encoded[start:start + batch_size]],
                                       max_new_tokens, eos, keyword, pad)
            for question, tokens in zip(chunk, answers):
                predictions[question.question_id] = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    bar.close()
    return predictions


def _first_images(questions: list[Question], limit: int | None) -> list[Question]:
    """The questions about the first ``limit`` images (by image path), all if ``limit`` is None."""
    if limit is None:
        return questions
    keep = set(sorted({q.images[0] for q in questions})[:limit])
    return [q for q in questions if q.images[0] in keep]


def evaluate_demo(model: nn.Module, processor: Any, split_folder: str | Path, limit: int | None = None,
                  blank_image: bool = False, max_new_tokens: int = 4, progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy per question type on a ShapesVQA split folder.

    Args:
        limit: use the questions of the first ``limit`` images only (every image has up to one
            question per type, so the subset stays stratified).
        blank_image: answer with a plain white image instead of each question's image.

    Returns:
        ``{"accuracy": {type: acc, ..., "overall": acc}, "counts": {type: n}, "questions": n,
        "images": n, "blank_image": bool, "seconds": s, "predictions": {question_id: text}}``.
    """
    folder = Path(split_folder)
    questions = _first_images(read_questions(folder / "questions.jsonl"), limit)
    start = time.time()
    predictions = predict_demo(model, processor, questions, folder, blank_image, max_new_tokens, progress)
    counts = Counter(q.category or "uncategorised" for q in questions)
    return {
        "accuracy": accuracy_by_type(predictions, questions),
        "counts": dict(sorted(counts.items())) | {"overall": len(questions)},
        "questions": len(questions),
        "images": len({q.images[0] for q in questions}),
        "blank_image": blank_image,
        "seconds": round(time.time() - start, 1),
        "predictions": predictions,
    }


def chance_by_type(split_folder: str | Path, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Reference levels per type: uniform guessing among the answers seen, and always answering
    the most frequent answer of that type (``{"uniform": {...}, "majority": {...}}``)."""
    questions = _first_images(read_questions(Path(split_folder) / "questions.jsonl"), limit)
    answers: dict[str, Counter[str]] = {}
    for question in questions:
        answers.setdefault(question.category or "uncategorised", Counter())[question.answer or ""] += 1
    uniform = {k: 1 / len(v) for k, v in sorted(answers.items())}
    majority = {k: max(v.values()) / sum(v.values()) for k, v in sorted(answers.items())}
    total = sum(sum(v.values()) for v in answers.values())
    majority["overall"] = sum(max(v.values()) for v in answers.values()) / total
    uniform["overall"] = sum(sum(v.values()) / len(v) for v in answers.values()) / total
    return {"uniform": uniform, "majority": majority}
