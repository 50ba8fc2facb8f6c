"""Tiny random models of every supported image-text family, and prompts built for them (no downloads).

One builder per ``model_type`` makes the family's own config classes with tiny sizes (4 decoder
layers, hidden 64, 4 query heads over 2 KV heads, a 1-layer vision tower) and random weights, so
the tests run the stock transformers model of each family. No family's processor is used (most
need files from the hub); instead ``tiny_family_batch`` writes the prompt the processor would
write, with a small made-up vocabulary:

    [bos] system text  <open markers> image token x n <close markers>  question text

where ``n`` (tokens per image) is read from the model's own image-feature function on the pixel
values it will get (``model.model.get_image_features``), so the prompt always matches what the
vision tower yields, and the markers are the tokens the family's processor writes around an image
(ids MARKER_A / MARKER_B here; set in the config where the config names them):

    llava, llava_next, llava_onevision   none
    qwen2_vl, qwen2_5_vl   <|vision_start|> ... <|vision_end|>   (config.vision_start/end_token_id)
    qwen3_5, qwen3_5_moe   the same (4 layers: linear attention, full, full, linear attention)
    internvl               <img> ... </img>
    idefics3, smolvlm      <fake_token_around_image><global-img> ... <fake_token_around_image>
                           (one image without splitting into sub-images)
    gemma3                 <start_of_image> ... <end_of_image>   (config.boi/eoi_token_index)
    gemma4                 boi ... eoi   (config.boi/eoi_token_id; 5 layers, sliding and full, 3 KV-shared,
                           per-layer embeddings; images of 4 x 4 and 8 x 4 patches, pooled 2 x 2)
    mistral3               [IMG] x w then [IMG_BREAK], per row of merged patches; the last row ends
                           in [IMG_END] instead

Image-newline tokens (llava_next, llava_onevision) are image tokens: the processor writes the
image token id for them and the model scatters the learned newline embedding there. Images are
random pixels: llava_next / llava_onevision get a wide and a tall original size alternately (so
the AnyRes grids and the unpadding differ), Qwen2-VL / 2.5-VL grids of 1x4x4 and 1x4x8 patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.errors import DyVTEError

VOCAB_SIZE = 96
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
MARKER_A, MARKER_B, MARKER_C = 4, 5, 6
"""Ids of the family's marker tokens (module docstring); MARKER_C is the video token id where a config
needs one (never written here). Text uses ids FIRST_TEXT .. VOCAB_SIZE - 1."""
FIRST_TEXT = 16

HIDDEN, INTERMEDIATE, LAYERS, HEADS = 64, 128, 4, 4
VISION_HIDDEN = 32


class TinyFamilyError(DyVTEError, ValueError):
    """A tiny model or prompt was asked for a family that has no builder."""


@dataclass(frozen=True)
class RowSpec:
    """One prompt of a batch: ``system`` text tokens, ``images`` images, then ``text`` tokens."""

    system: int = 3
    images: int = 1
    text: int = 5


def _text_kwargs(num_kv_heads: int) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def _clip(image_size: int = 28, patch_size: int = 14) -> object:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=VISION_HIDDEN,
    )


def _siglip(image_size: int = 28, patch_size: int = 14) -> object:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


# ---- configs -------------------------------------------------------------------------------


def _llava_config(kv: int) -> object:
    from transformers import LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=_clip(),
        text_config=LlamaConfig(**_text_kwargs(kv)),
        image_token_index=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _llava_next_config(kv: int) -> object:
    from transformers import LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=_clip(),
        text_config=LlamaConfig(**_text_kwargs(kv)),
        image_token_index=IMAGE,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _llava_onevision_config(kv: int) -> object:
    from transformers import LlavaOnevisionConfig, Qwen2Config

    return LlavaOnevisionConfig(
        vision_config=_siglip(),
        text_config=Qwen2Config(**_text_kwargs(kv)),
        image_token_index=IMAGE,
        video_token_index=MARKER_C,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def _qwen_text(kv: int, config_class: type) -> object:
    # M-RoPE sections (temporal, height, width) split the head's HIDDEN // HEADS / 2 = 8 frequencies.
    return config_class(
        **_text_kwargs(kv),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _qwen2_vl_config(kv: int) -> object:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(
        depth=1, embed_dim=VISION_HIDDEN, hidden_size=HIDDEN, num_heads=2, patch_size=2,
        spatial_merge_size=2, temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=_qwen_text(kv, Qwen2VLTextConfig),
        image_token_id=IMAGE,
        video_token_id=MARKER_C,
        vision_start_token_id=MARKER_A,
        vision_end_token_id=MARKER_B,
    )


def _qwen2_5_vl_config(kv: int) -> object:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    vision = Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, out_hidden_size=HIDDEN,
        num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=_qwen_text(kv, Qwen2_5_VLTextConfig),
        image_token_id=IMAGE,
        video_token_id=MARKER_C,
        vision_start_token_id=MARKER_A,
        vision_end_token_id=MARKER_B,
    )


_INTERLEAVED_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
_QWEN3_VL_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=INTERMEDIATE // 2, decoder_sparse_step=1)
"""Qwen3-VL-MoE's decoder: 4 experts, 2 per token, in every layer."""
_GLM4V_MOE = dict(
    moe_intermediate_size=INTERMEDIATE // 2, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
    first_k_dense_replace=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5},
)
"""GLM-4.5V's decoder: layer 0 dense, then 4 routed experts (2 per token) and a shared one; half of each head rotates."""


def _qwen3_vl_config(kv: int, model_type: str = "qwen3_vl", moe: dict | None = None) -> object:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # deepstack after decoder layers 0 and 1 (the features of vision layers 0 and 1): exits after
    # layer 0 keep the stream at full length, masked, until layer 2.
    config_class = CONFIG_MAPPING[model_type]
    vision = config_class.sub_configs["vision_config"](
        depth=2, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=2, patch_size=2,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    text = config_class.sub_configs["text_config"](
        **_text_kwargs(kv), head_dim=HIDDEN // 4, rope_parameters=_INTERLEAVED_MROPE, **(moe or {}))
    return config_class(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=MARKER_C,
                        vision_start_token_id=MARKER_A, vision_end_token_id=MARKER_B)


QWEN3_5_LAYER_TYPES = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
"""Qwen3.5's tiny decoder: Gated DeltaNet layers first and last, so exits after 0 and after 1 or 2 reach a
linear-attention layer on the compacted stream, and the last layer has no attention map."""
_QWEN3_5_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=INTERMEDIATE // 2,
                    shared_expert_intermediate_size=INTERMEDIATE // 2)
"""Qwen3.5-MoE's decoder: 4 routed experts (2 per token) and a shared one in every layer."""


def _qwen3_5_config(kv: int, model_type: str = "qwen3_5", moe: dict | None = None) -> object:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    vision = config_class.sub_configs["vision_config"](
        depth=1, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=2, patch_size=2,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=64,
    )
    text_kwargs = _text_kwargs(kv)
    if moe:
        text_kwargs.pop("intermediate_size")  # every layer's feed-forward is the experts'
    # head_dim 32 with half of it rotated: 8 M-RoPE frequencies, split [2, 3, 3] and interleaved.
    text = config_class.sub_configs["text_config"](
        **text_kwargs, head_dim=2 * HIDDEN // HEADS, layer_types=QWEN3_5_LAYER_TYPES,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, rope_parameters={**_INTERLEAVED_MROPE, "partial_rotary_factor": 0.5}, **(moe or {}),
    )
    return config_class(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=MARKER_C,
                        vision_start_token_id=MARKER_A, vision_end_token_id=MARKER_B)


def _glm4v_config(kv: int, model_type: str = "glm4v", moe: dict | None = None) -> object:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    vision = config_class.sub_configs["vision_config"](
        depth=1, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=2, patch_size=2,
        image_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN,
    )
    text_class = config_class.sub_configs["text_config"]
    text = text_class(**_text_kwargs(kv), **moe) if moe else _qwen_text(kv, text_class)
    return config_class(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=MARKER_C,
                        image_start_token_id=MARKER_A, image_end_token_id=MARKER_B)


def _internvl_config(kv: int) -> object:
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=VISION_HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * VISION_HIDDEN,
        image_size=(56, 56), patch_size=(14, 14),
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs(kv)),
        image_token_id=IMAGE,
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _idefics3_like_config(kv: int, family: str) -> object:
    from transformers import LlamaConfig

    if family == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig as Vision
    else:
        from transformers import SmolVLMConfig as Config
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig as Vision
    vision = Vision(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )
    return Config(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(kv)), image_token_id=IMAGE, scale_factor=2)


def _gemma3_config(kv: int) -> object:
    from transformers import Gemma3Config, Gemma3TextConfig

    text = Gemma3TextConfig(
        **_text_kwargs(kv),
        head_dim=HIDDEN // HEADS,
        sliding_window=8,  # shorter than the prompts, so the window matters in the tests
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
    )
    return Gemma3Config(
        vision_config=_siglip(28, 7),
        text_config=text,
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=MARKER_A,
        eoi_token_index=MARKER_B,
    )


GEMMA4_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
GEMMA4_KV_SHARED = 3
"""Gemma4's tiny decoder: 5 layers; layers 2..4 reuse the keys and values of layer 0 (sliding: layers
2, 3) and layer 1 (full: layer 4), so exits before, at and after the first KV-sharing layer differ."""


def _gemma4_config(kv: int) -> object:
    from transformers import Gemma4Config
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        **{**_text_kwargs(kv), "num_hidden_layers": len(GEMMA4_LAYER_TYPES)},
        head_dim=HIDDEN // HEADS,
        global_head_dim=2 * HIDDEN // HEADS,  # full-attention layers have their own head size
        sliding_window=8,  # shorter than the prompts, so the window matters in the tests
        layer_types=GEMMA4_LAYER_TYPES,
        num_kv_shared_layers=GEMMA4_KV_SHARED,
        hidden_size_per_layer_input=8,  # per-layer embeddings added in every layer
        vocab_size_per_layer_input=VOCAB_SIZE,
        use_bidirectional_attention="vision",  # image blocks bidirectional in the sliding layers
        attention_k_eq_v=True,  # full-attention layers use their keys as values
        final_logit_softcapping=30.0,
    )
    vision = Gemma4VisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=VISION_HIDDEN // 2, pooling_kernel_size=2, patch_size=4, position_embedding_size=64,
    )
    return Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE, boi_token_id=MARKER_A,
        eoi_token_id=MARKER_B, video_token_id=MARKER_C, audio_token_id=MARKER_C + 1, boa_token_id=MARKER_C + 2,
        eoa_token_index=MARKER_C + 3,
    )


def _gemma4_query_scale(model: nn.Module) -> None:
    """Gemma4 scales attention logits by 1 (queries and keys RMS-normed, the norms' scales learned):
    with the initial scales of 1, random tiny rows are so peaky (entropies of 1e-4 nats) that float32
    rounding alone exceeds the tests' tolerances. The query norms' scales are set to head_dim ** -0.5,
    the scaled dot product of the other families (trained checkpoints learn their own)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(layer.self_attn.head_dim**-0.5)


def _mistral3_config(kv: int) -> object:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        image_size=56, patch_size=14, head_dim=VISION_HIDDEN // 2,
    )
    return Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**_text_kwargs(kv), sliding_window=None, head_dim=HIDDEN // HEADS),
        image_token_index=IMAGE,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


# ---- pixel inputs per family ---------------------------------------------------------------
# Each returns the image keyword arguments the model takes, images in batch order, seeded.

ImageInputs = Callable[[nn.Module, list[int], torch.Generator], dict[str, torch.Tensor]]
"""(model, images per row, generator) -> the model's image keyword arguments."""


def _images(n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=generator)


def _pixels_flat(size: tuple[int, int]) -> ImageInputs:
    def make(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"pixel_values": _images(sum(per_row), size, generator)}

    return make


def _pixels_anyres(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n = sum(per_row)
    # Alternate a wide and a tall original image so the AnyRes grids (and the unpadding) differ.
    sizes = torch.tensor([[30, 50] if i % 2 == 0 else [50, 30] for i in range(n)])
    tile = model.config.vision_config.image_size
    patches = [image_size_to_num_patches(s.tolist(), model.config.image_grid_pinpoints, tile) for s in sizes]
    pixel_values = torch.zeros(n, max(patches), 3, tile, tile)
    for i, count in enumerate(patches):
        pixel_values[i, :count] = torch.randn(count, 3, tile, tile, generator=generator)
    return {"pixel_values": pixel_values, "image_sizes": sizes}


def _pixels_qwen(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    vision = model.config.vision_config
    grids = torch.tensor([[1, 4, 4] if i % 2 == 0 else [1, 4, 8] for i in range(sum(per_row))])
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=generator)
    return {"pixel_values": pixel_values, "image_grid_thw": grids}


def _pixels_idefics3(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    size = model.config.vision_config.image_size
    pixel_values = torch.zeros(len(per_row), max(per_row), 3, size, size)  # all-zero images are padding
    for row, count in enumerate(per_row):
        pixel_values[row, :count] = torch.randn(count, 3, size, size, generator=generator)
    return {"pixel_values": pixel_values}


def _pixels_mistral3(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    size = model.config.vision_config.image_size
    n = sum(per_row)
    return {"pixel_values": _images(n, (size, size), generator), "image_sizes": torch.tensor([[size, size]] * n)}


def _pixels_gemma4(model: nn.Module, per_row: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Patch rows and (x, y) patch positions as Gemma4's image processor gives them: images of 4 x 4
    and 8 x 4 patches alternately, padded to the longest with position (-1, -1)."""
    vision = model.config.vision_config
    n = sum(per_row)
    widths = [4 if i % 2 == 0 else 8 for i in range(n)]
    longest = 4 * max(widths)
    pixel_values = torch.zeros(n, longest, 3 * vision.patch_size**2)
    positions = torch.full((n, longest, 2), -1, dtype=torch.long)
    for i, width in enumerate(widths):
        grid = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(4), indexing="xy"), -1).reshape(-1, 2)
        pixel_values[i, : len(grid)] = torch.rand(len(grid), pixel_values.shape[-1], generator=generator)
        positions[i, : len(grid)] = grid
    return {"pixel_values": pixel_values, "image_position_ids": positions}


def _features_per_image(model: nn.Module, image_kwargs: dict[str, torch.Tensor], per_row: list[int]) -> list[int]:
    """Rows of the family's image features per image, from the model itself (Idefics3 and SmolVLM
    return one block per prompt, split here evenly over its images, which all have one size)."""
    with torch.no_grad():
        output = model.model.get_image_features(**image_kwargs, return_dict=True)
    features = output.pooler_output
    if isinstance(features, torch.Tensor):
        if features.dim() == 3:  # (images, tokens, hidden)
            return [features.shape[1]] * features.shape[0]
        features = [features]
    counts = [int(f.shape[0]) if f.dim() == 2 else int(f.shape[-2]) for f in features]
    if len(counts) != sum(per_row) and len(counts) == len(per_row):
        counts = [count // images for count, images in zip(counts, per_row) for _ in range(images)]
    return counts


@dataclass(frozen=True)
class _Family:
    config: Callable[[int], object]
    model_class: str
    image_inputs: ImageInputs
    open_markers: tuple[int, ...] = ()
    close_markers: tuple[int, ...] = ()
    mrope: bool = False
    type_ids: str | None = None
    """Name of the input that marks image tokens with 1 for the model, where it takes one."""
    vocab_fields: tuple[str, ...] = ("vocab_size",)
    """Text-config fields sized by the vocabulary (Gemma4's per-layer embeddings have their own)."""
    adjust: Callable[[nn.Module], None] | None = None
    """Sets some of the random weights after initialisation, where the family's defaults make a poor test model."""


AROUND = dict(open_markers=(MARKER_A,), close_markers=(MARKER_B,))
"""One marker before and one after each image (vision start/end, <img>/</img>, boi/eoi)."""
MM = "mm_token_type_ids"

_FAMILIES: dict[str, _Family] = {
    "llava": _Family(_llava_config, "LlavaForConditionalGeneration", _pixels_flat((28, 28))),
    "llava_next": _Family(_llava_next_config, "LlavaNextForConditionalGeneration", _pixels_anyres),
    "llava_onevision": _Family(_llava_onevision_config, "LlavaOnevisionForConditionalGeneration", _pixels_anyres),
    "qwen2_vl": _Family(_qwen2_vl_config, "Qwen2VLForConditionalGeneration", _pixels_qwen, **AROUND, mrope=True, type_ids=MM),
    "qwen2_5_vl": _Family(
        _qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration", _pixels_qwen, **AROUND, mrope=True, type_ids=MM
    ),
    "qwen3_vl": _Family(_qwen3_vl_config, "Qwen3VLForConditionalGeneration", _pixels_qwen, **AROUND, mrope=True, type_ids=MM),
    "qwen3_vl_moe": _Family(
        lambda kv: _qwen3_vl_config(kv, "qwen3_vl_moe", _QWEN3_VL_MOE), "Qwen3VLMoeForConditionalGeneration",
        _pixels_qwen, **AROUND, mrope=True, type_ids=MM,
    ),
    "qwen3_5": _Family(_qwen3_5_config, "Qwen3_5ForConditionalGeneration", _pixels_qwen, **AROUND, mrope=True, type_ids=MM),
    "qwen3_5_moe": _Family(
        lambda kv: _qwen3_5_config(kv, "qwen3_5_moe", _QWEN3_5_MOE), "Qwen3_5MoeForConditionalGeneration",
        _pixels_qwen, **AROUND, mrope=True, type_ids=MM,
    ),
    "glm4v": _Family(_glm4v_config, "Glm4vForConditionalGeneration", _pixels_qwen, **AROUND, mrope=True, type_ids=MM),
    "glm4v_moe": _Family(
        lambda kv: _glm4v_config(kv, "glm4v_moe", _GLM4V_MOE), "Glm4vMoeForConditionalGeneration", _pixels_qwen,
        **AROUND, mrope=True, type_ids=MM,
    ),
    "internvl": _Family(_internvl_config, "InternVLForConditionalGeneration", _pixels_flat((56, 56)), **AROUND),
    "idefics3": _Family(
        lambda kv: _idefics3_like_config(kv, "idefics3"),
        "Idefics3ForConditionalGeneration",
        _pixels_idefics3,
        open_markers=(MARKER_A, MARKER_B),  # <fake_token_around_image><global-img>
        close_markers=(MARKER_A,),  # <fake_token_around_image>
    ),
    "smolvlm": _Family(
        lambda kv: _idefics3_like_config(kv, "smolvlm"),
        "SmolVLMForConditionalGeneration",
        _pixels_idefics3,
        open_markers=(MARKER_A, MARKER_B),
        close_markers=(MARKER_A,),
    ),
    "gemma3": _Family(
        _gemma3_config, "Gemma3ForConditionalGeneration", _pixels_flat((28, 28)), **AROUND, type_ids="token_type_ids"
    ),
    "gemma4": _Family(
        _gemma4_config, "Gemma4ForConditionalGeneration", _pixels_gemma4, **AROUND, type_ids=MM,
        vocab_fields=("vocab_size", "vocab_size_per_layer_input"), adjust=_gemma4_query_scale,
    ),
    "mistral3": _Family(_mistral3_config, "Mistral3ForConditionalGeneration", _pixels_mistral3),  # breaks: _image_tokens
}


def tiny_family_types() -> list[str]:
    """The ``model_type`` values that have a tiny builder here."""
    return sorted(_FAMILIES)


def _family(model_type: str) -> _Family:
    if model_type not in _FAMILIES:
        raise TinyFamilyError(f"expected one of {tiny_family_types()}, found {model_type!r}")
    return _FAMILIES[model_type]


def uses_mrope(model_type: str) -> bool:
    """Whether the family computes 3-D (M-RoPE) positions itself from input_ids and the image grids."""
    return _family(model_type).mrope


def tiny_family_model(
    model_type: str, *, num_kv_heads: int = 2, attn_implementation: str = "sdpa", seed: int = 0,
    vocab_size: int = VOCAB_SIZE,
) -> nn.Module:
    """A randomly initialised stock model of the family, tiny sizes, in eval mode.

    Args:
        model_type: a family from ``tiny_family_types()``.
        num_kv_heads: KV heads of the text decoder (4 = MHA, 2 = GQA with 4 query heads).
        attn_implementation: the attention implementation of the whole model.
        seed: torch seed of the weights.
        vocab_size: the text decoder's vocabulary (a tokenizer's, ``analysis.testing.processors``);
            the special token ids stay the module's constants.
    """
    import transformers

    family = _family(model_type)
    config = family.config(num_kv_heads)
    for vocab_field in family.vocab_fields:
        setattr(config.get_text_config(), vocab_field, vocab_size)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    if family.adjust is not None:
        family.adjust(model)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_family_batch(
    model: nn.Module, rows: Sequence[RowSpec] = (RowSpec(),), *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts for ``model``: input_ids, attention_mask and the image inputs.

    Each row is ``[bos] system <open> image x n <close> ... text`` (module docstring); ``n`` per
    image comes from the model's image-feature function on these pixels. Families that take
    token-type ids (gemma3: ``token_type_ids``, Qwen2-VL/2.5-VL: ``mm_token_type_ids``) get them,
    1 on image tokens.
    """
    model_type = model.config.model_type
    family = _family(model_type)
    generator = torch.Generator().manual_seed(seed)
    per_row = [row.images for row in rows]
    image_kwargs = family.image_inputs(model, per_row, generator)
    counts = iter(_features_per_image(model, image_kwargs, per_row))
    sequences = []
    for row in rows:
        ids = [BOS] + torch.randint(FIRST_TEXT, VOCAB_SIZE, (row.system,), generator=generator).tolist()
        for _ in range(row.images):
            ids += [*family.open_markers, *_image_tokens(model, next(counts)), *family.close_markers]
        ids += torch.randint(FIRST_TEXT, VOCAB_SIZE, (row.text,), generator=generator).tolist()
        sequences.append(ids)
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **image_kwargs}
    if family.type_ids is not None:
        batch[family.type_ids] = (input_ids == IMAGE).long()
    return batch


def _image_tokens(model: nn.Module, count: int) -> list[int]:
    """Image token ids of one image; Mistral3 writes a break after each row of merged patches."""
    if model.config.model_type != "mistral3":
        return [IMAGE] * count
    side = int(round(count**0.5))
    if side * side != count:
        raise TinyFamilyError(f"expected a square grid of Mistral3 image tokens, found {count} tokens")
    ids: list[int] = []
    for r in range(side):
        ids += [IMAGE] * side + [MARKER_B if r == side - 1 else MARKER_A]
    return ids


__all__ = ["RowSpec", "TinyFamilyError", "tiny_family_batch", "tiny_family_model", "tiny_family_types", "uses_mrope"]
