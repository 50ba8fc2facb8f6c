"""Gate training (offline from cached features, online one layer per step) and the dyvte-exit command line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava
from exit import DyVTEGates, GateConfig, ModelSignature, feature_size
from exit.sweep import LabelRule, SweepError, SweepResult, SweepWriter, teacher_forced_inputs
from exit.train import TAU_GRID, TrainSettings, _replay_dyvte, _split, is_heldout, online_step, train_offline


def synthetic_sweep(folder, samples=240, layers=3, hidden=4, shards=3, kind="hidden"):
    """Feature shards whose label at layer l is sign(feature l); kind "both" appends noise
    attention features (one head) after the hidden ones."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(samples, layers, 2 * hidden, generator=generator)
    labels = features[:, torch.arange(layers), torch.arange(layers)] > 0
    if kind == "both":
        attention = feature_size(GateConfig(inputs="attention"), ModelSignature("llava", layers, hidden, 1))
        features = torch.cat([features, torch.randn(samples, layers, attention, generator=generator)], dim=-1)
    per = samples // shards
    with SweepWriter(folder, {"model": "synthetic"}) as writer:
        for shard in range(shards):
            part = slice(shard * per, (shard + 1) * per)
            zeros = torch.zeros(per, layers)
            result = SweepResult(
                agreement=zeros, ce_exit=zeros, ce_full=torch.ones(per), ce_ratio=zeros, label=labels[part],
                n_answer=torch.ones(per, dtype=torch.long), n_image=torch.ones(per, dtype=torch.long),
                n_kept=torch.ones(per, dtype=torch.long), rule=LabelRule(), features=features[part], features_kind=kind,
            )
            writer.write(result, [f"s{i}" for i in range(shard * per, (shard + 1) * per)])
    return ModelSignature("llava", layers, hidden, 1)


def test_offline_training_learns_and_is_seeded(tmp_path):
    signature = synthetic_sweep(tmp_path)
    settings = TrainSettings(lr=3e-2, epochs=15, batch_size=32, seed=7)
    runs = []
    for _ in range(2):
        gates = DyVTEGates(GateConfig(hidden_width=16, seed=7), signature)
        report = train_offline(gates, tmp_path, settings)
        runs.append(gates)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    heldout = sum(is_heldout(f"s{i}", settings.holdout_fraction, settings.seed) for i in range(240))
    assert report.heldout_samples == heldout and report.train_examples == 240 - heldout
    assert min(report.layer_accuracy) >= 0.85, report.layer_accuracy  # a chance gate scores about 0.5
    assert report.losses[-1] < report.losses[0]
    assert [point["tau"] for point in report.tau_curve] == list(TAU_GRID)
    shares = [point["exited_share"] for point in report.tau_curve]
    assert shares == sorted(shares, reverse=True), "a higher threshold never makes more rows exit"


def test_a_shared_gate_learns_every_layer_from_the_training_rows_scale(tmp_path):
    # one network for the three layers: the label at layer l is sign(feature l), so it must read
    # the layer's one-hot to know which feature decides
    signature = synthetic_sweep(tmp_path)
    settings = TrainSettings(lr=1e-2, epochs=30, batch_size=32, seed=7)
    gates = DyVTEGates(GateConfig(hidden_width=32, seed=7, shared=True, dropout=0.1), signature)
    report = train_offline(gates, tmp_path, settings)
    assert len(gates.gates) == 1
    rows = torch.cat([torch.cat([features, torch.eye(3).expand(len(features), 3, 3)], dim=-1)
                      for features, _ in _split(tmp_path, settings, heldout=False, gates=gates)]).flatten(0, 1)
    assert torch.allclose(gates.input_mean, rows.mean(0), atol=1e-5)
    assert torch.allclose(gates.input_scale, rows.std(0, correction=0), atol=1e-5)
    assert min(report.layer_accuracy) >= 0.85, report.layer_accuracy  # a chance gate scores about 0.5


def test_dyvte_replay_has_known_exits_and_unsafe_counts():
    p_exit = torch.tensor([[0.9, 0.1, 0.1, 0.99],    # fires after layer 0 at tau 0.5 (safe); never at 0.9
                           [0.2, 0.7, 0.95, 0.0],    # after layer 1 at 0.5 (unsafe), after 2 at 0.9 (safe)
                           [0.1, 0.1, 0.1, 0.99]])   # the last layer's gate is never asked: no exit
    labels = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert _replay_dyvte(p_exit, labels, 0.5).tolist() == [2.0, 0 + 1 + 3, 1.0]
    assert _replay_dyvte(p_exit, labels, 0.9).tolist() == [1.0, 3 + 2 + 3, 0.0]


def test_online_step_updates_only_the_drawn_gate(tiny_models, processor):
    model = tiny_models("gqa")
    from analysis.data import Question, build_prompt

    prompts = [build_prompt(processor, Question("a", ("x.png",), "What colour?"))]
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, [[Image.new("RGB", (40, 30), "red")]], ["Red."])
    gates = DyVTEGates.for_model(model, GateConfig(hidden_width=8))
    before = [p.detach().clone() for p in gates.parameters()]
    model_before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(gates.parameters(), lr=1e-2)
    layer, loss = online_step(gates, model, optimizer, inputs, answer_mask, torch.Generator().manual_seed(0))
    changed = [not torch.equal(a, b) for a, b in zip(before, gates.parameters())]
    assert changed == [i // 2 == layer for i in range(len(changed))] and loss > 0
    assert all(torch.equal(a, b) for a, b in zip(model_before, model.parameters()))


def test_command_line_sweep_train_generate(tmp_path, capsys):
    from exit.cli import main

    model_dir = save_tiny_llava(tmp_path / "model", TinyLlavaSpec(image_size=28))
    (tmp_path / "img").mkdir()
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "yellow", "red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"{i}.png", "text": "What colour?", "answer": colour}))
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--model", str(model_dir), "--no-progress"]
    assert main(["sweep", *common, "--questions", str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path / "img"),
                 "--out", str(tmp_path / "sweep"), "--batch-size", "2"]) == 0
    assert "wrote 24 rows for 6 samples" in capsys.readouterr().out
    assert main(["sweep", *common, "--questions", str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path / "img"),
                 "--out", str(tmp_path / "sweep"), "--batch-size", "2", "--resume"]) == 0  # a finished sweep: nothing to do
    assert "nothing left to sweep" in capsys.readouterr().out
    assert main(["train", "--sweep", str(tmp_path / "sweep"), "--model", str(model_dir), "--out", str(tmp_path / "gates"),
                 "--hidden-width", "8", "--epochs", "2", "--batch-size", "2", "--holdout", "0.5"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "held-out accuracy by layer" in out and (tmp_path / "gates" / "gates.safetensors").is_file()
    assert "warning: training would take 4 optimiser step(s) (3 samples, --batch-size 2, --epochs 2)" in captured.err
    assert "gates file would be" not in captured.err  # width 8: small beside its features
    assert main(["train", "--sweep", str(tmp_path / "sweep"), "--model", str(model_dir), "--out", str(tmp_path / "big"),
                 "--holdout", "0.5", "--no-progress"]) == 0  # the paper's defaults on 3 samples
    err = capsys.readouterr().err
    assert "training would take 1 optimiser step(s)" in err and "warning: the gates file would be" in err
    assert main(["train", "--sweep", str(tmp_path / "sweep"), "--model", str(model_dir), "--out", str(tmp_path / "fit"),
                 "--hidden-width", "8", "--epochs", "40", "--batch-size", "1", "--holdout", "0.5", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["train", "--online", "--model", str(model_dir), "--questions", str(tmp_path / "q.jsonl"),
                 "--image-folder", str(tmp_path / "img"), "--out", str(tmp_path / "gates-online"), "--hidden-width", "8",
                 "--batch-size", "2", "--holdout", "0.5", "--no-progress"]) == 0
    assert "held-out accuracy by layer" in capsys.readouterr().out
    assert main(["train", "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "expected --sweep" in capsys.readouterr().err
    assert main(["generate", *common, "--gates", str(tmp_path / "gates"), "--image", str(tmp_path / "img" / "0.png"),
                 "--question", "What colour?", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "exit layer:" in out
    assert main(["generate", *common, "--gates", str(tmp_path / "missing"), "--image", str(tmp_path / "img" / "0.png"),
                 "--question", "?"]) == 2


def test_both_features_serve_hidden_and_attention_gates(tmp_path):
    import pytest

    from exit.gates import select_features

    signature = synthetic_sweep(tmp_path / "hidden")
    synthetic_sweep(tmp_path / "both", kind="both")
    settings = TrainSettings(lr=3e-2, epochs=3, batch_size=32, seed=7)
    from_hidden = DyVTEGates(GateConfig(hidden_width=16, seed=7), signature)
    from_both = DyVTEGates(GateConfig(hidden_width=16, seed=7), signature)
    train_offline(from_hidden, tmp_path / "hidden", settings)
    train_offline(from_both, tmp_path / "both", settings)  # the hidden part of the cached 'both' features
    assert all(torch.equal(a, b) for a, b in zip(from_hidden.state_dict().values(), from_both.state_dict().values()))
    attention_gates = DyVTEGates(GateConfig(inputs="attention", hidden_width=16, seed=7), signature)
    train_offline(attention_gates, tmp_path / "both", settings)  # trains on the attention part
    with pytest.raises(SweepError, match="'attention'"):
        train_offline(attention_gates, tmp_path / "hidden", settings)
    features = torch.arange(30.0).reshape(1, 1, 30)
    with pytest.raises(ValueError, match="expected 16 cached 'both' features"):
        select_features(features, "both", "hidden", signature)


def test_the_sweep_lists_bad_questions_and_goes_on(tmp_path, capsys):
    from analysis.io import read_errors
    from exit.cli import main
    from exit.sweep import read_sweep

    model_dir = save_tiny_llava(tmp_path / "model", TinyLlavaSpec(image_size=28))
    (tmp_path / "img").mkdir()
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "img" / f"{i}.png")
        lines.append({"question_id": f"q{i}", "image": f"{i}.png", "text": "What colour?", "answer": colour})
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG truncated")  # late in the file
    lines.append({"question_id": "q4", "image": "absent.png", "text": "What colour?", "answer": "red"})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["sweep", "--model", str(model_dir), "--no-progress", "--questions", str(tmp_path / "q.jsonl"),
                 "--image-folder", str(tmp_path / "img"), "--out", str(tmp_path / "sweep"), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 12 rows for 3 samples" in captured.out
    assert "2 question(s) could not be swept and were left out" in captured.err
    assert sorted(read_sweep(tmp_path / "sweep")["sample_id"].unique()) == ["q0", "q1", "q3"]
    errors = read_errors(tmp_path / "sweep").set_index("sample_id")
    assert "question 'q2': expected a readable image at" in errors.loc["q2", "reason"]
    assert "question 'q4': expected an image at" in errors.loc["q4", "reason"]


def test_a_shared_gate_trained_online_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import analysis.loading
    from exit.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(analysis.loading, "load_model", no_weights)
    assert main(["train", "--online", "--shared", "--model", "demo", "--out", str(tmp_path / "gates")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected --shared with offline training" in err
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--sweep", str(tmp_path), "--model", "demo", "--dropout", "1.5", "--out", str(tmp_path / "g")])
    assert stopped.value.code == 2 and "--dropout: expected a number in [0, 1), found 1.5" in capsys.readouterr().err
