"""Evaluation of the demo model (analysis.demo.evaluation), on a tiny LLaVA.

Cheap: a 4-layer hidden-64 model, 28 px images (4 image tokens) and a 6-image ShapesVQA split.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402

from analysis.data import build_prompt, load_image, read_questions  # noqa: E402
from analysis.demo.evaluation import chance_by_type, evaluate_demo, predict_demo  # noqa: E402
from analysis.demo.shapes import QUESTION_TYPES  # noqa: E402
from tests.demo_fixtures import SPEC, split, tiny  # noqa: E402,F401 (fixtures)


def test_cached_prefix_decoding_matches_generate(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")[:8]
    assert len({q.images[0] for q in questions}) < len(questions)  # several questions continue one prefill
    predictions = predict_demo(model, processor, questions, split, max_new_tokens=3, progress=False)
    assert predict_demo(model, processor, questions, split, max_new_tokens=3, progress=False,
                        batch_size=3) == predictions
    for question in questions:
        inputs = processor(images=load_image(split, question.images[0]), text=build_prompt(processor, question),
                           return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert predictions[question.question_id] == expected.strip()


def test_evaluate_demo_reports_every_type_and_limits_images(split, tiny):
    model, processor = tiny
    result = evaluate_demo(model, processor, split, limit=3, max_new_tokens=2, progress=False)
    assert result["images"] == 3 and result["questions"] == len(result["predictions"])
    assert set(result["accuracy"]) <= set(QUESTION_TYPES) | {"overall"} and "overall" in result["accuracy"]
    blank = evaluate_demo(model, processor, split, limit=3, blank_image=True, max_new_tokens=2, progress=False)
    assert blank["blank_image"] and blank["questions"] == result["questions"]
    chance = chance_by_type(split)
    assert chance["uniform"]["exists"] == pytest.approx(0.5) or chance["uniform"]["exists"] == 1.0
    assert 0 < chance["majority"]["overall"] <= 1


def test_questions_with_other_than_one_image_are_refused(split, tiny):
    from dataclasses import replace

    model, processor = tiny
    question = read_questions(split / "questions.jsonl")[0]
    with pytest.raises(ValueError, match="expected one image, found 2"):
        predict_demo(model, processor, [replace(question, images=question.images * 2)], split, progress=False)
