"""Bad input, one case each: a bad sample is listed in the errors file and the run goes on (or stops
under --fail-fast); a bad model, file or gate folder stops with a message that says what was expected
and what was found."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from analysis.cli import main
from analysis.io import read_errors, read_samples, read_statistics
from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava

GOOD = [{"question_id": "good1", "image": "red.png", "text": "What colour?"},
        {"question_id": "good2", "image": "blue.png", "text": "<image>\nIs it blue?"}]
BAD = {  # question id -> (question line, part of the reason)
    "missing": ({"image": "nope.png", "text": "?"}, "expected an image at"),
    "corrupt": ({"image": "corrupt.png", "text": "?"}, "expected a readable image at"),
    "no-image": ({"text": "What is this?"}, "question 'no-image' has no image"),
    "placeholders": ({"image": ["red.png", "blue.png"], "text": "<image>\nWhich is red?"},
                     "expected one <image> placeholder per image (or none), found 1 placeholder(s) for 2 image(s)"),
    "too-long": ({"image": "red.png", "text": "why " * 1100},
                 "expected a prompt of at most 4096 tokens (the model's context, max_position_embeddings), found"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny"), TinyLlavaSpec(num_kv_heads=2))


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "red.png")
    Image.new("RGB", (40, 32), "blue").save(folder / "blue.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG truncated")
    return folder


def write_questions(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def dump(model_dir: Path, questions: Path, images: Path, out: Path, *extra: str) -> int:
    return main(["dump", "--model", str(model_dir), "--questions", str(questions), "--image-folder", str(images),
                 "--out", str(out), "--no-progress", "--quiet", *extra])


def test_bad_samples_are_listed_with_their_reason_and_the_run_goes_on(model_dir, images, tmp_path, capsys):
    entries = [GOOD[0], *({"question_id": qid, **line} for qid, (line, _) in BAD.items()), GOOD[1]]
    questions = write_questions(tmp_path / "q.jsonl", entries)
    out = tmp_path / "out"
    assert dump(model_dir, questions, images, out, "--batch-size", "3") == 0  # bad ones share batches with good ones
    assert f"{len(BAD)} sample(s) failed and were left out" in capsys.readouterr().err
    assert sorted(read_statistics(out)["sample_id"].unique()) == ["good1", "good2"]
    errors = read_errors(out).set_index("sample_id")
    assert sorted(errors.index) == sorted(BAD)
    for qid, (_, reason) in BAD.items():
        assert reason in errors.loc[qid, "reason"], (qid, errors.loc[qid, "reason"])
        assert errors.loc[qid, "error"] == "DataError"
    assert main(["errors", str(out)]) == 0
    assert f"{len(BAD)} failed sample(s)" in capsys.readouterr().out


@pytest.mark.parametrize("qid", sorted(BAD))
def test_fail_fast_stops_at_the_bad_sample(model_dir, images, tmp_path, capsys, qid):
    line, reason = BAD[qid]
    questions = write_questions(tmp_path / "q.jsonl", [GOOD[0], {"question_id": qid, **line}, GOOD[1]])
    assert dump(model_dir, questions, images, tmp_path / "out", "--fail-fast") == 2
    assert reason in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("_errors-*"))  # under --fail-fast nothing is listed


def test_a_sample_without_image_tokens_fails_alone(model_dir, images):
    from analysis.data import Question, prepare_batch
    from analysis.testing.tiny import tiny_processor

    processor = tiny_processor(28)
    z = processor.tokenizer.convert_tokens_to_ids("Z")  # pretend "Z" marks image positions
    batch = [Question("with", ("red.png",), "Zebra?"), Question("without", ("red.png",), "Horse?")]
    prepared = prepare_batch(processor, batch, images, z, None)
    assert [q.question_id for q in prepared.questions] == ["with"] and prepared.inputs["input_ids"].shape[0] == 1
    [(question, error)] = prepared.failed
    assert question.question_id == "without"
    assert f"question 'without' has no image token: expected at least one token with the image token id {z}" in str(error)


def test_empty_question_file_stops(model_dir, images, tmp_path, capsys):
    questions = tmp_path / "empty.jsonl"
    questions.write_text("\n\n")
    assert dump(model_dir, questions, images, tmp_path / "out") == 2
    assert "expected at least one question (one JSON object per line), found none" in capsys.readouterr().err


def test_unsupported_model_family_stops(tmp_path, images, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "bert")
    questions = write_questions(tmp_path / "q.jsonl", GOOD)
    assert dump(tmp_path / "bert", questions, images, tmp_path / "out") == 2
    assert "unsupported model type 'bert': expected one of [" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sdpa_only_backend_asked_for_attention_weights_stops(model_dir, images):
    from dataclasses import dataclass

    from analysis import record_attention, resolve_adapter, token_layout
    from analysis.data import Question, build_prompt
    from analysis.loading import load_model
    from analysis.recorder import RecordingError

    @dataclass(frozen=True)
    class SdpaOnly(type(resolve_adapter("llava"))):  # a backend that cannot switch to eager attention
        def set_attention_implementation(self, model, implementation):
            pass

    model, processor = load_model(model_dir)
    adapter = SdpaOnly(**{f: getattr(resolve_adapter(model), f) for f in resolve_adapter(model).__dataclass_fields__})
    question = Question("q", ("red.png",), "What colour?")
    inputs = processor(images=[Image.open(images / "red.png")], text=[build_prompt(processor, question)], return_tensors="pt")
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_id(model))
    with pytest.raises(RecordingError, match=r"expected attention weights .* under eager attention, found None \(the decoder runs 'sdpa'\)"):
        with torch.no_grad(), record_attention(model, layout, attention="eager", adapter=adapter):
            model(**inputs)


def _dump_folder(model_dir: Path, images: Path, tmp_path: Path) -> tuple[Path, Path]:
    questions = write_questions(tmp_path / "q.jsonl", GOOD)
    out = tmp_path / "out"
    assert dump(model_dir, questions, images, out, "--limit", "1") == 0
    return questions, out


def test_corrupt_parquet_stops_validate_read_and_resume(model_dir, images, tmp_path, capsys):
    questions, out = _dump_folder(model_dir, images, tmp_path)
    (out / "samples-00000.parquet").write_bytes(b"PAR1 garbage")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 2
    assert "samples-00000.parquet: expected a readable parquet file, found a corrupt or foreign file" in capsys.readouterr().err
    assert dump(model_dir, questions, images, out, "--resume") == 2
    assert "samples-00000.parquet: expected a readable parquet file" in capsys.readouterr().err


def test_parquet_of_another_schema_version_stops(model_dir, images, tmp_path, capsys):
    questions, out = _dump_folder(model_dir, images, tmp_path)
    path = out / "statistics-00000.parquet"
    table = pq.read_table(path)
    metadata = {**table.schema.metadata, b"dyvte.schema_version": b"3"}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    capsys.readouterr()
    assert main(["summary", str(out)]) == 2
    expected = "statistics-00000.parquet: expected schema version 2 (or an earlier one: 1), found version 3"
    assert expected in capsys.readouterr().err
    assert dump(model_dir, questions, images, out, "--resume") == 2
    assert "expected schema version 2 (or an earlier one: 1), found version 3" in capsys.readouterr().err
    assert len(read_samples(out)) == 1  # the samples shard (version 2) is untouched


def test_gates_for_another_model_stop(model_dir, images, tmp_path, capsys):
    from analysis.testing.tiny import tiny_llava
    from exit import DyVTEGates, GateConfig
    from exit.cli import main as exit_main

    other = tiny_llava(TinyLlavaSpec(num_layers=2, num_kv_heads=2))
    DyVTEGates.for_model(other, GateConfig(hidden_width=4)).save(tmp_path / "gates")
    assert exit_main(["generate", "--model", str(model_dir), "--gates", str(tmp_path / "gates"),
                      "--image", str(images / "red.png"), "--question", "?"]) == 2
    err = capsys.readouterr().err
    assert f"gates in {tmp_path / 'gates'} were trained for another model" in err
    assert "num_layers: gates 2, model 4" in err


def test_bad_shard_argument_is_a_usage_error(model_dir, images, tmp_path, capsys):
    questions = write_questions(tmp_path / "q.jsonl", GOOD)
    with pytest.raises(SystemExit):
        dump(model_dir, questions, images, tmp_path / "out", "--shard", "2/2")
    assert "expected I/N with 0 <= I < N (e.g. 0/4), found '2/2'" in capsys.readouterr().err


def test_an_arrow_file_of_another_table_is_not_statistics(tmp_path):
    from analysis.schema import SchemaError

    pq.write_table(pa.table({"x": [1]}), tmp_path / "statistics-00000.parquet")
    with pytest.raises(SchemaError, match="expected DyVTE statistics"):
        read_statistics(tmp_path)


# Usage errors found before any model loads: (command line, part of the message). "{m}" is the
# tiny model's folder, "{q}" a good question file, "{i}" its images, "{t}" the test's tmp folder.
BEFORE_LOADING = {
    "batch size 0": (["dump", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, found 0"),
    "negative batch size": (["dump", "--batch-size", "-2"], "expected an integer >= 1, found -2"),
    "limit 0": (["dump", "--limit", "0"], "argument --limit: expected an integer >= 1, found 0"),
    "negative limit": (["dump", "--limit", "-3"], "expected an integer >= 1, found -3"),
    "out is a file": (["dump", "--out", "{t}/a-file"], "expected --out to be a folder (new or existing), found a file"),
    "no such device": (["dump", "--device", "cuda"], "expected a CUDA device for --device cuda, found none"),
    "bad device name": (["dump", "--device", "toaster"], "expected --device to be cpu, cuda, cuda:N or mps"),
    "no such model": (["dump", "--model", "{t}/absent"], "expected --model to name a checkpoint"),
}


def _usage_line(entry: list[str], model_dir: Path, questions: Path, images: Path, tmp_path: Path) -> list[str]:
    command, *extra = entry
    values = {"m": str(model_dir), "q": str(questions), "i": str(images), "t": str(tmp_path)}
    extra = [part.format(**values) for part in extra]
    base = {"--model": str(model_dir), "--questions": str(questions), "--image-folder": str(images),
            "--out": str(tmp_path / "out")}
    for option in list(base):
        if option in extra:
            base.pop(option)
    return [command, *[x for pair in base.items() for x in pair], *extra, "--no-progress"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("case", sorted(BEFORE_LOADING))
def test_usage_errors_stop_before_the_model_loads(model_dir, images, tmp_path, capsys, monkeypatch, case):
    import analysis.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the usage error was found")

    monkeypatch.setattr(analysis.loading, "load_model", no_loading)
    (tmp_path / "a-file").write_text("not a folder")
    questions = write_questions(tmp_path / "q.jsonl", GOOD)
    entry, message = BEFORE_LOADING[case]
    argv = _usage_line(entry, model_dir, questions, images, tmp_path)
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and "Traceback" not in err


def test_a_read_only_output_folder_is_one_line(model_dir, images, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        # root writes anywhere: the check cannot see a read-only folder, so prove the foreign
        # PermissionError path instead (a parquet writer failing under the folder).
        from analysis.options import is_bad_input, one_line

        error = PermissionError(13, "Permission denied", str(tmp_path / "ro" / ".statistics-00000.parquet.partial"))
        assert is_bad_input(error) and one_line(error).startswith("Permission denied: ")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    questions = write_questions(tmp_path / "q.jsonl", GOOD)
    assert dump(model_dir, questions, images, folder / "out") == 2
    assert "without write permission" in capsys.readouterr().err


def test_foreign_file_errors_are_one_line_and_debug_shows_the_traceback(model_dir, images, tmp_path, capsys):
    from analysis.options import is_bad_input

    (tmp_path / "gates").mkdir()
    (tmp_path / "gates" / "gates.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    from exit.gates import DyVTEGates, GateConfig

    model = __import__("transformers").AutoModelForImageTextToText.from_pretrained(model_dir)
    DyVTEGates.for_model(model, GateConfig(hidden_width=8)).save(tmp_path / "good")
    (tmp_path / "gates" / "gate_config.json").write_text((tmp_path / "good" / "gate_config.json").read_text())
    from exit.cli import main as exit_main

    capsys.readouterr()
    argv = ["generate", "--model", str(model_dir), "--gates", str(tmp_path / "gates"),
            "--image", str(images / "red.png"), "--question", "What colour?"]
    assert exit_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    with pytest.raises(Exception) as raised:
        exit_main([*argv, "--debug"])
    assert is_bad_input(raised.value) and type(raised.value).__module__.startswith("safetensors")
    (tmp_path / "gates" / "gate_config.json").write_text("{not json")
    assert exit_main(argv) == 2
    assert "expected the JSON written by DyVTEGates.save" in capsys.readouterr().err
    assert not is_bad_input(KeyError("a bug")) and not is_bad_input(ZeroDivisionError())
