"""Evaluation folders never lose work: a folder holding an evaluation is refused unless resumed or
added to; a stopped evaluation resumes to the uninterrupted result; bad questions are listed and
the run goes on; rows are on disk after every batch."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis.data import read_questions  # noqa: E402
from analysis.demo.shapes import write_split  # noqa: E402
from analysis.errors import UsageError  # noqa: E402
from analysis.io import read_table  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava, tiny_llava, tiny_processor  # noqa: E402
from exit.evaluate import ERRORS_FILE, EvaluationFolder, evaluate_methods  # noqa: E402
from exit.methods import parse_method  # noqa: E402
from exit.plots import read_evaluation  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)
ANSWER_COLUMNS = ["method", "question_id", "prediction", "correct", "exit_layer", "relative_prefill_flops"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("shapes"), "val", 4, seed=3, image_size=84)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(SPEC), tiny_processor(SPEC.image_size)


def methods(*specs: str):
    return [parse_method(spec, SPEC.num_layers) for spec in specs]


def run(tiny, split, out, specs, mode="new", questions=None):
    model, processor = tiny
    questions = questions if questions is not None else read_questions(split / "questions.jsonl")
    return evaluate_methods(model, processor, questions, split, methods(*specs), out, batch_size=4, mode=mode)


def answers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[ANSWER_COLUMNS].sort_values(["method", "question_id"]).reset_index(drop=True)


def test_a_second_evaluation_into_the_same_folder_is_refused(tiny, split, tmp_path):
    run(tiny, split, tmp_path, ["none"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UsageError, match="expected a new or empty evaluation folder, found 1 method"):
        run(tiny, split, tmp_path, ["static:1"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced
    with pytest.raises(UsageError, match=r"expected --add to bring new methods, found \['none'\] already"):
        run(tiny, split, tmp_path, ["none"], mode="add")


def test_add_puts_new_methods_beside_the_old_ones(tiny, split, tmp_path):
    first_rows, _ = run(tiny, split, tmp_path, ["none"])
    run(tiny, split, tmp_path, ["static:1", "fastv:1:0.5"], mode="add")
    rows, summary = read_evaluation(tmp_path)
    assert list(summary["method"]) == ["none", "static:1", "fastv:1:0.5"]
    assert answers(rows[rows.method == "none"]).equals(answers(first_rows))  # the old method's rows kept


def test_a_stopped_evaluation_resumes_to_the_uninterrupted_result(tiny, split, tmp_path):
    full_rows, full_summary = run(tiny, split, tmp_path / "full", ["none", "static:1"])
    # A run stopped in its second method after one batch: "none" finished, "static:1" has one batch.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", stopped)
    rows = read_table(stopped / "eval-static_1.parquet", "evaluation")
    one_batch = rows[rows.batch == rows.batch.min()]
    assert 0 < len(one_batch) < len(rows)
    from analysis.io import read_provenance
    from exit.evaluate import write_evaluation_rows

    write_evaluation_rows(one_batch, stopped, read_provenance(stopped / "eval-static_1.parquet"))
    (stopped / "summary.parquet").unlink()
    with pytest.raises(UsageError, match="pass --resume"):
        run(tiny, split, stopped, ["none", "static:1"])
    resumed_rows, resumed_summary = run(tiny, split, stopped, ["none", "static:1"], mode="resume")
    assert answers(resumed_rows).equals(answers(full_rows))
    assert not resumed_rows.duplicated(["method", "question_id"]).any()
    on_disk, summary = read_evaluation(stopped)
    assert answers(on_disk).equals(answers(full_rows))
    assert list(summary["method"]) == ["none", "static:1"]
    assert summary["accuracy_overall"].tolist() == full_summary["accuracy_overall"].tolist()
    again, _ = run(tiny, split, stopped, ["none", "static:1"], mode="resume")  # nothing left to do
    assert answers(again).equals(answers(full_rows))


def test_bad_questions_are_listed_and_the_evaluation_goes_on(tiny, split, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(split, images)
    questions = read_questions(split / "questions.jsonl")
    last_image = questions[-1].images[0]
    (images / last_image).write_bytes(b"\x89PNG truncated")
    rows, summary = run(tiny, images, tmp_path / "out", ["none", "static:1"], questions=questions)
    broken = {q.question_id for q in questions if q.images[0] == last_image}
    assert broken and set(rows["question_id"]) == {q.question_id for q in questions} - broken
    lines = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert {entry["question_id"] for entry in lines} == broken  # each listed once, not once per method
    assert all("expected a readable image at" in entry["reason"] for entry in lines)
    assert all(f"question {entry['question_id']!r}" in entry["reason"] for entry in lines)
    assert EvaluationFolder(tmp_path / "out").failed() == broken


def test_rows_are_on_disk_after_every_batch(tiny, split, tmp_path):
    seen: list[int] = []
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")

    import exit.evaluate as evaluate

    original = evaluate.write_evaluation_rows

    def spy(frame, out_dir, provenance):
        path = original(frame, out_dir, provenance)
        seen.append(len(read_table(path, "evaluation")))
        return path

    evaluate.write_evaluation_rows = spy
    try:
        evaluate_methods(model, processor, questions, split, methods("none"), tmp_path, batch_size=4)
    finally:
        evaluate.write_evaluation_rows = original
    assert len(seen) > 1 and seen == sorted(seen) and seen[-1] == len(questions)


def test_eval_command_line_refuses_the_folder_before_loading_and_adds(tmp_path, split, capsys, monkeypatch):
    from exit.cli import main as exit_main

    model_dir = save_tiny_llava(tmp_path / "model", SPEC)
    base = ["eval", "--model", str(model_dir), "--questions", str(split / "questions.jsonl"),
            "--image-folder", str(split), "--out", str(tmp_path / "eval"), "--no-progress", "--limit", "4"]
    assert exit_main([*base, "--method", "none"]) == 0
    import analysis.loading

    loaded = analysis.loading.load_model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was refused")

    monkeypatch.setattr(analysis.loading, "load_model", no_loading)
    capsys.readouterr()
    assert exit_main([*base, "--method", "static:1"]) == 2
    err = capsys.readouterr().err
    assert "expected a new or empty evaluation folder" in err and "--add" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(analysis.loading, "load_model", loaded)
    assert exit_main([*base, "--method", "static:1", "--add"]) == 0
    assert exit_main(["figures", str(tmp_path / "eval"), "--out", str(tmp_path / "figures")]) == 0
    _, summary = read_evaluation(tmp_path / "eval")
    assert list(summary["method"]) == ["none", "static:1"]
