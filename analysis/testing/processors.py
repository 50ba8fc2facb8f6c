"""Every tiny family saved as a checkpoint folder with the family's real processor class (no downloads).

``save_tiny_family(folder, model_type)`` writes what ``from_pretrained(folder)`` of a real
checkpoint reads: the tiny random model of ``analysis.testing.families`` and the family's own
processor class (``AutoProcessor`` finds it from the saved files), made of

- the family's image processor (the PIL one; the torchvision ones are never installed here)
  with the family's defaults, resized to what the tiny vision tower takes;
- a byte-level tokenizer built here (every byte a token, no merges) that carries the family's
  special tokens under their real strings at the ids the tiny configs use (``PAD``, ``BOS``,
  ``EOS``, ``IMAGE``, ``MARKER_A`` ... in ``analysis.testing.families``), so the config's image
  and marker token ids are the tokenizer's;
- a chat template in the family's format (roles, turn markers, where the image goes).

So image placeholders, their expansion into image tokens and the grid and position inputs
(``image_grid_thw``, ``mm_token_type_ids``, ``pixel_attention_mask``, ``image_sizes``, ...) come
out of the processor as a real checkpoint's would: what the command line gets from a user's
folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from analysis.testing.families import (
    BOS,
    EOS,
    FIRST_TEXT,
    GRID_PINPOINTS,
    IMAGE,
    MARKER_A,
    MARKER_B,
    MARKER_C,
    PAD,
    TinyFamilyError,
    tiny_family_model,
)

ProcessorBuilder = Callable[[PreTrainedTokenizerFast, str], Any]
"""(tokenizer, chat template) -> the family's processor."""


@dataclass(frozen=True)
class FamilyProcessor:
    """How one family's processor is built.

    Attributes:
        specials: special token strings by id (ids below ``FIRST_TEXT``: ``PAD``, ``BOS``, ``EOS``,
            ``IMAGE`` and the family's markers as the tiny config names them).
        chat_template: the family's chat template (jinja), rendering ``analysis.data.conversation``.
        build: makes the processor from the tokenizer and the chat template.
        extra_special_tokens: tokenizer attributes the processor reads (``image_token``, ...) -> string.
    """

    specials: dict[int, str]
    chat_template: str
    build: ProcessorBuilder
    extra_special_tokens: dict[str, str] = field(default_factory=dict)


def family_tokenizer(spec: FamilyProcessor) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ``spec``'s special tokens at their ids, bytes from ``FIRST_TEXT`` on.

    Raises:
        TinyFamilyError: a special token's id is not below ``FIRST_TEXT``, or PAD/BOS/EOS have none.
    """
    missing = {PAD, BOS, EOS, IMAGE} - set(spec.specials)
    if missing or any(not 0 <= i < FIRST_TEXT for i in spec.specials):
        raise TinyFamilyError(f"expected special tokens at ids 0..{FIRST_TEXT - 1} including PAD, BOS, EOS and IMAGE, "
                              f"found ids {sorted(spec.specials)}")
    specials = [spec.specials.get(i, f"<|unused_{i}|>") for i in range(FIRST_TEXT)]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=spec.specials[PAD],
        bos_token=spec.specials[BOS],
        eos_token=spec.specials[EOS],
        extra_special_tokens=dict(spec.extra_special_tokens),
    )
    # the unnamed ones too (transformers 5 drops additional_special_tokens when named ones are given);
    # they are in the vocabulary already, so their ids stay
    named = {PAD, BOS, EOS} | {i for i, t in spec.specials.items() if t in spec.extra_special_tokens.values()}
    unnamed = [t for i, t in sorted(spec.specials.items()) if i not in named]
    tokenizer.add_special_tokens({"extra_special_tokens": unnamed}, replace_extra_special_tokens=False)
    tokenizer.chat_template = spec.chat_template
    tokenizer.padding_side = "left"
    return tokenizer


# ---- chat templates ---------------------------------------------------------------------------
# Each renders analysis.data.conversation(question): user turns whose content is image parts and a
# text part, then the generation prompt.


def _parts(image: str) -> str:
    """Jinja of one message's content: ``image`` for each image part, the text parts as they are."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


VICUNA_TEMPLATE = (
    "{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. "
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    + _parts("<image>\n") + " {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5's conversation format (vicuna_v1)."""


# ---- the families -----------------------------------------------------------------------------
# Each builder is the family's processor class with its default image processor (PIL), changed only
# where the tiny vision tower of analysis.testing.families needs it. Without torchvision the class is
# its images-only variant (analysis.loading.images_only_processor_class), as the loader makes it.


def _processor(model_type: str, tokenizer: PreTrainedTokenizerFast, chat_template: str, image_processor: Any,
               video_processor: Callable[[], Any] | None = None, **settings: Any) -> Any:
    """The family's processor over these parts (the video processor only where torchvision is)."""
    from analysis.loading import family_processor_class, torchvision_available

    processor_class = family_processor_class(model_type)
    if processor_class is None:
        raise TinyFamilyError(f"expected transformers to pair a processor class with {model_type!r}, found none")
    video = {} if video_processor is None else {"video_processor": video_processor() if torchvision_available() else None}
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                           **video, **settings)


def _video(class_name: str, **settings: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, class_name)(**settings)

    return make


def _llava(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return _processor("llava", tokenizer, chat_template, image_processor, patch_size=14,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _llava_next(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # llava-v1.6: 336-pixel CLIP tiles; the tiny CLIP takes 28 (14-pixel patches)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=GRID_PINPOINTS)
    return _processor("llava_next", tokenizer, chat_template, image_processor, patch_size=14,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _llava_onevision(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    # OneVision: 384-pixel SigLIP tiles (729 tokens); the tiny SigLIP takes 28 (2 x 2 patches of 14)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=GRID_PINPOINTS)
    return _processor("llava_onevision", tokenizer, chat_template, image_processor,
                      _video("LlavaOnevisionVideoProcessor", size={"height": 28, "width": 28}), num_image_tokens=4,
                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def _qwen_vl(model_type: str, **image_settings: Any) -> ProcessorBuilder:
    """Qwen2-VL's image processor (Qwen2.5-VL and Qwen3-VL use it too) at patch 2, merge 2: small images
    give 4 x 4 to 8 x 8 patches."""
    sizes = dict(size={"shortest_edge": 8 * 8, "longest_edge": 16 * 16}, patch_size=2, merge_size=2, temporal_patch_size=2)
    video = "Qwen3VLVideoProcessor" if model_type.startswith("qwen3") else "Qwen2VLVideoProcessor"

    def build(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return _processor(model_type, tokenizer, chat_template, Qwen2VLImageProcessorPil(**sizes, **image_settings),
                          _video(video, **sizes))

    return build


def _glm4v(model_type: str) -> ProcessorBuilder:
    # GLM's default pixel bounds (temporal x height x width at patch 14) scaled to patch 2: 4 x 4 to 8 x 8 patches
    sizes = dict(size={"shortest_edge": 256, "longest_edge": 512}, patch_size=2, merge_size=2, temporal_patch_size=2)

    def build(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        return _processor(model_type, tokenizer, chat_template, Glm4vImageProcessorPil(**sizes),
                          _video("Glm4vVideoProcessor", **sizes))

    return build


def _internvl(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    # InternVL3: 448-pixel tiles (256 tokens), up to 12 tiles + a thumbnail; the tiny tower takes 56-pixel
    # tiles of 4 x 4 patches, pixel-shuffled to 2 x 2 = 4 tokens (config.image_seq_length)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True,
                                               min_patches=1, max_patches=12)
    return _processor("internvl", tokenizer, chat_template, image_processor,
                      _video("InternVLVideoProcessor", size={"height": 56, "width": 56}), image_seq_length=4)


IDEFICS3_TILE, IDEFICS3_GRID = 32, 2
"""The tiny Idefics3 / SmolVLM tower's image size (patch 8, scale factor 2: 4 tokens a tile), and at
most GRID x GRID sub-images per image (the <row_i_col_j> tokens the tokenizer has; real ones: 4 x 4)."""


def _idefics3_like(model_type: str) -> ProcessorBuilder:
    sizes = dict(size={"longest_edge": IDEFICS3_GRID * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE})

    def build(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
        if model_type == "idefics3":
            from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images
        else:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Images
        video = _video("SmolVLMVideoProcessor", size={"longest_edge": IDEFICS3_TILE},
                       max_image_size={"longest_edge": IDEFICS3_TILE}) if model_type == "smolvlm" else None
        return _processor(model_type, tokenizer, chat_template, Images(**sizes), video, image_seq_len=4)

    return build


def _gemma3(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # SigLIP 28 px (patch 7), no pan-and-scan (the default), mm_tokens_per_image = 4
    return _processor("gemma3", tokenizer, chat_template, Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
                      image_seq_length=4)


def _gemma4(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    # the tiny vision tower: 4-pixel patches pooled 2 x 2, at most 70 soft tokens per image (the
    # checkpoints: 16-pixel patches pooled 3 x 3, 280); the processor writes one soft token per pooled cell
    image_processor = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    return _processor("gemma4", tokenizer, chat_template, image_processor, _video("Gemma4VideoProcessor"),
                      feature_extractor=Gemma4AudioFeatureExtractor(), image_seq_length=70)


def _mistral3(tokenizer: PreTrainedTokenizerFast, chat_template: str) -> Any:
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    # Mistral-Small-3.1: longest edge 1540, 14-pixel patches merged 2 x 2; the tiny Pixtral takes up to 56 px
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size={"height": 14, "width": 14})
    return _processor("mistral3", tokenizer, chat_template, image_processor, patch_size=14, spatial_merge_size=2,
                      image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


# ---- special tokens and chat templates --------------------------------------------------------

_LLAMA = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", IMAGE: "<image>"}
_CHATML = {PAD: "<|endoftext|>", BOS: "<|im_start|>", EOS: "<|im_end|>"}
"""Qwen2-style turns: no real BOS (a turn starts with <|im_start|>), a turn ends with <|im_end|>."""
_QWEN = {**_CHATML, IMAGE: "<|image_pad|>", MARKER_A: "<|vision_start|>", MARKER_B: "<|vision_end|>",
         MARKER_C: "<|video_pad|>", 7: "<|vision_pad|>"}
_GLM = {PAD: "<|endoftext|>", BOS: "[gMASK]", EOS: "<|user|>",  # GLM ends a turn by writing the next role
        IMAGE: "<|image|>", MARKER_A: "<|begin_of_image|>", MARKER_B: "<|end_of_image|>", MARKER_C: "<|video|>",
        7: "<sop>", 8: "<|system|>", 9: "<|assistant|>", 10: "<|observation|>"}
_ROW_COL = {8 + IDEFICS3_GRID * r + c: f"<row_{r + 1}_col_{c + 1}>" for r in range(IDEFICS3_GRID) for c in range(IDEFICS3_GRID)}
_IDEFICS3 = {IMAGE: "<image>", MARKER_A: "<fake_token_around_image>", MARKER_B: "<global-img>",
             EOS: "<end_of_utterance>", **_ROW_COL}
_IDEFICS3_NAMED = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                   "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


def _chatml(image: str, system: str | None) -> str:
    """ChatML turns (<|im_start|>role ... <|im_end|>), with a default system turn where the family writes one."""
    default = "" if system is None else (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}")
    return (default + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _parts(image)
            + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN2_VL_TEMPLATE = _chatml(_QWEN_IMAGE, "You are a helpful assistant.")
QWEN3_VL_TEMPLATE = _chatml(_QWEN_IMAGE, None)
ONEVISION_TEMPLATE = _chatml("<image>\n", "You are a helpful assistant.")
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL_TEMPLATE = _chatml("<IMG_CONTEXT>\n", INTERNVL_SYSTEM)  # the processor writes <img> <IMG_CONTEXT> x n </img>
GLM4V_TEMPLATE = ("[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
                  + _parts("<|begin_of_image|><|image|><|end_of_image|>")
                  + "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_IDEFICS3_TURNS = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}" + _parts("<image>") + "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS3_TURNS
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS3_TURNS
GEMMA3_TEMPLATE = (  # the processor expands <start_of_image> into <start_of_image> <image_soft_token> x 4 <end_of_image>
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}" + _parts("<start_of_image>") + "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA4_TEMPLATE = (  # the processor expands <|image|> into <|image> <|image|> x soft tokens <image|>
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<|turn>' + role + '\n' }}" + _parts("<|image|>") + "<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI."
    "[/SYSTEM_PROMPT]{% for message in messages %}{% if message['role'] == 'user' %}[INST]" + _parts("[IMG]")
    + "[/INST]{% else %}" + _parts("") + "{{ eos_token }}{% endif %}{% endfor %}"
)

FAMILY_PROCESSORS: dict[str, FamilyProcessor] = {
    "llava": FamilyProcessor(_LLAMA, VICUNA_TEMPLATE, _llava, {"image_token": "<image>"}),
    "llava_next": FamilyProcessor(_LLAMA, VICUNA_TEMPLATE, _llava_next, {"image_token": "<image>"}),
    "llava_onevision": FamilyProcessor({**_CHATML, IMAGE: "<image>", MARKER_C: "<video>"}, ONEVISION_TEMPLATE,
                                       _llava_onevision, {"image_token": "<image>", "video_token": "<video>"}),
    "qwen2_vl": FamilyProcessor(_QWEN, QWEN2_VL_TEMPLATE, _qwen_vl("qwen2_vl")),
    "qwen2_5_vl": FamilyProcessor(_QWEN, QWEN2_VL_TEMPLATE, _qwen_vl("qwen2_5_vl")),
    # Qwen3-VL checkpoints normalise with mean = std = 0.5
    "qwen3_vl": FamilyProcessor(_QWEN, QWEN3_VL_TEMPLATE, _qwen_vl("qwen3_vl", image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "qwen3_vl_moe": FamilyProcessor(_QWEN, QWEN3_VL_TEMPLATE,
                                    _qwen_vl("qwen3_vl_moe", image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    # Qwen3.5 checkpoints pair Qwen3-VL's processor with Qwen2-VL's image processor (mean = std = 0.5)
    "qwen3_5": FamilyProcessor(_QWEN, QWEN3_VL_TEMPLATE, _qwen_vl("qwen3_5", image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "qwen3_5_moe": FamilyProcessor(_QWEN, QWEN3_VL_TEMPLATE,
                                   _qwen_vl("qwen3_5_moe", image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "glm4v": FamilyProcessor(_GLM, GLM4V_TEMPLATE, _glm4v("glm4v")),
    "glm4v_moe": FamilyProcessor(_GLM, GLM4V_TEMPLATE, _glm4v("glm4v_moe")),
    "internvl": FamilyProcessor(
        {**_CHATML, IMAGE: "<IMG_CONTEXT>", MARKER_A: "<img>", MARKER_B: "</img>", MARKER_C: "<video>"},
        INTERNVL_TEMPLATE, _internvl,
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}),
    "idefics3": FamilyProcessor({PAD: "<|reserved_special_token_0|>", BOS: "<|begin_of_text|>", **_IDEFICS3},
                                IDEFICS3_TEMPLATE, _idefics3_like("idefics3"), _IDEFICS3_NAMED),
    "smolvlm": FamilyProcessor({PAD: "<|im_end|>", BOS: "<|im_start|>", **_IDEFICS3, MARKER_C: "<video>"},
                               SMOLVLM_TEMPLATE, _idefics3_like("smolvlm"), {**_IDEFICS3_NAMED, "video_token": "<video>"}),
    "gemma3": FamilyProcessor(
        {PAD: "<pad>", BOS: "<bos>", EOS: "<end_of_turn>", IMAGE: "<image_soft_token>", MARKER_A: "<start_of_image>",
         MARKER_B: "<end_of_image>", 7: "<start_of_turn>", 8: "<eos>"}, GEMMA3_TEMPLATE, _gemma3,
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}),
    # Gemma 4's strings as its tokenizer files and prompt-format guide write them; a turn ends with <turn|>
    "gemma4": FamilyProcessor(
        {PAD: "<pad>", BOS: "<bos>", EOS: "<turn|>", IMAGE: "<|image|>", MARKER_A: "<|image>", MARKER_B: "<image|>",
         MARKER_C: "<|video|>", 7: "<|audio|>", 8: "<|audio>", 9: "<audio|>", 10: "<|turn>"}, GEMMA4_TEMPLATE, _gemma4,
        {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
         "boa_token": "<|audio>", "eoa_token": "<audio|>"}),
    "mistral3": FamilyProcessor(
        {**_LLAMA, IMAGE: "[IMG]", MARKER_A: "[IMG_BREAK]", MARKER_B: "[IMG_END]", 7: "[INST]", 8: "[/INST]",
         9: "[SYSTEM_PROMPT]", 10: "[/SYSTEM_PROMPT]"}, MISTRAL3_TEMPLATE, _mistral3,
        {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}),
}
"""The processor of every tiny family, by ``model_type``: special tokens, chat template, builder."""


def tiny_family_processor(model_type: str) -> Any:
    """The family's real processor class over a tokenizer and chat template built here.

    Raises:
        TinyFamilyError: the family has no processor builder here.
    """
    if model_type not in FAMILY_PROCESSORS:
        raise TinyFamilyError(f"expected one of {sorted(FAMILY_PROCESSORS)}, found {model_type!r}")
    spec = FAMILY_PROCESSORS[model_type]
    processor = spec.build(family_tokenizer(spec), spec.chat_template)
    processor.tokenizer.padding_side = "left"
    return processor


def save_tiny_family(folder: str | Path, model_type: str, *, num_kv_heads: int = 2, seed: int = 0) -> Path:
    """Save a tiny random model of the family with its processor, loadable as a checkpoint folder.

    The model's vocabulary is the tokenizer's (the tiny configs' ids for the special tokens).
    """
    folder = Path(folder)
    processor = tiny_family_processor(model_type)
    model = tiny_family_model(model_type, num_kv_heads=num_kv_heads, seed=seed, vocab_size=len(processor.tokenizer))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


__all__ = ["FAMILY_PROCESSORS", "FamilyProcessor", "family_tokenizer", "save_tiny_family", "tiny_family_processor"]
