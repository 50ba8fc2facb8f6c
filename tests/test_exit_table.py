"""The exit table's answers: every exit layer's greedy answer from one teacher-forced pass equals
generate() under the surgery's static exit, token for token (tiny models, several families)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analysis.adapters import resolve_adapter
from analysis.data import build_prompt
from analysis.testing.families import RowSpec, tiny_family_batch, tiny_family_model, tiny_family_types
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor
from exit import visual_token_exit
from exit.answers import ExitAnswersError
from exit.sweep import exit_sweep, teacher_forced_inputs

NEW_TOKENS = 4


def static_exit_answers(model, prompt_inputs, layers, pad):
    """(batch, layers, NEW_TOKENS) generate() ids under ``visual_token_exit(model, k)`` for every k
    (the last: no exit), right-padded with ``pad``."""
    prompt = prompt_inputs["input_ids"].shape[1]
    answers = torch.full((prompt_inputs["input_ids"].shape[0], layers, NEW_TOKENS), pad, dtype=torch.long)
    for k in range(layers):
        with torch.no_grad(), visual_token_exit(model, k if k < layers - 1 else None):
            new = model.generate(**prompt_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt:]
        answers[:, k, : new.shape[1]] = new
    return answers


@pytest.fixture(scope="module", params=[("mha", "sdpa"), ("gqa", "sdpa"), ("gqa", "eager")], ids="-".join)
def image_dependent_llava(request):
    """A tiny LLaVA whose answers change with the exit layer (projector outputs scaled up, so the
    image tokens dominate), its processor and a left-padded batch of two questions."""
    from conftest import BATCH_CASES

    kind, implementation = request.param
    spec = TinyLlavaSpec(num_kv_heads=4 if kind == "mha" else 2, seed=3)
    model = tiny_llava(spec, attn_implementation=implementation).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(3)
    processor = tiny_processor(spec.image_size)
    prompts = [build_prompt(processor, q) for q in BATCH_CASES["batch2_left_padding"]]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in prompts]
    return model, processor, prompts, images


def test_every_exit_layers_answer_equals_generate_under_the_static_exit(image_dependent_llava):
    model, processor, prompts, images = image_dependent_llava
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, [[i] for i in images], ["Red.", "Yes, on the left."])
    result = exit_sweep(model, inputs, answer_mask, answers=NEW_TOKENS)
    prompt_inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    assert int((prompt_inputs["attention_mask"] == 0).sum()) > 0  # the batch is padded
    layers = len(resolve_adapter(model).decoder_layers(model))
    expected = static_exit_answers(model, prompt_inputs, layers, model.generation_config.pad_token_id)
    assert result.answer_ids.shape == (2, layers, NEW_TOKENS)
    assert torch.equal(result.answer_ids, expected)
    if model.config.text_config.num_key_value_heads == 2:  # the check has teeth: answers change with the exit
        assert all(len({tuple(result.answer_ids[b, k].tolist()) for k in range(layers)}) > 1 for b in range(2))


def test_answers_leave_the_labels_as_they_were(image_dependent_llava):
    model, processor, prompts, images = image_dependent_llava
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, [[i] for i in images], ["Red.", "Blue."])
    plain = exit_sweep(model, inputs, answer_mask)
    with_answers = exit_sweep(model, inputs, answer_mask, answers=NEW_TOKENS)
    assert plain.answer_ids is None
    assert torch.equal(plain.agreement, with_answers.agreement) and torch.equal(plain.label, with_answers.label)
    # the generate()-style positions only shift the padded row's RoPE phases: same scores up to rounding
    assert (plain.ce_exit - with_answers.ce_exit).abs().max() <= 1e-4


ONE_D = [t for t in tiny_family_types() if resolve_adapter(t).positions == "1d" and t not in ("gemma3", "gemma4")]


@pytest.mark.parametrize("model_type", ONE_D)
def test_every_family_with_1d_positions_answers_like_its_static_exits(model_type):
    model = tiny_family_model(model_type, num_kv_heads=2)
    prompt_inputs = tiny_family_batch(model, (RowSpec(text=4), RowSpec(system=2, text=7)))
    answer = torch.tensor([[40, 41, 42]]).expand(2, -1)
    inputs = {**prompt_inputs, "input_ids": torch.cat([prompt_inputs["input_ids"], answer], 1),
              "attention_mask": torch.cat([prompt_inputs["attention_mask"], torch.ones_like(answer)], 1)}
    answer_mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    answer_mask[:, -3:] = True
    result = exit_sweep(model, inputs, answer_mask, answers=NEW_TOKENS)
    layers = len(resolve_adapter(model).decoder_layers(model))
    pad = model.generation_config.pad_token_id
    expected = static_exit_answers(model, prompt_inputs, layers, 0 if pad is None else pad)
    assert torch.equal(result.answer_ids, expected)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "gemma3", "gemma4"])
def test_families_the_table_cannot_decode_are_refused_with_the_reason(model_type):
    model = tiny_family_model(model_type, num_kv_heads=2)
    prompt_inputs = tiny_family_batch(model, (RowSpec(),))
    answer = torch.tensor([[40, 41]])
    inputs = {**prompt_inputs, "input_ids": torch.cat([prompt_inputs["input_ids"], answer], 1),
              "attention_mask": torch.cat([prompt_inputs["attention_mask"], torch.ones_like(answer)], 1)}
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(answer)], 1)
    answer_mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    answer_mask[:, -2:] = True
    reason = {"qwen2_vl": "1-D position ids", "gemma4": "KV-sharing layers"}.get(model_type, "sliding-window layer")
    with pytest.raises(ExitAnswersError, match=reason):
        exit_sweep(model, inputs, answer_mask, answers=NEW_TOKENS)


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    from analysis.demo.shapes import write_split

    return write_split(tmp_path_factory.mktemp("shapes"), "val", 1, seed=3, image_size=56)


def test_a_resumed_sweep_with_answers_equals_one_uninterrupted_run(tmp_path, shapes_split):
    from analysis.data import read_questions
    from exit.sweep import read_exit_answers, read_sweep, run_sweep

    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model, processor = tiny_llava(spec).eval(), tiny_processor(spec.image_size)
    questions = read_questions(shapes_split / "questions.jsonl")
    assert len(questions) >= 6
    options = dict(provenance={"model": "tiny"}, features="hidden", batch_size=2, progress=False, answers=NEW_TOKENS,
                   batches_per_file=1)
    whole = run_sweep(model, processor, questions, shapes_split, tmp_path / "whole", **options)
    assert len(whole.files) == 3 * -(-len(questions) // 2)  # per batch: features, a sweep and an answers shard
    # a stopped run: two batches committed, then a kill leaves a hidden partial file and an orphan feature file
    run_sweep(model, processor, questions[:4], shapes_split, tmp_path / "stopped", **options)
    (tmp_path / "stopped" / ".exit_sweep-00007.parquet.partial").write_bytes(b"half")
    orphan = tmp_path / "stopped" / "features-00007-00000.safetensors"
    orphan.write_bytes(b"orphan")
    with pytest.raises(Exception, match="--resume"):
        run_sweep(model, processor, questions, shapes_split, tmp_path / "stopped", **options)
    resumed = run_sweep(model, processor, questions, shapes_split, tmp_path / "stopped", resume=True, **options)
    assert resumed.samples == len(questions) - 4 and not orphan.exists()
    assert not list((tmp_path / "stopped").glob(".*.partial"))
    for read in (read_sweep, read_exit_answers):
        a, b = (read(tmp_path / name).sort_values(["sample_id", "layer"]).reset_index(drop=True) for name in ("whole", "stopped"))
        pd.testing.assert_frame_equal(a, b)
    answers = read_exit_answers(tmp_path / "whole")
    assert set(answers["layer"]) == set(range(spec.num_layers)) and answers["same_as_full"][answers["layer"] == 3].all()


def test_gates_learn_the_label_rule_asked_for(tmp_path, shapes_split):
    from analysis.data import read_questions
    from exit.frontier import monotone
    from exit.sweep import read_exit_answers, run_sweep
    from exit.train import TrainSettings, _split, rule_labels

    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model, processor = tiny_llava(spec).eval(), tiny_processor(spec.image_size)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(3)
    run_sweep(model, processor, read_questions(shapes_split / "questions.jsonl"), shapes_split, tmp_path, features="both",
              provenance={"model": "tiny"}, batch_size=3, progress=False, answers=NEW_TOKENS)
    answers = read_exit_answers(tmp_path)
    same = answers.set_index(["sample_id", "layer"])["same_as_full"]
    assert not bool(same.all())  # some exit changes an answer: the labels are not all 1
    labels = rule_labels(tmp_path, "answer,monotone")
    for sample, row in labels.items():
        assert row.tolist() == monotone(same).loc[sample].astype(int).tolist()
    settings = TrainSettings(holdout_fraction=0.0, label_rule="answer")
    learned = torch.cat([y for _, y in _split(tmp_path, settings, heldout=False)])
    assert learned.shape == (len(labels), spec.num_layers)
    assert int(learned.sum()) == int(same.sum())
    with pytest.raises(Exception, match="label rule"):
        rule_labels(tmp_path, "answers")


def test_teacher_forced_label_rules_train_from_a_labels_only_sweep(tmp_path, shapes_split):
    from analysis.data import read_questions
    from exit.frontier import monotone
    from exit.sweep import read_sweep, run_sweep
    from exit.train import rule_labels

    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model, processor = tiny_llava(spec).eval(), tiny_processor(spec.image_size)
    with torch.no_grad():  # a stronger image, so that some exits change the answer
        model.model.multi_modal_projector.linear_2.weight.mul_(30)
    run_sweep(model, processor, read_questions(shapes_split / "questions.jsonl"), shapes_split, tmp_path, features=None,
              provenance={"model": "tiny"}, batch_size=2, progress=False)
    sweep = read_sweep(tmp_path).assign(layer=lambda f: f["layer"].astype("int64")).set_index(["sample_id", "layer"])
    safe = monotone((sweep["agreement"] > 0.99) & (sweep["ce_ratio"] < 1.03))  # the paper's rule, by hand
    labels = rule_labels(tmp_path, "paper,monotone")
    assert 0 < sum(int(row.sum()) for row in labels.values()) < len(labels) * spec.num_layers  # not constant
    assert set(labels) == set(sweep.index.get_level_values("sample_id"))
    for sample, row in labels.items():
        assert row.tolist() == safe.loc[sample].sort_index().astype(int).tolist()
    with pytest.raises(Exception, match="--answers"):
        rule_labels(tmp_path, "answer")


def test_the_frontier_command_looks_up_every_method_of_an_exit_table(tmp_path, shapes_split):
    from analysis.data import read_questions
    from exit.cli import main
    from exit.gates import DyVTEGates, GateConfig
    from exit.plots import read_evaluation
    from exit.sweep import read_exit_answers, run_sweep

    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model, processor = tiny_llava(spec).eval(), tiny_processor(spec.image_size)
    run_sweep(model, processor, read_questions(shapes_split / "questions.jsonl"), shapes_split, tmp_path / "table",
              features="both", provenance={"model": "tiny"}, batch_size=3, progress=False, answers=NEW_TOKENS)
    DyVTEGates.for_model(model, GateConfig(inputs="history", hidden_width=8)).save(tmp_path / "gates")
    code = main(["frontier", "--table", str(tmp_path / "table"), "--out", str(tmp_path / "frontier"),
                 "--figures", str(tmp_path / "figures"), "--gates", f"history={tmp_path / 'gates'}",
                 "--tau-table", str(tmp_path / "table"), "--taus", "0.3,0.6", "--vtw-layer", "2"])
    assert code == 0
    rows, summary = read_evaluation(tmp_path / "frontier")
    layers = spec.num_layers
    from analysis.io import read_provenance  # what make frontier reads back (the chosen tau to time DyVTE at)
    expected = {"none", "oracle", "oracle[correct]", "oracle[informed]", "oracle[category]", "static[category]", "vtw:2",
                "dyvte[history]:0.3", "dyvte[history]:0.6", *(f"static:{k}" for k in range(layers - 1))}
    assert set(summary["method"]) == expected
    from exit.frontier import category_static_layers

    made = read_provenance(tmp_path / "frontier" / "summary.parquet")  # the same table validates: both pick alike
    assert made["category_layers"]["oracle[category]"] == made["category_layers"]["static[category]"] == \
        category_static_layers(read_exit_answers(tmp_path / "table"))
    answers = read_exit_answers(tmp_path / "table").set_index(["sample_id", "layer"])
    for _, row in rows[rows["method"] == "static:1"].iterrows():  # a lookup reads the table's own answer
        assert row["prediction"] == answers.loc[(row["question_id"], 1), "prediction"]
    assert (tmp_path / "frontier" / "label_rules.md").read_text().count("oracle[") >= 8
    assert read_provenance(tmp_path / "frontier" / "summary.parquet")["chosen_tau"]["history"] in (0.3, 0.6)
    for name in ("frontier.png", "exit_histogram.png", "accuracy_by_exit_layer.png", "oracle_exit_layers.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0
    assert main(["frontier", "--table", str(tmp_path / "table"), "--out", str(tmp_path / "again"), "--gates", "x"]) == 2
    from exit.frontier import DEFAULT_TAUS  # without --taus: the library's own grid, one list for both

    assert main(["frontier", "--table", str(tmp_path / "table"), "--out", str(tmp_path / "defaults"),
                 "--gates", f"history={tmp_path / 'gates'}"]) == 0
    _, defaults = read_evaluation(tmp_path / "defaults")
    assert {m for m in defaults["method"] if m.startswith("dyvte")} == {f"dyvte[history]:{tau:g}" for tau in DEFAULT_TAUS}

    # an averaged gate set (NAME=A,B): its lookups read the mean of the members' p(exit)
    from exit.frontier import first_exit_over, gate_probabilities

    members = [DyVTEGates.for_model(model, GateConfig(hidden_width=8, seed=seed)).save(tmp_path / f"seed{seed}") for seed in (1, 2)]
    assert main(["frontier", "--table", str(tmp_path / "table"), "--out", str(tmp_path / "averaged"), "--taus", "0.5",
                 "--gates", "seeds=" + ",".join(map(str, members))]) == 0
    averaged_rows, _ = read_evaluation(tmp_path / "averaged")
    probabilities = [gate_probabilities(tmp_path / "table", DyVTEGates.load(folder)).set_index(["sample_id", "layer"])["p_exit"]
                     for folder in members]
    mean = ((probabilities[0] + probabilities[1]) / 2).rename("p_exit").reset_index()
    expected_exits = first_exit_over(mean, 0.5, layers)
    found = averaged_rows[averaged_rows["method"] == "dyvte[seeds]:0.5"].set_index("question_id")["exit_layer"]
    assert len(found) == len(expected_exits) > 0
    assert {q: (layers - 1 if k < 0 else k) for q, k in found.items()} == {q: int(k) for q, k in expected_exits.items()}


def test_real_runs_join_the_frontier_beside_the_lookups(tmp_path, shapes_split, capsys):
    """An evaluation folder over the table's questions (what no table holds: FastV) joins the frontier;
    a real static exit there equals the table's lookup of it, answer for answer and in FLOPs."""
    from analysis.data import read_questions
    from analysis.io import read_provenance
    from exit.cli import main
    from exit.evaluate import evaluate_methods
    from exit.methods import parse_method
    from exit.plots import read_evaluation
    from exit.sweep import run_sweep

    spec = TinyLlavaSpec(num_kv_heads=2, seed=3)
    model, processor = tiny_llava(spec).eval(), tiny_processor(spec.image_size)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(3)
    questions = read_questions(shapes_split / "questions.jsonl")
    run_sweep(model, processor, questions, shapes_split, tmp_path / "table", features=None,
              provenance={"model": "tiny"}, batch_size=3, progress=False, answers=NEW_TOKENS)
    methods = [parse_method(text, spec.num_layers) for text in ("static:1", "fastv:1:0.5")]
    evaluate_methods(model, processor, questions, shapes_split, methods, tmp_path / "runs", max_new_tokens=NEW_TOKENS,
                     batch_size=2, provenance={"model": "tiny"})
    table = ["frontier", "--table", str(tmp_path / "table")]
    # unnamed, its static:1 is named like the lookup's: refused, and nothing is written
    assert main([*table, "--out", str(tmp_path / "clash"), "--runs", str(tmp_path / "runs")]) == 2
    assert "found 'static:1' twice; name the run (--runs NAME=" in capsys.readouterr().err
    assert not (tmp_path / "clash" / "summary.parquet").exists()
    assert main([*table, "--out", str(tmp_path / "frontier"), "--runs", f"real={tmp_path / 'runs'}"]) == 0
    rows, summary = read_evaluation(tmp_path / "frontier")
    assert {"static[real]:1", "fastv[real]:1:0.5", "static:1", "none"} <= set(summary["method"])
    by_method = {m: f.set_index("question_id").sort_index() for m, f in rows.groupby("method")}
    real, lookup = by_method["static[real]:1"], by_method["static:1"]
    assert real["prediction"].tolist() == lookup["prediction"].tolist()
    np.testing.assert_allclose(real["relative_prefill_flops"], lookup["relative_prefill_flops"], rtol=1e-12)
    assert (real["prefill_seconds"] > 0).all() and (lookup["prefill_seconds"].isna()).all()  # rows keep their times
    fastv = summary.set_index("method").loc["fastv[real]:1:0.5"]
    assert fastv["relative_prefill_flops"] < 1 and np.isnan(fastv["prefill_seconds"])  # the summary shows no times
    made = read_provenance(tmp_path / "frontier" / "eval-fastv[real]_1_0.5.parquet")
    assert made["rows"] == f"real run (dyvte-exit eval) read from {tmp_path / 'runs'}"
    assert read_provenance(tmp_path / "frontier" / "summary.parquet")["real_runs"]["fastv[real]:1:0.5"] == str(tmp_path / "runs")
    assert "except static[real]:1, fastv[real]:1:0.5: real runs" in (tmp_path / "frontier" / "frontier.md").read_text()
    # a run over other questions than the table's is refused before any lookup
    evaluate_methods(model, processor, questions[:2], shapes_split, methods[1:], tmp_path / "few", batch_size=2,
                     provenance={"model": "tiny"})
    with pytest.raises(Exception, match="to answer the exit table's"):
        from exit.frontier import frontier_of_tables
        frontier_of_tables(tmp_path / "table", runs=[(None, tmp_path / "few")])
    assert main([*table, "--out", str(tmp_path / "bad"), "--runs", "=x"]) == 2
    assert "expected --runs FOLDER or --runs NAME=FOLDER, found '=x'" in capsys.readouterr().err


def test_answers_of_a_family_the_table_cannot_decode_stop_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import analysis.loading
    from exit.cli import main

    tiny_family_model("qwen2_vl").config.save_pretrained(tmp_path / "model")  # a config is all it reads
    monkeypatch.setattr(analysis.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "q.jsonl").write_text('{"question_id": "a", "image": "x.png", "text": "What?", "answer": "red"}\n')
    status = main(["sweep", "--model", str(tmp_path / "model"), "--questions", str(tmp_path / "q.jsonl"),
                   "--image-folder", str(tmp_path), "--out", str(tmp_path / "out"), "--answers", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "expected a family with 1-D position ids" in err and "Traceback" not in err
