"""Both observation paths against the stock model's output_attentions; logits unchanged; cleanup."""

from __future__ import annotations

import pytest
import torch

from analysis import KEY_GROUPS, QUERY_GROUPS, record_attention, resolve_adapter, token_layout
from analysis.hooks import Hook, attached, attached_count
from analysis.recorder import RECOMPUTED, RecordingError
from analysis.stats import group_means
from analysis.testing.tiny import tiny_llava


def layout_of(model, inputs):
    return token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))


def reference_statistics(eager_model, inputs, layout):
    """Reduce the stock eager model's output_attentions with the plain (unchunked) mathematics."""
    with torch.no_grad():
        attentions = eager_model(**inputs, output_attentions=True).attentions
    return [group_means(a, layout.query_membership(), layout.key_membership()) for a in attentions]


def assert_relative_close(found: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    both = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(found), ~both), "NaN (empty groups) must match"
    scale = expected[both].abs().clamp_min(1e-6)
    assert ((found[both] - expected[both]).abs() / scale).max().item() <= rtol


@pytest.mark.parametrize("path", ["sdpa", "sdpa-recomputed", "eager"])
def test_statistics_equal_stock_output_attentions(tiny_models, attention_kind, batch, path):
    eager_model = tiny_models(attention_kind, "eager")
    attention, fused = path.split("-")[0], not path.endswith("recomputed")
    model = tiny_models(attention_kind, attention)
    layout = layout_of(model, batch.inputs)
    expected = reference_statistics(eager_model, batch.inputs, layout)
    with torch.no_grad(), record_attention(model, layout, attention=attention, query_chunk=7, fused=fused) as recording:
        model(**batch.inputs)
    kernel = {"sdpa": "cpu:flash_attention_with_logsumexp", "sdpa-recomputed": RECOMPUTED, "eager": None}[path]
    assert recording.kernel == kernel
    assert [r.layer for r in recording.records] == list(range(len(expected)))
    for record, (mass, entropy) in zip(recording.records, expected):
        assert record.mass.shape == (layout.batch_size, 4, len(QUERY_GROUPS), len(KEY_GROUPS))
        assert_relative_close(record.mass, mass)
        assert_relative_close(record.entropy, entropy)


@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_recording_leaves_logits_bit_identical(tiny_models, attention_kind, batch, path):
    model = tiny_models(attention_kind, path)
    layout = layout_of(model, batch.inputs)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with record_attention(model, layout, attention=path, record_states=True):
            recorded = model(**batch.inputs).logits
    assert torch.equal(plain, recorded)
    assert resolve_adapter(model).attention_implementation(model) == path


def test_a_model_built_in_bfloat16_records_without_changing_its_logits(tiny_specs, attention_kind, case_inputs):
    """The benchmark's GPU set-up builds the random model in its dtype directly (tiny_llava's device and
    dtype): the weights are that dtype, the default build is unchanged, and recording bf16 leaves the
    logits bit-identical with statistics from the fp32 kernel (every text row's masses sum to 1)."""
    spec = tiny_specs(attention_kind)
    default, on_cpu = tiny_llava(spec), tiny_llava(spec, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), on_cpu.parameters(), strict=True))
    model = tiny_llava(spec, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = {name: value.to(torch.bfloat16) if value.is_floating_point() else value
              for name, value in case_inputs("batch2_left_padding").items()}
    layout = layout_of(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
        with record_attention(model, layout) as recording:
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    text = QUERY_GROUPS.index("text")
    for record in recording.records:
        assert record.mass.dtype == torch.float32
        torch.testing.assert_close(record.mass[:, :, text].sum(-1), torch.ones_like(record.mass[:, :, text, 0]))


def test_text_query_masses_sum_to_one_in_a_real_forward(tiny_models, batch):
    model = tiny_models("gqa")
    layout = layout_of(model, batch.inputs)
    with torch.no_grad(), record_attention(model, layout) as recording:
        model(**batch.inputs)
    text = QUERY_GROUPS.index("text")
    for record in recording.records:
        torch.testing.assert_close(record.mass[:, :, text].sum(-1), torch.ones_like(record.mass[:, :, text, 0]))


def test_text_states_are_the_layer_outputs_reduced_over_text_tokens(tiny_models, processor):
    from tests.conftest import BATCH_CASES, make_batch

    model = tiny_models("mha")
    inputs = make_batch(processor, BATCH_CASES["batch2_left_padding"])
    layout = layout_of(model, inputs)
    seen = []
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        with record_attention(model, layout, record_attention=False, record_states=True, keep=False, on_layer=seen.append) as rec:
            model(**inputs)
    assert rec.records == [] and [r.layer for r in seen] == list(range(4))
    text = layout.text_mask_excluding_last()
    for record in seen:
        output = hidden[record.layer + 1]  # hidden_states[0] is the embedding output
        if record.layer + 1 == len(hidden) - 1:
            continue  # the last entry of hidden_states is after the final norm
        for row in range(2):
            torch.testing.assert_close(record.text_mean[row], output[row, text[row]].mean(0))
            torch.testing.assert_close(record.last[row], output[row, layout.last_index[row]])
        assert record.mass is None


def test_generate_records_the_prefill_only(tiny_models, processor):
    from tests.conftest import BATCH_CASES, make_batch

    model = tiny_models("gqa")
    inputs = make_batch(processor, BATCH_CASES["batch1"])
    layout = layout_of(model, inputs)
    with torch.no_grad(), record_attention(model, layout) as recording:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert recording.forwards_recorded == 1 and recording.forwards_skipped == 2
    assert len(recording.records) == 4


def test_no_hook_left_after_exit_exception_and_nesting(tiny_models, processor):
    from tests.conftest import BATCH_CASES, make_batch

    model = tiny_models("mha")
    inputs = make_batch(processor, BATCH_CASES["batch1"])
    layout = layout_of(model, inputs)
    baseline = attached_count(model)  # transformers attaches a few hooks of its own
    with record_attention(model, layout):
        assert attached_count(model) == baseline + 8  # a layer hook and an attention observer per layer
    assert attached_count(model) == baseline
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(model, layout, attention="eager"):
            assert resolve_adapter(model).attention_implementation(model) == "eager"
            raise RuntimeError("boom")
    assert attached_count(model) == baseline
    assert resolve_adapter(model).attention_implementation(model) == "sdpa"
    with record_attention(model, layout) as outer:
        with record_attention(model, layout, record_attention=False, record_states=True) as inner:
            assert attached_count(model) == baseline + 12
            with torch.no_grad():
                model(**inputs)
        assert attached_count(model) == baseline + 8
    assert attached_count(model) == baseline
    assert len(outer.records) == 4 and inner.records[0].last is not None


def test_bad_module_path_attaches_nothing(tiny_models):
    model = tiny_models("mha")
    baseline = attached_count(model)
    hooks = [Hook("model.language_model.layers.0", lambda *a: None), Hook("model.no_such_module", lambda *a: None)]
    with pytest.raises(KeyError, match="no_such_module"):
        with attached(model, hooks):
            pass
    assert attached_count(model) == baseline


def test_eager_path_on_a_model_whose_attention_returns_no_weights_fails_loudly(tiny_models, processor):
    from tests.conftest import BATCH_CASES, make_batch

    model = tiny_models("mha")
    inputs = make_batch(processor, BATCH_CASES["batch1"])
    layout = layout_of(model, inputs)
    adapter = resolve_adapter(model)
    baseline = attached_count(model)
    with pytest.raises(RecordingError, match="expected attention weights"):
        with record_attention(model, layout, attention="eager"):
            adapter.set_attention_implementation(model, "sdpa")  # something switched it back
            with torch.no_grad():
                model(**inputs)
    assert attached_count(model) == baseline and adapter.attention_implementation(model) == "sdpa"


def test_to_table_without_a_forward_is_an_error(tiny_models, processor):
    from tests.conftest import BATCH_CASES, make_batch

    model = tiny_models("mha")
    layout = layout_of(model, make_batch(processor, BATCH_CASES["batch1"]))
    with record_attention(model, layout) as recording:
        pass
    with pytest.raises(RecordingError, match="found none"):
        recording.to_table(["a"])


@pytest.mark.parametrize("path", ["sdpa", "sdpa-recomputed"])
@pytest.mark.parametrize("case", ["batch1", "batch2_left_padding", "two_images"])
def test_recording_some_query_groups_runs_their_rows_alone_with_the_same_numbers(tiny_models, attention_kind,
                                                                                  case_inputs, case, path):
    """query_groups=("text", "last") (what the gates read): the attention call runs over those rows
    only, and their statistics equal a recording of every group; the other groups are NaN."""
    fused = not path.endswith("recomputed")
    model = tiny_models(attention_kind)
    inputs = case_inputs(case)
    layout = layout_of(model, inputs)
    with torch.no_grad():
        with record_attention(model, layout, fused=fused) as everything:
            model(**inputs)
        with record_attention(model, layout, fused=fused, query_groups=("text", "last")) as some:
            model(**inputs)
    kept = [QUERY_GROUPS.index("text"), QUERY_GROUPS.index("last")]
    others = [g for g in range(len(QUERY_GROUPS)) if g not in kept]
    for full, part in zip(everything.records, some.records):
        assert_relative_close(part.mass[:, :, kept], full.mass[:, :, kept])
        assert_relative_close(part.entropy[:, :, kept], full.entropy[:, :, kept])
        assert torch.isnan(part.mass[:, :, others]).all() and torch.isnan(part.entropy[:, :, others]).all()
    with pytest.raises(RecordingError, match="expected query groups among"):
        with record_attention(model, layout, query_groups=("answer",)):
            pass


def test_selected_query_rows_gather_each_rows_groups_in_order():
    from analysis.recorder import selected_query_rows

    # row 0: system, image, image, text, last; row 1: padding, padding, image, text, last
    membership = torch.tensor([
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
    ], dtype=torch.float32)
    rows = selected_query_rows(membership, [1])  # the image rows
    assert rows.index[0].tolist() == [1, 2] and rows.index[1, 0].item() == 2
    assert rows.membership[1, 1].sum().item() == 0  # row 1 has one image token: its second slot is filler
    assert rows.membership[:, :, 1].sum().item() == 3 and rows.membership[:, :, [0, 2, 3]].sum().item() == 0
    causal = rows.gather_mask(None, 5)
    assert causal[0, 0, 1].tolist() == [True, True, True, False, False]  # slot 1 is position 2
