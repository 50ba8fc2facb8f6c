"""FLOPs formulas of exit.flops against torch's FlopCounterMode on tiny models (within 2 %)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from analysis.testing.tiny import TinyLlavaSpec, tiny_llava
from exit import fastv, visual_token_exit
from exit.flops import (
    DecoderShape,
    VisionShape,
    decode_flops,
    decode_flops_for_counts,
    fastv_tokens_per_layer,
    prefill_flops,
    prefill_flops_for_counts,
    relative_prefill_flops,
    vision_flops,
)

SPECS = {
    "mha": TinyLlavaSpec(image_size=56, num_layers=4),
    "gqa": TinyLlavaSpec(image_size=56, num_layers=4, num_heads=4, num_kv_heads=2, vision_layers=2),
}
TEXT_BEFORE, TEXT_AFTER = 7, 11


def _inputs(model) -> tuple[torch.Tensor, torch.Tensor, int]:
    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 200, (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
    ids = torch.cat([text[:TEXT_BEFORE], torch.full((image_tokens,), model.config.image_token_id), text[TEXT_BEFORE:]])
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    return ids[None], pixels, image_tokens


def _counted(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def _close(predicted: int, counted: int) -> None:
    assert counted > 0
    assert abs(predicted - counted) <= 0.02 * counted, (predicted, counted)


@pytest.fixture(params=sorted(SPECS))
def model(request):
    return tiny_llava(SPECS[request.param], attn_implementation="eager")


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [None, 0, 2, 3])
def test_prefill_flops_match_the_flop_counter(model, exit_layer):
    ids, pixels, image_tokens = _inputs(model)
    shape = DecoderShape.from_config(model.config)
    vision = _counted(lambda: model.model.get_image_features(pixel_values=pixels))

    def run() -> None:
        with visual_token_exit(model, exit_layers=[exit_layer]):
            model(input_ids=ids, pixel_values=pixels, use_cache=False)

    # the forward computes logits at every position
    _close(prefill_flops(shape, ids.shape[1], image_tokens, exit_layer, logits_positions=ids.shape[1]), _counted(run) - vision)


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [None, 1])
def test_decode_flops_match_the_flop_counter(model, exit_layer):
    ids, pixels, image_tokens = _inputs(model)
    shape = DecoderShape.from_config(model.config)
    with visual_token_exit(model, exit_layers=[exit_layer]):
        prefill = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        mask = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
        next_token = prefill.logits[:, -1:].argmax(-1)
        counted = _counted(lambda: model(input_ids=next_token, attention_mask=mask, cache=prefill.past_key_values))
    _close(decode_flops(shape, ids.shape[1], image_tokens, exit_layer), counted)


@torch.inference_mode()
@pytest.mark.parametrize("layer, ratio, exit_layer", [(1, 0.5, None), (0, 0.75, 2)])
def test_fastv_flops_match_the_flop_counter(model, layer, ratio, exit_layer):
    ids, pixels, image_tokens = _inputs(model)
    shape = DecoderShape.from_config(model.config)
    tokens = ids.shape[1]
    counts = fastv_tokens_per_layer(shape, tokens, image_tokens, layer, ratio, exit_layer)
    vision = _counted(lambda: model.model.get_image_features(pixel_values=pixels))
    found: dict[str, object] = {}

    def run() -> None:
        with fastv(model, layer, ratio, exit_layers=exit_layer) as pruning:
            model(input_ids=ids, pixel_values=pixels, use_cache=False)
        found["counts"] = pruning.tokens_per_layer()[0].tolist()

    counted = _counted(run) - vision
    assert found["counts"] == counts
    _close(prefill_flops_for_counts(shape, counts, logits_positions=tokens), counted)
    # decoding one token: each layer attends to what its cache holds (the kept tokens)
    with fastv(model, layer, ratio, exit_layers=exit_layer):
        prefill = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        cached = [prefill.past_key_values.layers[i].keys.shape[2] for i in range(shape.layers)]
        assert cached == counts
        mask = torch.ones(1, tokens + 1, dtype=torch.long)
        next_token = prefill.logits[:, -1:].argmax(-1)
        step = _counted(lambda: model(input_ids=next_token, attention_mask=mask, cache=prefill.past_key_values))
    _close(decode_flops_for_counts(shape, cached), step)


def test_per_layer_counts_generalise_the_exit_formula():
    shape = DecoderShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49153)
    for k in (None, 0, 14, 29):
        last = 29 if k is None else k
        counts = [640] * (last + 1) + [64] * (29 - last)
        assert prefill_flops_for_counts(shape, counts, logits_positions=1) == prefill_flops(shape, 640, 576, k, 1)
        assert decode_flops_for_counts(shape, [c + 60 for c in counts]) == decode_flops(shape, 700, 576, k)
    # FastV after layer 2 keeping 288 of 576, then an exit after layer 14
    assert fastv_tokens_per_layer(shape, 640, 576, 2, 0.5, 14) == [640] * 3 + [352] * 12 + [64] * 15
    assert fastv_tokens_per_layer(shape, 640, 576, 2, 0.5) == [640] * 3 + [352] * 27
    assert fastv_tokens_per_layer(shape, 640, 576, 2, 0.0) == [640] * 30
    assert fastv_tokens_per_layer(shape, 640, 576, 2, 1.0) == [640] * 3 + [64] * 27
    assert fastv_tokens_per_layer(shape, 640, 576, 5, 0.5, 3) == [640] * 4 + [64] * 26  # exit before FastV's layer
    with pytest.raises(ValueError, match="one per decoder layer"):
        prefill_flops_for_counts(shape, [640] * 29)


@torch.inference_mode()
def test_vision_tower_and_projector_flops_match_the_flop_counter(model):
    _, pixels, image_tokens = _inputs(model)
    predicted = vision_flops(VisionShape.from_config(model.config), model.config.vision_config.image_size, image_tokens)
    _close(sum(predicted.values()), _counted(lambda: model.model.get_image_features(pixel_values=pixels)))


def test_exit_saves_flops_in_proportion_to_the_layers_after_it():
    shape = DecoderShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49153)
    assert relative_prefill_flops(shape, 640, 576, None) == 1.0
    assert relative_prefill_flops(shape, 640, 576, 29) == 1.0  # exit after the last layer changes nothing
    ratios = [relative_prefill_flops(shape, 640, 576, k) for k in range(30)]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    # exit after layer 14: 15 of 30 layers at 640 tokens, 15 at 64 tokens
    full, text = prefill_flops(shape, 640, 0, None) / 30, prefill_flops(shape, 64, 0, None) / 30
    assert ratios[14] == pytest.approx((15 * full + 15 * text) / (30 * full))
    assert decode_flops(shape, 700, 576, 3) < decode_flops(shape, 700, 576, None)
    with pytest.raises(ValueError, match="image_tokens"):
        prefill_flops(shape, 10, 11)
    with pytest.raises(ValueError, match="exit layer"):
        prefill_flops(shape, 640, 576, -3)


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [None, 0, 1, 3])
def test_gemma4_prefill_and_decode_flops_match_the_flop_counter_layer_by_layer(exit_layer):
    # Gemma 4's layers differ: global layers with their own head width, keys as values there,
    # layers reusing an earlier layer's keys and values, per-layer inputs
    from analysis.testing.families import RowSpec, tiny_family_batch, tiny_family_model

    model = tiny_family_model("gemma4", attn_implementation="eager")  # the counter sees eager attention's products
    shape = DecoderShape.from_config(model.config)
    assert len({layer.head_dim for layer in shape.per_layer}) == 2
    assert {layer.key_value_projections for layer in shape.per_layer} == {0, 2, 4}
    batch = tiny_family_batch(model, [RowSpec(system=3, images=1, text=6)])
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    tokens = batch["input_ids"].shape[1]
    images = {key: value for key, value in batch.items() if key.startswith(("pixel", "image_position"))}
    vision = _counted(lambda: model.model.get_image_features(**images))
    with visual_token_exit(model, exit_layers=[exit_layer]):
        counted = _counted(lambda: model(**batch, use_cache=False)) - vision
        _close(prefill_flops(shape, tokens, image_tokens, exit_layer, logits_positions=tokens), counted)
        prefill = model(**batch, use_cache=True)
        mask = torch.ones(1, tokens + 1, dtype=torch.long)
        next_token = prefill.logits[:, -1:].argmax(-1)
        step = _counted(lambda: model(input_ids=next_token, attention_mask=mask, cache=prefill.past_key_values))
    _close(decode_flops(shape, tokens, image_tokens, exit_layer), step)


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [None, 0, 2])
def test_qwen3_5_flops_match_the_flop_counter_with_its_linear_attention_layers(exit_layer):
    # Gated DeltaNet layers (projections, convolution, the chunked recurrence) beside full-attention
    # layers whose queries carry an output gate
    from analysis.testing.families import RowSpec, tiny_family_batch, tiny_family_model

    model = tiny_family_model("qwen3_5", attn_implementation="eager")
    shape = DecoderShape.from_config(model.config)
    recurrent = [layer.linear_attention for layer in shape.per_layer if layer.linear_attention is not None]
    assert len(recurrent) == 2 and all(layer.query_gate for layer in shape.per_layer if layer.linear_attention is None)
    batch = tiny_family_batch(model, [RowSpec(system=3, images=1, text=6)])
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    tokens = batch["input_ids"].shape[1]
    images = {key: batch[key] for key in ("pixel_values", "image_grid_thw")}
    vision = _counted(lambda: model.model.get_image_features(**images))

    def generated(new_tokens: int) -> int:
        return _counted(lambda: model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False))

    with visual_token_exit(model, exit_layers=[exit_layer]):
        counted = _counted(lambda: model(**batch, use_cache=False)) - vision
        _close(prefill_flops(shape, tokens, image_tokens, exit_layer, logits_positions=tokens), counted)
        step = generated(2) - generated(1)
    # the reference decoding step writes the state's update and read as elementwise products, which
    # the counter does not see: 6 b k v per linear-attention layer
    unseen = sum(6 * layer.value_heads * layer.key_dim * layer.value_dim for layer in recurrent)
    _close(decode_flops(shape, tokens, image_tokens, exit_layer), step + unseen)


@torch.inference_mode()
@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"])
def test_mixture_of_experts_layers_match_the_flop_counter_layer_by_layer(model_type):
    # the experts run as a loop of matrix products (the counter does not see grouped_mm); GLM-4.5V's
    # first layer is dense (first_k_dense_replace)
    from analysis.testing.families import RowSpec, tiny_family_batch, tiny_family_model
    from exit.flops import layer_flops

    model = tiny_family_model(model_type, attn_implementation="eager")
    model.set_experts_implementation("eager")
    shape = DecoderShape.from_config(model.config)
    batch = tiny_family_batch(model, [RowSpec(system=3, images=1, text=6)])
    tokens = batch["input_ids"].shape[1]
    with FlopCounterMode(display=False) as counter:
        model(**batch, use_cache=False)
    by_module = counter.get_flop_counts()
    layers = model.model.language_model.layers
    prefix = next(name for name in by_module if name.endswith("language_model.layers.0"))[:-1]
    for index in range(len(layers)):
        _close(layer_flops(shape, tokens, tokens, index), sum(by_module[f"{prefix}{index}"].values()))
