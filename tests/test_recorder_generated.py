"""Decoding statistics: every generated token's attention, against an eager step-by-step recomputation."""

from __future__ import annotations

import pytest
import torch

from analysis import record_attention, resolve_adapter, token_layout
from analysis.recorder import RecordingError
from analysis.stats import group_means
from analysis.vocabulary import GENERATED, GENERATED_KEY_GROUPS, PROMPT_STEP
from tests.test_recorder import assert_relative_close

NEW_TOKENS = 4


def generate_recorded(model, inputs, path: str, fused: bool = True):
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))
    with torch.no_grad(), record_attention(model, layout, attention=path, fused=fused, generated=True) as recording:
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)
    return layout, recording, output


def step_by_step_reference(eager_model, inputs, layout, sequences):
    """Per decoding step s and layer: the group means of the stock eager model's output_attentions
    at the query of generated token s, from one forward over prompt + answer (no cache)."""
    prompt_length = layout.seq_len
    full = inputs
    if inputs["input_ids"].shape[1] == prompt_length:  # the prompt: grow it by the answer
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, prompt_length:])], dim=1)
        full = {**inputs, "input_ids": sequences, "attention_mask": mask}
    with torch.no_grad():
        attentions = eager_model(**full, output_attentions=True).attentions
    prompt_keys = layout.key_membership()
    expected = {}
    for step in range(sequences.shape[1] - prompt_length - 1):  # the last token is never fed back
        query = prompt_length + step
        keys = torch.zeros(sequences.shape[0], query + 1, len(GENERATED_KEY_GROUPS))
        keys[:, :prompt_length, :-1] = prompt_keys
        keys[:, prompt_length:, -1] = 1
        for layer, weights in enumerate(attentions):
            rows = weights[:, :, query : query + 1, : query + 1]
            expected[step, layer] = group_means(rows, torch.ones(sequences.shape[0], 1, 1), keys)
    return expected


@pytest.mark.parametrize("path", ["sdpa", "sdpa-recomputed", "eager"])
@pytest.mark.parametrize("case", ["batch2_left_padding", "two_images"])
def test_generated_tokens_statistics_equal_an_eager_step_by_step_recomputation(tiny_models, attention_kind,
                                                                                 case_inputs, case, path):
    attention, fused = path.split("-")[0], not path.endswith("recomputed")
    model, eager_model = tiny_models(attention_kind, attention), tiny_models(attention_kind, "eager")
    inputs = case_inputs(case)
    layout, recording, sequences = generate_recorded(model, inputs, attention, fused)
    expected = step_by_step_reference(eager_model, inputs, layout, sequences)
    num_layers = len(recording.records)
    assert recording.steps_recorded == NEW_TOKENS - 1 and len(recording.generated) == (NEW_TOKENS - 1) * num_layers
    for record in recording.generated:
        mass, entropy = expected[record.step, record.layer]
        assert record.mass.shape == (layout.batch_size, mass.shape[1], 1, len(GENERATED_KEY_GROUPS))
        assert_relative_close(record.mass, mass)
        assert_relative_close(record.entropy, entropy)
        assert record.key_counts[:, -1].tolist() == [record.step + 1] * layout.batch_size
    # the answer so far takes a real share of the mass (the test would pass on a zero column otherwise)
    assert max(float(r.mass[..., -1].max()) for r in recording.generated) > 0.01


def test_recording_generated_steps_leaves_the_answer_unchanged(tiny_models, case_inputs):
    model = tiny_models("gqa")
    inputs = case_inputs("batch2_left_padding")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))
    with torch.no_grad(), record_attention(model, layout, generated=True):
        recorded = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                  output_scores=True, return_dict_in_generate=True)
    assert torch.equal(plain.sequences, recorded.sequences)
    for a, b in zip(plain.scores, recorded.scores):
        assert torch.equal(a, b)


def test_the_table_holds_prompt_rows_then_each_rows_answer_steps(tiny_models, case_inputs):
    model = tiny_models("mha")
    inputs = case_inputs("batch2_left_padding")
    layout, recording, _ = generate_recorded(model, inputs, "sdpa")
    table = recording.to_table(["a", "b"], steps=[3, 1]).to_pandas()
    prompt, generated = table[table["step"] == PROMPT_STEP], table[table["step"] != PROMPT_STEP]
    plain = recording.to_table(["a", "b"]).to_pandas()
    assert len(prompt) == len(plain[plain["step"] == PROMPT_STEP]) and GENERATED not in set(prompt["query_group"])
    assert set(generated["query_group"]) == {GENERATED} and set(generated["key_group"]) == set(GENERATED_KEY_GROUPS)
    assert sorted(generated[generated["sample_id"] == "a"]["step"].unique()) == [0, 1, 2]
    assert sorted(generated[generated["sample_id"] == "b"]["step"].unique()) == [0]
    answer_so_far = generated[generated["key_group"] == GENERATED]
    assert (answer_so_far["n_key"] == answer_so_far["step"] + 1).all()
    per_row = generated.groupby(["sample_id", "step", "layer", "head"])["mass"].sum()
    torch.testing.assert_close(torch.tensor(per_row.to_numpy()), torch.ones(len(per_row)),
                               rtol=0, atol=1e-5)
    with pytest.raises(RecordingError, match="at most 3 decoding steps"):
        recording.to_table(["a", "b"], steps=[4, 1])


def test_decoding_statistics_refuse_a_cache_without_the_image(tiny_models, case_inputs):
    from exit.surgery import visual_token_exit

    model = tiny_models("mha")
    inputs = case_inputs("batch1")
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))
    with torch.no_grad(), visual_token_exit(model, 0), record_attention(model, layout, generated=True):
        with pytest.raises(RecordingError, match="whole prompt"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
