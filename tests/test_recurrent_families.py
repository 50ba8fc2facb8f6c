"""Hybrid decoders (Qwen3.5: Gated DeltaNet layers beside full-attention layers) on tiny random models.

A recurrent layer's state decays at every token of its stream, so masking a token's key is not
removing the token: the exit is checked against its definition instead. Each row runs alone (batch 1,
no padding): layers 0..k on its whole sequence, then layers k+1.. on the sequence without its image
tokens (text tokens keep their positions), by hooks written here, independent of the surgery. The
surgery runs the two rows together, left-padded, compacted. The families come from the adapter table
(``ModelAdapter.recurrent``), so a new hybrid family is tested here by adding it there.
"""

from __future__ import annotations

import pytest
import torch

from analysis import record_attention, resolve_adapter
from analysis.hooks import Hook, attached
from analysis.layout import IMAGE, PADDING
from analysis.testing.families import IMAGE as IMAGE_ID
from analysis.testing.families import MARKER_A
from exit import DyVTEGates, GateConfig, dyvte_exit, visual_token_exit
from exit.answers import ExitAnswersError, check_answerable
from exit.surgery import ExitSurgeryError
from tests.test_families import FAMILIES, TOLERANCE, layout_of, recompute_inputs, running

RECURRENT = [family for family in FAMILIES if resolve_adapter(family).recurrent is not None]
RECURRENT_PLANS = [[0, 0], [1, 2], [0, None], [None, 2], [3, 0]]
"""Exits per row of the tiny Qwen3.5 (layers: linear, full, full, linear): after 0 the first
attention layer's cache is short, [1, 2] and [0, None] compact while a row still holds its image."""


def test_the_hybrid_families_are_tested():
    assert {"qwen3_5", "qwen3_5_moe"} <= set(RECURRENT)


def row_alone(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of a Qwen-style batch as a batch of its own without padding: its real tokens and
    its images' patches (images in batch order, one <|vision_start|> each, ``image_grid_thw`` patches)."""
    real = inputs["attention_mask"][row].bool()
    images = (inputs["input_ids"] == MARKER_A).sum(dim=1).tolist()
    grids = inputs["image_grid_thw"]
    patches = grids.prod(dim=-1).tolist()
    first = sum(images[:row])
    start, stop = sum(patches[:first]), sum(patches[: first + images[row]])
    alone = {key: inputs[key][row : row + 1, real] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**alone, "pixel_values": inputs["pixel_values"][start:stop], "image_grid_thw": grids[first : first + images[row]]}


def deleted_image_logits(model: torch.nn.Module, alone: dict[str, torch.Tensor], exit_layer: int | None,
                         deleted: torch.Tensor | None = None) -> torch.Tensor:
    """(1, kept, vocab) logits of one row run alone with its image tokens (or the ``deleted`` (seq,)
    positions) deleted after ``exit_layer`` (None: the stock model): every layer after it gets the
    states of the other tokens only, their cos/sin and position ids, and a causal mask over them (a
    recurrent layer: no mask, as for an unpadded row)."""
    adapter = resolve_adapter(model)
    kept = alone["input_ids"][0] != IMAGE_ID if deleted is None else ~deleted
    length = int(kept.sum())
    recurrent = set(adapter.recurrent_layers(model))
    eager = adapter.attention_implementation(model) == "eager"
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if hidden.shape[1] == kept.shape[0]:  # the first layer after the exit: delete the image tokens
                hidden = hidden[:, kept]
            cos, sin = kwargs["position_embeddings"]
            changed = {**kwargs, "position_embeddings": (cos[:, kept], sin[:, kept])}
            if kwargs.get("position_ids") is not None:
                changed["position_ids"] = kwargs["position_ids"][..., kept]
            if layer in recurrent:
                changed["attention_mask"] = None
            else:
                changed["attention_mask"] = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min) if eager else causal
            return (hidden, *args[1:]), changed

        return hook

    paths = adapter.layer_paths(model)
    hooks = [] if exit_layer is None else [
        Hook(path, hook_for(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > exit_layer]
    with torch.no_grad(), attached(model, hooks):
        logits = model(**alone).logits
    if not hooks:  # no exit, or one after the last layer: the stock model
        logits = logits[:, kept]
    assert logits.shape[1] == length
    return logits


@pytest.mark.parametrize("model_type", RECURRENT)
@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_left_padding_is_exact_for_the_stock_hybrid_decoder(family_case, model_type, path):
    """The stock model zeroes the padded slots' inputs of its recurrent layers (their conv and state
    stay zero there), so a left-padded row equals the row alone: what the compacted stream relies on."""
    model, inputs = family_case(model_type)
    real = inputs["attention_mask"].bool()
    with torch.no_grad(), running(model, path):
        together = model(**inputs).logits
        for row in range(2):
            alone = model(**row_alone(inputs, row)).logits[0]
            assert (together[row][real[row]] - alone).abs().max().item() <= TOLERANCE, row


@pytest.mark.parametrize("model_type", RECURRENT)
@pytest.mark.parametrize("path", ["sdpa", "eager"])
@pytest.mark.parametrize("plan", RECURRENT_PLANS)
def test_exit_equals_each_row_alone_with_its_image_deleted(family_case, model_type, path, plan):
    model, inputs = family_case(model_type)
    layout = layout_of(model, inputs)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    with torch.no_grad(), running(model, path):
        with visual_token_exit(model, plan) as surgery:
            found = model(**inputs).logits
        assert surgery.exit_layers == plan
        for row, exit_layer in enumerate(plan):
            expected = deleted_image_logits(model, row_alone(inputs, row), exit_layer)[0]
            error = (found[row][kept[row]] - expected).abs().max().item()
            assert error <= TOLERANCE, (row, error)
            if exit_layer is not None and exit_layer < 3:  # the reference is not the stock model: the exit changes the logits
                assert (expected - deleted_image_logits(model, row_alone(inputs, row), None)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", RECURRENT)
@pytest.mark.parametrize("plan", RECURRENT_PLANS)
def test_cached_generate_equals_each_row_alone_with_its_image_deleted(family_case, model_type, plan):
    """generate() with the recurrent, convolution and KV caches under the exit, batch 2 left-padded:
    each step's logits equal the row alone, prompt + answer so far, image deleted after its exit, no cache."""
    model, inputs = family_case(model_type)
    steps = 3
    with torch.no_grad(), visual_token_exit(model, plan):
        generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   suppress_tokens=[IMAGE_ID], output_logits=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    assert generated.sequences.shape[1] == prompt + steps
    for step in range(steps):
        grown = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
        for row, exit_layer in enumerate(plan):
            expected = deleted_image_logits(model, row_alone(grown, row), exit_layer)[0, -1]
            error = (generated.logits[step][row] - expected).abs().max().item()
            assert error <= TOLERANCE, (step, row, error)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_masking_instead_of_removal_is_refused(family_case, model_type):
    model, _ = family_case(model_type)
    with pytest.raises(ExitSurgeryError, match=r"compact=True .*recurrent \(linear-attention\) layers \[0, 3\]"):
        visual_token_exit(model, 1, compact=False)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_the_statistics_have_no_rows_for_layers_without_a_map(family_case, model_type, tmp_path):
    """The recurrent layers get records with states only; the table leaves them out and says so
    (the provenance lists them), and stage finding runs over the recorded layers."""
    from analysis.loading import provenance
    from analysis.stages import detect_dataset_stages

    model, inputs = family_case(model_type)
    layout = layout_of(model, inputs)
    with torch.no_grad(), record_attention(model, layout, record_states=True) as recording:
        model(**inputs)
    assert recording.layers_without_attention == [0, 3]
    assert [r.mass is None for r in recording.records] == [True, False, False, True]
    assert all(r.text_mean is not None for r in recording.records)  # states exist at every layer
    frame = recording.to_frame(["a", "b"])
    assert sorted(set(frame["layer"])) == [1, 2]
    assert not frame["mass"].isna().all()
    assert provenance(str(tmp_path), model, "sdpa", "mean", 0)["layers_without_attention"] == [0, 3]
    stages = detect_dataset_stages(frame)
    assert set(stages.per_sample["sample_id"]) == {"a", "b"}  # two recorded layers: too short, said per sample
    assert stages.per_sample["reason"].str.startswith("too_short").all()


@pytest.mark.parametrize("model_type", RECURRENT)
@pytest.mark.parametrize("inputs_kind", ["attention", "both", "history", "hidden+history"])
def test_attention_gates_are_refused_naming_the_layers_without_a_map(family_case, model_type, inputs_kind):
    from analysis.errors import UsageError

    model, inputs = family_case(model_type)
    gates = DyVTEGates.for_model(model, GateConfig(inputs=inputs_kind, hidden_width=8, tau=0.0))
    with pytest.raises(UsageError, match=r"layers \[0, 3\] .*no attention map"):
        with dyvte_exit(model, gates, inputs["input_ids"], inputs["attention_mask"]):
            model(**inputs)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_hidden_gates_that_fire_after_a_recurrent_layer_equal_the_static_exit(family_case, model_type):
    """Hidden-state gates run after every layer, recurrent ones included: gates that always fire
    exit after layer 0 (a linear-attention layer), exactly the static exit there."""
    model, inputs = family_case(model_type)
    gates = DyVTEGates.for_model(model, GateConfig(inputs="hidden", hidden_width=8, tau=0.0))
    with torch.no_grad():
        with visual_token_exit(model, 0):
            expected = model(**inputs).logits
        with dyvte_exit(model, gates, inputs["input_ids"], inputs["attention_mask"]) as surgery:
            found = model(**inputs).logits
    assert surgery.exit_layers == [0, 0]
    assert torch.equal(found, expected)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_exit_table_answers_are_refused_with_the_reason(family_case, model_type):
    model, _ = family_case(model_type)
    with pytest.raises(ExitAnswersError, match="recurrent"):
        check_answerable(resolve_adapter(model), model.config)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_exit_sweep_takes_hidden_features_and_refuses_attention_features_and_answers(family_case, model_type):
    """The sweep's branches (layers k+1.. on the kept tokens) equal the surgery for every layer
    (tests/test_families.py); here: its hidden features are those of every layer, attention features
    and exit-table answers are refused with the reason rather than made up."""
    from analysis.errors import UsageError
    from exit.sweep import exit_sweep

    model, inputs = family_case(model_type)
    answer = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    answer[:, -2:] = True
    result = exit_sweep(model, inputs, answer, features="hidden")
    assert result.features.shape == (2, 4, 2 * model.config.text_config.hidden_size)
    assert bool(result.label[:, -1].all())  # no exit after the last layer: always safe
    with pytest.raises(UsageError, match=r"layers \[0, 3\]"):
        exit_sweep(model, inputs, answer, features="attention")
    with pytest.raises(ExitAnswersError, match="recurrent"):
        exit_sweep(model, inputs, answer, answers=2)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_plots_of_a_table_without_rows_for_some_layers_span_the_decoder(family_case, model_type):
    """Stage finding and every figure read the recorded layers only; the layer axis spans the decoder
    up to the last recorded layer, so a recorded layer is drawn at its own number."""
    import matplotlib

    matplotlib.use("Agg")
    from analysis.plots import plot_entropy, plot_stages
    from analysis.stages import detect_dataset_stages

    model, inputs = family_case(model_type)
    with torch.no_grad(), record_attention(model, layout_of(model, inputs)) as recording:
        model(**inputs)
    frame = recording.to_frame(["a", "b"])
    stages = detect_dataset_stages(frame)
    assert stages.n_layers == 3  # layers 0..2 drawn; 0 has no rows
    for plot in (plot_stages, plot_entropy):
        figure = plot(frame, stages)
        assert figure.axes[0].get_xlim() == (-0.5, 2.5)
        matplotlib.pyplot.close(figure)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_fastv_pruning_equals_each_row_alone_with_the_dropped_tokens_deleted(family_case, model_type):
    """FastV ranks image tokens by the attention of full-attention layer 1 and drops half of them
    after it; the recurrent layers after it see only the kept tokens, in the prefill and while decoding."""
    from exit.baselines import fastv

    model, inputs = family_case(model_type)
    real = inputs["attention_mask"].bool()
    with torch.no_grad(), fastv(model, 1, 0.5) as pruning:
        generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   suppress_tokens=[IMAGE_ID], output_logits=True, return_dict_in_generate=True)
    dropped = pruning.dropped
    assert bool(dropped.any(dim=1).all())
    with pytest.raises(ExitSurgeryError, match=r"layer 0, a recurrent .*attention layers: \[1, 2\]"):
        fastv(model, 0, 0.5)
    prompt = inputs["input_ids"].shape[1]
    for step in range(2):
        grown = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
        for row in range(2):
            deleted = torch.cat([dropped[row][real[row]], torch.zeros(step, dtype=torch.bool)])
            expected = deleted_image_logits(model, row_alone(grown, row), 1, deleted)[0, -1]
            assert (generated.logits[step][row] - expected).abs().max().item() <= TOLERANCE, (step, row)
