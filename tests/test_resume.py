"""Resume: a dump killed with SIGKILL mid-run and restarted with --resume ends with exactly the data of
an uninterrupted run; no partially written file is ever visible under its final name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis.cli import main
from analysis.io import clean_incomplete, finished_samples, parse_shard_file, read_errors, read_samples, read_statistics
from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 60
KEYS = ["sample_id", "layer", "head", "query_group", "key_group"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resume")
    model = save_tiny_llava(folder / "model", TinyLlavaSpec(num_kv_heads=2))
    (folder / "img").mkdir()
    colours = ["red", "green", "blue", "yellow", "white"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (30 + 4 * i, 30), colour).save(folder / "img" / f"{i}.png")
    (folder / "img" / "broken.png").write_bytes(b"not an image")
    lines = [{"question_id": f"q{i:02d}", "image": f"{i % 5}.png", "text": "What colour?" + " Tell me." * (i % 4)}
             for i in range(QUESTIONS)]
    lines[17]["image"] = "broken.png"  # one bad sample: listed in the errors file, also after a resume
    (folder / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"root": folder, "model": model, "questions": folder / "q.jsonl", "images": folder / "img"}


def dump_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["dump", "--model", str(setup["model"]), "--questions", str(setup["questions"]), "--image-folder",
            str(setup["images"]), "--out", str(out), "--no-progress", "--quiet", "--batches-per-file", "1", *extra]


def visible_files_are_complete(folder: Path) -> None:
    """Every file under its final name is complete: parquet files read, errors files are JSON lines."""
    for path in folder.iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(".partial"), path
            continue
        assert parse_shard_file(path) is not None, path
        if path.suffix == ".parquet":
            pq.read_table(path)
        else:
            [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkilled_dump_resumes_to_the_uninterrupted_result(setup, capsys):
    reference = setup["root"] / "reference"
    assert main(dump_args(setup, reference)) == 0
    out = setup["root"] / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "analysis", *dump_args(setup, out)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("samples-*.parquet"))) < 5:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    done = finished_samples(out)
    assert 5 <= len(done) < QUESTIONS, "the kill was expected to land mid-run"
    visible_files_are_complete(out)

    assert main(dump_args(setup, out)) == 2  # without --resume the folder is refused
    assert "pass --resume to continue" in capsys.readouterr().err
    assert main(dump_args(setup, out, "--resume")) == 0
    printed = capsys.readouterr()
    assert f"(skipped {len(done)} already in the folder)" in printed.out
    assert not list(out.glob(".*")), "leftovers of the killed writer are removed"
    visible_files_are_complete(out)
    expected, found = read_statistics(reference), read_statistics(out)
    assert not found.duplicated(KEYS).any()
    pd.testing.assert_frame_equal(found.sort_values(KEYS).reset_index(drop=True),
                                  expected.sort_values(KEYS).reset_index(drop=True), check_exact=True)
    samples = read_samples(out).sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(samples, read_samples(reference).sort_values("sample_id").reset_index(drop=True))
    assert read_errors(out)["sample_id"].tolist() == ["q17"] == read_errors(reference)["sample_id"].tolist()
    # a second resume finds nothing left to do
    assert main(dump_args(setup, out, "--resume")) == 0
    assert f"wrote 0 rows for 0 samples to {out} (skipped {QUESTIONS} already" in capsys.readouterr().out


def test_resume_removes_orphans_and_refuses_other_settings(setup, capsys):
    out = setup["root"] / "orphans"
    args = dump_args(setup, out, "--limit", "3")
    assert main(args) == 0
    # a kill between the renames of one shard: statistics committed, samples not; plus a stale partial
    (out / "samples-00002.parquet").unlink()
    (out / ".statistics-00003.parquet.partial").write_bytes(b"half")
    assert finished_samples(out) == {"q00", "q01"}
    capsys.readouterr()
    assert main(["validate", str(out)]) == 2
    assert "statistics-00002.parquet: expected its samples shard samples-00002.parquet beside it" in capsys.readouterr().err
    assert main([*args, "--resume", "--heads", "all"]) == 2
    assert "expected --resume to continue a dump with the same settings" in capsys.readouterr().err
    assert clean_incomplete(out) == [out / ".statistics-00003.parquet.partial", out / "statistics-00002.parquet"]
    assert main([*args, "--resume"]) == 0
    assert sorted(read_statistics(out)["sample_id"].unique()) == ["q00", "q01", "q02"]
    assert not read_statistics(out).duplicated(KEYS).any()


def test_sigterm_stops_a_dump_like_ctrl_c_and_keeps_its_open_shard(setup, capsys):
    reference = setup["root"] / "reference-term"
    assert main(dump_args(setup, reference)) == 0
    out = setup["root"] / "terminated"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # many batches per file: at the signal a shard is open, and it must be closed under its final name
    args = [arg for arg in dump_args(setup, out) if arg not in ("--batches-per-file", "1")]
    args += ["--batches-per-file", "1000"]
    process = subprocess.Popen([sys.executable, "-m", "analysis", *args], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob(".statistics-*.partial")):
            time.sleep(0.005)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "stopped; the files finished so far are kept" in stderr
    assert not list(out.glob(".*")), "the open shard was closed and renamed, not left partial"
    visible_files_are_complete(out)
    done = finished_samples(out)
    assert 1 <= len(done) < QUESTIONS, "the signal was expected to land mid-run"
    assert main(dump_args(setup, out, "--resume")) == 0
    capsys.readouterr()
    found = read_statistics(out).sort_values(KEYS).reset_index(drop=True)
    pd.testing.assert_frame_equal(found, read_statistics(reference).sort_values(KEYS).reset_index(drop=True),
                                  check_exact=True)
