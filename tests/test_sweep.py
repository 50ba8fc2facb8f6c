"""The exit sweep against the surgery run layer by layer; labels; the parquet table; cached features."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from analysis import record_attention, resolve_adapter, token_layout
from analysis.data import build_prompt
from analysis.hooks import attached_count
from analysis.schema import SchemaError
from exit import gate_features, visual_token_exit
from exit.sweep import LabelRule, SweepError, SweepWriter, exit_sweep, read_sweep, teacher_forced_inputs

IMPLEMENTATIONS = ["eager", "sdpa"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def forced(processor):
    from conftest import BATCH_CASES

    questions = BATCH_CASES["batch2_left_padding"]
    prompts = [build_prompt(processor, q) for q in questions]
    images = [[Image.new("RGB", (40, 30), colour)] for colour in ("red", "blue")]
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, images, ["Red.", "Yes, on the left."])
    return inputs, answer_mask, prompts, images


def surgery_reference(model, inputs, answer_mask, layer):
    """Answer cross-entropy per row and argmax per answer token with the surgery's exit after ``layer``."""
    rows, positions = answer_mask.nonzero(as_tuple=True)
    targets = inputs["input_ids"][rows, positions]
    with torch.no_grad(), visual_token_exit(model, layer):
        logits = model(**inputs).logits[rows, positions - 1].float()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    per_row = torch.stack([ce[rows == b].mean() for b in range(answer_mask.shape[0])])
    return per_row, logits.argmax(-1), rows


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sweep_equals_the_surgery_layer_by_layer(tiny_models, attention_kind, forced, implementation):
    model = tiny_models(attention_kind, implementation)
    inputs, answer_mask, _, _ = forced
    with torch.no_grad():
        model(**inputs)  # transformers attaches its own output-capturing hooks on the first forward
    hooks = attached_count(model)
    result = exit_sweep(model, inputs, answer_mask, features="both")
    assert attached_count(model) == hooks and resolve_adapter(model).attention_implementation(model) == implementation
    layers = len(resolve_adapter(model).decoder_layers(model))
    assert result.agreement.shape == (2, layers)
    full_ce, full_argmax, rows = surgery_reference(model, inputs, answer_mask, layers - 1)
    assert (result.ce_full - full_ce).abs().max() <= TOLERANCE
    for layer in range(layers):
        ce, argmax, _ = surgery_reference(model, inputs, answer_mask, layer)
        agreement = torch.stack([(argmax == full_argmax)[rows == b].float().mean() for b in range(2)])
        assert torch.equal(result.agreement[:, layer], agreement), layer
        assert (result.ce_exit[:, layer] - ce).abs().max() <= TOLERANCE, layer
    assert torch.equal(result.ce_ratio[:, -1], torch.ones(2)) and bool(result.label[:, -1].all())
    assert result.n_answer.tolist() == [5, 18] and result.n_image.tolist() == [4, 4]


def test_label_rule_thresholds():
    rule = LabelRule()
    agreement = torch.tensor([1.0, 0.99, 1.0, 0.995])
    ratio = torch.tensor([1.0, 1.0, 1.03, 1.029])
    assert rule.label(agreement, ratio).tolist() == [True, False, False, True]
    assert LabelRule(min_agreement=0.5, max_ce_ratio=2.0).label(agreement, ratio).all()


def test_features_are_the_prompt_only_gate_inputs(tiny_models, processor, forced):
    model = tiny_models("gqa")
    inputs, answer_mask, prompts, images = forced
    result = exit_sweep(model, inputs, answer_mask, features="both")
    for row in range(2):
        alone = processor(images=images[row], text=prompts[row], return_tensors="pt")
        layout = token_layout(alone["input_ids"], alone["attention_mask"], resolve_adapter(model).image_token_id(model))
        with torch.no_grad(), record_attention(model, layout, record_states=True) as recording:
            model(**alone)
        expected = torch.stack([gate_features(r, "both") for r in recording.records], dim=1)[0]
        assert (result.features[row] - expected).abs().max() <= TOLERANCE


def test_writer_streams_a_validated_table_and_feature_shards(tmp_path, tiny_models, forced):
    model = tiny_models("mha")
    inputs, answer_mask, _, _ = forced
    result = exit_sweep(model, inputs, answer_mask, features="hidden")
    with SweepWriter(tmp_path, {"model": "tiny"}) as writer:
        writer.write(result, ["q1", "q2"])
        writer.write(result, ["q3", "q4"])
    frame = read_sweep(tmp_path)
    assert len(frame) == 4 * 4 and list(frame["sample_id"].unique()) == ["q1", "q2", "q3", "q4"]
    assert frame.loc[frame.layer == 3, "ce_ratio"].eq(1.0).all()
    metadata = pq.read_schema(tmp_path / "exit_sweep-00000.parquet").metadata
    assert json.loads(metadata[b"dyvte.provenance"])["label_rule"] == {"min_agreement": 0.99, "max_ce_ratio": 1.03}
    with safe_open(str(tmp_path / "features-00000-00001.safetensors"), "pt") as shard:
        assert shard.get_tensor("features").shape == (2, 4, 128)
        assert json.loads(shard.metadata()["sample_ids"]) == ["q3", "q4"]
    pq.write_table(pa.table({"x": [1]}), tmp_path / "exit_sweep-00009.parquet")
    with pytest.raises(SchemaError, match="expected an exit_sweep table"):
        read_sweep(tmp_path)


def test_writer_commits_what_it_finished_and_never_shows_a_partial_file(tmp_path, tiny_models, forced):
    model = tiny_models("mha")
    inputs, answer_mask, _, _ = forced
    result = exit_sweep(model, inputs, answer_mask, features="hidden")
    with pytest.raises(RuntimeError, match="stop"), SweepWriter(tmp_path, {"model": "tiny"}) as writer:
        writer.write(result, ["q1", "q2"])
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == [".exit_sweep-00000.parquet.partial", "features-00000-00000.safetensors"]
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit_sweep-00000.parquet", "features-00000-00000.safetensors"]
    assert writer.files == [tmp_path / "features-00000-00000.safetensors", tmp_path / "exit_sweep-00000.parquet"]
    assert list(read_sweep(tmp_path)["sample_id"].unique()) == ["q1", "q2"] and writer.rows_written == 8
    with SweepWriter(tmp_path, {"model": "tiny"}, tag="shard001of002") as tagged:
        tagged.write(result, ["q3", "q4"])
    with SweepWriter(tmp_path, {"model": "tiny"}) as again:  # the next writer takes the next shard number
        again.write(result, ["q5", "q6"])
    assert {p.name for p in tmp_path.iterdir()} == {
        "exit_sweep-00000.parquet", "features-00000-00000.safetensors",
        "exit_sweep-shard001of002-00000.parquet", "features-shard001of002-00000-00000.safetensors",
        "exit_sweep-00001.parquet", "features-00001-00000.safetensors",
    }
    with SweepWriter(tmp_path / "empty", {"model": "tiny"}) as empty:
        pass
    assert list((tmp_path / "empty").iterdir()) == [] and empty.files == []


def test_answer_mask_must_mark_the_answer(tiny_models, forced):
    model = tiny_models("mha")
    inputs, answer_mask, _, _ = forced
    image = inputs["input_ids"] == resolve_adapter(model).image_token_id(model)
    with pytest.raises(SweepError, match="non-image"):
        exit_sweep(model, inputs, answer_mask | image)
    with pytest.raises(SweepError, match="last real tokens"):
        exit_sweep(model, inputs, answer_mask & answer_mask.roll(-1, dims=1))
