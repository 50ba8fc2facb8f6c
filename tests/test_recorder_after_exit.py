"""Recording attention under a visual-token exit: the layers after a row's exit are observed over the
tokens that remain, the image groups are reported absent (NaN, n = 0), never zero.

The reference is independent of the surgery: the stock eager model with hand-written 4-D masks
(each row's image keys switched off in the layers after its exit; tests/test_exit_surgery.py proves
that this equals removal for every remaining query), its ``output_attentions``, and the group
means computed here from the layout of the tokens that remain.
"""

from __future__ import annotations

import math

import pytest
import torch

from analysis import record_attention, resolve_adapter
from analysis.hooks import Hook, attached, attached_count
from analysis.layout import IMAGE, PADDING, TokenLayout
from analysis.stats import group_sums
from analysis.vocabulary import KEY_GROUPS, QUERY_GROUPS
from exit import fastv, visual_token_exit
from tests.test_exit_surgery import layout_of, with_positions

PLANS = {  # per batch case: exit plans (one entry per row); [0, 2] compacts the stream after layer 2
    "batch1": [[1]],
    "batch2_left_padding": [[1, None], [0, 2]],
    "two_images": [[0]],
}


def reference_statistics(model, inputs, plan):
    """(layer -> (mass, entropy)) of the stock eager model with the image keys of each row masked in
    the layers after its exit, reduced over the tokens that remain."""
    layout = layout_of(model, inputs)
    group, seq = layout.group, layout.seq_len
    exits = torch.tensor([-1 if k is None else k for k in plan])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    def removed_at(layer):
        return (group == IMAGE) & ((exits >= 0) & (exits < layer))[:, None]

    def hook_for(layer):
        def hook(module, args, kwargs):
            keys = (group != PADDING) & ~removed_at(layer)
            allowed = causal[None, None] & keys[:, None, None, :]
            mask = torch.zeros(allowed.shape, dtype=args[0].dtype).masked_fill(~allowed, torch.finfo(args[0].dtype).min)
            return args, {**kwargs, "attention_mask": mask}

        return hook

    layer_paths = resolve_adapter(model).layer_paths(model)
    hooks = [Hook(p, hook_for(i), kind="forward_pre", with_kwargs=True) for i, p in enumerate(layer_paths)]
    with torch.no_grad(), attached(model, hooks):
        attentions = model(**inputs, output_attentions=True).attentions
    result = {}
    for layer, weights in enumerate(attentions):
        remaining = TokenLayout(torch.where(removed_at(layer), PADDING, group), layout.last_index, layout.image_token_id)
        sums = group_sums(weights.float(), remaining.query_membership(), remaining.key_membership())
        mass, entropy = sums.means(remaining.query_counts())
        gone = (remaining.key_counts() == 0) & (layout.key_counts() > 0)
        result[layer] = (mass.masked_fill(gone[:, None, None, :], math.nan), entropy, remaining)
    return result


@pytest.mark.parametrize("path", ["sdpa", "eager"])
@pytest.mark.parametrize("compact", [True, False])
def test_recording_after_an_exit_follows_the_tokens_that_remain(tiny_models, attention_kind, batch, path, compact):
    model = tiny_models(attention_kind, "eager")
    inputs = with_positions(batch.inputs)
    for plan in PLANS[batch.name]:
        check_plan(model, inputs, plan, path, compact)


def check_plan(model, inputs, plan, path, compact):
    expected = reference_statistics(model, inputs, plan)
    layout = layout_of(model, inputs)
    before = attached_count(model)
    with torch.no_grad(), visual_token_exit(model, plan, compact=compact), \
            record_attention(model, layout, attention=path) as recording:
        model(**inputs)
    assert attached_count(model) == before
    assert len(recording.records) == len(expected)  # every layer, in one forward
    for record in recording.records:
        mass, entropy, remaining = expected[record.layer]
        assert torch.equal(torch.isnan(record.mass), torch.isnan(mass)), record.layer
        torch.testing.assert_close(record.mass, mass, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(record.entropy, entropy, rtol=1e-5, atol=1e-6, equal_nan=True)
        counts = record.key_counts if record.key_counts is not None else layout.key_counts()
        assert torch.equal(counts, remaining.key_counts())
    frame = recording.to_frame([f"s{i}" for i in range(layout.batch_size)])
    image = frame[(frame.key_group == "image") & (frame.query_group == "text")]
    for row, exit_layer in enumerate(plan):
        rows = image[image.sample_id == f"s{row}"].set_index("layer")
        later = rows.index > (exit_layer if exit_layer is not None else len(expected))
        assert rows.loc[later, "mass"].isna().all() and (rows.loc[later, "n_key"] == 0).all()
        assert rows.loc[~later, "mass"].notna().all() and (rows.loc[~later, "n_key"] > 0).all()
        text = frame[(frame.sample_id == f"s{row}") & (frame.query_group == "text")]
        totals = text.groupby("layer")["mass"].sum(min_count=1)  # NaN (absent) counts as nothing
        assert totals.to_numpy() == pytest.approx(1.0, abs=1e-5)  # the remaining groups share all of it


def test_recording_under_fastv_counts_the_kept_image_tokens(tiny_models, case_inputs):
    model = tiny_models("gqa", "sdpa")
    inputs = with_positions(case_inputs("batch2_left_padding"))
    layout = layout_of(model, inputs)
    with torch.no_grad(), fastv(model, 1, 0.5), record_attention(model, layout) as recording:
        model(**inputs)
    assert len(recording.records) == len(resolve_adapter(model).decoder_layers(model))
    image_column = KEY_GROUPS.index("image")
    for record in recording.records:
        counts = record.key_counts if record.key_counts is not None else layout.key_counts()
        if record.layer <= 1:
            assert torch.equal(counts, layout.key_counts())
        else:
            prompt = layout.key_counts()[:, image_column]
            assert torch.equal(counts[:, image_column], prompt - prompt // 2)  # ceil((1 - 0.5) n) kept
            assert not torch.isnan(record.mass[:, :, QUERY_GROUPS.index("text"), image_column]).any()
