"""Stage 0 of the demo model's training (analysis.demo.grounding), on a tiny LLaVA.

Cheap: a 4-layer hidden-64 model, 28 px images (4 image tokens) and a 6-image ShapesVQA split.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402

from analysis.demo.grounding import ground_projector, grounding_targets, standardise_projector  # noqa: E402
from analysis.demo.training import pack_split  # noqa: E402
from analysis.testing.tiny import tiny_llava, tiny_processor  # noqa: E402
from tests.demo_fixtures import SPEC, split  # noqa: E402,F401 (fixtures)


def test_standardised_projector_centres_and_matches_text_norms():
    model = tiny_llava(SPEC)
    features = 5 + 3 * torch.randn(2, 4, SPEC.vision_hidden_size, generator=torch.Generator().manual_seed(0))
    first = model.model.multi_modal_projector.linear_1
    old_bias = first.bias.detach().clone()
    norms = standardise_projector(model, features)
    assert norms["projected_norm_after"] == pytest.approx(norms["text_embedding_norm"], rel=1e-4)
    with torch.no_grad():  # linear_1 now sees centred channels: the mean feature maps to the old bias
        torch.testing.assert_close(first(features.reshape(-1, SPEC.vision_hidden_size).mean(0)), old_bias,
                                   rtol=0, atol=1e-4)


def test_grounding_targets_mark_the_patches_a_shape_covers():
    from PIL import Image, ImageDraw

    from analysis.demo.shapes import COLOURS, Scene, SceneObject

    image = Image.new("RGB", (56, 56), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([14, 28, 41, 55], fill=COLOURS["red"])  # patches (row 2-3, column 1-2)
    scene = Scene(56, (255, 255, 255), (SceneObject("red", "square", "large", 14, 28, 28),))
    words = {w: torch.full((3,), float(i)) for i, w in enumerate([".", "large", "red", "square"])}
    targets, is_shape = grounding_targets(scene, image, side=56, patch=14, words=words)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[9, 10, 13, 14]] = True
    assert torch.equal(is_shape, expected)
    assert torch.equal(targets[9], torch.full((3,), 2.0))  # mean of "large", "red", "square"
    assert torch.equal(targets[0], words["."])


def test_grounding_stage_fits_the_projector_to_the_words(split):
    from analysis.demo.shapes import read_scenes

    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    examples = pack_split(split, extra_per_type=0, seed=0)
    before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    result = ground_projector(model, processor, examples, split, read_scenes(split), images=6, steps=30, lr=1e-2,
                              seed=0, batch_patches=64, progress=False)
    assert result["images"] == 6 and result["held_out_images"] == 1
    assert 0.0 <= result["colour_nearest"] <= 1.0 and 0.0 <= result["shape_nearest"] <= 1.0
    after = model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
