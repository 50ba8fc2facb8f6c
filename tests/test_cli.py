"""The command line end to end on a tiny model saved to a folder with a locally built processor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from analysis.cli import main
from analysis.io import read_provenance, read_samples, read_statistics
from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec(num_kv_heads=2))


def write_questions(folder: Path, entries: list[dict]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (32 + 8 * i, 32), colour).save(images / f"{i}.png")
    entries = [
        {"question_id": 1, "image": "0.png", "text": "<image>\nWhat colour is it?"},
        {"question_id": 2, "image": "1.png", "text": "Is it green?"},
        {"question_id": 3, "image": ["1.png", "2.png"], "text": "Which is wider?"},
    ]
    return write_questions(tmp_path, entries), images


def dump_args(model_dir, questions, images, out, *extra):
    return ["dump", "--model", str(model_dir), "--questions", str(questions), "--image-folder", str(images), "--out", str(out), "--no-progress", *extra]


def test_dump_validate_summary_end_to_end(model_dir, dataset, tmp_path, capsys):
    questions, images = dataset
    out = tmp_path / "stats"
    assert main(dump_args(model_dir, questions, images, out, "--batch-size", "2", "--heads", "all")) == 0
    stats = read_statistics(out)
    assert set(stats["sample_id"]) == {"1", "2", "3"}
    assert set(stats["head"]) == {0, 1, 2, 3} and set(stats["layer"]) == {0, 1, 2, 3}
    samples = read_samples(out).set_index("sample_id")
    assert samples.loc["3", "n_image"] == 8 and list(samples.loc["3", "images"]) == ["1.png", "2.png"]
    assert samples.loc["1", "question"] == "What colour is it?"
    provenance = read_provenance(next(out.glob("statistics-*.parquet")))
    assert provenance["attention_path"] == "sdpa" and provenance["model"] == str(model_dir)
    assert {"torch", "transformers", "git_revision", "dtype", "seed"} <= set(provenance)
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    assert main(["summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text->image" in printed and "last->image" in printed


def test_dump_generate_records_each_answer_tokens_attention(model_dir, dataset, tmp_path, capsys):
    from analysis.stages import answer_curves, detect_dataset_stages, prompt_rows
    from analysis.vocabulary import GENERATED, PROMPT_STEP

    questions, images = dataset
    assert main(dump_args(model_dir, questions, images, tmp_path / "prompt", "--quiet")) == 0
    assert main(dump_args(model_dir, questions, images, tmp_path / "answers", "--generate", "3", "--batch-size", "2")) == 0
    assert "generated->image" in capsys.readouterr().out  # the summary shows where the answer looks
    stats, samples = read_statistics(tmp_path / "answers"), read_samples(tmp_path / "answers").set_index("sample_id")
    generated = stats[stats["step"] != PROMPT_STEP]
    assert set(generated["query_group"]) == {GENERATED}
    counts = []
    for sample, row in samples.iterrows():  # one step per answer token (at most 3; fewer where the answer ended)
        steps = sorted(generated[generated["sample_id"] == sample]["step"].unique())
        assert steps == list(range(len(steps))) and len(steps) <= 3 and (steps or row["generated"] == "")
        counts.append(len(steps))
    assert max(counts) > 0
    assert read_provenance(next((tmp_path / "answers").glob("statistics-*.parquet")))["generate"] == 3
    # the prompt's rows are those of a dump without --generate (left padding changes only rounding)
    plain, prompt = (f.sort_values(["sample_id", "layer", "head", "query_group", "key_group"]).reset_index(drop=True)
                     for f in (read_statistics(tmp_path / "prompt"), prompt_rows(stats)))
    assert plain[["sample_id", "layer", "query_group", "key_group"]].equals(prompt[["sample_id", "layer", "query_group", "key_group"]])
    assert (plain["mass"] - prompt["mass"]).abs().max() < 1e-5
    assert detect_dataset_stages(stats).consensus_stages() == detect_dataset_stages(plain).consensus_stages()
    assert set(answer_curves(stats).columns) >= {f"{GENERATED}->image", f"{GENERATED}->{GENERATED}"}
    assert main(["plot", str(tmp_path / "answers"), "--kind", "answer", "--out", str(tmp_path / "answer.png")]) == 0
    assert (tmp_path / "answer.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "prompt"), "--kind", "answer", "--out", str(tmp_path / "none.png")]) == 2
    assert "dump --generate" in capsys.readouterr().err
    # a resumed dump must keep the setting
    assert main(dump_args(model_dir, questions, images, tmp_path / "answers", "--resume")) == 2
    assert "generate=3 (now 0)" in capsys.readouterr().err


def test_eager_and_sdpa_dumps_agree(model_dir, dataset, tmp_path):
    questions, images = dataset
    for path in ("sdpa", "eager"):
        assert main(dump_args(model_dir, questions, images, tmp_path / path, "--attn", path, "--quiet")) == 0
    sdpa, eager = (read_statistics(tmp_path / p) for p in ("sdpa", "eager"))
    assert sdpa[["sample_id", "layer", "query_group", "key_group"]].equals(eager[["sample_id", "layer", "query_group", "key_group"]])
    assert (sdpa["mass"] - eager["mass"]).abs().max() < 1e-5
    assert read_provenance(tmp_path / "eager" / "statistics-00000.parquet")["attention_path"] == "eager"


def test_python_dash_m_entry_point(model_dir, dataset, tmp_path):
    questions, images = dataset
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "analysis", *dump_args(model_dir, questions, images, tmp_path / "s", "--limit", "1")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 48 rows for 1 samples" in result.stdout  # 4 layers x 1 head row x 4 x 3 groups
    help_text = subprocess.run([sys.executable, "-m", "analysis", "dump", "--help"], capture_output=True, text=True).stdout
    assert "examples:" in help_text and "--image-folder" in help_text


def test_missing_image_fails_before_any_work(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path, [{"question_id": "q", "image": "nope.png", "text": "?"}])
    assert main(dump_args(model_dir, questions, tmp_path, tmp_path / "out", "--fail-fast")) == 2
    assert "expected an image at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreadable_image_mid_run_keeps_finished_batches(model_dir, dataset, tmp_path, capsys):
    questions, images = dataset
    (images / "2.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(dump_args(model_dir, questions, images, out, "--fail-fast")) == 2
    assert "expected a readable image" in capsys.readouterr().err
    assert set(read_statistics(out)["sample_id"]) == {"1", "2"}  # the batches before the bad one


def test_question_without_image_is_a_clear_error(model_dir, tmp_path, capsys):
    questions = write_questions(tmp_path, [{"question_id": "q7", "text": "What is this?"}])
    assert main(dump_args(model_dir, questions, tmp_path, tmp_path / "out")) == 2
    assert "question 'q7' has no image" in capsys.readouterr().err


def test_unknown_model_type_lists_the_supported_ones(tmp_path, dataset, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "llama")
    questions, images = dataset
    assert main(dump_args(tmp_path / "llama", questions, images, tmp_path / "out")) == 2
    from analysis.adapters import supported_model_types

    assert f"unsupported model type 'llama': expected one of {supported_model_types()}" in capsys.readouterr().err


def test_model_whose_image_token_id_the_prompts_never_contain(model_dir, tmp_path, dataset, capsys):
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["image_token_index"] = 250  # a byte token that no image placeholder expands to
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    questions, images = dataset
    assert main(dump_args(tmp_path / "m", questions, images, tmp_path / "out")) == 2
    assert "has no image token: expected at least one token with the image token id 250" in capsys.readouterr().err


def test_adapter_without_an_image_token_field_is_a_clear_error():
    from types import SimpleNamespace

    from analysis.adapters import UnsupportedModelError, resolve_adapter

    model = SimpleNamespace(config=SimpleNamespace(model_type="llava"))
    with pytest.raises(UnsupportedModelError, match="expected an image token id in one of the config fields"):
        resolve_adapter(model).image_token_id(model)


def test_validate_rejects_a_corrupt_file(tmp_path, capsys):
    (tmp_path / "statistics-00000.parquet").write_bytes(b"garbage")
    assert main(["validate", str(tmp_path)]) == 2
    assert "statistics-00000.parquet: expected a readable parquet file" in capsys.readouterr().err


# dyvte-exit ----------------------------------------------------------------------------------


def answered_questions(folder: Path) -> tuple[Path, Path]:
    images = folder / "answered-images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "0.png")
    entries = [{"question_id": i, "image": "0.png", "text": "What colour is it?", "answer": "red"} for i in range(2)]
    questions = folder / "answered.jsonl"
    questions.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return questions, images


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any command loads model weights (analysis.loading.load_model)."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("analysis.loading.load_model", load_model)


@pytest.mark.parametrize("methods, message", [
    (["static:99"], "expected the layer K of 'static:99' in 0..3 (the model has 4 decoder layers), found 99"),
    (["fastv:99:0.5"], "expected the layer K of 'fastv:99:0.5' in 0..3"),
    (["dyvte:1.5"], "expected 'dyvte:TAU' with a number TAU in [0, 1)"),
    (["fastv:2"], "expected a method of the form 'fastv:K:R', found 'fastv:2'"),
    (["foo"], "unknown exit method kind 'foo' in 'foo': expected a method of one of the kinds ['none', 'static', 'vtw', "
              "'fastv', 'dyvte', 'dyvte+fastv']"),
    (["static:1,static:1"], "expected each method once, found ['static:1'] more than once"),
    (["none", "static:1", "none"], "expected each method once, found ['none'] more than once"),
    (["dyvte"], "expected --gates FOLDER for the methods 'dyvte', found none"),
    (["vtw"], "expected --calibration-questions"),
])
def test_exit_eval_rejects_bad_methods_before_the_model_loads(model_dir, tmp_path, capsys, no_model_loading,
                                                              methods, message):
    from exit.cli import main as exit_main

    questions, images = answered_questions(tmp_path)
    method_options = [option for method in methods for option in ("--method", method)]
    code = exit_main(["eval", "--model", str(model_dir), "--questions", str(questions), "--image-folder", str(images),
                      *method_options, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dyvte-exit eval: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_exit_eval_rejects_questions_without_answers_before_the_model_loads(model_dir, dataset, capsys,
                                                                             no_model_loading):
    from exit.cli import main as exit_main

    questions, images = dataset
    assert exit_main(["eval", "--model", str(model_dir), "--questions", str(questions), "--image-folder", str(images),
                      "--method", "none"]) == 2
    assert "question '1': expected a reference answer, found none" in capsys.readouterr().err


def test_exit_eval_names_a_missing_checkpoint_in_one_line(tmp_path, capsys, no_model_loading):
    from exit.cli import main as exit_main

    questions, images = answered_questions(tmp_path)
    assert exit_main(["eval", "--model", str(tmp_path / "absent"), "--questions", str(questions),
                      "--image-folder", str(images), "--method", "none"]) == 2
    err = capsys.readouterr().err
    assert "expected --model to name a checkpoint" in err and len(err.strip().splitlines()) == 1


def test_exit_eval_entry_point_answers_a_bad_method_in_one_line_without_loading(model_dir, tmp_path):
    questions, images = answered_questions(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "exit.cli", "eval", "--model", str(model_dir), "--questions", str(questions),
         "--image-folder", str(images), "--method", "static:99"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "dyvte-exit eval: error: expected the layer K of 'static:99' in 0..3 (the model has 4 decoder layers), found 99"]


def test_exit_eval_writes_the_seed_and_the_model_into_the_provenance(model_dir, tmp_path, capsys):
    from analysis.io import read_provenance
    from exit.cli import main as exit_main

    questions, images = answered_questions(tmp_path)
    out = tmp_path / "eval"
    assert exit_main(["eval", "--model", str(model_dir), "--questions", str(questions), "--image-folder", str(images),
                      "--method", "none,fastv:1:0.5", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    provenance = read_provenance(out / "eval-fastv_1_0.5.parquet")
    assert provenance["model"] == str(model_dir) and provenance["seed"] == 3 and provenance["attention_path"] == "sdpa"
    assert provenance["method"] == "fastv:1:0.5" and provenance["layer"] == 1 and provenance["ratio"] == 0.5
    assert read_provenance(out / "summary.parquet")["methods"] == ["none", "fastv:1:0.5"]


@pytest.mark.parametrize("command, example, others", [
    ("eval", "dyvte-exit eval --model demo --questions", ("dyvte-exit sweep", "dyvte-exit train", "dyvte-exit figures")),
    ("sweep", "dyvte-exit sweep --model demo", ("dyvte-exit eval", "dyvte-exit generate")),
    ("train", "dyvte-exit train --online --model demo", ("dyvte-exit eval", "dyvte-exit sweep --model")),
    ("generate", "dyvte-exit generate --model demo --gates", ("dyvte-exit eval --model",)),
    ("figures", "dyvte-exit figures runs/eval --out figures", ("dyvte-exit eval --model",)),
])
def test_exit_subcommand_help_shows_its_own_examples(capsys, command, example, others):
    from exit.cli import main as exit_main

    with pytest.raises(SystemExit) as stopped:
        exit_main([command, "--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0 and "examples:" in out and example in out
    assert not [other for other in others if other in out]
    if command == "eval":  # every continued example line ends with a backslash
        lines = out[out.index("examples:"):].splitlines()[1:]
        assert all(line.endswith("\\") for line, following in zip(lines, lines[1:]) if following.startswith("      "))
        assert "none | static:K | vtw | vtw:K | fastv:K:R | dyvte | dyvte:TAU | dyvte+fastv:K:R | dyvte+fastv:K:R:TAU" in " ".join(out.split())


@pytest.mark.parametrize("tau", ["1", "1.5", "-0.1", "x"])
def test_exit_tau_options_take_a_threshold_in_zero_one(capsys, tau):
    from exit.cli import main as exit_main

    with pytest.raises(SystemExit) as stopped:
        exit_main(["generate", "--model", "m", "--gates", "g", "--image", "i.png", "--question", "?", "--tau", tau])
    assert stopped.value.code == 2 and "expected a number in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exit_main(["train", "--model", "m", "--out", "o", "--tau", tau])
