"""exit.evaluate on a tiny LLaVA: methods, per-question rows, summaries."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from analysis.adapters import resolve_adapter  # noqa: E402
from analysis.data import read_questions  # noqa: E402
from analysis.demo.shapes import write_split  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402
from exit.evaluate import calibrate_vtw, encode_questions, evaluate_method, parse_method, summarize_evaluation  # noqa: E402
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


def test_unknown_kind_lists_the_valid_kinds():
    from analysis.errors import UsageError
    from exit.methods import METHODS, parse_method_spec

    with pytest.raises(UsageError) as raised:
        parse_method_spec("pdrop:8")
    assert "'pdrop'" in str(raised.value) and all(repr(kind) in str(raised.value) for kind in METHODS)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("spec, message", [
    ("static:99x", "integer K"), ("static:-1", "integer K"), ("fastv:2", "'fastv:K:R'"), ("fastv:1:nan", r"\[0, 1\]"),
    ("dyvte:1.5", r"\[0, 1\)"), ("dyvte:1", r"\[0, 1\)"), ("dyvte:-0.1", r"\[0, 1\)"), ("vtw:1:2", "'vtw' or 'vtw:K'"),
    ("none:1", "'none'"), ("foo", "one of the kinds"), ("", "one of the kinds"),
])
def test_syntax_and_ranges_are_checked_without_a_model(spec, message):
    from analysis.errors import UsageError
    from exit.methods import parse_method_spec

    with pytest.raises(UsageError, match=message):
        parse_method_spec(spec)


def test_layers_are_checked_against_the_number_of_decoder_layers():
    from analysis.errors import UsageError
    from exit.methods import parse_method_spec

    for spec in ("static:99", "fastv:99:0.5", "vtw:4", "dyvte+fastv:4:0.5"):
        parsed = parse_method_spec(spec)  # fine without a model
        with pytest.raises(UsageError, match="in 0..3 \\(the model has 4 decoder layers\\)"):
            parsed.check_layers(SPEC.num_layers)
    assert parse_method_spec("static:3").check_layers(SPEC.num_layers).layer == 3


def test_every_kind_of_the_table_parses_names_and_labels_its_forms():
    from exit.methods import CALIBRATION, GATES, METHOD_FORMS, METHODS, parse_method_spec

    examples = {"K": "2", "R": "0.5", "TAU": "0.7"}
    written = [":".join([form.split(":")[0], *(examples[p] for p in form.split(":")[1:])]) for form in METHOD_FORMS]
    assert written == ["none", "static:2", "vtw", "vtw:2", "fastv:2:0.5", "dyvte", "dyvte:0.7", "dyvte+fastv:2:0.5",
                       "dyvte+fastv:2:0.5:0.7"]
    specs = [parse_method_spec(text) for text in written]
    assert [spec.name for spec in specs] == written
    assert [spec.label for spec in specs] == ["full model", "K=2", "", "K=2", "K=2 R=0.5", "gates' tau", "tau=0.7",
                                              "gates+K=2 R=0.5", "gates+K=2 R=0.5 tau=0.7"]
    assert [sorted(spec.needs) for spec in specs] == [[], [], [CALIBRATION], [], [], [GATES], [GATES], [GATES], [GATES]]
    assert {spec.kind for spec in specs} == set(METHODS)
    assert parse_method_spec(" fastv:2:0.50 ").name == "fastv:2:0.5"  # canonical names (file names)


def test_duplicate_methods_are_usage_errors(split, tiny):
    from analysis.errors import UsageError
    from exit.evaluate import evaluate_methods
    from exit.methods import parse_method_specs

    for values in (["static:1,static:1"], ["none", "static:1", "none"], ["dyvte:0.5", "dyvte:0.50"]):
        with pytest.raises(UsageError, match="expected each method once"):
            parse_method_specs(values)
    assert [spec.name for spec in parse_method_specs(["none,static:1", "vtw:2"])] == ["none", "static:1", "vtw:2"]
    with pytest.raises(UsageError, match="expected at least one method"):
        parse_method_specs([","])
    model, processor = tiny
    twice = [parse_method("static:1", SPEC.num_layers), parse_method("vtw:1", SPEC.num_layers)] * 2
    with pytest.raises(UsageError, match="expected each method once, found \\['static:1', 'vtw:1'\\]"):
        evaluate_methods(model, processor, read_questions(split / "questions.jsonl"), split, twice)


def test_binding_checks_the_needs_and_the_gates(tiny):
    from analysis.errors import UsageError
    from exit.evaluate import VTWCalibration

    model, _ = tiny
    with pytest.raises(UsageError, match="'dyvte:0.5'"):
        parse_method("dyvte:0.5", SPEC.num_layers)
    attention = DyVTEGates.for_model(model, GateConfig(inputs="attention", hidden_width=4))
    assert parse_method("dyvte", SPEC.num_layers, attention).gates is attention
    with pytest.raises(UsageError, match="inputs='hidden'"):
        parse_method("dyvte+fastv:1:0.5", SPEC.num_layers, attention)
    tuned = parse_method("dyvte:0.25", SPEC.num_layers, attention)
    assert tuned.gates.config.tau == 0.25 and attention.config.tau == 0.5 and tuned.gates.gates is attention.gates
    hidden = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=4))
    paired = parse_method("dyvte+fastv:1:0.5:0.9", SPEC.num_layers, hidden)
    assert (paired.gates.config.tau, paired.layer, paired.ratio, hidden.config.tau) == (0.9, 1, 0.5, 0.5)
    far = VTWCalibration(layer=7, eta=0.1, kl=(0.0,) * 8, question_ids=("q",))
    with pytest.raises(UsageError, match="0..3"):
        parse_method("vtw", SPEC.num_layers, vtw=far)


@pytest.mark.parametrize("text", ["none", "static:1", "vtw:2", "fastv:1:0.5", "fastv:0:1", "dyvte", "dyvte+fastv:1:0.5",
                                  "dyvte+fastv:2:0.5"])
def test_the_flops_rule_of_each_kind_matches_the_tokens_the_surgery_kept(split, tiny, text):
    """The table's FLOPs rule, evaluated on each row's exit layer, equals the FLOPs of the tokens
    each layer really processed (the handle's tokens_per_layer), row by row in a padded batch."""
    model, processor = tiny
    gates = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8, seed=3))
    method = parse_method(text, SPEC.num_layers, gates)
    questions = read_questions(split / "questions.jsonl")
    inputs = encode_questions(processor, questions, split)
    image_token_id = resolve_adapter(model).image_token_id(model)
    shape = DecoderShape.from_config(model.config)
    with torch.no_grad(), method.attached(model, inputs["input_ids"], inputs["attention_mask"]) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    exits = handle.exit_layers if handle is not None else [None] * len(questions)
    for row, exit_layer in enumerate(exits):
        mask = inputs["attention_mask"][row].bool()
        tokens, image_tokens = int(mask.sum()), int(((inputs["input_ids"][row] == image_token_id) & mask).sum())
        counts = handle.tokens_per_layer()[row].tolist() if handle is not None else [tokens] * SPEC.num_layers
        expected = prefill_flops_for_counts(shape, counts) / prefill_flops(shape, tokens, image_tokens)
        assert method.relative_prefill_flops(shape, tokens, image_tokens, exit_layer) == pytest.approx(expected, rel=1e-12)


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
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_evaluation_files_are_registered_tables_with_provenance(split, tiny, tmp_path):
    import json

    import pyarrow.parquet as pq

    from analysis.io import validate_path
    from analysis.schema import PROVENANCE_KEY, TABLE_KEY, TABLES, VERSION_KEY, validate_arrow_schema
    from exit.evaluate import evaluate_methods

    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")
    gates = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8))
    methods = [parse_method(spec, SPEC.num_layers, gates) for spec in ("static:1", "dyvte:0.3")]
    evaluate_methods(model, processor, questions, split, methods, tmp_path, provenance={"model": "tiny", "seed": 7})
    expected = {"eval-static_1.parquet": ("evaluation", "static:1"), "eval-dyvte_0.3.parquet": ("evaluation", "dyvte:0.3"),
                "summary.parquet": ("evaluation_summary", None)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for name, (table, method) in expected.items():
        schema = pq.read_schema(tmp_path / name)
        assert schema.metadata[TABLE_KEY].decode() == table
        assert schema.metadata[VERSION_KEY].decode() == str(TABLES[table].version)
        assert validate_arrow_schema(schema, name, expected=table) == table
        provenance = json.loads(schema.metadata[PROVENANCE_KEY])
        assert provenance["model"] == "tiny" and provenance["seed"] == 7
        if method is not None:
            assert provenance["method"] == method
    dyvte = json.loads(pq.read_schema(tmp_path / "eval-dyvte_0.3.parquet").metadata[PROVENANCE_KEY])
    assert dyvte["tau"] == 0.3 and dyvte["gates"]["tau"] == 0.3 and dyvte["gates"]["model"]["num_layers"] == SPEC.num_layers
    summary = json.loads(pq.read_schema(tmp_path / "summary.parquet").metadata[PROVENANCE_KEY])
    assert summary["methods"] == ["static:1", "dyvte:0.3"]
    summary_columns = pq.read_schema(tmp_path / "summary.parquet").names
    assert [c for c in summary_columns if c.startswith("accuracy_")][1:] == [
        f"accuracy_{c}" for c in sorted({q.category for q in questions})]  # the open columns, after accuracy_overall
    lines = sorted(validate_path(tmp_path))
    assert [line.rsplit(": ", 1)[1] for line in lines] == [f"evaluation, {len(questions)} rows"] * 2 + [
        "evaluation_summary, 2 rows"]


def test_default_provenance_describes_the_model(split, tiny, tmp_path):
    from analysis.io import read_provenance
    from exit.evaluate import evaluate_methods

    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")[:1]
    evaluate_methods(model, processor, questions, split, [parse_method("none", SPEC.num_layers)], tmp_path)
    provenance = read_provenance(tmp_path / "eval-none.parquet")
    assert provenance["model_type"] == "llava" and provenance["attention_path"] in ("sdpa", "eager")
    assert {"torch", "transformers", "git_revision", "dtype", "seed", "method", "kind"} <= set(provenance)


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
