"""DyVTE gates: structure, features from the recorder, gated inference, save/load."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import record_attention, resolve_adapter, token_layout
from analysis.errors import DyVTEError, UsageError
from analysis.hooks import attached_count
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava
from exit import DyVTEGates, GateConfig, GateMismatchError, ModelSignature, dyvte_exit, gate_features, visual_token_exit
from exit.gates import feature_size

IMPLEMENTATIONS = ["eager", "sdpa"]
GENERATE_WITH_LOGITS = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


class CountingGates(DyVTEGates):
    """Gates that count how often each layer's gate was asked."""

    asked: list[int]

    def forward(self, layer, features):
        self.asked.append(layer)
        return super().forward(layer, features)


def counting(model, **settings) -> CountingGates:
    gates = CountingGates(GateConfig(hidden_width=16, **settings), ModelSignature.of(model))
    gates.asked = []
    return gates


def test_gate_structure_and_seeded_xavier_init(tiny_models):
    model = tiny_models("gqa")
    assert GateConfig().hidden_width == 2048 and GateConfig().tau == 0.5 and GateConfig().inputs == "hidden"
    gates = DyVTEGates.for_model(model, GateConfig(hidden_width=32, seed=3))
    assert len(gates.gates) == 4
    first, act, second = gates.gates[0]
    assert (first.in_features, first.out_features, first.bias) == (2 * 64, 32, None)
    assert isinstance(act, torch.nn.GELU) and (second.out_features, second.bias) == (2, None)
    bound = math.sqrt(6 / (128 + 32))
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
    again = DyVTEGates.for_model(model, GateConfig(hidden_width=32, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(gates.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(gates.gates[0][0].weight, gates.gates[1][0].weight)
    with pytest.raises(ValueError, match="expected gate inputs"):
        GateConfig(inputs="pixels")


def test_a_shared_gate_is_one_network_asked_with_the_layers_one_hot(tmp_path, tiny_models):
    model = tiny_models("gqa")
    gates = DyVTEGates.for_model(model, GateConfig(hidden_width=8, seed=3, shared=True, dropout=0.5))
    layers, size = gates.signature.num_layers, feature_size(gates.config, gates.signature)
    assert len(gates.gates) == 1 and gates.gates[0][0].in_features == size + layers
    features = torch.randn(5, layers, size, generator=torch.Generator().manual_seed(0)) * 3 + 1
    gates.fit_input_scale([features[:2], features[2:]])
    rows = torch.cat([features, torch.eye(layers).expand(5, layers, layers)], dim=-1).flatten(0, 1)
    assert torch.allclose(gates.input_mean, rows.mean(0), atol=1e-5)
    assert torch.allclose(gates.input_scale, rows.std(0, correction=0), atol=1e-5)
    first, act, second = gates.gates[0]
    gates.eval()
    for layer in range(layers):
        one_hot = torch.nn.functional.one_hot(torch.full((5,), layer), layers).float()
        standardised = (torch.cat([features[:, layer], one_hot], dim=-1) - rows.mean(0)) / rows.std(0, correction=0)
        assert torch.allclose(gates(layer, features[:, layer]), second(act(first(standardised))), atol=1e-5)
    assert not torch.allclose(gates(0, features[:, 0]), gates(1, features[:, 0]))  # the layer is part of the input
    gates.train()  # dropout acts while training only
    assert not torch.allclose(gates(0, features[:, 0]), gates(0, features[:, 0]))
    gates.eval()
    loaded = DyVTEGates.load(gates.save(tmp_path / "shared"), model)
    assert loaded.config == gates.config and torch.equal(loaded.input_scale, gates.input_scale)
    assert torch.equal(loaded(2, features[:, 2]), gates(2, features[:, 2]))
    with pytest.raises(UsageError, match="expected shared gates"):
        DyVTEGates.for_model(model, GateConfig(hidden_width=8)).fit_input_scale([features])


def test_bad_gate_settings_are_toolkit_errors():
    for settings, message in (({"inputs": "pixels"}, "expected gate inputs"), ({"hidden_width": 0}, "positive hidden width"),
                              ({"tau": 1.5}, r"tau in \[0, 1\]"), ({"dropout": 1.0}, r"dropout in \[0, 1\)")):
        with pytest.raises(UsageError, match=message) as error:
            GateConfig(**settings)
        assert isinstance(error.value, DyVTEError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("inputs", ["hidden", "attention", "both"])
def test_features_come_from_the_recorder(tiny_models, case_inputs, inputs):
    model = tiny_models("gqa")
    batch = case_inputs("batch2_left_padding")
    layout = token_layout(batch["input_ids"], batch["attention_mask"], resolve_adapter(model).image_token_id(model))
    with torch.no_grad(), record_attention(model, layout, record_states=True) as recording:
        model(**batch)
    record = recording.records[2]
    features = gate_features(record, inputs)
    signature = ModelSignature.of(model)
    assert features.shape == (2, feature_size(GateConfig(inputs=inputs), signature))
    if inputs != "attention":
        assert torch.equal(features[:, :64], record.text_mean) and torch.equal(features[:, 64:128], record.last)
    if inputs != "hidden":
        assert torch.equal(features[:, -signature.num_heads * 8 :][:, : 4 * 6].view(2, 4, 2, 3), record.mass[:, :, 2:4])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("inputs", ["hidden", "attention", "both"])
def test_gate_that_never_fires_is_bit_identical_and_asked_once_per_layer(tiny_models, case_inputs, implementation, inputs):
    model = tiny_models("gqa", implementation)
    batch = case_inputs("batch2_left_padding")
    gates = counting(model, inputs=inputs, tau=1.0)
    with torch.no_grad():
        stock = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        before = attached_count(model)
        with dyvte_exit(model, gates, batch["input_ids"], batch["attention_mask"]) as surgery:
            assert torch.equal(model(**batch).logits, stock)
            assert surgery.exit_layers == [None, None]
            gates.asked.clear()
            assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), stock_tokens)
        assert attached_count(model) == before
    assert gates.asked == [0, 1, 2]  # the prefill asks every layer but the last; decoding asks nothing
    assert resolve_adapter(model).attention_implementation(model) == implementation


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gate_that_fires_exits_at_the_first_layer(tiny_models, case_inputs, implementation):
    model = tiny_models("mha", implementation)
    batch = case_inputs("batch2_left_padding")
    gates = counting(model, tau=0.0)
    with torch.no_grad():
        with visual_token_exit(model, 0):
            expected = model.generate(**batch, **GENERATE_WITH_LOGITS)
        with dyvte_exit(model, gates, batch["input_ids"], batch["attention_mask"]) as surgery:
            found = model.generate(**batch, **GENERATE_WITH_LOGITS)
    assert surgery.exit_layers == [0, 0]
    assert gates.asked == [0]
    assert torch.equal(found.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(found.logits, expected.logits))


def test_save_load_round_trip_and_mismatch(tmp_path, tiny_models):
    model = tiny_models("gqa")
    gates = DyVTEGates.for_model(model, GateConfig(inputs="both", hidden_width=8, tau=0.7, seed=5))
    gates.save(tmp_path / "gates")
    meta = json.loads((tmp_path / "gates" / "gate_config.json").read_text())
    assert meta["model"] == {"model_type": "llava", "num_layers": 4, "hidden_size": 64, "num_heads": 4}
    loaded = DyVTEGates.load(tmp_path / "gates", model)
    assert loaded.config == gates.config and loaded.signature == gates.signature
    assert all(torch.equal(a, b) for a, b in zip(gates.state_dict().values(), loaded.state_dict().values()))
    assert DyVTEGates.load(tmp_path / "gates", tau=0.2).config.tau == 0.2
    other = tiny_llava(TinyLlavaSpec(num_layers=3, num_kv_heads=2, image_size=28))
    with pytest.raises(GateMismatchError, match="'num_layers': 3"):
        DyVTEGates.load(tmp_path / "gates", other)
    with pytest.raises(GateMismatchError):
        with dyvte_exit(other, gates, torch.zeros(1, 2, dtype=torch.long)):
            pass
    with pytest.raises(FileNotFoundError, match="gate_config.json"):
        DyVTEGates.load(tmp_path)


class ScriptedGates(DyVTEGates):
    """Gates whose decisions are fixed per layer and row (to test per-row exits through the gate path)."""

    script: dict[int, list[bool]]

    def fires(self, layer, features):
        return torch.tensor(self.script.get(layer, [False] * features.shape[0]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("inputs", ["hidden", "attention"])
def test_rows_exit_where_their_gate_fires(tiny_models, case_inputs, implementation, inputs):
    model = tiny_models("gqa", implementation)
    batch = case_inputs("batch2_left_padding")
    gates = ScriptedGates(GateConfig(inputs=inputs, hidden_width=4), ModelSignature.of(model))
    gates.script = {0: [False, True], 1: [True, True], 2: [True, True]}
    with torch.no_grad():
        with visual_token_exit(model, [1, 0]):
            expected = model.generate(**batch, **GENERATE_WITH_LOGITS)
        with dyvte_exit(model, gates, batch["input_ids"], batch["attention_mask"]) as surgery:
            found = model.generate(**batch, **GENERATE_WITH_LOGITS)
    assert surgery.exit_layers == [1, 0]
    assert torch.equal(found.sequences, expected.sequences)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(found.logits, expected.logits))


def test_history_features_built_online_equal_those_taken_from_cached_features(tiny_models, processor):
    """The history gate inputs of a prefill (GateFeatureBuilder, layer after layer) equal what
    select_features makes out of the cached 'both' features of every layer, and at layer l they
    hold layers 0..l only."""
    from conftest import BATCH_CASES, make_batch

    from analysis import token_layout
    from exit.cli import GATE_INPUT_CHOICES
    from exit.gates import GATE_INPUTS, GateFeatureBuilder, ModelSignature, gate_features, gate_recording, select_features

    assert GATE_INPUT_CHOICES == GATE_INPUTS
    model = tiny_models("gqa")
    inputs = make_batch(processor, BATCH_CASES["batch2_left_padding"])
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    signature = ModelSignature.of(model)
    with torch.no_grad(), gate_recording(model, layout, "both") as recording:
        model(**inputs)
    cached = torch.stack([gate_features(r, "both") for r in recording.records], dim=1)  # batch layer F
    for kind in ("history", "hidden+history"):
        builder = GateFeatureBuilder(kind, signature)
        online = torch.stack([builder(r) for r in recording.records], dim=1)
        assert online.shape[-1] == feature_size(GateConfig(inputs=kind), signature)
        assert torch.allclose(online, select_features(cached, "both", kind, signature), atol=1e-6)
    history = select_features(cached, "both", "history", signature).view(2, signature.num_layers, signature.num_layers, 8)
    assert torch.equal(history[:, 1, 2:], torch.zeros_like(history[:, 1, 2:]))  # the layers still to come
    assert bool((history[:, 1, :2] != 0).any())
    text_image = history[:, -1, :, 1]  # text queries' mass over image keys, head-mean, per layer
    per_head = cached[..., 2 * signature.hidden_size:][..., : signature.num_heads * 6].reshape(2, -1, signature.num_heads, 6)
    assert torch.allclose(text_image, per_head[..., 1].mean(-1), atol=1e-6)


@pytest.mark.parametrize("kind", ["hidden", "history", "hidden+history", "averaged hidden", "shared hidden"])
def test_gated_prefill_exits_where_the_cached_features_say(tiny_models, processor, kind):
    """DyVTE by lookup (first layer whose p(exit) on the cached features passes tau) exits where the
    gated prefill does, for every input kind and for an averaged set (three seeds; its p(exit) is the
    members' mean, test_averaged_gates_average_the_members_and_refuse_mixed_sets): what the frontier's
    lookups rely on."""
    from conftest import BATCH_CASES, make_batch

    from exit.frontier import first_exit_over
    from exit.gates import AveragedGates, gate_recording, select_features

    model = tiny_models("gqa")
    inputs = make_batch(processor, BATCH_CASES["batch2_left_padding"])
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    with torch.no_grad(), gate_recording(model, layout, "both") as recording:
        model(**inputs)
    cached = torch.stack([gate_features(r, "both") for r in recording.records], dim=1)
    averaged, shared = kind.startswith("averaged "), kind.startswith("shared ")
    kind = kind.removeprefix("averaged ").removeprefix("shared ")
    members = [DyVTEGates.for_model(model, GateConfig(inputs=kind, hidden_width=16, seed=seed, shared=shared))
               for seed in (3, 4, 5)]
    gates = AveragedGates(members) if averaged else members[0]
    features = select_features(cached, "both", kind, gates.signature)
    if shared:  # a scale that is not the identity, saved and loaded with the gate
        gates.fit_input_scale([features])
    layers = gates.signature.num_layers
    with torch.no_grad():
        p = torch.stack([gates.p_exit(layer, features[:, layer]) for layer in range(layers)], dim=1)  # batch layer
    tau = float(p[:, : layers - 1].median())  # some rows fire somewhere, not all at layer 0
    gates = AveragedGates(members, tau=tau) if averaged else DyVTEGates.load(gates.save(Path(tempfile.mkdtemp())), model, tau=tau)
    frame = pd.DataFrame([{"sample_id": str(b), "layer": k, "p_exit": float(p[b, k])} for b in range(2) for k in range(layers)])
    expected = first_exit_over(frame, tau, layers)
    with torch.no_grad(), dyvte_exit(model, gates, inputs["input_ids"], inputs["attention_mask"]) as surgery:
        model(**inputs)
    found = [layers - 1 if k is None else k for k in surgery.exit_layers]
    assert found == [int(expected[str(b)]) for b in range(2)]
    assert min(found) < layers - 1  # some row exits: the comparison has teeth


def test_averaged_gates_average_the_members_and_refuse_mixed_sets(tmp_path, tiny_models):
    """load_gate_set("a,b") is the mean of the two sets' p(exit), thresholded at tau; sets of another
    input kind or with other saved thresholds are refused."""
    from exit.gates import AveragedGates, load_gate_set

    model = tiny_models("gqa")
    folders = [DyVTEGates.for_model(model, GateConfig(hidden_width=8, tau=0.6, seed=seed)).save(tmp_path / f"s{seed}")
               for seed in (1, 2)]
    members = [DyVTEGates.load(folder, model) for folder in folders]
    gates = load_gate_set(",".join(map(str, folders)), model)
    assert isinstance(gates, AveragedGates) and gates.config.tau == 0.6 and gates.signature == members[0].signature
    features = torch.randn(5, feature_size(gates.config, gates.signature))
    with torch.no_grad():
        for layer in range(gates.signature.num_layers):
            expected = (members[0].p_exit(layer, features) + members[1].p_exit(layer, features)) / 2
            assert torch.allclose(gates.p_exit(layer, features), expected, atol=1e-7)
            assert not torch.allclose(members[0].p_exit(layer, features), members[1].p_exit(layer, features))
            assert torch.equal(gates.fires(layer, features), gates.p_exit(layer, features) > 0.6)
    assert load_gate_set(f"{folders[0]},{folders[1]}", tau=0.3).config.tau == 0.3
    assert [member["seed"] for member in gates.provenance()["averaged"]] == [1, 2]  # results files name every member
    assert isinstance(load_gate_set(str(folders[0])), DyVTEGates)
    DyVTEGates.for_model(model, GateConfig(hidden_width=8, tau=0.9, seed=3)).save(tmp_path / "other-tau")
    with pytest.raises(GateMismatchError, match="one tau"):
        load_gate_set(f"{folders[0]},{tmp_path / 'other-tau'}")
    DyVTEGates.for_model(model, GateConfig(inputs="both", hidden_width=8, tau=0.6)).save(tmp_path / "both")
    with pytest.raises(GateMismatchError, match="one input kind"):
        load_gate_set(f"{folders[0]},{tmp_path / 'both'}")
    with pytest.raises(FileNotFoundError, match="gate_config.json"):
        load_gate_set(f"{folders[0]},{tmp_path}")

