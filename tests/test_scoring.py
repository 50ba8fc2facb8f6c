"""Answer scoring (analysis.scoring): normalisation, exact match, accuracy per question type."""

import pytest

from analysis.data import Question
from analysis.scoring import accuracy_by_type, exact_match, normalise_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Two.", "2"), ("The Circle!", "circle"), ("  RED  ", "red"), ('"yes"', "yes"), ("a square", "square"),
     ("left.", "left"), ("4", "4"), ("the", "the"), ("", "")],
)
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_exact_match_and_accuracy_by_type():
    assert exact_match("Three", "3") and exact_match("Yes.", "yes") and not exact_match("yes no", "yes")
    questions = [
        Question("a", ("x.png",), "q", "red", "colour"),
        Question("b", ("x.png",), "q", "2", "count"),
        Question("c", ("x.png",), "q", "yes", "exists"),
        Question("d", ("x.png",), "q", "no", "exists"),
    ]
    scores = accuracy_by_type({"a": "Red.", "b": "three", "c": "yes"}, questions)  # d has no prediction
    assert scores == {"colour": 1.0, "count": 0.0, "exists": 0.5, "overall": 0.5}
    assert list(scores)[-1] == "overall"
    with pytest.raises(ValueError, match="answer"):
        accuracy_by_type({}, [Question("e", ("x.png",), "q")])
    with pytest.raises(ValueError, match="at least one"):
        accuracy_by_type({}, [])
