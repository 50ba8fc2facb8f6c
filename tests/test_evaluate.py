"""exit.evaluate on a tiny LLaVA: methods, per-question rows, summaries."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from analysis.data import read_questions  # noqa: E402
from analysis.demo.shapes import write_split  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402
from analysis.adapters import resolve_adapter  # noqa: E402
from exit.evaluate import calibrate_vtw, evaluate_method, parse_method, summarize_evaluation  # noqa: E402
from exit.flops import DecoderShape, fastv_tokens_per_layer, prefill_flops, prefill_flops_for_counts  # noqa: E402
from exit.gates import DyVTEGates, GateConfig  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("shapes"), "val", 3, seed=5, image_size=84)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(SPEC), tiny_processor(SPEC.image_size)


def test_no_exit_and_exit_after_the_last_layer_answer_alike_at_full_cost(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    none = evaluate_method(model, processor, questions, split, parse_method("none", SPEC.num_layers), batch_size=4)
    last = evaluate_method(model, processor, questions, split, parse_method(f"static:{SPEC.num_layers - 1}",
                                                                            SPEC.num_layers), batch_size=4)
    assert list(none["question_id"]) == [q.question_id for q in questions]
    assert list(none["prediction"]) == list(last["prediction"])
    assert (none["relative_prefill_flops"] == 1.0).all() and (none["exit_layer"] == -1).all()
    assert (none["image_tokens"] == (SPEC.image_size // 14) ** 2).all()
    assert none["batch_rows"].max() > 1  # questions about one image share a padded batch
    summary = summarize_evaluation(none, SPEC.num_layers)
    assert summary["accuracy"]["overall"] == pytest.approx(none["correct"].mean())
    assert set(summary["accuracy"]) == {q.category for q in questions} | {"overall"}
    assert summary["mean_exit_layer"] == SPEC.num_layers - 1 and summary["exited_share"] == 0.0


def test_prefill_and_decoding_times_split_each_batchs_generate_time(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    rows = evaluate_method(model, processor, questions, split, parse_method("static:0", SPEC.num_layers),
                           max_new_tokens=3, batch_size=4)
    batches = rows.groupby("batch").first()
    assert (batches["prefill_seconds"] > 0).all() and (batches["decode_seconds"] >= 0).all()
    assert (batches["prefill_seconds"] + batches["decode_seconds"]).tolist() == pytest.approx(
        batches["batch_seconds"].tolist(), abs=1e-9)
    assert batches["decode_steps"].between(0, 2).all() and batches["decode_steps"].max() == 2
    summary = summarize_evaluation(rows, SPEC.num_layers)
    decoded = (batches["decode_steps"] * batches["batch_rows"]).sum()
    assert summary["decode_tokens_per_second"] == pytest.approx(decoded / batches["decode_seconds"].sum())
    assert summary["prefill_seconds"] + summary["decode_seconds"] == pytest.approx(summary["seconds"])


def test_static_exit_is_batch_independent_and_saves_flops(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    method = parse_method("static:0", SPEC.num_layers)
    batched = evaluate_method(model, processor, questions, split, method, batch_size=8)
    alone = evaluate_method(model, processor, questions, split, method, batch_size=1)
    assert list(batched["prediction"]) == list(alone["prediction"])
    assert (batched["exit_layer"] == 0).all()
    assert (batched["relative_prefill_flops"] < 1.0).all()


def test_dyvte_records_each_rows_exit_layer(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    gates = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8, tau=0.0))  # always fires
    frame = evaluate_method(model, processor, questions, split, parse_method("dyvte", SPEC.num_layers, gates))
    assert (frame["exit_layer"] == 0).all()  # tau 0: the first gate fires for every row
    static = evaluate_method(model, processor, questions, split, parse_method("static:0", SPEC.num_layers))
    assert list(frame["prediction"]) == list(static["prediction"])


def test_fastv_brackets_the_stock_model_and_the_static_exit(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    run = lambda spec: evaluate_method(model, processor, questions, split, parse_method(spec, SPEC.num_layers))  # noqa: E731
    none, static, keep_all, keep_none, half = (run(s) for s in ("none", "static:1", "fastv:1:0", "fastv:1:1", "fastv:1:0.5"))
    assert list(keep_all["method"].unique()) == ["fastv:1:0"] and list(half["method"].unique()) == ["fastv:1:0.5"]
    assert list(keep_all["prediction"]) == list(none["prediction"])
    assert (keep_all["relative_prefill_flops"] == 1.0).all() and (keep_all["exit_layer"] == -1).all()
    assert list(keep_none["prediction"]) == list(static["prediction"])
    assert list(keep_none["relative_prefill_flops"]) == list(static["relative_prefill_flops"])
    assert (keep_none["exit_layer"] == 1).all() and (half["exit_layer"] == -1).all()
    shape = DecoderShape.from_config(model.config)
    for row in half.itertuples():
        counts = fastv_tokens_per_layer(shape, row.tokens, row.image_tokens, 1, 0.5)
        expected = prefill_flops_for_counts(shape, counts) / prefill_flops(shape, row.tokens, row.image_tokens)
        assert row.relative_prefill_flops == pytest.approx(expected, rel=1e-12)
    assert (static["relative_prefill_flops"] < half["relative_prefill_flops"]).all()
    assert (half["relative_prefill_flops"] < 1.0).all()


def test_dyvte_with_fastv_follows_the_gates(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    run = lambda spec, gates=None: evaluate_method(  # noqa: E731
        model, processor, questions, split, parse_method(spec, SPEC.num_layers, gates))
    always = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8, tau=0.0))
    never = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8, tau=1.0))
    fired = run("dyvte+fastv:2:0.5", always)  # the first gate fires before FastV's layer
    static = run("static:0")
    assert (fired["exit_layer"] == 0).all() and list(fired["prediction"]) == list(static["prediction"])
    assert list(fired["relative_prefill_flops"]) == list(static["relative_prefill_flops"])
    silent, pruned = run("dyvte+fastv:2:0.5", never), run("fastv:2:0.5")
    assert list(silent["method"].unique()) == ["dyvte+fastv:2:0.5"]
    assert list(silent["prediction"]) == list(pruned["prediction"])
    assert list(silent["relative_prefill_flops"]) == list(pruned["relative_prefill_flops"])


def test_vtw_calibration_has_a_known_answer(split):
    """Layers 2 and 3 write nothing to the residual stream, so every exit from layer 1 on leaves the
    next-token distribution unchanged (KL 0), and eta = 0 picks layer 1."""
    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    with torch.no_grad():
        for layer in resolve_adapter(model).decoder_layers(model)[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    questions = read_questions(split / "questions.jsonl")
    calibration = calibrate_vtw(model, processor, questions, split, eta=0.0, n=2)
    assert calibration.layer == 1 and calibration.samples == 2
    assert calibration.kl[0] > 0 and calibration.kl[1:] == (0.0, 0.0, 0.0)
    assert calibrate_vtw(model, processor, questions, split, eta=calibration.kl[0], n=2).layer == 0
    method = parse_method("vtw", SPEC.num_layers, vtw=calibration)
    assert method.name == "vtw:1" and parse_method("vtw:1", SPEC.num_layers) == method
    vtw = evaluate_method(model, processor, questions, split, method)
    static = evaluate_method(model, processor, questions, split, parse_method("static:1", SPEC.num_layers))
    assert list(vtw["prediction"]) == list(static["prediction"]) and (vtw["exit_layer"] == 1).all()
    assert list(vtw["method"].unique()) == ["vtw:1"]


@pytest.mark.parametrize("spec, message", [
    ("static:9", "0..3"), ("static:x", "integer"), ("dyvte", "gates"), ("fastv", "expected a method"),
    ("fastv:1", "fastv:K:R"), ("fastv:4:0.5", "0..3"), ("fastv:1:1.5", r"\[0, 1\]"), ("fastv:1:x", "number R"),
    ("dyvte+fastv:1:0.5", "gates"), ("vtw", "VTW calibration"), ("vtw:7", "0..3"), ("pdrop:8", "expected a method"),
])
def test_bad_methods_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec, SPEC.num_layers)


def test_several_methods_share_the_model_and_write_parquet(split, tiny, tmp_path):
    import pandas as pd

    from exit.evaluate import evaluate_methods

    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    methods = [parse_method(spec, SPEC.num_layers) for spec in ("none", "static:1")]
    rows, summary = evaluate_methods(model, processor, questions, split, methods, tmp_path)
    assert list(summary["method"]) == ["none", "static:1"]
    assert summary.loc[1, "relative_prefill_flops"] < summary.loc[0, "relative_prefill_flops"] == 1.0
    assert len(rows) == 2 * len(questions)
    written = pd.read_parquet(tmp_path / "eval-static_1.parquet")
    assert (written["exit_layer"] == 1).all() and len(written) == len(questions)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "summary.parquet"), summary)
    assert not list(tmp_path.glob("*.partial"))


def test_eval_command_compares_methods_on_one_model(split, tmp_path, capsys):
    import pandas as pd

    from analysis.testing.tiny import save_tiny_llava
    from exit.cli import main

    model_dir = save_tiny_llava(tmp_path / "model", SPEC)
    gates = DyVTEGates.for_model(tiny_llava(SPEC), GateConfig(inputs="hidden", hidden_width=8))
    gates.save(tmp_path / "gates")
    args = ["eval", "--model", str(model_dir), "--questions", str(split / "questions.jsonl"),
            "--image-folder", str(split), "--gates", str(tmp_path / "gates"), "--out", str(tmp_path / "eval"),
            "--method", "none,static:1", "--method", "dyvte:0", "--method", "vtw:2", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = pd.read_parquet(tmp_path / "eval" / "summary.parquet")
    assert list(summary["method"]) == ["none", "static:1", "dyvte:0", "vtw:2"]
    assert all(method in printed for method in summary["method"])
    rows = pd.read_parquet(tmp_path / "eval" / "eval-dyvte_0.parquet")
    assert (rows["exit_layer"] == 0).all()  # tau 0 fires at the first gate
    assert main(args[:-9] + ["--method", "vtw", "--no-progress"]) == 2
    assert "--calibration-questions" in capsys.readouterr().err


def test_figures_command_draws_an_eval_folder(split, tiny, tmp_path, capsys):
    from exit.cli import main
    from exit.evaluate import evaluate_methods

    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    evaluate_methods(model, processor, questions, split, [parse_method("none", SPEC.num_layers)], tmp_path / "eval")
    assert main(["figures", str(tmp_path / "eval"), "--out", str(tmp_path / "figures")]) == 0
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["exit_histogram.png", "exit_results.md",
                                                                       "frontier.png"]
    assert main(["figures", str(tmp_path / "missing"), "--out", str(tmp_path / "figures")]) == 2
    assert "missing" in capsys.readouterr().err
