"""Every supported family on a tiny random model: recorder, logits, stages, exit surgery, cached generate.

One parametrised set of tests runs over ``supported_model_types()``; the models come from
``analysis.testing.families`` (stock transformers classes, tiny configs, random weights) and the
batch has two left-padded rows, the second with two images, so padding and several images are
covered for every family.
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
from analysis.testing.families import MARKER_A, MARKER_B, RowSpec, tiny_family_batch, tiny_family_model, tiny_family_types
from exit import DyVTEGates, GateConfig, dyvte_exit, visual_token_exit
from exit.sweep import exit_sweep
from tests.test_recorder import assert_relative_close, reference_statistics

FAMILIES = supported_model_types()
ROWS = (RowSpec(system=3, images=1, text=5), RowSpec(system=2, images=2, text=3))
PLANS = [[1, 2], [0, None]]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def family_case():
    """(model, batch) per family, built once; the model runs SDPA unless a test switches it."""
    cache: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}

    def get(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        if model_type not in cache:
            model = tiny_family_model(model_type, num_kv_heads=2)
            cache[model_type] = (model, tiny_family_batch(model, ROWS))
        return cache[model_type]

    return get


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
    assert len(expected) == num_layers
    for path, fused in (("sdpa", True), ("sdpa", False), ("eager", True)):  # fused kernel, recomputed, eager
        with torch.no_grad(), record_attention(model, layout, attention=path, query_chunk=7, fused=fused) as recording:
            model(**inputs)
        assert (recording.kernel or "eager").startswith({("sdpa", True): "cpu:flash", ("sdpa", False): "recomputed",
                                                         ("eager", True): "eager"}[path, fused])
        assert [r.layer for r in recording.records] == list(range(num_layers))
        for record, (mass, entropy) in zip(recording.records, expected):
            assert record.mass.shape == (2, 4, len(QUERY_GROUPS), len(KEY_GROUPS))
            assert_relative_close(record.mass, mass)
            assert_relative_close(record.entropy, entropy)
    frame = recording.to_frame(sample_ids=["a", "b"])
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


@pytest.mark.parametrize("model_type", FAMILIES)
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
    assert recording.steps_recorded == 2 and len(expected) == 2 * len(recording.records)
    for record in recording.generated:
        mass, entropy = expected[record.step, record.layer]
        assert record.mass.shape[-1] == len(GENERATED_KEY_GROUPS)
        assert_relative_close(record.mass, mass, TOLERANCE)
        assert_relative_close(record.entropy, entropy, TOLERANCE)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_that_fire_equal_an_exit_after_the_first_layer(family_case, model_type):
    model, inputs = family_case(model_type)
    gates = DyVTEGates.for_model(model, GateConfig(inputs="both", hidden_width=8, tau=0.0))
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
