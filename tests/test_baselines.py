"""The peers in the surgery's conventions (exit.baselines): FastV, VTW, DyVTE + FastV.

Tiny random LLaVAs (MHA and GQA, eager and SDPA), 16 image tokens per image from noise images (so
the image tokens differ and their attention scores do not tie), batch 2 with left padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import resolve_adapter, supported_model_types, token_layout
from analysis.data import Question, build_prompt
from analysis.errors import DyVTEError
from analysis.hooks import OBSERVED_SDPA, Hook, attached, attached_count
from analysis.layout import IMAGE, PADDING
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor
from exit import (
    DyVTEGates,
    ExitSurgeryError,
    FastV,
    GateConfig,
    ModelSignature,
    dyvte_exit,
    dyvte_fastv,
    fastv,
    fastv_keep_count,
    first_layer_within,
    visual_token_exit,
    vtw_kl_curve,
)
from exit.baselines import top_slots
from exit.flops import DecoderShape, fastv_tokens_per_layer

IMAGE_SIZE = 56  # 16 image tokens per image
LAYER, RATIO = 1, 0.5  # FastV after layer 1 of 4, keeping 8 of 16 image tokens
IMPLEMENTATIONS = ["eager", "sdpa"]
KINDS = ["mha", "gqa"]
TOLERANCE = 1e-5
QUESTIONS = [
    Question("a", ("x.png",), "What colour?"),
    Question("b", ("y.png",), "Is there a large circle on the left of the picture?"),
]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(IMAGE_SIZE)


@pytest.fixture(scope="module")
def inputs(processor):
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in QUESTIONS]
    prompts = [build_prompt(processor, question) for question in QUESTIONS]
    batch = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    assert not bool(batch["attention_mask"][0, 0]) and bool(batch["attention_mask"][:, -1].all())  # left padding
    return batch


@pytest.fixture(scope="module")
def models():
    """Tiny LLaVAs keyed by (kind, attention implementation), built once."""
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(kind: str, implementation: str = "sdpa") -> torch.nn.Module:
        if (kind, implementation) not in cache:
            spec = TinyLlavaSpec(num_heads=4, num_kv_heads=4 if kind == "mha" else 2, image_size=IMAGE_SIZE)
            cache[(kind, implementation)] = tiny_llava(spec, attn_implementation=implementation)
        return cache[(kind, implementation)]

    return get


def layout_of(model, inputs):
    return token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))


def with_positions(inputs):
    """Position ids as generate() makes them (left padding starts each row at 0)."""
    positions = inputs["attention_mask"].long().cumsum(-1) - 1
    return {**inputs, "position_ids": positions.clamp_min(0)}


def text_positions(model, inputs):
    layout = layout_of(model, inputs)
    return (layout.group != PADDING) & (layout.group != IMAGE)


def masked_reference(model, inputs, dropped, after):
    """Stock model whose layers after ``after`` see a hand-written 4-D mask (causal, padding) with the
    ``dropped`` (batch, seq) keys masked for every query."""
    layout = layout_of(model, inputs)
    seq = layout.seq_len
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    eager = resolve_adapter(model).attention_implementation(model) == "eager"
    keys = (layout.group != PADDING) & ~dropped

    def hook(module, args, kwargs):
        allowed = causal[None, None] & keys[:, None, None, :]
        if eager:
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        else:
            mask = allowed
        return args, {**kwargs, "attention_mask": mask}

    paths = resolve_adapter(model).layer_paths(model)
    hooks = [Hook(path, hook, kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > after]
    with torch.no_grad(), attached(model, hooks):
        return model(**inputs).logits


# FastV ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ratio_zero_is_bit_identical_and_ratio_one_is_a_static_exit(models, inputs, kind, implementation):
    model = models(kind, implementation)
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with fastv(model, LAYER, 0.0) as pruning:
            assert torch.equal(model(**inputs).logits, stock)
            assert not bool(pruning.dropped.any()) and pruning.exit_layers == [None, None]
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock_tokens)
        with visual_token_exit(model, LAYER):
            static = model(**inputs).logits
            static_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with fastv(model, LAYER, 1.0) as pruning:
            assert torch.equal(model(**inputs).logits, static)
            assert pruning.exit_layers == [LAYER, LAYER]
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), static_tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_removal_equals_masking_the_dropped_keys(models, inputs, kind, implementation):
    model = models(kind, implementation)
    inputs = with_positions(inputs)
    text = text_positions(model, inputs)
    layout = layout_of(model, inputs)
    for compact in (True, False):
        with torch.no_grad(), fastv(model, LAYER, RATIO, compact=compact) as pruning:
            found = model(**inputs).logits
        image = layout.group == IMAGE
        assert pruning.dropped.sum(1).tolist() == [8, 8] and pruning.kept.sum(1).tolist() == [8, 8]
        assert torch.equal(pruning.kept | pruning.dropped, image) and not bool((pruning.kept & pruning.dropped).any())
        expected = masked_reference(model, inputs, pruning.dropped, LAYER)
        error = (found - expected)[text].abs().max().item()
        assert error <= TOLERANCE, (compact, error)
        kept_images = (found - expected)[pruning.kept].abs().max().item()
        assert kept_images <= TOLERANCE, (compact, kept_images)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padded_batch_equals_each_row_alone(models, inputs, kind, implementation):
    model = models(kind, implementation)
    inputs = with_positions(inputs)
    text = text_positions(model, inputs)
    with torch.no_grad(), fastv(model, LAYER, RATIO) as pruning:
        together = model(**inputs).logits
    kept_together = pruning.kept
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        alone_inputs = {key: inputs[key][row : row + 1, real] for key in ("input_ids", "attention_mask")}
        alone_inputs["pixel_values"] = inputs["pixel_values"][row : row + 1]
        with torch.no_grad(), fastv(model, LAYER, RATIO) as pruning:
            alone = model(**alone_inputs).logits[0]
        assert torch.equal(pruning.kept[0], kept_together[row, real]), row
        error = (together[row, real][text[row, real]] - alone[text[row, real]]).abs().max().item()
        assert error <= TOLERANCE, (row, error)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cached_generate_equals_recomputation(models, inputs, kind, implementation):
    model = models(kind, implementation)
    image_id = resolve_adapter(model).image_token_id(model)
    steps = 4
    with torch.no_grad():
        with fastv(model, LAYER, RATIO) as pruning:
            cache = model(**inputs, use_cache=True).past_key_values
            generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                       suppress_tokens=[image_id], output_logits=True, return_dict_in_generate=True)
        # Layers after K hold only the kept image keys (and the text), compacted.
        kept_length = int(((layout_of(model, inputs).group != PADDING) & ~pruning.dropped).sum(1).max())
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        assert lengths == [inputs["input_ids"].shape[1]] * (LAYER + 1) + [kept_length] * (len(lengths) - LAYER - 1)
        prompt = inputs["input_ids"].shape[1]
        for step in range(steps):
            ids = generated.sequences[:, : prompt + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
            recompute = with_positions({"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]})
            # The same pruning (ranked at the prompt's last token), replayed without a cache.
            with visual_token_exit(model, removals={LAYER: pruning.dropped}):
                logits = model(**recompute).logits[:, -1]
            error = (logits - generated.logits[step]).abs().max().item()
            assert error <= TOLERANCE, (step, error)
            logits[:, image_id] = -torch.inf
            logits[:, model.config.text_config.eos_token_id] = -torch.inf  # min_new_tokens suppresses it
            assert torch.equal(logits.argmax(-1), generated.sequences[:, prompt + step])


@pytest.mark.parametrize("kind", KINDS)
def test_kept_set_is_the_top_by_the_stock_models_head_mean_attention(models, inputs, kind):
    eager = models(kind, "eager")
    layout = layout_of(eager, inputs)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    rows = torch.arange(2)
    stock = attentions[LAYER][rows, :, layout.last_index].mean(dim=1)  # batch key
    for implementation in IMPLEMENTATIONS:
        model = models(kind, implementation)
        with torch.no_grad(), fastv(model, LAYER, RATIO) as pruning:
            model(**inputs)
        image = layout.group == IMAGE
        for row in range(2):
            scores = stock[row, image[row]]
            keep = fastv_keep_count(int(image[row].sum()), RATIO)
            top = torch.zeros_like(scores, dtype=torch.bool)
            top[scores.topk(keep).indices] = True
            assert torch.equal(pruning.kept[row, image[row]], top), (implementation, row)
            ranked = scores.sort(descending=True).values
            assert ranked[keep - 1] - ranked[keep] > 1e-7  # no near tie at the boundary decides the set
        assert torch.allclose(pruning.scores[image], stock[image], rtol=1e-5, atol=1e-7)
        assert bool(pruning.scores[~image].isnan().all())


def test_ties_keep_the_earlier_position_and_counts_round_up():
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3, 9.0], [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]])
    candidates = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    kept = top_slots(scores, candidates, 0.5)  # ceil(0.5 * 5) = 3 and ceil(0.5 * 4) = 2
    assert kept.tolist() == [[False, True, True, False, True, False], [True, True, False, False, False, False]]
    assert top_slots(scores, candidates, 0.7).sum(1).tolist() == [2, 2]  # ceil(1.5) = 2, ceil(1.2) = 2
    assert [fastv_keep_count(576, r) for r in (0.0, 0.5, 0.75, 1.0)] == [576, 288, 144, 0]
    assert fastv_keep_count(10, 0.7) == 3 and fastv_keep_count(10, 0.9) == 1 and fastv_keep_count(4, 0.1) == 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fastv_keep_count(4, 1.5)


def test_only_layer_k_reads_attention_weights(models, inputs, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    import analysis.hooks

    model = models("gqa", "sdpa")
    adapter = resolve_adapter(model)
    num_layers = len(adapter.decoder_layers(model))
    kernel_layers: list[int] = []
    plain_sdpa = analysis.hooks.sdpa_attention_forward

    def counting_sdpa(module, *args, **kwargs):
        kernel_layers.append(module.layer_idx)
        return plain_sdpa(module, *args, **kwargs)

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    weights: list[object] = []
    returned = [Hook(path, lambda module, args, output: weights.append(output[1])) for path in adapter.attention_paths(model)]
    implementations = []
    with monkeypatch.context() as patch:
        patch.setattr(analysis.hooks, "sdpa_attention_forward", counting_sdpa)
        patch.setattr(llama, "eager_attention_forward", no_eager)
        with torch.no_grad(), attached(model, returned), fastv(model, LAYER, RATIO) as pruning:
            implementations.append(adapter.attention_implementation(model))
            model(**inputs)
    assert pruning.weights_read == [LAYER]  # one last-token row, in layer K only
    assert kernel_layers == list(range(num_layers))  # every layer, K included, ran the SDPA kernel
    assert weights == [None] * num_layers  # and no layer returned attention weights
    assert implementations == [OBSERVED_SDPA] and adapter.attention_implementation(model) == "sdpa"
    eager = models("gqa", "eager")
    with torch.no_grad(), fastv(eager, LAYER, RATIO) as pruning:
        eager(**inputs)
    assert pruning.weights_read == [LAYER] and resolve_adapter(eager).attention_implementation(eager) == "eager"


def test_fastv_tokens_per_layer_follow_the_formula(models, inputs):
    model = models("gqa", "sdpa")
    shape = DecoderShape.from_config(model.config)
    layout = layout_of(model, inputs)
    with torch.no_grad(), fastv(model, LAYER, RATIO, exit_layers=2) as pruning:
        model(**inputs)
    assert pruning.exit_layers == [2, 2]
    for row in range(2):
        tokens, images = int((layout.group[row] != PADDING).sum()), int((layout.group[row] == IMAGE).sum())
        expected = fastv_tokens_per_layer(shape, tokens, images, LAYER, RATIO, exit_layer=2)
        assert pruning.tokens_per_layer()[row].tolist() == expected == [tokens, tokens, tokens - 8, tokens - 16]


def test_bad_settings_are_toolkit_errors(models, inputs):
    model = models("mha", "sdpa")
    gates = DyVTEGates.for_model(model, GateConfig(inputs="attention", hidden_width=4))
    calls = {
        r"ratio R in \[0, 1\]": lambda: fastv_keep_count(4, 1.5),
        "eta >= 0": lambda: first_layer_within([0.1], -1.0),
        "a KL value per layer": lambda: first_layer_within([], 0.1),
        "calibration samples": lambda: vtw_kl_curve(model, []),
        "inputs='hidden'": lambda: dyvte_fastv(model, gates, inputs["input_ids"], inputs["attention_mask"], 1, 0.5).__enter__(),
    }
    for message, call in calls.items():
        with pytest.raises(DyVTEError, match=message) as error:
            call()
        assert isinstance(error.value, ValueError), message


def test_bad_settings_are_named(models, inputs):
    model = models("mha", "sdpa")
    before = attached_count(model)
    with pytest.raises(ExitSurgeryError, match=r"FastV layer K in 0..3"):
        fastv(model, 4, 0.5)
    with pytest.raises(ValueError, match=r"ratio R in \[0, 1\]"):
        fastv(model, 1, -0.1)
    gates = DyVTEGates.for_model(model, GateConfig(inputs="attention", hidden_width=4))
    with pytest.raises(ValueError, match="inputs='hidden'"), dyvte_fastv(model, gates, inputs["input_ids"],
                                                                        inputs["attention_mask"], 1, 0.5):
        pass
    with pytest.raises(ExitSurgeryError, match="image positions only"), visual_token_exit(
        model, removals={1: ~(layout_of(model, inputs).group == IMAGE)}
    ), torch.no_grad():
        model(**inputs)
    assert attached_count(model) == before and resolve_adapter(model).attention_implementation(model) == "sdpa"


def test_no_hook_left_behind(models, inputs):
    model = models("mha", "sdpa")
    gates = DyVTEGates.for_model(model, GateConfig(hidden_width=4, tau=1.0))
    with torch.no_grad():
        model(**inputs)  # transformers attaches its own output-capturing hooks on the first forward
        before = attached_count(model)
        with dyvte_fastv(model, gates, inputs["input_ids"], inputs["attention_mask"], 2, 0.5):
            model(**inputs)
        assert attached_count(model) == before
        with fastv(model, 1, 0.5):
            assert attached_count(model) > before
            with fastv(model, 2, 0.5):  # nested handles remove only their own hooks
                pass
            assert attached_count(model) > before
            assert resolve_adapter(model).attention_implementation(model) == OBSERVED_SDPA
        assert attached_count(model) == before
        with pytest.raises(RuntimeError, match="boom"), dyvte_fastv(model, gates, inputs["input_ids"],
                                                                   inputs["attention_mask"], 1, 0.5):
            raise RuntimeError("boom")
        handle = fastv(model, 1, 0.5).attach()
        model(**inputs)
        handle.remove()
        handle.remove()
    assert attached_count(model) == before and resolve_adapter(model).attention_implementation(model) == "sdpa"


def reporting(adapter, implementation):
    """A copy of ``adapter`` that reports ``implementation`` as the decoder's attention."""

    class Reporting(type(adapter)):
        def attention_implementation(self, model):
            return implementation

    return Reporting(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.init})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_fastv_handle_attaches_on_entry_only(models, inputs, implementation):
    model = models("mha", implementation)
    adapter = resolve_adapter(model)
    with torch.no_grad():
        model(**inputs)  # transformers attaches its own output-capturing hooks on the first forward
    before = attached_count(model)
    pruning = fastv(model, LAYER, RATIO)
    assert isinstance(pruning, FastV) and not pruning.is_attached and not pruning.surgery.is_attached
    assert attached_count(model) == before and adapter.attention_implementation(model) == implementation
    observed = OBSERVED_SDPA if implementation == "sdpa" else "eager"
    with pruning as entered:
        assert entered is pruning and pruning.is_attached and pruning.surgery.is_attached
        assert attached_count(model) > before and adapter.attention_implementation(model) == observed
        with pytest.raises(ExitSurgeryError, match="attached already"):
            pruning.attach()
        with torch.no_grad():
            model(**inputs)
    assert not pruning.is_attached and not pruning.surgery.is_attached
    assert attached_count(model) == before and adapter.attention_implementation(model) == implementation
    kept, exits = pruning.kept.clone(), pruning.exit_layers
    assert pruning.weights_read == [LAYER] and bool(kept.any())
    # handle use
    assert pruning.attach() is pruning and attached_count(model) > before
    assert adapter.attention_implementation(model) == observed
    with torch.no_grad():
        model(**inputs)
    pruning.remove()
    pruning.remove()
    assert attached_count(model) == before and adapter.attention_implementation(model) == implementation
    assert torch.equal(pruning.kept, kept) and pruning.exit_layers == exits and pruning.weights_read == [LAYER, LAYER]
    outer, inner = fastv(model, 1, 0.5), fastv(model, 2, 0.5)  # both made before either is entered
    with outer, inner:
        assert outer.is_attached and inner.is_attached and attached_count(model) > before
    assert attached_count(model) == before and adapter.attention_implementation(model) == implementation


def test_a_failing_fastv_construction_or_attach_leaves_nothing(models, inputs, monkeypatch):
    model = models("mha", "sdpa")
    adapter = resolve_adapter(model)
    with torch.no_grad():
        model(**inputs)
    before = attached_count(model)
    with pytest.raises(ExitSurgeryError, match="no module named"):
        FastV(model, LAYER, RATIO, adapter=dataclasses.replace(adapter, attention_attr="no_such_attention"))
    with pytest.raises(ExitSurgeryError, match="flash_attention_2"):
        FastV(model, LAYER, RATIO, adapter=reporting(adapter, "flash_attention_2"))
    with pytest.raises(ExitSurgeryError, match="exit layer in 0..3"):
        FastV(model, LAYER, RATIO, exit_layers=7)
    assert attached_count(model) == before and adapter.attention_implementation(model) == "sdpa"
    pruning = FastV(model, LAYER, RATIO)
    adapter.set_attention_implementation(model, "eager")
    try:
        with pytest.raises(ExitSurgeryError, match="as when the FastV handle was made"):
            pruning.attach()
    finally:
        adapter.set_attention_implementation(model, "sdpa")
    assert attached_count(model) == before

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")

    monkeypatch.setattr("exit.baselines.running_attention", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        pruning.attach()  # fails after the surgery and the reader were attached: both come off again
    assert not pruning.is_attached and not pruning.surgery.is_attached
    assert attached_count(model) == before and adapter.attention_implementation(model) == "sdpa"


# DyVTE + FastV ----------------------------------------------------------------------------------
class FixedGates(DyVTEGates):
    """Gates that fire at layer ``fire_at`` only, whatever the features; they record what they saw."""

    def __init__(self, model, fire_at):
        super().__init__(GateConfig(hidden_width=4, tau=0.5), ModelSignature.of(model))
        self.fire_at = fire_at
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, layer, features):
        self.seen.append((layer, features))
        logits = torch.tensor([0.0, 10.0] if layer == self.fire_at else [10.0, 0.0])
        return logits.expand(features.shape[0], 2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gates_firing_after_k_equal_fastv_then_an_exit(models, inputs, implementation):
    model = models("gqa", implementation)
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fire_at = LAYER + 1
    with torch.no_grad():
        with fastv(model, LAYER, RATIO, exit_layers=fire_at) as reference:
            expected_logits = model(**inputs).logits
            expected = model.generate(**inputs, **settings)
        gates = FixedGates(model, fire_at)
        with dyvte_fastv(model, gates, inputs["input_ids"], inputs["attention_mask"], LAYER, RATIO) as combined:
            found_logits = model(**inputs).logits
            assert [layer for layer, _ in gates.seen] == list(range(fire_at + 1))  # asked after each layer until it fired
            assert combined.exit_layers == [fire_at, fire_at]
            found = model.generate(**inputs, **settings)
    assert torch.equal(combined.dropped, reference.dropped)
    assert torch.equal(combined.surgery.drop_layers, reference.surgery.drop_layers)
    assert torch.equal(found_logits, expected_logits)
    assert torch.equal(found.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(found.logits, expected.logits))


def test_gate_features_equal_dyvte_exits_and_an_early_gate_leaves_nothing_to_prune(models, inputs):
    model = models("gqa", "sdpa")
    plain, combined = FixedGates(model, fire_at=-1), FixedGates(model, fire_at=-1)  # never fire
    with torch.no_grad():
        with dyvte_exit(model, plain, inputs["input_ids"], inputs["attention_mask"]):
            model(**inputs)
        with dyvte_fastv(model, combined, inputs["input_ids"], inputs["attention_mask"], LAYER, 0.0):
            model(**inputs)
        assert [layer for layer, _ in combined.seen] == [layer for layer, _ in plain.seen] == [0, 1, 2]
        for (_, a), (_, b) in zip(plain.seen, combined.seen):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        # FastV's layer K = 2 comes after a gate fired at layer 0: no image token is left to rank.
        early = FixedGates(model, fire_at=0)
        with dyvte_fastv(model, early, inputs["input_ids"], inputs["attention_mask"], 2, RATIO) as pruning:
            logits = model(**inputs).logits
        with visual_token_exit(model, 0):
            static = model(**inputs).logits
    assert pruning.exit_layers == [0, 0] and not bool(pruning.dropped.any())
    assert torch.equal(logits, static)


# VTW --------------------------------------------------------------------------------------------
def test_vtw_takes_the_first_layer_within_eta():
    curve = [0.9, 0.04, 0.3, 0.01, 0.0]
    assert first_layer_within(curve, 0.05) == 1  # the first, not the lowest or the last
    assert first_layer_within(curve, 0.02) == 3
    assert first_layer_within(curve, 0.0) == 4
    assert first_layer_within(curve, 10.0) == 0
    assert first_layer_within([0.5, 0.4], 0.1) == 1  # none within: the last layer (no change)
    with pytest.raises(ValueError, match="eta >= 0"):
        first_layer_within(curve, -1.0)


def test_vtw_curve_has_a_known_answer_when_the_last_layers_do_nothing(inputs):
    """Layers 2 and 3 write nothing to the residual stream (zero output projections), so any exit
    after layer 1 or later leaves the logits unchanged (KL exactly 0) and eta = 0 picks layer 1."""
    model = tiny_llava(TinyLlavaSpec(num_heads=4, num_kv_heads=2, image_size=IMAGE_SIZE))
    layers = resolve_adapter(model).decoder_layers(model)
    with torch.no_grad():
        for layer in layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    curve = vtw_kl_curve(model, [inputs])
    assert curve.shape == (2, 4)
    assert bool((curve[:, 1:] == 0).all()) and bool((curve[:, 0] > 1e-9).all())
    assert first_layer_within(curve.mean(0), 0.0) == 1
    # KL(full || exit after 0) by hand, in float64
    with torch.no_grad():
        full = model(**inputs).logits[:, -1].double().log_softmax(-1)
        with visual_token_exit(model, 0):
            exited = model(**inputs).logits[:, -1].double().log_softmax(-1)
    by_hand = (full.exp() * (full - exited)).sum(-1)
    assert (curve[:, 0] - by_hand).abs().max() <= 1e-6 * by_hand.abs().max() + 1e-8


# every supported family ---------------------------------------------------------------------------
def family_positions(model, inputs):
    if resolve_adapter(model).positions == "mrope":
        return dict(inputs)  # the model computes its own 3-D positions
    return with_positions(inputs)


def family_reference(model, inputs, dropped, after):
    """The model's own mask (or a hand-written causal one where SDPA passes none) with the dropped keys
    masked for every query in the layers after ``after``."""
    layout = layout_of(model, inputs)
    causal = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool).tril()

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = causal[None, None] & (layout.group != PADDING)[:, None, None, :]
        if mask.dtype == torch.bool:
            mask = mask & ~dropped[:, None, None, :]
        else:
            mask = mask.masked_fill(dropped[:, None, None, :], torch.finfo(hidden.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    paths = resolve_adapter(model).layer_paths(model)
    hooks = [Hook(path, hook, kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > after]
    with torch.no_grad(), attached(model, hooks):
        return model(**inputs).logits


@pytest.mark.parametrize("model_type", [t for t in supported_model_types() if resolve_adapter(t).recurrent is None])
def test_every_family_prunes_exactly_and_decodes_with_the_cache(family_case, model_type):
    """Pruning equals masking the dropped keys (hybrid decoders' recurrent layers: masking is not
    removal there; tests/test_recurrent_families.py checks FastV against deleting the tokens)."""
    model, inputs = family_case(model_type)
    positioned = family_positions(model, inputs)
    text = text_positions(model, inputs)
    with torch.no_grad(), fastv(model, LAYER, RATIO) as pruning:
        found = model(**positioned).logits
    assert bool(pruning.dropped.any(dim=1).all())
    expected = family_reference(model, positioned, pruning.dropped, LAYER)
    error = (found - expected)[text].abs().max().item()
    assert error <= TOLERANCE, error
    image_id = resolve_adapter(model).image_token_id(model)
    eos = model.config.get_text_config().eos_token_id
    steps = 3
    with torch.no_grad(), fastv(model, LAYER, RATIO) as pruning:
        generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   suppress_tokens=[image_id], output_logits=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    for step in range(steps):
        ids = generated.sequences[:, : prompt + step]
        grown = {**inputs, "input_ids": ids}
        for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
            if key in inputs:
                fill = torch.ones if key == "attention_mask" else torch.zeros
                grown[key] = torch.cat([inputs[key], fill(ids.shape[0], step, dtype=inputs[key].dtype)], dim=1)
        with torch.no_grad(), visual_token_exit(model, removals={LAYER: pruning.dropped}):
            logits = model(**family_positions(model, grown)).logits[:, -1]
        assert (logits - generated.logits[step]).abs().max().item() <= TOLERANCE, step
        logits[:, image_id] = -torch.inf
        logits[:, eos] = -torch.inf
        assert torch.equal(logits.argmax(-1), generated.sequences[:, prompt + step])
