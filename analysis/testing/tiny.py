"""Tiny random LLaVA models with a real, locally built processor (no downloads).

Used by the tests, the benchmarks and as a stand-in model for the main job while no pretrained
model is available. The tokenizer is byte-level (every byte is a token, no merges), so any text
tokenizes without a vocabulary file; "<image>" is an added special token and the chat template
renders image parts as "<image>", which the processor expands to one token per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "A chat between a curious user and an artificial intelligence assistant."
CHAT_TEMPLATE = (
    "{{ bos_token }}" + SYSTEM_PROMPT + " "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PATCH_SIZE = 14


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA. ``image_size`` / 14 squared is the number of image tokens."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    image_size: int = 28
    vision_hidden_size: int = 32
    vision_layers: int = 1
    seed: int = 0


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with <s>, </s>, <pad>, <image> and the chat template above."""
    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<s>", "</s>", "<pad>", IMAGE_TOKEN]
    vocab = {token: i for i, token in enumerate(specials + sorted(byte_tokens))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_processor(image_size: int = 28) -> LlavaProcessor:
    """A LlavaProcessor whose image processor yields ``image_size`` pixels square, CLIP mean/std."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=byte_level_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava(spec: TinyLlavaSpec = TinyLlavaSpec(), attn_implementation: str = "sdpa", *,
               device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA of the given sizes, matching ``tiny_processor``'s vocabulary.

    ``device`` and ``dtype`` build the weights there and in that type directly (a model of a real
    checkpoint's shape on a GPU, without a float32 copy in host memory first); by default fp32 on the CPU.
    """
    tokenizer = byte_level_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=PATCH_SIZE,
        projection_dim=spec.vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def save_tiny_llava(folder: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    """Save a tiny model and its processor so that ``from_pretrained(folder)`` loads both."""
    folder = Path(folder)
    tiny_llava(spec).save_pretrained(folder)
    tiny_processor(spec.image_size).save_pretrained(folder)
    return folder
