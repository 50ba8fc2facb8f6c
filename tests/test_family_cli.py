"""Every supported family through the command line, as a user's checkpoint folder would go.

Each family's tiny random model is saved with the family's real processor class
(``analysis.testing.processors``: its image processor, a tokenizer with its special tokens, a chat
template in its format), then ``dyvte-stats dump`` / ``summary`` and ``dyvte-exit sweep`` / ``eval``
run on the folder. The prompts, the image-token expansion and the grid/position inputs are the
processor's own, so what breaks here is what would break on a user's first run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.adapters import resolve_adapter
from analysis.cli import main as stats_main
from analysis.data import encode_questions, read_questions
from analysis.io import read_samples, read_statistics
from analysis.loading import ProcessorUnavailableError, load_model, torchvision_available
from analysis.testing.families import IMAGE
from analysis.testing.processors import FAMILY_PROCESSORS, save_tiny_family, tiny_family_processor
from exit.answers import ExitAnswersError, check_answerable
from exit.cli import main as exit_main
from exit.plots import read_evaluation
from exit.sweep import read_exit_answers, read_sweep

QUESTIONS = [
    {"question_id": "wide", "image": "wide.png", "text": "What colour is the shape?", "answer": "red", "category": "colour"},
    {"question_id": "tall", "image": "tall.png", "text": "Is it round?", "answer": "yes", "category": "shape"},
    {"question_id": "both", "image": ["wide.png", "tall.png"], "text": "Which one is wider?", "answer": "left",
     "category": "position"},
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("family-data")
    rng = np.random.default_rng(0)
    for name, (height, width) in {"wide.png": (30, 40), "tall.png": (50, 30)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return questions, folder


@pytest.fixture(scope="module", params=sorted(FAMILY_PROCESSORS))
def checkpoint(request, tmp_path_factory) -> Path:
    try:
        tiny_family_processor(request.param)
    except (ImportError, ProcessorUnavailableError) as error:  # PixtralProcessor, SmolVLMProcessor need torchvision
        pytest.skip(f"the {request.param} processor cannot be built here: {str(error).strip().splitlines()[0]}")
    return save_tiny_family(tmp_path_factory.mktemp(request.param), request.param)


def image_tokens_per_question(checkpoint: Path, questions: Path, images: Path) -> dict[str, int]:
    """Image tokens of each question as the loaded processor writes them (one question at a time)."""
    model, processor = load_model(checkpoint)
    image_token_id = resolve_adapter(model).image_token_id(model)
    counts = {}
    for question in read_questions(questions):
        ids = encode_questions(processor, [question], images)["input_ids"]
        counts[question.question_id] = int((ids == image_token_id).sum())
    return counts


def test_statistics_dump_and_summary_from_the_command_line(checkpoint, dataset, tmp_path, capsys):
    questions, images = dataset
    out = tmp_path / "stats"
    assert stats_main(["dump", "--model", str(checkpoint), "--questions", str(questions), "--image-folder", str(images),
                       "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    samples = read_samples(out).set_index("sample_id")
    expected = image_tokens_per_question(checkpoint, questions, images)
    assert samples["n_image"].to_dict() == expected
    assert min(expected.values()) > 0  # (LLaVA-OneVision writes fewer tokens per image for several images)
    stats = read_statistics(out)
    model, _ = load_model(checkpoint)
    mapped = resolve_adapter(model).attention_layers(model)  # a hybrid decoder's recurrent layers have no rows
    assert set(stats["layer"]) == set(mapped) and set(stats["sample_id"]) == set(expected)
    from analysis.io import read_provenance

    file = next(out.glob("statistics-*.parquet"))
    assert read_provenance(file)["layers_without_attention"] == resolve_adapter(model).recurrent_layers(model)
    image_mass = stats[(stats["query_group"] == "text") & (stats["key_group"] == "image")]["mass"]
    assert image_mass.notna().all() and ((image_mass > 0) & (image_mass < 1)).all()
    capsys.readouterr()
    assert stats_main(["summary", str(out)]) == 0
    assert "text->image" in capsys.readouterr().out


def test_exit_sweep_and_eval_from_the_command_line(checkpoint, dataset, tmp_path, capsys):
    questions, images = dataset
    model, _ = load_model(checkpoint)
    adapter = resolve_adapter(model)
    layers = len(adapter.decoder_layers(model))
    try:
        check_answerable(adapter, model.config)
        answerable = True
    except ExitAnswersError:  # M-RoPE positions, sliding-window caches: the sweep gives labels and features only
        answerable = False
    common = ["--model", str(checkpoint), "--questions", str(questions), "--image-folder", str(images), "--batch-size", "1"]
    table = tmp_path / "table"
    features = "both" if adapter.recurrent is None else "hidden"  # recurrent layers have no attention statistics
    assert exit_main(["sweep", *common, "--out", str(table), "--features", features, "--no-progress",
                      *(["--answers", "3"] if answerable else [])]) == 0
    sweep = read_sweep(table)
    assert len(sweep) == len(QUESTIONS) * layers and sweep["agreement"].between(0, 1).all()
    evaluation = tmp_path / "eval"
    assert exit_main(["eval", *common, "--method", "none,static:1,fastv:1:0.5", "--max-new-tokens", "3",
                      "--out", str(evaluation), "--no-progress"]) == 0
    rows, summary = read_evaluation(evaluation)
    assert list(summary["method"]) == ["none", "static:1", "fastv:1:0.5"]
    by_method = {method: frame.set_index("question_id") for method, frame in rows.groupby("method")}
    assert (by_method["static:1"]["exit_layer"] == 1).all()
    assert (by_method["static:1"]["relative_prefill_flops"] < 1).all()
    if answerable:  # the exit table's answers (one pass) are eval's (generate() under each method)
        answers = read_exit_answers(table).set_index(["sample_id", "layer"])["prediction"]
        for question in by_method["none"].index:
            assert answers[(question, layers - 1)] == by_method["none"].loc[question, "prediction"]
            assert answers[(question, 1)] == by_method["static:1"].loc[question, "prediction"]
    capsys.readouterr()


def test_the_folder_loads_the_familys_own_processor_class(checkpoint):
    model, processor = load_model(checkpoint)
    family = model.config.model_type
    assert type(processor) is type(tiny_family_processor(family))  # AutoProcessor found it from the saved files
    image_token = processor.tokenizer.convert_ids_to_tokens(resolve_adapter(model).image_token_id(model))
    assert image_token == FAMILY_PROCESSORS[family].specials[IMAGE]


@pytest.mark.skipif(torchvision_available(), reason="these processors load where torchvision is installed")
@pytest.mark.parametrize("family", ["mistral3", "smolvlm"])
def test_a_processor_that_needs_a_missing_package_is_one_line_before_the_weights(family, tmp_path, dataset, capsys,
                                                                                 monkeypatch):
    from transformers import AutoModelForImageTextToText

    from analysis.testing.families import tiny_family_model

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    tiny_family_model(family).config.save_pretrained(tmp_path)  # a config, no weights, no processor files
    questions, images = dataset
    assert stats_main(["dump", "--model", str(tmp_path), "--questions", str(questions), "--image-folder", str(images),
                       "--out", str(tmp_path / "stats"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "torchvision" in error.lower() and "processor" in error


def test_a_gemma4_config_with_bidirectional_attention_everywhere_is_one_line_before_the_weights(tmp_path, dataset, capsys,
                                                                                                monkeypatch):
    """use_bidirectional_attention="all" lets every token see later ones: refused from the config
    (the command line, before any weights) and from a built model (the library)."""
    from transformers import AutoModelForImageTextToText

    from analysis.adapters import UnsupportedModelError
    from analysis.testing.families import tiny_family_model

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    model = tiny_family_model("gemma4")
    resolve_adapter(model)  # the default (causal text, bidirectional image blocks in "vision" mode) is supported
    model.config.text_config.use_bidirectional_attention = "all"
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention='all'"):
        resolve_adapter(model)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    model.config.save_pretrained(tmp_path)
    questions, images = dataset
    assert stats_main(["dump", "--model", str(tmp_path), "--questions", str(questions), "--image-folder", str(images),
                       "--out", str(tmp_path / "stats"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "use_bidirectional_attention='all'" in error and "causal" in error
