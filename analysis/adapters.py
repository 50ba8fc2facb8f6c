"""One table of per-family facts, so that no other module needs code per model family.

Each entry says where a family keeps its text decoder's layers, which config field holds the
image token id and which sub-config the text decoder reads (for switching only the decoder's
attention implementation). Families are resolved from ``config.model_type``; anything not in
the table is rejected with the list of what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's family is not in the adapter table, or lacks a field the toolkit needs."""


@dataclass(frozen=True)
class ModelAdapter:
    """Facts about one model family.

    Attributes:
        model_type: ``config.model_type`` of the family.
        layers_path: dotted path from the top model to the decoder's ``nn.ModuleList`` of layers.
        attention_attr: attribute of a decoder layer holding its self-attention module.
        image_token_fields: config fields that may hold the image token id, tried in order.
        text_config_key: name of the text decoder's sub-config (None: the top config itself).
        image_token_groups: how the family's extra vision tokens map to the token groups.
        final_norm_path: dotted path of the decoder's final norm (applied after the last layer,
            before the output head ``model.get_output_embeddings()``).
    """

    model_type: str
    layers_path: str
    attention_attr: str = "self_attn"
    image_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index")
    text_config_key: str | None = "text_config"
    image_token_groups: str = "image tokens = positions equal to the image token id"
    final_norm_path: str = "model.language_model.norm"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder's layers, found at ``layers_path``."""
        module: Any = model
        for part in self.layers_path.split("."):
            if not hasattr(module, part):
                raise UnsupportedModelError(
                    f"expected the decoder layers of a {self.model_type!r} model at "
                    f"model.{self.layers_path}, but {type(module).__name__} has no attribute {part!r}"
                )
            module = getattr(module, part)
        if not isinstance(module, nn.ModuleList):
            raise UnsupportedModelError(
                f"expected model.{self.layers_path} to be an nn.ModuleList of decoder layers, "
                f"found {type(module).__name__}"
            )
        return module

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The decoder's final norm, found at ``final_norm_path``."""
        try:
            return model.get_submodule(self.final_norm_path)
        except AttributeError as error:
            raise UnsupportedModelError(
                f"expected the final norm of a {self.model_type!r} model at model.{self.final_norm_path}, found none"
            ) from error

    def layer_paths(self, model: nn.Module) -> list[str]:
        """Dotted module names of every decoder layer, as ``model.named_modules()`` spells them."""
        return [f"{self.layers_path}.{i}" for i in range(len(self.decoder_layers(model)))]

    def attention_paths(self, model: nn.Module) -> list[str]:
        """Dotted module names of every decoder layer's self-attention module."""
        return [f"{path}.{self.attention_attr}" for path in self.layer_paths(model)]

    def text_config(self, model: nn.Module) -> Any:
        """The config that describes the text decoder (heads, hidden size, layers)."""
        config = model.config
        return getattr(config, self.text_config_key) if self.text_config_key else config

    def image_token_id(self, model: nn.Module) -> int:
        """The token id that marks image positions in ``input_ids``."""
        for field in self.image_token_fields:
            value = getattr(model.config, field, None)
            if value is not None:
                return int(value)
        raise UnsupportedModelError(
            f"expected an image token id in one of the config fields {list(self.image_token_fields)} "
            f"of this {self.model_type!r} model, found none set"
        )

    def attention_implementation(self, model: nn.Module) -> str:
        """The attention implementation the text decoder currently runs."""
        return str(self.text_config(model)._attn_implementation)

    def set_attention_implementation(self, model: nn.Module, implementation: str) -> None:
        """Switch only the text decoder's attention implementation (the vision tower keeps its own)."""
        if self.text_config_key:
            model.set_attn_implementation({self.text_config_key: implementation})
        else:
            model.set_attn_implementation(implementation)


_ADAPTERS: dict[str, ModelAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        ModelAdapter(model_type="llava", layers_path="model.language_model.layers"),
    )
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values the toolkit supports, sorted."""
    return sorted(_ADAPTERS)


def resolve_adapter(model_or_type: nn.Module | str) -> ModelAdapter:
    """The adapter for a model (or a ``model_type`` string).

    Raises:
        UnsupportedModelError: the family is not in the table; the message lists the supported ones.
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}: expected one of {supported_model_types()} "
            "(image-text models with a decoder-only language model)"
        )
    return _ADAPTERS[model_type]
