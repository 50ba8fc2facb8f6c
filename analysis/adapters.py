"""One table of per-family facts, so that no other module needs code per model family.

Each entry says where a family keeps its text decoder's layers, which config field holds the
image token id, which config fields name the tokens a processor writes around an image, which
sub-config the text decoder reads (for switching only the decoder's attention implementation and
reading its head counts), and how the family's tokens map to the token groups. Families are
resolved from ``config.model_type``; anything not in the table (cross-attention models such as
mllama, encoder-decoder models, families not tested yet) is rejected with the list of what is
supported.

Token groups (``analysis.layout``) are read from input_ids alone, the same way for every family:
``image`` = positions holding the image token id; every other real token is ``system`` before the
first image token of its row and ``text`` after it. So the tokens a family writes around images
(vision start/end, <img>/</img>, <fake_token_around_image>, [IMG_BREAK]/[IMG_END], ...) are text
embeddings and belong to system or text by position; tokens the model fills with vision features
(image-newline tokens of LLaVA-NeXT/OneVision included) carry the image token id and are image.
Each adapter's ``image_token_groups`` says this for its family.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from analysis.errors import DyVTEError
from analysis.hooks import Hook


class UnsupportedModelError(DyVTEError, ValueError):
    """The model's family is not in the adapter table, or lacks a field the toolkit needs."""


@dataclass(frozen=True)
class RefusedSetting:
    """A value of a text-config field under which the family's model is not supported.

    Attributes:
        field: the text-config attribute.
        value: the value refused.
        reason: why, as the error message says it.
    """

    field: str
    value: Any
    reason: str


@dataclass(frozen=True)
class KVSharing:
    """Where a family's KV-sharing layers get their keys and values.

    Attributes:
        modes_field: text-config attribute with one entry per decoder layer: ``store_mode`` (the
            layer hands its keys and values on), ``reuse_mode`` (it reads those of the latest
            storing layer of its own type in ``layer_types`` and computes none), or anything else.
        states_kwarg: the decoder layer's keyword argument holding the shared {layer type: (keys,
            values)} mapping, (batch, kv_head, slots, dim) each, over the stream of the storing layer.
    """

    modes_field: str = "kv_sharing_modes"
    states_kwarg: str = "shared_kv_states"
    store_mode: str = "store"
    reuse_mode: str = "reuse"


@dataclass(frozen=True)
class RecurrentLayers:
    """Where a hybrid family's recurrent decoder layers are (Qwen3.5's Gated DeltaNet layers).

    Such a layer mixes tokens through a state that decays at every token, not through an attention
    map: it has no map to record, and masking a token is not removing it (the state still decays
    over the masked slot), so the exit surgery removes tokens from its stream instead of masking them.

    Attributes:
        layer_type: the text config's ``layer_types`` entry of a recurrent layer.
        mixer_attr: attribute of such a decoder layer holding its token mixer (in place of ``attention_attr``).
    """

    layer_type: str = "linear_attention"
    mixer_attr: str = "linear_attn"


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
        marker_token_fields: config fields holding ids of tokens the processor writes around each
            image (they are system/text tokens, see the module docstring); empty where the ids
            live only in the tokenizer.
        head_fields: text-config fields holding the query-head and key/value-head counts.
        positions: "1d" (position ids from the attention mask) or "mrope" (the model computes
            3-D positions from input_ids and the image grids; pass no position_ids).
        deepstack_field: dotted config path of the vision layers whose features the decoder adds
            to the image positions after its first decoder layers (Qwen3-VL's deepstack), or None.
            After decoder layer i < len(that list) the model indexes the image positions of the
            full sequence, so the exit surgery keeps the stream at full length (removed keys
            masked) until those layers are done (:meth:`first_compactable_layer`).
        layer_token_inputs: names of a decoder layer's forward parameters, besides the hidden
            states, that hold one entry per token of the stream, (batch, seq, ...) (Gemma4's
            per-layer embeddings ``per_layer_input``): the exit surgery gathers them at the kept
            tokens, as it gathers cos/sin.
        kv_sharing: how decoder layers read the keys and values of an earlier layer instead of
            computing their own (Gemma4's KV-shared layers), or None.
        query_slicing: (module path, keyword) of a module that, given a nonzero ``keyword``, runs
            its later decoder layers on the last queries only (Gemma4's text model under
            generate()'s ``logits_to_keep=1``: its KV-shared layers see one query); the recorder and
            the exit surgery pass 0 during a prefill so every layer holds the whole stream (the
            output head still keeps the logits it was asked for), or None.
        recurrent: where the decoder's recurrent (linear-attention) layers are, or None for a decoder
            of attention layers only; those layers have no attention map (:meth:`attention_layers`).
    """

    model_type: str
    layers_path: str
    attention_attr: str = "self_attn"
    image_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index")
    text_config_key: str | None = "text_config"
    image_token_groups: str = "image tokens = positions equal to the image token id"
    final_norm_path: str = "model.language_model.norm"
    marker_token_fields: tuple[str, ...] = ()
    head_fields: tuple[str, str] = ("num_attention_heads", "num_key_value_heads")
    positions: str = "1d"
    deepstack_field: str | None = None
    layer_token_inputs: tuple[str, ...] = ()
    kv_sharing: KVSharing | None = None
    query_slicing: tuple[str, str] | None = None
    recurrent: RecurrentLayers | None = None
    refused_settings: tuple[RefusedSetting, ...] = ()

    def check_settings(self, model_or_config: Any) -> None:
        """Refuse a model (or a config) whose text config holds one of ``refused_settings``.

        Raises:
            UnsupportedModelError: naming the field, the value found and why it is refused.
        """
        if not self.refused_settings:
            return
        text = self.text_config(model_or_config)
        for refused in self.refused_settings:
            if getattr(text, refused.field, None) == refused.value:
                raise UnsupportedModelError(
                    f"expected a {self.model_type!r} model without {refused.field}={refused.value!r}, found it set: "
                    f"{refused.reason}"
                )

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
        """Dotted module names of every decoder layer's self-attention module (index = layer; a
        recurrent layer's entry names no module: see :meth:`attention_layers`)."""
        return [f"{path}.{self.attention_attr}" for path in self.layer_paths(model)]

    def recurrent_layers(self, model_or_config: Any) -> list[int]:
        """The decoder layers that mix tokens through a recurrent state instead of attention (empty
        for a decoder of attention layers only), read from the text config's ``layer_types``."""
        if self.recurrent is None:
            return []
        layer_types = getattr(self.text_config(model_or_config), "layer_types", None) or ()
        return [i for i, kind in enumerate(layer_types) if kind == self.recurrent.layer_type]

    def attention_layers(self, model: nn.Module) -> list[int]:
        """The decoder layers that have an attention map (every layer but the recurrent ones)."""
        recurrent = set(self.recurrent_layers(model))
        return [i for i in range(len(self.decoder_layers(model))) if i not in recurrent]

    def text_config(self, model_or_config: Any) -> Any:
        """The config that describes the text decoder (heads, hidden size, layers), from a model or
        from its config alone (no weights needed)."""
        config = getattr(model_or_config, "config", model_or_config)
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

    def first_compactable_layer(self, model: nn.Module) -> int:
        """The first decoder layer whose input may be shorter than the prompt: 0, or with deepstack
        the number of decoder layers the vision features are added after."""
        if self.deepstack_field is None:
            return 0
        value: Any = model.config
        for part in self.deepstack_field.split("."):
            value = getattr(value, part, None)
        return len(value or ())

    def kv_sources(self, model_or_config: Any) -> dict[int, int]:
        """{decoder layer: the earlier layer whose keys and values it reads} for every KV-reusing
        layer (empty without KV sharing).

        Raises:
            UnsupportedModelError: a reusing layer has no storing layer of its type before it (its
                keys and values would come from outside the model, as an assistant model's do).
        """
        if self.kv_sharing is None:
            return {}
        config = self.text_config(model_or_config)
        modes = list(getattr(config, self.kv_sharing.modes_field, None) or ())
        types = list(getattr(config, "layer_types", None) or [None] * len(modes))
        sources: dict[int, int] = {}
        stored: dict[Any, int] = {}
        for layer, (mode, kind) in enumerate(zip(modes, types)):
            if mode == self.kv_sharing.store_mode:
                stored[kind] = layer
            elif mode == self.kv_sharing.reuse_mode:
                if kind not in stored:
                    raise UnsupportedModelError(
                        f"expected a {kind!r} layer storing keys and values before KV-reusing decoder layer {layer} of "
                        f"this {self.model_type!r} model, found none (its keys and values come from outside the model)"
                    )
                sources[layer] = stored[kind]
        return sources

    def layer_token_positions(self, model: nn.Module) -> dict[str, int]:
        """{name: position among the decoder layer forward's positional arguments} of each of
        ``layer_token_inputs`` (the model may pass them by position or by name).

        Raises:
            UnsupportedModelError: a name is not a parameter of the decoder layer's forward.
        """
        layers = self.decoder_layers(model)
        parameters = list(inspect.signature(layers[0].forward).parameters) if len(layers) else []
        missing = [name for name in self.layer_token_inputs if name not in parameters]
        if missing:
            raise UnsupportedModelError(
                f"expected the decoder-layer parameters {missing} of a {self.model_type!r} model, found {parameters}")
        return {name: parameters.index(name) for name in self.layer_token_inputs}

    def whole_stream_hooks(self, when: Callable[[], bool] = lambda: True) -> list[Hook]:
        """Forward pre-hooks that make every decoder layer of a prefill hold the whole stream
        (``query_slicing`` set to 0 in the forwards where ``when()`` says so; empty where the family
        never slices); attach them with ``analysis.hooks.attached`` for a recording or a surgery."""
        if self.query_slicing is None:
            return []
        path, keyword = self.query_slicing

        def every_query(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not kwargs.get(keyword) or not when():
                return None
            return args, {**kwargs, keyword: 0}

        return [Hook(path, every_query, kind="forward_pre", with_kwargs=True)]

    def head_counts(self, model: nn.Module) -> tuple[int, int]:
        """(query heads, key/value heads) of the text decoder's attention."""
        config = self.text_config(model)
        values = [getattr(config, field, None) for field in self.head_fields]
        if values[0] is None:
            raise UnsupportedModelError(
                f"expected the head count of a {self.model_type!r} model in text config field "
                f"{self.head_fields[0]!r}, found none"
            )
        return int(values[0]), int(values[1] if values[1] is not None else values[0])

    def marker_token_ids(self, model: nn.Module) -> dict[str, int]:
        """Ids of the tokens written around images that the config names ({field: id}; may be empty)."""
        found = {field: getattr(model.config, field, None) for field in self.marker_token_fields}
        return {field: int(value) for field, value in found.items() if value is not None}

    def attention_implementation(self, model: nn.Module) -> str:
        """The attention implementation the text decoder currently runs."""
        return str(self.text_config(model)._attn_implementation)

    def set_attention_implementation(self, model: nn.Module, implementation: str) -> None:
        """Switch only the text decoder's attention implementation (the vision tower keeps its own)."""
        if self.text_config_key:
            model.set_attn_implementation({self.text_config_key: implementation})
        else:
            model.set_attn_implementation(implementation)


_POSITIONAL = "other tokens: system before the first image token of the row, text after it"
_LANGUAGE_MODEL = "model.language_model"
_TEXT_MODEL = "model.text_model"

_QWEN2_VL = ModelAdapter(
    model_type="qwen2_vl",
    layers_path=f"{_LANGUAGE_MODEL}.layers",
    marker_token_fields=("vision_start_token_id", "vision_end_token_id"),
    positions="mrope",
    image_token_groups=(
        "image: <|image_pad|> x merged patches; <|vision_start|> is system before the first image "
        f"(text before later images), <|vision_end|> is text; {_POSITIONAL}"
    ),
)
_QWEN3_VL = replace(
    _QWEN2_VL, model_type="qwen3_vl", deepstack_field="vision_config.deepstack_visual_indexes",
    image_token_groups=_QWEN2_VL.image_token_groups + "; deepstack: vision features of some vision layers are added "
    "to the image positions after the first decoder layers (image tokens still)",
)
_QWEN3_5 = ModelAdapter(
    model_type="qwen3_5",
    layers_path=f"{_LANGUAGE_MODEL}.layers",
    marker_token_fields=("vision_start_token_id", "vision_end_token_id"),
    positions="mrope",
    recurrent=RecurrentLayers(),
    image_token_groups=_QWEN2_VL.image_token_groups + "; the linear-attention (Gated DeltaNet) layers have no "
    "attention map: the statistics have no rows for them",
)
_GLM4V = ModelAdapter(
    model_type="glm4v",
    layers_path=f"{_LANGUAGE_MODEL}.layers",
    marker_token_fields=("image_start_token_id", "image_end_token_id"),
    positions="mrope",
    image_token_groups=(
        "image: <|image|> x merged patches (3-D positions: its own M-RoPE index); <|begin_of_image|> is "
        f"system before the first image (text before later images), <|end_of_image|> is text; {_POSITIONAL}"
    ),
)
_IDEFICS3 = ModelAdapter(
    model_type="idefics3",
    layers_path=f"{_TEXT_MODEL}.layers",
    final_norm_path=f"{_TEXT_MODEL}.norm",
    image_token_groups=(
        "image: <image> x tokens per sub-image and global image; <fake_token_around_image>, "
        "<row_i_col_j> and <global-img> are system before the first image token, text after it; "
        f"{_POSITIONAL}"
    ),
)

_ADAPTERS: dict[str, ModelAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        ModelAdapter(
            model_type="llava",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            image_token_groups=f"image: <image> x patches; {_POSITIONAL}",
        ),
        ModelAdapter(
            model_type="llava_next",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            image_token_groups=(
                "image: <image> x (base tile + AnyRes tiles + one image-newline per row of tiles; the newline "
                f"positions carry the image token id and the learned newline embedding); {_POSITIONAL}"
            ),
        ),
        ModelAdapter(
            model_type="llava_onevision",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            image_token_groups=(
                "image: <image> x (base tile + AnyRes tiles + image-newlines, as llava_next); video tokens "
                f"(video_token_id) are not image tokens; {_POSITIONAL}"
            ),
        ),
        _QWEN2_VL,
        replace(_QWEN2_VL, model_type="qwen2_5_vl"),  # same layout, processor tokens and M-RoPE
        _QWEN3_VL,
        replace(_QWEN3_VL, model_type="qwen3_vl_moe"),  # the same with a mixture-of-experts decoder (routed per token)
        _QWEN3_5,
        replace(_QWEN3_5, model_type="qwen3_5_moe"),  # the same with a mixture-of-experts decoder (routed per token)
        _GLM4V,
        replace(_GLM4V, model_type="glm4v_moe"),  # the same with a mixture-of-experts decoder (routed per token)
        ModelAdapter(
            model_type="internvl",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            image_token_groups=(
                "image: <IMG_CONTEXT> x (tiles x tokens per tile); <img> is system before the first image, "
                f"</img> is text (their ids are in the tokenizer, not the config); {_POSITIONAL}"
            ),
        ),
        _IDEFICS3,
        replace(_IDEFICS3, model_type="smolvlm"),  # SmolVLM is Idefics3's architecture
        ModelAdapter(
            model_type="gemma3",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            marker_token_fields=("boi_token_index", "eoi_token_index"),
            image_token_groups=(
                "image: <image_soft_token> x mm_tokens_per_image (they attend to each other bidirectionally); "
                "<start_of_image> is system before the first image (text before later images), "
                f"<end_of_image> is text; {_POSITIONAL}"
            ),
        ),
        ModelAdapter(
            model_type="gemma4",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            marker_token_fields=("boi_token_id", "eoi_token_id"),
            layer_token_inputs=("per_layer_input",),
            kv_sharing=KVSharing(),
            query_slicing=(_LANGUAGE_MODEL, "logits_to_keep"),
            refused_settings=(RefusedSetting(
                "use_bidirectional_attention", "all",
                "every token then attends to the tokens after it as well, while the recorder and the exits assume a causal "
                "decoder (a text token's attention over later keys, and keys removed after an exit, would be wrong)"),),
            image_token_groups=(
                "image: the image token x soft tokens per image (with use_bidirectional_attention='vision' they attend to "
                "each other bidirectionally in the sliding layers); the begin-of-image token (boi_token_id) is system "
                "before the first image (text before later images), the end-of-image token (eoi_token_id) is text; video "
                f"and audio tokens are not image tokens; {_POSITIONAL}"
            ),
        ),
        ModelAdapter(
            model_type="mistral3",
            layers_path=f"{_LANGUAGE_MODEL}.layers",
            image_token_groups=(
                "image: [IMG] x merged patches; the [IMG_BREAK] after each row of patches and the final "
                f"[IMG_END] are text (their ids are in the tokenizer, not the config); {_POSITIONAL}"
            ),
        ),
    )
}


_REJECTED: dict[str, str] = {
    "mllama": "its decoder reads the image through cross-attention layers, so no image tokens sit in the "
    "decoder's sequence to group, record or remove",
}
"""Families known not to fit the toolkit, with the reason added to the rejection."""
_BUILT_IN = frozenset(_ADAPTERS)


POSITION_KINDS: tuple[str, ...] = ("1d", "mrope")


def adapter_problems(adapter: ModelAdapter, model: nn.Module) -> list[str]:
    """What in ``model`` does not match ``adapter`` (empty: everything the toolkit reads is there):
    the model type, the decoder layers and their attention modules, the final norm and the output
    head, the text config and its head counts, the image token id."""
    problems: list[str] = []
    found_type = getattr(getattr(model, "config", None), "model_type", None)
    if found_type != adapter.model_type:
        problems.append(f"the adapter is for model_type {adapter.model_type!r}, the model's config says {found_type!r}")
    if adapter.positions not in POSITION_KINDS:
        problems.append(f"positions must be one of {list(POSITION_KINDS)}, found {adapter.positions!r}")
    checks = [
        ("decoder layers", lambda: adapter.decoder_layers(model)),
        ("final norm", lambda: adapter.final_norm(model)),
        ("text config", lambda: adapter.text_config(model)),
        ("head counts", lambda: adapter.head_counts(model)),
        ("image token id", lambda: adapter.image_token_id(model)),
    ]
    for what, check in checks:
        try:
            check()
        except (UnsupportedModelError, AttributeError) as error:
            problems.append(f"{what}: {error}")
    if not problems:
        paths = adapter.attention_paths(model)
        missing = [paths[i] for i in adapter.attention_layers(model) if _no_module(model, paths[i])]
        if missing:
            problems.append(f"expected each decoder layer's attention at .{adapter.attention_attr}, found none at {missing[:3]}")
        if adapter.recurrent is not None:
            layer_paths = adapter.layer_paths(model)
            mixers = [f"{layer_paths[i]}.{adapter.recurrent.mixer_attr}" for i in adapter.recurrent_layers(model)]
            missing = [path for path in mixers if _no_module(model, path)]
            if missing:
                problems.append(f"expected each recurrent decoder layer's token mixer at .{adapter.recurrent.mixer_attr}, "
                                f"found none at {missing[:3]}")
        if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
            problems.append("expected model.get_output_embeddings() to return the output head, found none")
    return problems


def _no_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return True
    return False


def register_adapter(adapter: ModelAdapter, model: nn.Module, *, replace_existing: bool = False) -> ModelAdapter:
    """Add a family to the table: ``resolve_adapter`` then serves every model whose
    ``config.model_type`` is ``adapter.model_type`` (a remote-code VILA or Eagle checkpoint, a
    family not tested here). ``model`` is one instance of the family, checked against the adapter
    first (:func:`adapter_problems`).

    Example::

        register_adapter(ModelAdapter(model_type="my_vlm", layers_path="decoder.layers",
                                      final_norm_path="decoder.norm", text_config_key="text_config",
                                      image_token_fields=("image_token_id",)), model)

    Raises:
        UnsupportedModelError: the adapter does not match ``model`` (every problem listed), the
            family is one the toolkit rejects, or it is in the table already (unless
            ``replace_existing``).
    """
    if adapter.model_type in _REJECTED:
        raise UnsupportedModelError(f"cannot register {adapter.model_type!r}: {_REJECTED[adapter.model_type]}")
    if adapter.model_type in _ADAPTERS and not replace_existing:
        raise UnsupportedModelError(f"expected a family not in the table, found {adapter.model_type!r} registered already "
                                    "(pass replace_existing=True to replace it)")
    problems = adapter_problems(adapter, model)
    if problems:
        raise UnsupportedModelError(f"the adapter for {adapter.model_type!r} does not match the model: " + "; ".join(problems))
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def unregister_adapter(model_type: str) -> None:
    """Remove a family added with :func:`register_adapter` (the built-in families stay)."""
    if model_type in _BUILT_IN:
        raise UnsupportedModelError(f"expected a registered family, found the built-in {model_type!r}")
    _ADAPTERS.pop(model_type, None)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values the toolkit supports, sorted."""
    return sorted(_ADAPTERS)


def resolve_adapter(model_or_type: nn.Module | str) -> ModelAdapter:
    """The adapter for a model (or a ``model_type`` string).

    Raises:
        UnsupportedModelError: the family is not in the table (the message lists the supported
            ones), or the model's config holds a setting its adapter refuses (``refused_settings``).
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        reason = f"; {model_type} is not supported because {_REJECTED[model_type]}" if model_type in _REJECTED else ""
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}: expected one of {supported_model_types()} "
            f"(image-text models with a decoder-only language model, tested on a tiny model each){reason}"
        )
    adapter = _ADAPTERS[model_type]
    if not isinstance(model_or_type, str):
        adapter.check_settings(model_or_type)
    return adapter
