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
                             progress=False, share_prefix=False)
    assert first.samples == 4 and len(first.files) == 2
    with pytest.raises(SweepError, match="--resume"):
        feature_pass_plan(tmp_path / "labels", questions, "both")
    rest = run_feature_pass(model, processor, questions, shapes_split, tmp_path / "labels", features="both", batch_size=2,
                            progress=False, resume=True, share_prefix=False)
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


def test_gates_learn_from_the_analysis_halfs_statistics_joined_with_the_labels(tmp_path, shapes_split, capsys):
    """dyvte-stats dump -> dyvte-exit join-stats -> dyvte-exit train: the dump's statistics are the
    attention (every head) or history (head mean) features the sweep caches for the same questions."""
    from analysis.cli import main as stats_main
    from analysis.testing.processors import save_tiny_family
    from exit.cli import main as exit_main
    from exit.gates import ModelSignature, select_features

    checkpoint = save_tiny_family(tmp_path / "model", "llava")
    data = ["--questions", str(shapes_split / "questions.jsonl"), "--image-folder", str(shapes_split), "--no-progress"]
    for heads in ("all", "mean"):
        assert stats_main(["dump", "--model", str(checkpoint), *data, "--out", str(tmp_path / f"stats-{heads}"),
                           "--heads", heads, "--batch-size", "2", "--quiet"]) == 0
    for table, features in (("swept", "attention"), ("joined", "none"), ("joined-mean", "none")):
        assert exit_main(["sweep", "--model", str(checkpoint), *data, "--out", str(tmp_path / table), "--features", features,
                          "--batch-size", "2"]) == 0
    assert exit_main(["join-stats", "--stats", str(tmp_path / "stats-all"), "--table", str(tmp_path / "joined")]) == 0
    assert exit_main(["join-stats", "--stats", str(tmp_path / "stats-mean"), "--table", str(tmp_path / "joined-mean")]) == 0
    assert "trains attention and history gates" in capsys.readouterr().out
    swept = {}
    for path in feature_shards(tmp_path / "swept"):
        features, labels, ids, kind = read_shard(path)
        swept.update({sample: (features[i], labels[i]) for i, sample in enumerate(ids)})
    from analysis.loading import load_model

    signature = ModelSignature.of(load_model(checkpoint)[0])
    for folder, kind in (("joined", "attention"), ("joined-mean", "history")):
        seen = set()
        for path in feature_shards(tmp_path / folder):
            features, labels, ids, found_kind = read_shard(path)
            assert found_kind == kind and path.name.startswith("features-stats-")
            for i, sample in enumerate(ids):
                expected = select_features(swept[sample][0], "attention", kind, signature)
                assert expected.abs().sum() > 0
                assert torch.allclose(features[i], expected, atol=1e-5, rtol=1e-5), (folder, sample)
                assert torch.equal(labels[i], swept[sample][1])
                seen.add(sample)
        assert seen == set(swept)
    assert exit_main(["join-stats", "--stats", str(tmp_path / "stats-all"), "--table", str(tmp_path / "joined")]) == 2
    assert "features-stats-* files" in capsys.readouterr().err
    status = exit_main(["train", "--sweep", str(tmp_path / "joined-mean"), "--model", str(checkpoint), "--features", "history",
                        "--out", str(tmp_path / "gates"), "--epochs", "2", "--batch-size", "4", "--hidden-width", "8",
                        "--no-progress"])
    assert status == 0 and (tmp_path / "gates" / "gates.safetensors").is_file()


def test_questions_about_one_image_share_its_prefix_and_keep_their_features(tiny, shapes_split):
    from analysis.data import load_question
    from exit.feature_pass import prefix_sharing_refusal, shared_prefix_features

    model, processor = tiny
    assert prefix_sharing_refusal(model) is None
    questions = read_questions(shapes_split / "questions.jsonl")
    by_image = {}
    for question in questions:
        by_image.setdefault(question.images, []).append(question)
    group = max(by_image.values(), key=len)
    assert len(group) >= 3 and len({len(q.text) for q in group}) > 1  # prompts of several lengths: padded suffixes
    loaded = [load_question(processor, q, shapes_split) for q in group]
    shared = shared_prefix_features(model, processor, [p for _, p in loaded], loaded[0][0], "both")
    inputs, answer_mask = teacher_forced_inputs(processor, [p for _, p in loaded], [i for i, _ in loaded],
                                                [q.answer for q in group])
    full = sweep_features(model, inputs, answer_mask, "both")
    assert shared.shape == full.shape and full.abs().sum() > 0
    assert torch.allclose(shared, full, atol=1e-5, rtol=1e-5), (shared - full).abs().max()
    # prompts whose tokens before the image differ share no prefix: refused, so the caller runs them in full
    differ = [loaded[0][1], "Look. " + loaded[1][1]]
    assert shared_prefix_features(model, processor, differ, loaded[0][0], "both") is None
    eager = tiny_llava(TinyLlavaSpec(num_kv_heads=2, seed=3), attn_implementation="eager").eval()
    assert prefix_sharing_refusal(eager) == "the eager path"


def test_a_shared_prefix_pass_writes_the_features_of_a_pass_in_full(tmp_path, tiny):
    from analysis.demo.shapes import write_split

    model, processor = tiny
    split = write_split(tmp_path / "data", "val", 2, seed=4, image_size=56)
    questions = read_questions(split / "questions.jsonl")
    questions = questions[::2] + questions[1::2]  # the two images' questions interleaved: grouped by image again
    assert len({q.images for q in questions}) == 2
    for name, share in (("shared", True), ("full", False)):
        run_sweep(model, processor, questions, split, tmp_path / name, features=None, provenance={"model": "tiny"},
                  batch_size=2, progress=False)
        run_feature_pass(model, processor, questions, split, tmp_path / name, features="both", batch_size=2,
                         progress=False, share_prefix=share)
    shared, full = (features_by_sample(tmp_path / name) for name in ("shared", "full"))
    assert set(shared) == set(full) == {q.question_id for q in questions}
    for sample, (features, labels) in shared.items():
        assert torch.allclose(features, full[sample][0], atol=1e-5, rtol=1e-5) and torch.equal(labels, full[sample][1])
    assert len(feature_shards(tmp_path / "shared")) == 2 < len(feature_shards(tmp_path / "full"))  # one file per image
