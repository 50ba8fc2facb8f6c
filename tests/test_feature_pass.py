"""The features pass: an exit table committed without its gate features gets them back from one
forward per question, equal to the features the sweep itself caches, with the table's labels."""

from __future__ import annotations

import pytest
import torch

from analysis.data import read_questions
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor
from exit.feature_pass import FEATURE_PASS_PREFIX, feature_pass_plan, run_feature_pass, sweep_features
from exit.sweep import SweepError, exit_sweep, feature_shards, read_shard, read_sweep, run_sweep, teacher_forced_inputs

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    from analysis.demo.shapes import write_split

    return write_split(tmp_path_factory.mktemp("shapes"), "val", 1, seed=3, image_size=56)


@pytest.fixture(scope="module")
def tiny():
    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model = tiny_llava(spec).eval()
    with torch.no_grad():  # a strong image, so that features and labels vary with the question
        model.model.multi_modal_projector.linear_2.weight.mul_(3)
    return model, tiny_processor(spec.image_size)


def features_by_sample(folder):
    found = {}
    for path in feature_shards(folder):
        features, labels, ids, kind = read_shard(path)
        assert kind == "both"
        found.update({sample: (features[i], labels[i]) for i, sample in enumerate(ids)})
    return found


def test_one_forward_gives_the_features_the_exit_table_caches(tiny, shapes_split):
    from analysis.data import load_question

    model, processor = tiny
    questions = read_questions(shapes_split / "questions.jsonl")[:3]
    loaded = [load_question(processor, q, shapes_split) for q in questions]
    inputs, answer_mask = teacher_forced_inputs(processor, [p for _, p in loaded], [i for i, _ in loaded],
                                                [q.answer for q in questions])
    assert int((inputs["attention_mask"] == 0).sum()) > 0  # the batch is padded
    table = exit_sweep(model, inputs, answer_mask, features="both", answers=NEW_TOKENS)
    labels_only = exit_sweep(model, inputs, answer_mask, features="both")
    found = sweep_features(model, inputs, answer_mask, "both")
    assert torch.equal(found, table.features)
    # a labels-only sweep's default positions shift the padded rows' RoPE phases: equal up to rounding
    assert (found - labels_only.features).abs().max() <= 1e-4
    assert found.abs().sum() > 0 and not torch.equal(found[0], found[1])


def test_a_labels_only_table_gets_the_sweeps_features_and_keeps_its_labels(tmp_path, tiny, shapes_split):
    model, processor = tiny
    questions = read_questions(shapes_split / "questions.jsonl")
    options = dict(provenance={"model": "tiny"}, batch_size=2, progress=False)
    run_sweep(model, processor, questions, shapes_split, tmp_path / "table", features="both", answers=NEW_TOKENS, **options)
    run_sweep(model, processor, questions, shapes_split, tmp_path / "labels", features=None, answers=NEW_TOKENS, **options)
    assert not list((tmp_path / "labels").glob("features-*"))
    # a stopped pass: the first four questions only, then resumed over all of them
    first = run_feature_pass(model, processor, questions[:4], shapes_split, tmp_path / "labels", features="both", batch_size=2,
                             progress=False)
    assert first.samples == 4 and len(first.files) == 2
    with pytest.raises(SweepError, match="--resume"):
        feature_pass_plan(tmp_path / "labels", questions, "both")
    rest = run_feature_pass(model, processor, questions, shapes_split, tmp_path / "labels", features="both", batch_size=2,
                            progress=False, resume=True)
    assert rest.samples == len(questions) - 4
    assert all(path.name.startswith(FEATURE_PASS_PREFIX) for path in feature_shards(tmp_path / "labels"))
    swept, passed = features_by_sample(tmp_path / "table"), features_by_sample(tmp_path / "labels")
    assert set(swept) == set(passed) == {q.question_id for q in questions}
    sweep = read_sweep(tmp_path / "labels").pivot(index="sample_id", columns="layer", values="label")
    for sample, (features, labels) in passed.items():
        assert torch.equal(features, swept[sample][0])  # same batches, same padding: the very same numbers
        assert labels.tolist() == sweep.loc[sample].astype(int).tolist() == swept[sample][1].tolist()
    assert feature_pass_plan(tmp_path / "labels", questions, "both", resume=True).todo == []
    # the sweep's own resume leaves the pass's files alone
    run_sweep(model, processor, questions, shapes_split, tmp_path / "labels", features=None, answers=NEW_TOKENS,
              resume=True, **options)
    assert len(features_by_sample(tmp_path / "labels")) == len(questions)


def test_a_pass_is_refused_before_the_model_loads(tmp_path, tiny, shapes_split, monkeypatch, capsys):
    import analysis.loading
    from exit.cli import main

    model, processor = tiny
    questions = read_questions(shapes_split / "questions.jsonl")
    run_sweep(model, processor, questions[:2], shapes_split, tmp_path / "table", features=None, provenance={"model": "tiny"},
              progress=False)
    monkeypatch.setattr(analysis.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = {  # questions outside the table; a folder without a table
        "2 that are not": ["--table", str(tmp_path / "table")],
        "expected an exit table": ["--table", str(tmp_path)],
    }
    for message, table in cases.items():
        status = main(["features", "--model", "unused", "--questions", str(shapes_split / "questions.jsonl"),
                       "--image-folder", str(shapes_split), "--limit", "4", *table, "--features", "both", "--no-progress"])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, err
    run_feature_pass(model, processor, questions[:2], shapes_split, tmp_path / "table", features="hidden", progress=False)
    with pytest.raises(SweepError, match="kind 'both'"):
        feature_pass_plan(tmp_path / "table", questions[:2], "both", resume=True)
