"""ShapesVQA (analysis.demo.shapes): determinism, question types, answers consistent with the scenes,
scoring, and disjoint fixed splits. Small splits, except where scenes alone are cheap."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from analysis.data import read_questions
from analysis.demo.shapes import (
    COLOURS,
    MARKER_FILE,
    QUESTION_TYPES,
    SHAPES,
    SPLITS,
    Scene,
    SceneObject,
    ask,
    ensure_split,
    horizontal_side,
    is_complete,
    read_scenes,
    render_scene,
    scene_for,
    vertical_side,
    write_split,
)

N_IMAGES = 24


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("shapes"), "mini", N_IMAGES, seed=7)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(split, tmp_path):
    again = write_split(tmp_path, "mini", N_IMAGES, seed=7)
    assert _files(again) == _files(split)
    other = write_split(tmp_path / "other", "mini", N_IMAGES, seed=8)
    assert (other / "scenes.jsonl").read_bytes() != (split / "scenes.jsonl").read_bytes()


def test_split_layout_and_marker(split):
    questions = read_questions(split / "questions.jsonl")
    assert len({q.images[0] for q in questions}) == N_IMAGES
    assert all((split / q.images[0]).is_file() for q in questions)
    assert len({q.question_id for q in questions}) == len(questions)
    marker = json.loads((split / MARKER_FILE).read_text())
    assert marker["n_images"] == N_IMAGES and marker["seed"] == 7 and marker["questions"] == len(questions)
    assert is_complete(split, {"seed": 7}) and not is_complete(split, {"seed": 8})
    answers = [json.loads(line) for line in (split / "answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["answer"]) for a in answers] == [(q.question_id, q.answer) for q in questions]


def test_all_question_types_present(split):
    counts = Counter(q.category for q in read_questions(split / "questions.jsonl"))
    assert set(counts) == set(QUESTION_TYPES)


def test_every_image_gets_at_most_one_question_per_type(split):
    per_image = Counter((q.images[0], q.category) for q in read_questions(split / "questions.jsonl"))
    assert max(per_image.values()) == 1


def _matches(question: str, scene: Scene) -> list[SceneObject]:
    """The objects a question names ("the red circle", "the square", "the red object")."""
    words = question.lower().replace("?", " ").split()
    colours = [c for c in COLOURS if c in words]
    shapes = [s for s in SHAPES if s in words or s + "s" in words]
    return [o for o in scene.objects if (not colours or o.colour == colours[0]) and (not shapes or o.shape == shapes[0])]


def test_answers_are_consistent_with_the_scenes(split):
    scenes = read_scenes(split)
    for question in read_questions(split / "questions.jsonl"):
        scene = scenes[question.images[0]]
        named = _matches(question.text, scene)
        if question.category == "count":
            assert question.answer == str(len(named)), question
        elif question.category == "exists":
            assert question.answer == ("yes" if named else "no"), question
        else:  # the question names exactly one object: unambiguous
            assert len(named) == 1, question
            obj = named[0]
            if question.category == "colour":
                assert question.answer == obj.colour
            elif question.category == "shape":
                assert question.answer == obj.shape
            elif question.category == "size":
                assert question.answer == obj.size
            elif question.category == "position":
                side = (horizontal_side if "left" in question.text else vertical_side)(obj, scene.image_size)
                assert question.answer == side


def test_rendered_pixels_show_the_scene():
    scene = scene_for(SPLITS["val"][1], 0)
    image = render_scene(scene)
    for obj in scene.objects:
        x, y = obj.centre
        y += obj.extent / 4 if obj.shape == "triangle" else 0  # the lower part of an upward triangle
        assert image.getpixel((int(x), int(y))) == COLOURS[obj.colour]
    assert image.getpixel((0, 0)) == scene.background


def test_scenes_do_not_overlap_and_stay_inside():
    for index in range(200):
        scene = scene_for(123, index)
        for a in scene.objects:
            x0, y0, x1, y1 = a.bbox
            assert 0 < x0 and 0 < y0 and x1 < scene.image_size and y1 < scene.image_size
            for b in scene.objects:
                if a is not b:
                    bx0, by0, bx1, by1 = b.bbox
                    assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0


def test_exists_answers_are_balanced():
    rng = random.Random(0)
    scene = scene_for(5, 3)
    assert ask(scene, "exists", rng, exists_answer="yes")[1] == "yes"
    text, answer = ask(scene, "exists", rng, exists_answer="no")
    assert answer == "no" and not _matches(text, scene)
    with pytest.raises(ValueError, match="exists_answer"):
        ask(scene, "exists", rng, exists_answer="maybe")
    with pytest.raises(ValueError, match="category"):
        ask(scene, "weight", rng)


def test_fixed_splits_do_not_share_scenes():
    # scenes only (no rendering): cheap even for the 4000 train images
    seen: dict[str, str] = {}
    for name, (n_images, seed) in SPLITS.items():
        for index in range(n_images):
            key = json.dumps(scene_for(seed, index).to_dict(), sort_keys=True)
            assert key not in seen or seen[key] == name, f"{name} image {index} repeats a scene of {seen[key]}"
            seen[key] = name
    assert len({seed for _, seed in SPLITS.values()}) == len(SPLITS)


def test_ensure_split_reuses_a_complete_split(tmp_path, monkeypatch):
    monkeypatch.setitem(SPLITS, "val", (3, SPLITS["val"][1]))
    folder = ensure_split(tmp_path, "val")
    stamp = (folder / "questions.jsonl").stat().st_mtime_ns
    assert ensure_split(tmp_path, "val") == folder
    assert (folder / "questions.jsonl").stat().st_mtime_ns == stamp
    (folder / MARKER_FILE).unlink()  # half-written: regenerated
    ensure_split(tmp_path, "val")
    assert (folder / MARKER_FILE).is_file()
    with pytest.raises(KeyError, match="split"):
        ensure_split(tmp_path, "nonsense")


def test_write_split_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        write_split(tmp_path, "s", 0, seed=1)
    with pytest.raises(ValueError, match="questions_per_image"):
        write_split(tmp_path, "s", 1, seed=1, questions_per_image=7)
    with pytest.raises(ValueError, match="split name"):
        write_split(tmp_path, "../x", 1, seed=1)
