"""The demo model's hand-built inputs (analysis.demo.inputs), on a tiny LLaVA."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from analysis.demo.inputs import expand_image_tokens, image_features, input_embeds  # noqa: E402
from analysis.hooks import attached_count  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)


def test_image_features_are_what_the_model_projects():
    model = tiny_llava(SPEC)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    features = image_features(model, pixels)
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output[0]
        torch.testing.assert_close(model.model.multi_modal_projector(features)[0], expected, rtol=0, atol=0)


def test_image_features_leave_no_hook():
    model = tiny_llava(SPEC)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    image_features(model, pixels)  # the first call lets transformers install its own hooks
    before = attached_count(model)
    image_features(model, pixels)
    assert attached_count(model) == before
    assert not model.model.multi_modal_projector._forward_pre_hooks


def test_input_embeds_put_the_projected_features_in_the_image_tokens():
    model = tiny_llava(SPEC)
    image = model.config.image_token_id
    ids = torch.tensor([expand_image_tokens([1, image, 2], image, 4)])
    assert ids.tolist() == [[1, image, image, image, image, 2]]
    features = torch.randn(1, 4, SPEC.vision_hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = input_embeds(model, ids, features)
        torch.testing.assert_close(embeds[0, 1:5], model.model.multi_modal_projector(features)[0])
        torch.testing.assert_close(embeds[0, [0, 5]], model.get_input_embeddings()(torch.tensor([1, 2])))
