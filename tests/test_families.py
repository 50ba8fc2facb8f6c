"""Every supported family on a tiny random model: recorder, logits, stages, exit surgery, cached generate.

One parametrised set of tests runs over ``supported_model_types()``; the models come from
``analysis.testing.families`` (stock transformers classes, tiny configs, random weights) and the
batch has two left-padded rows, the second with two images, so padding and several images are
covered for every family. Gemma4's tests at the end add exits before, at and after its first
KV-sharing layer, a recompaction between a storing and a reusing layer, and generate()'s one-query
slicing of its KV-shared layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from analysis import KEY_GROUPS, QUERY_GROUPS, record_attention, resolve_adapter, supported_model_types, token_layout
from analysis.adapters import UnsupportedModelError
from analysis.hooks import Hook, attached, attached_count
from analysis.layout import IMAGE, PADDING, SYSTEM, TEXT
from analysis.stages import detect_dataset_stages
from analysis.testing.families import IMAGE as IMAGE_ID
from analysis.testing.families import MARKER_A, MARKER_B, tiny_family_types
from exit import DyVTEGates, GateConfig, dyvte_exit, visual_token_exit
from exit.sweep import exit_sweep
from tests.test_recorder import assert_relative_close, reference_statistics

FAMILIES = supported_model_types()
MASKABLE = [family for family in FAMILIES if resolve_adapter(family).recurrent is None]
"""Families whose decoder layers all attend, so removing a token equals masking its key; a hybrid
decoder's recurrent layers are tested against deleting the tokens instead (tests/test_recurrent_families.py)."""
PLANS = [[1, 2], [0, None]]
TOLERANCE = 1e-5


def layout_of(model, inputs):
    return token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))


def with_positions(model, inputs):
    """Position ids as generate() makes them (left padding starts each row at 0); M-RoPE families
    compute their own 3-D positions from input_ids, the mask and the image grids."""
    if resolve_adapter(model).positions == "mrope":
        return dict(inputs)
    positions = inputs["attention_mask"].long().cumsum(-1) - 1
    return {**inputs, "position_ids": positions.clamp_min(0)}


@contextmanager
def running(model, name):
    """Run the text decoder of ``model`` with ``name`` attention inside the block."""
    adapter = resolve_adapter(model)
    previous = adapter.attention_implementation(model)
    adapter.set_attention_implementation(model, name)
    try:
        yield
    finally:
        adapter.set_attention_implementation(model, previous)


def test_every_tiny_family_is_supported_and_every_supported_family_is_tested():
    assert FAMILIES == tiny_family_types()
    required = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "smolvlm")
    for family in (*required, "gemma3", "mistral3"):
        assert family in FAMILIES


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layout_groups_and_marker_tokens(family_case, model_type):
    model, inputs = family_case(model_type)
    adapter = resolve_adapter(model)
    layout = layout_of(model, inputs)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    assert adapter.image_token_id(model) == IMAGE_ID
    assert torch.equal(layout.group == IMAGE, (ids == IMAGE_ID) & real)
    assert torch.equal(layout.group == PADDING, ~real)
    markers = (ids == MARKER_A) | (ids == MARKER_B)
    assert bool(((layout.group[markers] == SYSTEM) | (layout.group[markers] == TEXT)).all())
    for field, value in adapter.marker_token_ids(model).items():
        assert value in (MARKER_A, MARKER_B), field
    heads, kv_heads = adapter.head_counts(model)
    assert (heads, kv_heads) == (4, 2)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_recorder_equals_stock_output_attentions(family_case, model_type):
    model, inputs = family_case(model_type)
    inputs = with_positions(model, inputs)
    layout = layout_of(model, inputs)
    with running(model, "eager"):
        expected = reference_statistics(model, inputs, layout)
    num_layers = len(resolve_adapter(model).decoder_layers(model))
    mapped = resolve_adapter(model).attention_layers(model)  # a hybrid decoder's recurrent layers have no map
    assert len(expected) == len(mapped)
    for path, fused in (("sdpa", True), ("sdpa", False), ("eager", True)):  # fused kernel, recomputed, eager
        with torch.no_grad(), record_attention(model, layout, attention=path, query_chunk=7, fused=fused) as recording:
            model(**inputs)
        assert (recording.kernel or "eager").startswith({("sdpa", True): "cpu:flash", ("sdpa", False): "recomputed",
                                                         ("eager", True): "eager"}[path, fused])
        assert [r.layer for r in recording.records] == list(range(num_layers))
        assert recording.layers_without_attention == [i for i in range(num_layers) if i not in mapped]
        assert all(r.mass is None and r.entropy is None for r in recording.records if r.layer not in mapped)
        for record, (mass, entropy) in zip([r for r in recording.records if r.layer in mapped], expected):
            assert record.mass.shape == (2, 4, len(QUERY_GROUPS), len(KEY_GROUPS))
            assert_relative_close(record.mass, mass)
            assert_relative_close(record.entropy, entropy)
    frame = recording.to_frame(sample_ids=["a", "b"])
    assert sorted(set(frame["layer"])) == mapped  # no rows, rather than made-up ones, for layers without a map
    stages = detect_dataset_stages(frame)
    assert len(stages.per_sample) > 0


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_recording_leaves_logits_bit_identical(family_case, model_type, path):
    model, inputs = family_case(model_type)
    layout = layout_of(model, inputs)
    baseline = attached_count(model)
    with torch.no_grad(), running(model, path):
        plain = model(**inputs).logits
        with record_attention(model, layout, attention=path, record_states=True):
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    assert attached_count(model) == baseline
    assert resolve_adapter(model).attention_implementation(model) == "sdpa"


def masked_image_reference(model, inputs, plan):
    """In every layer after a row's exit, that row's image keys are masked for every query: the
    model's own 4-D mask (or, where SDPA passes none, a hand-written causal one) with those keys off."""
    adapter = resolve_adapter(model)
    layout = layout_of(model, inputs)
    exits = torch.tensor([-1 if k is None else k for k in plan])
    causal = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool).tril()

    def hook_for(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            removed = (layout.group == IMAGE) & ((exits >= 0) & (exits < layer))[:, None]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = causal[None, None] & (layout.group != PADDING)[:, None, None, :]
            if mask.dtype == torch.bool:
                mask = mask & ~removed[:, None, None, :]
            else:
                mask = mask.masked_fill(removed[:, None, None, :], torch.finfo(hidden.dtype).min)
            return args, {**kwargs, "attention_mask": mask}

        return hook

    first = min((k for k in plan if k is not None), default=len(plan))
    paths = adapter.layer_paths(model)
    hooks = [Hook(path, hook_for(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > first]
    with torch.no_grad(), attached(model, hooks):
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", MASKABLE)
@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_exit_removal_equals_masking(family_case, model_type, path):
    model, inputs = family_case(model_type)
    inputs = with_positions(model, inputs)
    layout = layout_of(model, inputs)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    with running(model, path):
        for plan in PLANS:
            expected = masked_image_reference(model, inputs, plan)
            for compact in (True, False):
                with torch.no_grad(), visual_token_exit(model, plan, compact=compact) as surgery:
                    found = model(**inputs).logits
                assert surgery.exit_layers == plan
                error = (found - expected)[kept].abs().max().item()
                assert error <= TOLERANCE, (plan, compact, error)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_no_exit_and_exit_after_the_last_layer_are_bit_identical(family_case, model_type):
    model, inputs = family_case(model_type)
    last = len(resolve_adapter(model).decoder_layers(model)) - 1
    baseline = attached_count(model)
    with torch.no_grad():
        stock = model(**inputs).logits
        for plan in (None, [None, None], last):
            with visual_token_exit(model, plan):
                assert torch.equal(model(**inputs).logits, stock), plan
    assert attached_count(model) == baseline


def recompute_inputs(model, inputs, ids):
    """The prompt plus the generated tokens as one uncached input (image inputs unchanged)."""
    extra = ids.shape[1] - inputs["input_ids"].shape[1]
    grown = {**inputs, "input_ids": ids}
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones if key == "attention_mask" else torch.zeros
            grown[key] = torch.cat([inputs[key], fill(ids.shape[0], extra, dtype=inputs[key].dtype)], dim=1)
    return with_positions(model, grown)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("plan", PLANS)
def test_cached_generate_equals_recomputation(family_case, model_type, plan):
    model, inputs = family_case(model_type)
    image_id = resolve_adapter(model).image_token_id(model)
    eos = model.config.get_text_config().eos_token_id
    steps = 3
    with torch.no_grad(), visual_token_exit(model, plan):
        generated = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=[image_id],
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = inputs["input_ids"].shape[1]
    assert generated.sequences.shape[1] == prompt + steps
    for step in range(steps):
        recompute = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
        with torch.no_grad(), visual_token_exit(model, plan):
            logits = model(**recompute).logits[:, -1]
        cached = generated.logits[step]
        assert (logits - cached).abs().max().item() <= TOLERANCE, step
        logits[:, image_id] = -torch.inf
        logits[:, eos] = -torch.inf  # min_new_tokens suppresses it
        assert torch.equal(logits.argmax(-1), generated.sequences[:, prompt + step])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generated_tokens_statistics_equal_an_eager_recomputation(family_case, model_type):
    """Each decoding step's query over the prompt's groups and the answer so far, against the
    stock eager model's output_attentions over prompt + answer in one uncached forward."""
    from analysis.vocabulary import GENERATED_KEY_GROUPS
    from tests.test_recorder_generated import step_by_step_reference

    model, inputs = family_case(model_type)
    layout = layout_of(model, inputs)
    image_id = resolve_adapter(model).image_token_id(model)
    with torch.no_grad(), record_attention(model, layout, generated=True) as recording:
        sequences = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                   suppress_tokens=[image_id])
    recompute = recompute_inputs(model, inputs, sequences)
    with running(model, "eager"):
        expected = step_by_step_reference(model, recompute, layout, sequences)
    mapped = resolve_adapter(model).attention_layers(model)
    expected = {(step, mapped[i]): value for (step, i), value in expected.items()}  # output_attentions: mapped layers only
    assert recording.steps_recorded == 2 and len(expected) == 2 * len(mapped) == len(recording.generated)
    for record in recording.generated:
        mass, entropy = expected[record.step, record.layer]
        assert record.mass.shape[-1] == len(GENERATED_KEY_GROUPS)
        assert_relative_close(record.mass, mass, TOLERANCE)
        assert_relative_close(record.entropy, entropy, TOLERANCE)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_that_fire_equal_an_exit_after_the_first_layer(family_case, model_type):
    model, inputs = family_case(model_type)
    # Attention inputs need a map after every layer; a hybrid decoder's recurrent layers have none.
    inputs_kind = "both" if resolve_adapter(model).recurrent is None else "hidden"
    gates = DyVTEGates.for_model(model, GateConfig(inputs=inputs_kind, hidden_width=8, tau=0.0))
    settings = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with visual_token_exit(model, 0):
            expected = model.generate(**inputs, **settings)
        with dyvte_exit(model, gates, inputs["input_ids"], inputs["attention_mask"]) as surgery:
            found = model.generate(**inputs, **settings)
    assert surgery.exit_layers == [0, 0]
    assert torch.equal(found.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(found.logits, expected.logits))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_exit_sweep_equals_the_surgery(family_case, model_type, path):
    """Each layer after an exit runs on its own mask and cos/sin (Gemma3: sliding window over
    prompt columns, local RoPE base), in the sweep's branches as in the surgery."""
    model, inputs = family_case(model_type)
    inputs = with_positions(model, inputs)
    answer = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    answer[:, -2:] = True  # the last two text tokens of each row, teacher-forced
    rows, positions = answer.nonzero(as_tuple=True)
    targets = inputs["input_ids"][rows, positions]
    with running(model, path):
        result = exit_sweep(model, inputs, answer)
    for layer in range(len(resolve_adapter(model).decoder_layers(model))):
        with torch.no_grad(), running(model, path), visual_token_exit(model, layer):
            logits = model(**inputs).logits[rows, positions - 1].float()
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        per_row = torch.stack([ce[rows == b].mean() for b in range(answer.shape[0])])
        assert (result.ce_exit[:, layer] - per_row).abs().max().item() <= TOLERANCE, layer


def test_cross_attention_family_is_rejected_with_the_supported_list():
    from transformers import MllamaConfig

    class CrossAttentionModel(torch.nn.Module):
        config = MllamaConfig()

    listed = ", ".join(repr(family) for family in FAMILIES)
    with pytest.raises(UnsupportedModelError) as error:
        resolve_adapter(CrossAttentionModel())
    message = str(error.value)
    assert message.startswith(f"unsupported model type 'mllama': expected one of [{listed}]")
    assert "cross-attention" in message
    for use in (lambda model: visual_token_exit(model, 1), lambda model: record_attention(model, None).__enter__()):
        with pytest.raises(UnsupportedModelError, match=r"expected one of \["):
            use(CrossAttentionModel())


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_deepstack_exits_before_its_last_addition_stay_exact(family_case, model_type, path):
    """Qwen3-VL (dense and mixture-of-experts) adds vision features to the image positions after
    decoder layers 0 and 1 (the tiny config): an exit of every row after layer 0 keeps the stream
    at full length with the image keys masked until layer 2, then compacts; removal still equals
    masking for every text query, and generate() with the cache equals recomputation."""
    model, inputs = family_case(model_type)
    assert resolve_adapter(model).first_compactable_layer(model) == 2
    inputs = with_positions(model, inputs)
    layout = layout_of(model, inputs)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    with running(model, path):
        expected = masked_image_reference(model, inputs, [0, 0])
        with torch.no_grad(), visual_token_exit(model, [0, 0]) as surgery:
            found = model(**inputs).logits
        assert surgery.exit_layers == [0, 0]
        assert (found - expected)[kept].abs().max().item() <= TOLERANCE
        with torch.no_grad(), visual_token_exit(model, [0, 0]):
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
        prompt = inputs["input_ids"].shape[1]
        for step in range(3):
            grown = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
            with torch.no_grad(), visual_token_exit(model, [0, 0]):
                logits = model(**grown).logits[:, -1]
            assert torch.equal(logits.argmax(-1), generated.sequences[:, prompt + step])


GEMMA4_PLANS = [[0, 0], [1, 1], [2, 2], [3, 3], [1, 3], [2, None], [0, 2]]
"""Exits of the tiny Gemma4 (layers 2..4 reuse the keys and values of layer 0, sliding, and layer 1,
full): before the first KV-sharing layer (0: layer 0's keys gathered at the kept tokens, layer 1's
already compacted; 1: both gathered), at it (2) and after it (3: layer 4 reads layer 1's), mixed per row."""


@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_gemma4_exits_around_kv_sharing_equal_masking_and_cached_generate(family_case, path):
    """Removal after layer k equals masking the image keys for every text query in the layers after
    k, including the KV-reusing layers, whose keys come from a layer before or after k; the per-layer
    embeddings follow the kept tokens; generate() with the cache equals recomputation."""
    from analysis.testing.families import GEMMA4_KV_SHARED, GEMMA4_LAYER_TYPES

    model, inputs = family_case("gemma4")
    adapter = resolve_adapter(model)
    assert adapter.kv_sources(model) == {2: 0, 3: 0, 4: 1}
    assert len(GEMMA4_LAYER_TYPES) - GEMMA4_KV_SHARED == 2
    assert adapter.layer_token_positions(model) == {"per_layer_input": 1}
    inputs = with_positions(model, inputs)
    layout = layout_of(model, inputs)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    prompt = inputs["input_ids"].shape[1]
    with running(model, path):
        for plan in GEMMA4_PLANS:
            expected = masked_image_reference(model, inputs, plan)
            for compact in (True, False):
                with torch.no_grad(), visual_token_exit(model, plan, compact=compact) as surgery:
                    found = model(**inputs).logits
                assert surgery.exit_layers == plan
                assert (found - expected)[kept].abs().max().item() <= TOLERANCE, (plan, compact)
            with torch.no_grad(), visual_token_exit(model, plan):
                generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                           suppress_tokens=[IMAGE_ID], output_logits=True, return_dict_in_generate=True)
            for step in range(3):
                grown = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
                with torch.no_grad(), visual_token_exit(model, plan):
                    logits = model(**grown).logits[:, -1]
                assert (logits - generated.logits[step]).abs().max().item() <= TOLERANCE, (plan, step)


def test_gemma4_generate_prefill_runs_every_query_through_the_kv_shared_layers(family_case):
    """Under generate() (logits_to_keep=1) the stock Gemma4 runs its KV-shared layers on the last
    query only; inside a recording block and an exit surgery every layer of the prefill holds the
    whole prompt, so each layer has a record and its token stream."""
    model, inputs = family_case("gemma4")
    layout = layout_of(model, inputs)
    lengths = {}

    def length_of(layer):
        def hook(module, args, output):
            lengths.setdefault(layer, (output[0] if isinstance(output, tuple) else output).shape[1])

        return hook

    paths = resolve_adapter(model).layer_paths(model)
    hooks = [Hook(path, length_of(i)) for i, path in enumerate(paths)]
    settings = dict(max_new_tokens=1, do_sample=False)
    with torch.no_grad(), attached(model, hooks):
        model.generate(**inputs, **settings)
    assert [lengths[i] for i in range(len(paths))] == [layout.seq_len] * 2 + [1] * 3  # the stock slicing
    lengths.clear()
    with torch.no_grad(), attached(model, hooks), record_attention(model, layout) as recording:
        model.generate(**inputs, **settings)
    assert [lengths[i] for i in range(len(paths))] == [layout.seq_len] * len(paths)
    assert [record.layer for record in recording.records] == list(range(len(paths)))
    lengths.clear()
    with torch.no_grad(), attached(model, hooks), visual_token_exit(model, [1, 2]):
        model.generate(**inputs, **settings)
    # every row has exited after layer 2: layers 3 and 4 hold the kept tokens, not the last one alone
    kept = int(((layout.group != PADDING) & (layout.group != IMAGE)).sum(1).max())
    assert [lengths[i] for i in range(len(paths))] == [layout.seq_len] * 3 + [kept] * 2


@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_gemma4_recompaction_between_a_storing_and_a_reusing_layer_is_exact(family_case, path):
    """Half of each row's image tokens leave after layer 0 (as FastV prunes), the rest after layer 2:
    layer 1 (the full-attention keys' source) runs on the first compaction, layer 4 (which reuses
    them) on the second, so its keys are gathered from one compacted stream into the other; the
    result equals masking the removed keys (compact=False), prefill and cached generate()."""
    model, inputs = family_case("gemma4")
    inputs = with_positions(model, inputs)
    layout = layout_of(model, inputs)
    image = layout.group == IMAGE
    half = image & (image.long().cumsum(1) % 2 == 1)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    prompt = inputs["input_ids"].shape[1]
    with running(model, path):
        with torch.no_grad(), visual_token_exit(model, removals={0: half}, compact=False):
            expected = model(**inputs).logits
        with torch.no_grad(), visual_token_exit(model, 2, removals={0: half}, compact=False):
            expected_exit = model(**inputs).logits
        with torch.no_grad(), visual_token_exit(model, 2, removals={0: half}) as surgery:
            found = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                       suppress_tokens=[IMAGE_ID], output_logits=True, return_dict_in_generate=True)
        assert surgery.exit_layers == [2, 2]
        assert surgery.tokens_per_layer()[:, 1].tolist() == (layout.group != PADDING).sum(1).sub(half.sum(1)).tolist()
        assert (found - expected_exit)[kept].abs().max().item() <= TOLERANCE
        assert (found - expected)[kept].abs().max().item() > 1e-3  # the exit after layer 2 changes the answer
        for step in range(3):
            grown = recompute_inputs(model, inputs, generated.sequences[:, : prompt + step])
            with torch.no_grad(), visual_token_exit(model, 2, removals={0: half}, compact=False):
                logits = model(**grown).logits[:, -1]
            assert (logits - generated.logits[step]).abs().max().item() <= TOLERANCE, step
