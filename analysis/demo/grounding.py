"""Stage 0 of the demo model's training: a projector start that the frozen language model can read.

Two steps, both folded into the projector's weights (the architecture never changes):

- :func:`standardise_projector` rescales the projector for the statistics of the vision features
  (centred, unit-variance input channels; projected tokens as long as text embeddings).
- :func:`ground_projector` regresses the projector, on the train split's scene annotations, so
  that each image patch maps to the word embeddings of what covers it ("large red circle", or a
  filler word for the background, :func:`grounding_targets`). Image tokens then start out close
  to words the language model knows; from a plain random projector the answers stayed at the
  majority-answer level within the CPU budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from analysis.data import load_image
from analysis.demo.inputs import image_features

if TYPE_CHECKING:
    from analysis.demo.training import PackedExample

__all__ = [
    "GROUND_BACKGROUND_WORD",
    "GROUND_MIN_COVER",
    "GroundingSet",
    "ground_projector",
    "grounding_targets",
    "standardise_projector",
    "word_embedding",
]

GROUND_BACKGROUND_WORD = "."
"""The word whose embedding background patches are grounded to (a filler token)."""
GROUND_MIN_COVER = 0.3
"""A patch belongs to a shape when at least this share of its pixels has the shape's fill colour."""


@torch.no_grad()
def standardise_projector(model: nn.Module, features: torch.Tensor) -> dict[str, float]:
    """Data-driven start for the projector, folded into its weights (the architecture is unchanged).

    The vision features of these images are nearly the same for every patch (mostly background)
    and about 14 times larger than the text embeddings. ``linear_1`` is rescaled to see each input
    channel centred and scaled to unit variance over ``features`` ([..., vision hidden]), and
    ``linear_2`` so that the mean projected token norm equals the mean text-embedding norm.
    Returns the norms before and after.
    """
    projector = model.model.multi_modal_projector
    flat = features.reshape(-1, features.shape[-1]).float()
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
    before = float(projector(flat).norm(dim=-1).mean())
    projector.linear_1.weight.div_(std)
    projector.linear_1.bias.sub_(projector.linear_1.weight @ mean)
    target = float(model.get_input_embeddings().weight.norm(dim=-1).mean())
    scale = target / float(projector(flat).norm(dim=-1).mean())
    projector.linear_2.weight.mul_(scale)
    projector.linear_2.bias.mul_(scale)
    return {"projected_norm_before": before, "projected_norm_after": float(projector(flat).norm(dim=-1).mean()),
            "text_embedding_norm": target}


def word_embedding(model: nn.Module, tokenizer: Any, word: str) -> torch.Tensor:
    """The input embedding of `` word`` (the mean over its tokens if it splits)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight.detach()[ids].mean(dim=0)


def grounding_targets(scene: Any, image: Any, side: int, patch: int,
                      words: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch (raster order), the embedding the projector is first taught to produce, and
    whether the patch shows a shape.

    A patch of a shape gets the mean embedding of the shape's words (size, colour, shape: " large",
    " red", " circle"); a background patch gets the embedding of :data:`GROUND_BACKGROUND_WORD`.
    Patch membership comes from the pixels: at least :data:`GROUND_MIN_COVER` of the patch has
    the shape's exact fill colour, inside the shape's bounding square.
    """
    import numpy as np

    from analysis.demo.shapes import COLOURS

    grid = side // patch
    pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32)
    scale = side / scene.image_size
    background = words[GROUND_BACKGROUND_WORD]
    targets = background.expand(grid * grid, -1).clone()
    is_shape = torch.zeros(grid * grid, dtype=torch.bool)
    for obj in scene.objects:
        fill = np.array(COLOURS[obj.colour], dtype=np.float32)
        covered = (((pixels - fill) ** 2).sum(-1) < 30.0**2).astype(np.float32)
        x0, y0, x1, y1 = (int(v * scale) for v in obj.bbox)
        inside = np.zeros_like(covered)
        inside[y0:y1, x0:x1] = 1.0
        share = (covered * inside).reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)
        chosen = torch.from_numpy(share >= GROUND_MIN_COVER)
        meaning = torch.stack([words[obj.size], words[obj.colour], words[obj.shape]]).mean(dim=0)
        targets[chosen] = meaning
        is_shape |= chosen
    return targets, is_shape


def _grounding_words(model: nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The embedding of every colour, shape and size word and of the background word."""
    from analysis.demo.shapes import COLOURS, SHAPES, SIZES

    vocabulary = [*COLOURS, *SHAPES, *SIZES, GROUND_BACKGROUND_WORD]
    return {word: word_embedding(model, tokenizer, word) for word in vocabulary}


@dataclass
class GroundingSet:
    """The grounding stage's images: per image (in visiting order) its vision features (bf16),
    per-patch targets and shape mask (:func:`grounding_targets`), scene and image path, plus the
    pixel geometry the targets were computed with."""

    words: dict[str, torch.Tensor]
    side: int
    patch: int
    features: list[torch.Tensor]
    targets: list[torch.Tensor]
    shape_masks: list[torch.Tensor]
    scenes: list[Any]
    images: list[str]

    @property
    def held(self) -> int:
        """How many images (the last ones) are held out of the fit: an eighth, at least one."""
        return max(1, len(self.features) // 8)


def grounding_examples(examples: Sequence[PackedExample], scenes: dict[str, Any], images: int,
                       seed: int) -> list[PackedExample]:
    """The ``images`` examples stage 0 grounds on: a seeded random order of those with a scene."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [e for e in examples if e.image in scenes]
    return [chosen[i] for i in torch.randperm(len(chosen), generator=generator)[:images].tolist()]


def _grounding_set(model: nn.Module, processor: Any, examples: Sequence[PackedExample], image_folder: str | Path,
                   scenes: dict[str, Any], images: int, seed: int, progress: bool) -> GroundingSet:
    """Vision features and targets of ``images`` train images with scenes, in a seeded random order."""
    from tqdm.auto import tqdm

    crop = processor.image_processor.crop_size
    side = int(crop["height"] if isinstance(crop, dict) else crop.height)
    patch = int(model.config.vision_config.patch_size)
    data = GroundingSet(_grounding_words(model, processor.tokenizer), side, patch, [], [], [], [], [])
    for example in tqdm(grounding_examples(examples, scenes, images, seed), desc="ground: vision features",
                        disable=not progress):
        image = load_image(image_folder, example.image)
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        data.features.append(image_features(model, pixels)[0].to(torch.bfloat16))
        target, is_shape = grounding_targets(scenes[example.image], image, side, patch, data.words)
        data.targets.append(target)
        data.shape_masks.append(is_shape)
        data.scenes.append(scenes[example.image])
        data.images.append(example.image)
    return data


def _fit_projector(projector: nn.Module, data: GroundingSet, steps: int, lr: float, batch_patches: int,
                   progress: bool) -> float:
    """Regress the projector onto the targets of the fit images (all but the held-out ones).

    Mean squared error over ``batch_patches`` patches per step, sampled so that the shape patches
    weigh as much as all background patches together; AdamW with a cosine learning rate. The
    projector is trainable only during the fit. Returns the last step's loss.
    """
    from tqdm.auto import tqdm

    held = data.held
    fit_x = torch.cat(data.features[:-held])
    fit_y, fit_shape = torch.cat(data.targets[:-held]), torch.cat(data.shape_masks[:-held])
    weight = torch.where(fit_shape, 1.0 / fit_shape.sum().clamp_min(1), 1.0 / (~fit_shape).sum().clamp_min(1))
    projector.requires_grad_(True)
    optimiser = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    sampler = torch.distributions.Categorical(probs=weight / weight.sum())
    for step in tqdm(range(steps), desc="ground: projector", disable=not progress):
        for group in optimiser.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = sampler.sample((batch_patches,))
        loss = ((projector(fit_x[pick].float()) - fit_y[pick]) ** 2).sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    projector.requires_grad_(False)
    return float(loss.detach())


def _nearest_share(projector: nn.Module, data: GroundingSet, image_folder: str | Path, names: Sequence[str],
                   attribute: str) -> float:
    """On the held-out images, the share of shape patches whose projection is nearest (cosine) to
    the embedding of the object's own ``attribute`` word among ``names``."""
    words = data.words
    table = torch.nn.functional.normalize(torch.stack([words[n] for n in names]), dim=-1)
    hits = total = 0
    held = data.held
    for x, scene, image_name in zip(data.features[-held:], data.scenes[-held:], data.images[-held:]):
        with torch.no_grad():
            projected = torch.nn.functional.normalize(projector(x.float()), dim=-1)
        image = load_image(image_folder, image_name)
        for obj in scene.objects:
            _, is_obj = grounding_targets(type(scene)(scene.image_size, scene.background, (obj,)), image, data.side,
                                          data.patch, words)
            if bool(is_obj.any()):
                guess = (projected[is_obj] @ table.T).argmax(-1)
                hits += int((guess == names.index(getattr(obj, attribute))).sum())
                total += int(is_obj.sum())
    return hits / max(1, total)


def ground_projector(model: nn.Module, processor: Any, examples: Sequence[PackedExample], image_folder: str | Path,
                     scenes: dict[str, Any], images: int, steps: int, lr: float, seed: int,
                     batch_patches: int = 4096, progress: bool = True) -> dict[str, float]:
    """Stage 0: teach the projector to map each patch to the words of what covers it.

    Before any question is asked, the projector is regressed (mean squared error, shape patches
    weighted as much as all background patches together) onto :func:`grounding_targets` of
    ``images`` train images, the last eighth of them held out. Image tokens then start out close
    to word embeddings the frozen language model can read ("red", "circle", ...), which the
    question-answer training builds on; from a plain random projector the answers stayed at the
    majority-answer level within the CPU budget. Returns held-out figures: the share of shape
    patches whose projection is nearest (cosine) to the embedding of the right colour word among
    the six colours, and of the right shape word among the three shapes.
    """
    from analysis.demo.shapes import COLOURS, SHAPES

    data = _grounding_set(model, processor, examples, image_folder, scenes, images, seed, progress)
    projector = model.model.multi_modal_projector
    final_loss = _fit_projector(projector, data, steps, lr, batch_patches, progress)
    return {"images": len(data.features), "held_out_images": data.held, "final_loss": final_loss,
            "colour_nearest": _nearest_share(projector, data, image_folder, list(COLOURS), "colour"),
            "shape_nearest": _nearest_share(projector, data, image_folder, list(SHAPES), "shape")}
