"""The demo LLaVA's inputs, built by hand where training and evaluation bypass ``model(...)``'s defaults.

Training (:mod:`analysis.demo.training`), the grounding stage (:mod:`analysis.demo.grounding`)
and the cached-prefix decoding (:mod:`analysis.demo.evaluation`) all need the same few pieces:
how many tokens the processor expands one image to, a prompt's token ids with the image token
expanded, the vision features the projector receives, the input embeddings with the projected
image tokens scattered in, the pad token, and the name under which the model's forward takes a
key/value cache. They are defined once here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from analysis.hooks import Hook, attached

__all__ = [
    "PROJECTOR_PATH",
    "cache_keyword",
    "expand_image_tokens",
    "image_features",
    "image_seq_length",
    "input_embeds",
    "pad_token_id",
    "tokenize",
]

PROJECTOR_PATH = "model.multi_modal_projector"
"""Module path of a ``LlavaForConditionalGeneration``'s projector (as in ``named_modules()``)."""


def image_seq_length(model: nn.Module, processor: Any) -> int:
    """How many image tokens the processor expands one image to (probed with a blank image)."""
    from PIL import Image

    crop = processor.image_processor.crop_size
    side = int(crop["height"] if isinstance(crop, dict) else crop.height)
    probe = processor(images=Image.new("RGB", (side, side)), text=processor.image_token, return_tensors="pt")
    return int((probe["input_ids"] == model.config.image_token_id).sum())


def tokenize(processor: Any, text: str) -> list[int]:
    """The token ids of ``text`` as the processor's tokenizer gives them (image token not expanded)."""
    return list(processor.tokenizer(text)["input_ids"])


def expand_image_tokens(ids: list[int], image_token_id: int, n_tokens: int) -> list[int]:
    """``ids`` with every image token repeated ``n_tokens`` times (what the processor does)."""
    out: list[int] = []
    for token in ids:
        out.extend([token] * n_tokens if token == image_token_id else [token])
    return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, or its end-of-sequence token when it has none."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


@torch.no_grad()
def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features the projector receives, [images, tokens, vision hidden] (as the model
    computes them: its own ``get_image_features``, with the projector's input captured by a
    forward pre-hook attached for the call only)."""
    captured: list[torch.Tensor] = []

    def capture_projector_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())

    with attached(model, [Hook(PROJECTOR_PATH, capture_projector_input, kind="forward_pre")]):
        model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    return captured[0]


def input_embeds(model: nn.Module, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The input embeddings of ``input_ids`` with the projected ``features`` in the image tokens' places.

    Raises:
        ValueError: the number of image tokens in ``input_ids`` differs from the features' count.
    """
    embeds = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(features).to(embeds.dtype)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    if int(mask.sum()) != projected.shape[0] * projected.shape[1]:
        raise ValueError(f"expected {projected.shape[0] * projected.shape[1]} image tokens in the input, "
                         f"found {int(mask.sum())}")
    return embeds.masked_scatter(mask, projected)


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a key/value cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    warning), so the name is read from the signature.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
