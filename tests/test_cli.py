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
