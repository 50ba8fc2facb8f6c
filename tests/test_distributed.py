"""Scale-out: the dump, the exit sweep and gate training on two CPU processes (torchrun, gloo)
against one process on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from analysis.cli import main as stats_main
from analysis.distributed import Shard
from analysis.io import read_samples, read_statistics
from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava
from exit.cli import main as exit_main
from exit.sweep import read_sweep

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["sample_id", "layer", "head", "query_group", "key_group"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    model = save_tiny_llava(folder / "model", TinyLlavaSpec(num_kv_heads=2))
    (folder / "img").mkdir()
    lines = []
    colours = ["red", "green", "blue", "yellow", "white", "black", "red"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (30 + 3 * i, 30), colour).save(folder / "img" / f"{i}.png")
        lines.append({"question_id": f"q{i}", "image": f"{i}.png", "text": "What colour is it?" + " Say it." * (i % 3),
                      "answer": colour})
    (folder / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"root": folder, "model": model, "questions": folder / "q.jsonl", "images": folder / "img"}


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def dump_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["dump", "--model", str(setup["model"]), "--questions", str(setup["questions"]),
            "--image-folder", str(setup["images"]), "--out", str(out), "--no-progress", "--quiet", *extra]


def sorted_frame(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys).reset_index(drop=True)


def test_torchrun_dump_equals_the_single_process_dump(setup):
    single, sharded = setup["root"] / "single", setup["root"] / "torchrun"
    assert stats_main(dump_args(setup, single)) == 0
    result = torchrun("-m", "analysis", *dump_args(setup, sharded))
    assert "shard 0/2: wrote" in result.stdout and "shard 1/2: wrote" in result.stdout
    names = sorted(p.name for p in sharded.iterdir())
    assert names == [f"{table}-shard00{i}of002-00000.parquet" for table in ("samples", "statistics") for i in (0, 1)]
    # strided split: rank 0 has q0 q2 q4 q6, rank 1 has q1 q3 q5
    assert read_samples(sharded / "samples-shard001of002-00000.parquet")["sample_id"].tolist() == ["q1", "q3", "q5"]
    expected = sorted_frame(read_statistics(single), KEYS)
    # torchrun starts its processes with OMP_NUM_THREADS=1, so reductions may round differently
    # from this process's thread count: equal within float32 rounding, not bit for bit
    pd.testing.assert_frame_equal(sorted_frame(read_statistics(sharded), KEYS), expected, rtol=1e-5, atol=1e-6)
    # pandas and pyarrow read the shards of all ranks as one table
    direct = pd.read_parquet(sharded, ignore_prefixes=[".", "_", "samples-"])
    pd.testing.assert_frame_equal(sorted_frame(direct, KEYS), expected)
    assert pq.read_table(sharded, ignore_prefixes=[".", "_", "samples-"]).num_rows == len(expected)
    assert sorted(read_samples(sharded)["sample_id"]) == [f"q{i}" for i in range(7)]


def test_explicit_shards_write_one_folder_equal_to_one_process(setup):
    out = setup["root"] / "explicit"
    for index in (1, 0):  # any order, one folder
        assert stats_main(dump_args(setup, out, "--shard", f"{index}/2")) == 0
    single = setup["root"] / "single"
    if not single.exists():
        assert stats_main(dump_args(setup, single)) == 0
    pd.testing.assert_frame_equal(sorted_frame(read_statistics(out), KEYS), sorted_frame(read_statistics(single), KEYS),
                                  rtol=1e-5, atol=1e-6)
    assert Shard(1, 3).select(list(range(8))) == [1, 4, 7]
    assert sorted(i for k in range(3) for i in Shard(k, 3).select(list(range(8)))) == list(range(8))


ONLINE = ["--hidden-width", "8", "--epochs", "2", "--batch-size", "3", "--lr", "0.01", "--holdout", "0.3", "--no-progress"]
SCRIPT = f"""
ONLINE = {ONLINE!r}
import sys
import torch.distributed as dist
from exit.cli import main

dist.init_process_group("gloo")
model, questions, images, single_sweep, sweep, gates, online = sys.argv[1:]
common = ["--model", model, "--no-progress"]
assert main(["sweep", *common, "--questions", questions, "--image-folder", images, "--out", sweep, "--batch-size", "2"]) == 0
assert main(["train", "--sweep", single_sweep, "--model", model, "--out", gates, "--hidden-width", "8", "--epochs", "3",
             "--batch-size", "3", "--lr", "0.01", "--holdout", "0.3", "--no-progress"]) == 0
assert main(["train", "--online", "--model", model, "--questions", questions, "--image-folder", images, "--out", online,
             *ONLINE]) == 0
dist.barrier()  # leave together: gloo may abort a process whose group is torn down while a peer still talks to it
dist.destroy_process_group()
"""


def test_torchrun_sweep_and_gate_training_equal_one_process(setup, capsys):
    root = setup["root"]
    common = ["--model", str(setup["model"]), "--no-progress"]
    assert exit_main(["sweep", *common, "--questions", str(setup["questions"]), "--image-folder", str(setup["images"]),
                      "--out", str(root / "sweep1"), "--batch-size", "2"]) == 0
    assert exit_main(["train", "--sweep", str(root / "sweep1"), "--model", str(setup["model"]), "--out", str(root / "gates1"),
                      "--hidden-width", "8", "--epochs", "3", "--batch-size", "3", "--lr", "0.01", "--holdout", "0.3",
                      "--no-progress"]) == 0
    single_report = json.loads((root / "gates1" / "train_report.json").read_text())
    assert exit_main(["train", "--online", "--model", str(setup["model"]), "--questions", str(setup["questions"]),
                      "--image-folder", str(setup["images"]), "--out", str(root / "online1"), *ONLINE]) == 0
    script = root / "sweep_and_train.py"
    script.write_text(SCRIPT)
    result = torchrun(str(script), str(setup["model"]), str(setup["questions"]), str(setup["images"]),
                      str(root / "sweep1"), str(root / "sweep2"), str(root / "gates2"), str(root / "online2"))
    assert "on 2 processes" in result.stdout
    keys = ["sample_id", "layer"]
    one, two = sorted_frame(read_sweep(root / "sweep1"), keys), sorted_frame(read_sweep(root / "sweep2"), keys)
    pd.testing.assert_frame_equal(two, one, rtol=1e-5, atol=1e-6)
    assert {p.name for p in (root / "sweep2").glob("exit_sweep-*")} == {
        "exit_sweep-shard000of002-00000.parquet", "exit_sweep-shard001of002-00000.parquet"}
    report = json.loads((root / "gates2" / "train_report.json").read_text())
    assert report["steps"] == single_report["steps"] > 1 and report["train_examples"] == single_report["train_examples"]
    assert report["losses"] == pytest.approx(single_report["losses"], rel=1e-5, abs=1e-7)
    assert single_report["losses"][0] != single_report["losses"][-1]  # the gates did move
    for one, two in (("gates1", "gates2"), ("online1", "online2")):  # offline and online training
        gates1, gates2 = (load_file(str(root / name / "gates.safetensors")) for name in (one, two))
        assert gates1.keys() == gates2.keys()
        for name in gates1:
            torch.testing.assert_close(gates2[name], gates1[name], rtol=1e-5, atol=1e-6)
    online1, online2 = (json.loads((root / name / "train_report.json").read_text()) for name in ("online1", "online2"))
    assert online2["losses"] == pytest.approx(online1["losses"], rel=1e-5) and len(online1["losses"]) > 2
