"""The main job (`dyvte-stats demo`) and `--model demo`, end to end on the real demo model.

Skipped, with the install command as the reason, where the demo model's wheels are missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from demo_available import requires_demo  # noqa: E402

from analysis.cli import main  # noqa: E402
from analysis.data import Question  # noqa: E402
from analysis.demo.job import one_question_per_image  # noqa: E402
from analysis.demo.shapes import QUESTIONS_FILE, write_split  # noqa: E402
from analysis.io import read_provenance, read_samples, read_statistics  # noqa: E402


def test_one_question_per_image_keeps_file_order_and_the_limit():
    questions = [Question(f"q{i}", (f"{i // 3}.png",), "?") for i in range(9)]  # 3 questions per image
    assert [q.question_id for q in one_question_per_image(questions, 2)] == ["q0", "q3"]
    assert [q.question_id for q in one_question_per_image(questions, 10)] == ["q0", "q3", "q6"]


@requires_demo
def test_demo_command_end_to_end_replaces_its_output_only_when_complete(tmp_path, capsys):
    data, out = tmp_path / "shapes", tmp_path / "runs" / "demo"
    args = ["demo", "--samples", "2", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "for 2 ShapesVQA test samples" in printed and "text->image" in printed
    statistics = read_statistics(out)
    assert statistics["layer"].nunique() == 30  # SmolLM2-135M's decoder
    samples = read_samples(out)
    assert len(samples) == 2 and (samples["n_image"] == 576).all()
    assert read_provenance(next(out.glob("statistics-*.parquet")))["model"] == "demo"
    # the demo records its answer tokens too: at most 4 steps each, and the answer it gave
    answered = statistics[statistics["step"] >= 0]
    assert set(answered["query_group"]) == {"generated"} and answered["step"].max() <= 3
    assert (samples["generated"] != "").all() and "generated->image" in printed
    first = sorted(p.name for p in out.iterdir())

    assert main(args) == 0  # a second run replaces the folder: no doubled samples, no leftovers
    assert sorted(p.name for p in out.iterdir()) == first
    assert len(read_samples(out)) == 2
    assert [p.name for p in out.parent.iterdir()] == ["demo"]


@requires_demo
def test_dump_accepts_model_demo_like_any_checkpoint(tmp_path, capsys):
    split = write_split(tmp_path, "mini", n_images=1, seed=5)
    out = tmp_path / "stats"
    args = ["dump", "--model", "demo", "--questions", str(split / QUESTIONS_FILE), "--image-folder", str(split),
            "--out", str(out), "--limit", "1", "--no-progress", "--quiet"]
    assert main(args) == 0
    assert len(read_samples(out)) == 1
    assert main(args) == 2  # the folder already holds a dump: refused, the first dump kept
    assert "expected a new or empty output folder" in capsys.readouterr().err
    assert len(read_samples(out)) == 1
