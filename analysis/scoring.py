"""Scoring answers: normalisation and exact match, per question and per question type.

Used by every evaluation (the exit module's ``dyvte-exit eval``, the demo model's checks): a
prediction is right when it equals the reference answer after :func:`normalise_answer`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from analysis.data import Question

NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
_EDGE_PUNCTUATION = ".,!?;:\"'`()[]{}"


def normalise_answer(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and trailing punctuation, drop a
    leading article, and write number words as digits ("Two." -> "2", "The Circle!" -> "circle")."""
    words = text.lower().split()
    words = [w.strip(_EDGE_PUNCTUATION) for w in words]
    words = [w for w in words if w]
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer after :func:`normalise_answer` on both."""
    return normalise_answer(prediction) == normalise_answer(answer)


def accuracy_by_type(predictions: Mapping[str, str], questions: Iterable[Question]) -> dict[str, float]:
    """Exact-match accuracy per category (question type) and ``"overall"`` (over all questions).

    A question without a prediction counts as wrong; a question without a category is counted
    under ``"uncategorised"``.

    Raises:
        ValueError: a question has no answer, or there are no questions.
    """
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for question in questions:
        if question.answer is None:
            raise ValueError(f"question {question.question_id!r}: expected an answer to score against, found none")
        category = question.category or "uncategorised"
        prediction = predictions.get(question.question_id)
        hit = prediction is not None and exact_match(prediction, question.answer)
        for key in (category, "overall"):
            total[key] += 1
            correct[key] += hit
    if not total:
        raise ValueError("expected at least one question to score, found none")
    return {key: correct[key] / total[key] for key in sorted(total, key=lambda k: (k == "overall", k))}
