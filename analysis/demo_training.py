"""Train and evaluate the demo LLaVA (:mod:`analysis.demo_model`) on ShapesVQA (:mod:`analysis.shapes`).

Two stages on a CPU budget; the vision tower and the language model stay frozen. Stage 0
(:func:`ground_projector`) teaches the projector, by regression on the train split's scene
annotations, to map each image patch to the word embeddings of what covers it ("large red
circle", or a filler word for the background), so that image tokens start out readable by the
language model. Stage 1 trains the projector together with small low-rank adapters (LoRA,
written here with forward hooks, no ``peft``) on the decoder's linear layers, on the questions. The result is one small safetensors
file (:func:`save_demo_weights`): the projector's weights and, per adapted linear layer, the two
low-rank factors whose product is *added* to that layer's weight when the model is loaded
(:func:`analysis.demo_model.apply_demo_weights`), so the loaded model is a stock
``LlavaForConditionalGeneration``.

Training format. Each question about an image is its own single-turn chat, token for token the
prompt :func:`analysis.data.build_prompt` gives at inference, followed by the answer; the loss is
on the answer tokens and the end-of-turn token only. The questions of one image share the
prompt up to the image tokens, so that prefix runs once per image and the questions continue
from its key/value cache as one batch (:func:`branched_answer_loss`; equal to separate
forwards, tested). No question sees another's answer: an earlier version packed them into one
multi-turn chat, where later questions were answered by earlier answers and the loss fell
without the image being used. Besides the split's own questions, extra questions about the same
train scenes are drawn with :func:`analysis.shapes.ask` (seeded).

Evaluation (:func:`evaluate_demo`) is greedy decoding of a few tokens for single-turn questions
(as the command line prompts); the key/value cache of the shared prefix (system turn, image
tokens) is computed once per image and all its questions continue from it as one batch, which
gives the same tokens as ``generate()`` on each full prompt (tested) at a fraction of the cost.

Command line::

    # train with the settings of the committed weights (demo_weights/MODEL_CARD.md: under 2 hours
    # on 2 cores, capped by --max-minutes; OMP_WAIT_POLICY=PASSIVE avoids a large slow-down when
    # cores are shared)
    OMP_WAIT_POLICY=PASSIVE python -m analysis.demo_training train --out runs/demo-train --seed 0
    # evaluate the committed weights on the first 60 test images, and with a blank image instead
    python -m analysis.demo_training eval --split test --limit 60
    python -m analysis.demo_training eval --split test --limit 60 --blank-image
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.data import Question, build_prompt, load_image, read_questions
from analysis.shapes import (
    QUESTION_TYPES,
    SCENES_FILE,
    accuracy_by_type,
    ask,
    read_scenes,
)

__all__ = [
    "LoraAdapters",
    "TrainConfig",
    "PackedExample",
    "EncodedImage",
    "branched_answer_loss",
    "chance_by_type",
    "encode_branches",
    "evaluate_demo",
    "extra_questions",
    "image_features",
    "main",
    "pack_split",
    "predict_demo",
    "save_demo_weights",
    "train_demo",
]

IGNORE = -100
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of each decoder layer that get a low-rank adapter (by attribute name)."""

WEIGHTS_FORMAT = "dyvte-demo-weights/1"
PROJECTOR_PREFIX = "model.multi_modal_projector."
LORA_PREFIX = "lora."
"""Key prefix of the adapter factors: ``lora.<module path>.A`` (rank x in) and ``.B`` (out x rank, scale folded in)."""


# --------------------------------------------------------------------------------------------
# Low-rank adapters, attached with forward hooks and merged on load
# --------------------------------------------------------------------------------------------

class LoraAdapters(nn.Module):
    """Low-rank adapters on the decoder's linear layers: ``y = W x + scale * B (A x)``.

    The adapters live in this module, not in the model: :meth:`attached` registers one forward
    hook per adapted linear layer (checking every path first, removing them all on exit), so the
    model's classes and weights are never changed. :meth:`deltas` gives the factors to merge.
    ``B`` starts at zero, so attaching fresh adapters leaves the outputs unchanged.
    """

    def __init__(self, model: nn.Module, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = LORA_TARGETS, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"expected rank >= 1, found {rank}")
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        decoder = model.get_decoder()
        prefix = _module_path(model, decoder)
        self.paths: list[str] = []
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for index, layer in enumerate(decoder.layers):
            for name, module in layer.named_modules():
                if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
                    self.paths.append(f"{prefix}.layers.{index}.{name}")
                    a = torch.empty(rank, module.in_features)
                    bound = 1.0 / math.sqrt(module.in_features)
                    a.uniform_(-bound, bound, generator=generator)
                    self.A.append(nn.Parameter(a))
                    self.B.append(nn.Parameter(torch.zeros(module.out_features, rank)))
        if not self.paths:
            raise ValueError(f"found no nn.Linear named {tuple(targets)} in the decoder layers")

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[LoraAdapters]:
        modules = dict(model.named_modules())
        missing = [p for p in self.paths if p not in modules]
        if missing:
            raise KeyError(f"expected the adapted modules in the model, missing {missing[:3]} ...")
        handles = []
        try:
            for path, a, b in zip(self.paths, self.A, self.B):
                handles.append(modules[path].register_forward_hook(self._hook(a, b)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        scale = self.scale

        def lora_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + (x @ a.to(x.dtype).t()) @ (b.to(x.dtype).t() * scale)

        return lora_hook

    @torch.no_grad()
    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set A and B from a weights file's "lora.<path>.A" / ".B" (scale folded into B) keys."""
        for path, a, b in zip(self.paths, self.A, self.B):
            a.copy_(tensors[f"{LORA_PREFIX}{path}.A"])
            b.copy_(tensors[f"{LORA_PREFIX}{path}.B"] / self.scale)

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, scale * B), detached fp32: the weight grows by ``(scale * B) @ A``."""
        return {path: (a.detach().float().clone(), (b.detach().float() * self.scale).clone())
                for path, a, b in zip(self.paths, self.A, self.B)}


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a sub-module of {type(model).__name__}")


def save_demo_weights(path: str | Path, model: nn.Module, adapters: LoraAdapters | None,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Write the projector and the adapters' factors (fp32) to one safetensors file.

    Keys: ``model.multi_modal_projector.*`` and ``lora.<module path>.A`` / ``.B``; the
    safetensors metadata holds the format tag and ``metadata`` (JSON-encoded values).
    """
    from safetensors.torch import save_file

    tensors = {PROJECTOR_PREFIX + k: v.detach().float().contiguous().clone()
               for k, v in model.model.multi_modal_projector.state_dict().items()}
    if adapters is not None:
        for module_path, (a, b) in adapters.deltas().items():
            tensors[f"{LORA_PREFIX}{module_path}.A"] = a.contiguous()
            tensors[f"{LORA_PREFIX}{module_path}.B"] = b.contiguous()
    meta = {"format": WEIGHTS_FORMAT}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# Data: the questions of each image
# --------------------------------------------------------------------------------------------

def extra_questions(scene: Any, rng: random.Random, per_type: int = 2) -> list[tuple[str, str, str]]:
    """Up to ``per_type`` questions of every type about a scene (exists: as many yes as no).

    Returns (category, text, answer) triples; a type without an unambiguous question is skipped.
    """
    result: list[tuple[str, str, str]] = []
    for category in QUESTION_TYPES:
        for attempt in range(per_type):
            exists_answer = "yes" if attempt % 2 == 0 else "no"
            asked = ask(scene, category, rng, exists_answer=exists_answer)
            if asked is not None:
                result.append((category, asked[0], asked[1]))
    return result


@dataclass(frozen=True)
class PackedExample:
    """One image and its questions (each asked on its own, in this order)."""

    image: str
    turns: tuple[tuple[str, str, str], ...]  # (category, question text, answer)


def pack_split(folder: str | Path, extra_per_type: int = 2, seed: int = 0,
               limit: int | None = None) -> list[PackedExample]:
    """The split's questions grouped by image, plus extra questions drawn from each scene.

    Duplicate question texts are dropped; the order of the turns is shuffled (seeded per image)
    so that every type is asked first, as at inference, about equally often.
    """
    folder = Path(folder)
    by_image: dict[str, list[tuple[str, str, str]]] = {}
    for question in read_questions(folder / "questions.jsonl"):
        by_image.setdefault(question.images[0], []).append(
            (question.category or "uncategorised", question.text, question.answer or ""))
    scenes = read_scenes(folder) if extra_per_type > 0 and (folder / SCENES_FILE).is_file() else {}
    examples = []
    for image in sorted(by_image)[:limit]:
        turns = by_image[image]
        rng = random.Random(f"demo-training:{seed}:{image}")
        if image in scenes:
            turns = turns + extra_questions(scenes[image], rng, extra_per_type)
        seen: set[str] = set()
        unique = [t for t in turns if not (t[1] in seen or seen.add(t[1]))]
        rng.shuffle(unique)
        examples.append(PackedExample(image, tuple(unique)))
    return examples


def _image_seq_length(model: nn.Module, processor: Any) -> int:
    """How many image tokens the processor expands one image to (probed with a blank image)."""
    from PIL import Image

    crop = processor.image_processor.crop_size
    side = int(crop["height"] if isinstance(crop, dict) else crop.height)
    probe = processor(images=Image.new("RGB", (side, side)), text=processor.image_token, return_tensors="pt")
    return int((probe["input_ids"] == model.config.image_token_id).sum())


def _tokenize(processor: Any, text: str) -> list[int]:
    return list(processor.tokenizer(text)["input_ids"])


def _expand_image_tokens(ids: list[int], image_token_id: int, n_tokens: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([token] * n_tokens if token == image_token_id else [token])
    return out


@dataclass(frozen=True)
class EncodedImage:
    """One image's questions as single-turn prompts that share their prefix (up to the image tokens).

    ``prefix`` is the token ids up to and including the last image token (image tokens
    expanded); ``branches[i]`` continues it into question i's prompt and answer, exactly the
    tokens :func:`analysis.data.build_prompt` gives at inference followed by the answer and its
    end-of-turn token; ``labels[i]`` is ``-100`` except on those answer tokens.
    """

    prefix: list[int]
    branches: tuple[list[int], ...]
    labels: tuple[list[int], ...]
    categories: tuple[str, ...]


def encode_branches(processor: Any, turns: Sequence[tuple[str, str, str]], image_token_id: int,
                    n_image_tokens: int) -> EncodedImage:
    """Encode each (category, question, answer) of one image as its own single-turn chat.

    Every question gets the image and only its own question: no question can see another's
    answer (packing all questions into one multi-turn chat let the loss fall without looking at
    the image, because later questions are answered by earlier answers). The shared prefix is
    computed once in training (:func:`branched_answer_loss`).

    Raises:
        ValueError: a prompt does not contain the image token, the prompts do not share the
            prefix up to it, or the rendering with the answer does not extend the prompt.
    """
    prefix: list[int] | None = None
    branches: list[list[int]] = []
    labels: list[list[int]] = []
    for category, text, answer in turns:
        messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = _tokenize(processor, processor.apply_chat_template(messages, add_generation_prompt=True))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = _tokenize(processor, processor.apply_chat_template(messages))
        if full[:len(prompt)] != prompt:
            raise ValueError(f"question {text!r}: the chat template's rendering with the answer does not extend the prompt")
        end = len(full)
        while end > len(prompt) and not processor.tokenizer.decode(full[end - 1:end]).strip():
            end -= 1  # the answer and its end-of-turn token, without the whitespace after it
        full = _expand_image_tokens(full[:end], image_token_id, n_image_tokens)
        answer_start = len(full) - (end - len(prompt))
        if image_token_id not in full:
            raise ValueError(f"question {text!r}: expected the image token {image_token_id} in the prompt, found none")
        split = max(i for i, token in enumerate(full) if token == image_token_id) + 1
        if prefix is None:
            prefix = full[:split]
        elif full[:split] != prefix:
            raise ValueError(f"question {text!r}: expected the prompts of one image to share the prefix up to the image tokens")
        branches.append(full[split:])
        labels.append([IGNORE] * (answer_start - split) + full[answer_start:])
    if prefix is None:
        raise ValueError("expected at least one question per image, found none")
    return EncodedImage(prefix, tuple(branches), tuple(labels), tuple(t[0] for t in turns))


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features the projector receives, [images, tokens, vision hidden] (as the model
    computes them: its own ``get_image_features``, with the projector's input captured)."""
    captured: list[torch.Tensor] = []
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    finally:
        handle.remove()
    return captured[0]


def _input_embeds(model: nn.Module, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(features).to(embeds.dtype)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    if int(mask.sum()) != projected.shape[0] * projected.shape[1]:
        raise ValueError(f"expected {projected.shape[0] * projected.shape[1]} image tokens in the input, "
                         f"found {int(mask.sum())}")
    return embeds.masked_scatter(mask, projected)


def branched_answer_loss(model: nn.Module, encoded: EncodedImage, features: torch.Tensor,
                         pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed answer cross-entropy of all branches of one image, sharing one prefill of the prefix.

    The prefix (system turn and image tokens) runs once and its key/value cache, repeated per
    branch, is the past of a right-padded batch of the branches. Each branch therefore sees
    exactly what a single-turn prompt sees at inference (same tokens, same positions), and the
    gradient flows into the prefix through the cache.

    Returns (loss sum, number of labelled tokens, per-labelled-token correctness of the argmax).
    """
    language_model = model.model.language_model
    prefix = torch.tensor([encoded.prefix])
    embeds = _input_embeds(model, prefix, features)
    cache = language_model(inputs_embeds=embeds, use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(encoded.branches))
    width = max(len(branch) for branch in encoded.branches)
    ids = torch.full((len(encoded.branches), width), pad_token_id)
    labels = torch.full((len(encoded.branches), width), IGNORE)
    mask = torch.zeros((len(encoded.branches), prefix.shape[1] + width), dtype=torch.long)
    mask[:, :prefix.shape[1]] = 1
    for row, (branch, label) in enumerate(zip(encoded.branches, encoded.labels)):
        ids[row, :len(branch)] = torch.tensor(branch)
        labels[row, :len(label)] = torch.tensor(label)
        mask[row, prefix.shape[1]:prefix.shape[1] + len(branch)] = 1
    hidden = language_model(input_ids=ids, attention_mask=mask, use_cache=False,
                            **{_cache_keyword(language_model): cache}).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][selected]).float()
    wanted = targets[selected]
    loss = nn.functional.cross_entropy(logits, wanted, reduction="sum")
    return loss, selected.sum(), (logits.argmax(-1) == wanted).detach()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

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

GROUND_BACKGROUND_WORD = "."
"""The word whose embedding background patches are grounded to (a filler token)."""
GROUND_MIN_COVER = 0.3
"""A patch belongs to a shape when at least this share of its pixels has the shape's fill colour."""


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

    from analysis.shapes import COLOURS

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
    from tqdm.auto import tqdm

    from analysis.shapes import COLOURS, SHAPES, SIZES

    tokenizer = processor.tokenizer
    vocabulary = [*COLOURS, *SHAPES, *SIZES, GROUND_BACKGROUND_WORD]
    words = {word: word_embedding(model, tokenizer, word) for word in vocabulary}
    crop = processor.image_processor.crop_size
    side = int(crop["height"] if isinstance(crop, dict) else crop.height)
    patch = int(model.config.vision_config.patch_size)
    generator = torch.Generator().manual_seed(seed)
    chosen = [e for e in examples if e.image in scenes]
    order = torch.randperm(len(chosen), generator=generator)[:images].tolist()
    features, targets, shape_mask, objects = [], [], [], []
    for index in tqdm(order, desc="ground: vision features", disable=not progress):
        example = chosen[index]
        image = load_image(image_folder, example.image)
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        features.append(image_features(model, pixels)[0].to(torch.bfloat16))
        target, is_shape = grounding_targets(scenes[example.image], image, side, patch, words)
        targets.append(target)
        shape_mask.append(is_shape)
        objects.append(scenes[example.image])
    held = max(1, len(features) // 8)
    fit_x = torch.cat(features[:-held])
    fit_y, fit_shape = torch.cat(targets[:-held]), torch.cat(shape_mask[:-held])
    weight = torch.where(fit_shape, 1.0 / fit_shape.sum().clamp_min(1), 1.0 / (~fit_shape).sum().clamp_min(1))
    projector = model.model.multi_modal_projector
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

    def nearest_share(names: Sequence[str], attribute: str) -> float:
        table = torch.nn.functional.normalize(torch.stack([words[n] for n in names]), dim=-1)
        hits = total = 0
        for x, scene, image_name in zip(features[-held:], objects[-held:], [chosen[i].image for i in order][-held:]):
            with torch.no_grad():
                projected = torch.nn.functional.normalize(projector(x.float()), dim=-1)
            image = load_image(image_folder, image_name)
            for obj in scene.objects:
                _, is_obj = grounding_targets(type(scene)(scene.image_size, scene.background, (obj,)), image, side, patch,
                                              words)
                if bool(is_obj.any()):
                    guess = (projected[is_obj] @ table.T).argmax(-1)
                    hits += int((guess == names.index(getattr(obj, attribute))).sum())
                    total += int(is_obj.sum())
        return hits / max(1, total)

    return {"images": len(features), "held_out_images": held, "final_loss": float(loss.detach()),
            "colour_nearest": nearest_share(list(COLOURS), "colour"), "shape_nearest": nearest_share(list(SHAPES), "shape")}


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved beside the weights)."""

    data_root: str = ".cache/shapesvqa"
    split: str = "train"
    steps: int = 1150
    batch_size: int = 1  # images per optimiser step (each with all its questions)
    lr_projector: float = 2e-3
    lr_lora: float = 6e-4
    warmup: int = 30
    min_lr_ratio: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    extra_per_type: int = 3
    image_size: int = 336
    seed: int = 0
    threads: int = 2
    # Autocast matmuls to bfloat16 (the weights stay fp32). Off by default: on a CPU without native
    # bfloat16 (no AMX / AVX512-BF16) a step took 2.5 times as long as in fp32 (13.7 s vs 5.5 s,
    # mean of the same 5 steps).
    bf16: bool = False
    checkpoint_minutes: float = 5.0
    standardise_images: int = 16  # images whose features start the projector (0: plain random start)
    ground_images: int = 240  # stage 0 (ground_projector) on this many train images; 0: off
    ground_steps: int = 600
    ground_lr: float = 2e-3
    init_weights: str | None = None  # continue from a weights file (projector and adapters) instead
    max_minutes: float | None = None  # stop early (saving the weights) after this much wall time
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_demo(model: nn.Module, processor: Any, examples: Sequence[PackedExample], image_folder: str | Path,
               config: TrainConfig, out_dir: str | Path | None = None,
               progress: bool = True) -> tuple[LoraAdapters | None, list[dict[str, Any]]]:
    """Train the projector (and LoRA adapters if ``config.rank`` > 0): stage 0 then stage 1.

    The model is changed in place (its projector); the adapters are returned, not merged. Images
    are visited in a seeded random order, ``config.batch_size`` per step (gradients accumulated
    over the images of a step, loss averaged over answer tokens). With ``out_dir``, the weights
    are saved to ``out_dir/demo_weights.safetensors`` every ``checkpoint_minutes`` and at the
    end, and every step's log line is appended to ``out_dir/log.jsonl``.

    Returns:
        (adapters or None, the per-step log records).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    adapters = LoraAdapters(model, config.rank, config.alpha, config.targets, generator) if config.rank > 0 else None
    groups = [{"params": list(projector.parameters()), "lr": config.lr_projector, "base_lr": config.lr_projector}]
    if adapters is not None:
        groups.append({"params": list(adapters.parameters()), "lr": config.lr_lora, "base_lr": config.lr_lora})
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.999))
    image_token_id = int(model.config.image_token_id)
    n_image_tokens = _image_seq_length(model, processor)
    pad_token_id = int(processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None
                       else processor.tokenizer.eos_token_id)

    if config.init_weights is not None:
        from safetensors.torch import load_file

        tensors = load_file(config.init_weights)
        projector.load_state_dict({k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items()
                                   if k.startswith(PROJECTOR_PREFIX)}, strict=True)
        if adapters is not None:
            adapters.load_factors(tensors)
    elif config.standardise_images > 0:
        pick = torch.randperm(len(examples), generator=generator)[:config.standardise_images].tolist()
        sample = torch.cat([image_features(model, processor.image_processor(
            load_image(image_folder, examples[i].image), return_tensors="pt")["pixel_values"]) for i in pick])
        standardise_projector(model, sample)
        if config.ground_images > 0:
            from analysis.shapes import read_scenes

            grounded = ground_projector(model, processor, examples, image_folder, read_scenes(image_folder),
                                        config.ground_images, config.ground_steps, config.ground_lr, config.seed,
                                        progress=progress)
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                (Path(out_dir) / "grounding.json").write_text(json.dumps(grounded, indent=2) + "\n")
    order: list[int] = []
    needed = config.steps * config.batch_size
    while len(order) < needed:
        order.extend(torch.randperm(len(examples), generator=generator).tolist())
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        (out / "log.jsonl").write_text("")
    records: list[dict[str, Any]] = []
    last_checkpoint = start = time.time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    model.train(False)  # no dropout in these models, but keep eval-mode semantics
    bar = tqdm(range(config.steps), desc="train", disable=not progress)
    with (adapters.attached(model) if adapters is not None else _nothing()):
        for step in bar:
            factor = _lr_factor(step, config)
            for group in optimiser.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = [examples[i] for i in order[step * config.batch_size:(step + 1) * config.batch_size]]
            encoded = []
            for example in batch:
                pixels = processor.image_processor(load_image(image_folder, example.image), return_tensors="pt")["pixel_values"]
                encoded.append((encode_branches(processor, example.turns, image_token_id, n_image_tokens),
                                image_features(model, pixels)))
            total_tokens = sum(sum(label != IGNORE for labels in item.labels for label in labels[1:])
                               for item, _ in encoded)
            loss_sum, hits = 0.0, 0
            optimiser.zero_grad(set_to_none=True)
            for item, features in encoded:
                with autocast:
                    loss, _, correct = branched_answer_loss(model, item, features, pad_token_id)
                (loss / total_tokens).backward()
                loss_sum += float(loss.detach())
                hits += int(correct.sum())
            optimiser.step()
            record = {"step": step + 1, "loss": loss_sum / total_tokens, "token_accuracy": hits / total_tokens,
                      "tokens": total_tokens, "lr_factor": factor, "elapsed_s": time.time() - start}
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.2f}")
            if out is not None:
                with (out / "log.jsonl").open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            out_of_time = config.max_minutes is not None and time.time() - start > 60 * config.max_minutes
            if out is not None and (time.time() - last_checkpoint > 60 * config.checkpoint_minutes
                                    or step + 1 == config.steps or out_of_time):
                save_demo_weights(out / "demo_weights.safetensors", model, adapters,
                                  {"config": asdict(config), "steps_done": step + 1,
                                   "wall_s": round(time.time() - start, 1)})
                last_checkpoint = time.time()
            if out_of_time:
                break
    projector.requires_grad_(False)
    return adapters, records


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _cache_keyword(model: nn.Module) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _greedy_branches(model: nn.Module, prefill_cache: Any, prefix_length: int, suffixes: Sequence[list[int]],
                     max_new_tokens: int, eos: set[int], keyword: str, pad_token_id: int) -> list[list[int]]:
    """Greedy continuations of several prompts that share a prefilled prefix, as one batch.

    The suffixes are left-padded after the prefix; their position ids are given explicitly
    (the prefix length plus the token's index in its own suffix) and the pads are masked, so
    each row sees the same keys at the same positions as its prompt alone would (the causal
    mask follows the cache's slots, the rotary phases the position ids).
    """
    rows, width = len(suffixes), max(len(suffix) for suffix in suffixes)
    cache = copy.deepcopy(prefill_cache)
    cache.batch_repeat_interleave(rows)
    step_ids = torch.full((rows, width), pad_token_id)
    mask = torch.zeros((rows, prefix_length + width), dtype=torch.long)
    mask[:, :prefix_length] = 1
    positions = torch.full((rows, width), prefix_length)
    for row, suffix in enumerate(suffixes):
        step_ids[row, width - len(suffix):] = torch.tensor(suffix)
        mask[row, prefix_length + width - len(suffix):] = 1
        positions[row, width - len(suffix):] = prefix_length + torch.arange(len(suffix))
    next_position = torch.tensor([prefix_length + len(suffix) for suffix in suffixes])
    tokens: list[list[int]] = [[] for _ in suffixes]
    finished = [False] * rows
    for _ in range(max_new_tokens):
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{keyword: cache})
        cache = output.past_key_values
        chosen = output.logits[:, -1].argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not finished[row]:
                finished[row] = token in eos
                if not finished[row]:
                    tokens[row].append(token)
        if all(finished):
            break
        step_ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], dim=1)
        positions = next_position[:, None].clone()
        next_position += 1
    return tokens


@torch.inference_mode()
def predict_demo(model: nn.Module, processor: Any, questions: Sequence[Question], image_folder: str | Path,
                 blank_image: bool = False, max_new_tokens: int = 4, progress: bool = True,
                 batch_size: int = 32) -> dict[str, str]:
    """Greedy answers (``max_new_tokens`` at most) to single-turn questions, keyed by question_id.

    Questions about the same image share one prefill of the prompt up to the image tokens; they
    continue from it in batches of at most ``batch_size`` (:func:`_greedy_branches`), which gives
    the tokens of ``generate()`` on each full prompt (tested). With ``blank_image`` every image is
    replaced by a plain white square of the same size (one prefill for all questions).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    image_token_id = int(model.config.image_token_id)
    n_image_tokens = _image_seq_length(model, processor)
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {processor.tokenizer.eos_token_id}
    pad_token_id = int(processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None
                       else processor.tokenizer.eos_token_id)
    keyword = _cache_keyword(model)
    groups: dict[str, list[Question]] = {}
    for question in questions:
        if len(question.images) != 1:
            raise ValueError(f"question {question.question_id!r}: expected one image, found {len(question.images)}")
        groups.setdefault("blank" if blank_image else question.images[0], []).append(question)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(questions), desc="blank" if blank_image else "eval", disable=not progress)
    for group in groups.values():
        image = load_image(image_folder, group[0].images[0])
        if blank_image:
            image = Image.new("RGB", image.size, (255, 255, 255))
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        encoded = [_expand_image_tokens(_tokenize(processor, build_prompt(processor, q)), image_token_id,
                                        n_image_tokens) for q in group]
        prefix_length = max(i for i, t in enumerate(encoded[0]) if t == image_token_id) + 1
        prefix = encoded[0][:prefix_length]
        for ids in encoded:
            if ids[:prefix_length] != prefix:
                raise ValueError("expected the prompts of one image to share the prefix up to the image tokens")
        prefill = model(input_ids=torch.tensor([prefix]), pixel_values=pixels, use_cache=True)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            answers = _greedy_branches(model, prefill.past_key_values, prefix_length,
                                       [ids[prefix_length:] for ids in encoded[start:start + batch_size]],
                                       max_new_tokens, eos, keyword, pad_token_id)
            for question, tokens in zip(chunk, answers):
                predictions[question.question_id] = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    bar.close()
    return predictions


def _first_images(questions: list[Question], limit: int | None) -> list[Question]:
    """The questions about the first ``limit`` images (by image path), all if ``limit`` is None."""
    if limit is None:
        return questions
    keep = set(sorted({q.images[0] for q in questions})[:limit])
    return [q for q in questions if q.images[0] in keep]


def evaluate_demo(model: nn.Module, processor: Any, split_folder: str | Path, limit: int | None = None,
                  blank_image: bool = False, max_new_tokens: int = 4, progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy per question type on a ShapesVQA split folder.

    Args:
        limit: use the questions of the first ``limit`` images only (every image has up to one
            question per type, so the subset stays stratified).
        blank_image: answer with a plain white image instead of each question's image.

    Returns:
        ``{"accuracy": {type: acc, ..., "overall": acc}, "counts": {type: n}, "questions": n,
        "images": n, "blank_image": bool, "seconds": s, "predictions": {question_id: text}}``.
    """
    folder = Path(split_folder)
    questions = _first_images(read_questions(folder / "questions.jsonl"), limit)
    start = time.time()
    predictions = predict_demo(model, processor, questions, folder, blank_image, max_new_tokens, progress)
    counts = Counter(q.category or "uncategorised" for q in questions)
    return {
        "accuracy": accuracy_by_type(predictions, questions),
        "counts": dict(sorted(counts.items())) | {"overall": len(questions)},
        "questions": len(questions),
        "images": len({q.images[0] for q in questions}),
        "blank_image": blank_image,
        "seconds": round(time.time() - start, 1),
        "predictions": predictions,
    }


def chance_by_type(split_folder: str | Path, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Reference levels per type: uniform guessing among the answers seen, and always answering
    the most frequent answer of that type (``{"uniform": {...}, "majority": {...}}``)."""
    questions = _first_images(read_questions(Path(split_folder) / "questions.jsonl"), limit)
    answers: dict[str, Counter[str]] = {}
    for question in questions:
        answers.setdefault(question.category or "uncategorised", Counter())[question.answer or ""] += 1
    uniform = {k: 1 / len(v) for k, v in sorted(answers.items())}
    majority = {k: max(v.values()) / sum(v.values()) for k, v in sorted(answers.items())}
    total = sum(sum(v.values()) for v in answers.values())
    majority["overall"] = sum(max(v.values()) for v in answers.values()) / total
    uniform["overall"] = sum(sum(v.values()) / len(v) for v in answers.values()) / total
    return {"uniform": uniform, "majority": majority}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

EXAMPLES = """examples:
  # train as for the committed weights: grounding on 240 images, then 1150 images with their questions
  OMP_WAIT_POLICY=PASSIVE python -m analysis.demo_training train --out runs/demo-train --seed 0
  # a quick smoke run
  python -m analysis.demo_training train --out runs/smoke --steps 2 --batch-size 1
  # accuracy of the committed weights on the first 60 test images, then with a blank image
  python -m analysis.demo_training eval --split test --limit 60
  python -m analysis.demo_training eval --split test --limit 60 --blank-image
  # accuracy of a training run's weights
  python -m analysis.demo_training eval --weights runs/demo-train/demo_weights.safetensors
"""


def _train_command(args: argparse.Namespace) -> int:
    from analysis.demo_model import load_demo_model
    from analysis.shapes import ensure_split

    config = TrainConfig(data_root=str(args.data_root), steps=args.steps, batch_size=args.batch_size,
                         lr_projector=args.lr_projector, lr_lora=args.lr_lora, warmup=min(args.warmup, args.steps),
                         rank=args.rank, extra_per_type=args.extra_per_type, image_size=args.image_size,
                         seed=args.seed, threads=args.threads, bf16=args.bf16,
                         checkpoint_minutes=args.checkpoint_minutes, max_minutes=args.max_minutes or None,
                         standardise_images=args.standardise_images, ground_images=args.ground_images,
                         ground_steps=args.ground_steps, ground_lr=args.ground_lr,
                         init_weights=None if args.init_weights is None else str(args.init_weights))
    torch.set_num_threads(config.threads)
    folder = ensure_split(config.data_root, config.split, image_size=config.image_size)
    model, processor = load_demo_model(image_size=config.image_size, weights="random")
    examples = pack_split(folder, config.extra_per_type, config.seed)
    start = time.time()
    train_demo(model, processor, examples, folder, config, args.out)
    print(f"trained {config.steps} steps in {time.time() - start:.0f} s; weights: {Path(args.out) / 'demo_weights.safetensors'}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from analysis.demo_model import load_demo_model
    from analysis.shapes import ensure_split

    torch.set_num_threads(args.threads)
    folder = ensure_split(args.data_root, args.split, image_size=args.image_size)
    weights = args.weights if args.weights is not None else "trained"
    model, processor = load_demo_model(image_size=args.image_size, weights=weights)
    result = evaluate_demo(model, processor, folder, args.limit, args.blank_image, args.max_new_tokens)
    result["chance"] = chance_by_type(folder, args.limit)
    result.update({"split": args.split, "weights": str(weights), "threads": args.threads})
    predictions = result.pop("predictions")
    print(json.dumps(result, indent=2))
    if args.output is not None:
        Path(args.output).write_text(json.dumps(result | {"predictions": predictions}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.demo_training {train,eval} ...`` (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.demo_training",
        description="Train the demo LLaVA's projector and LoRA adapters on ShapesVQA, or evaluate weights.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", type=Path, default=Path(".cache/shapesvqa"),
                        help="folder of the ShapesVQA splits (generated there if missing)")
    common.add_argument("--image-size", type=int, default=336, help="image side in pixels (336: 576 image tokens)")
    common.add_argument("--threads", type=int, default=2, help="torch threads")

    train = commands.add_parser("train", parents=[common], help="train, saving weights periodically",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--out", type=Path, required=True, help="run folder: weights, config.json, log.jsonl")
    train.add_argument("--steps", type=int, default=1150)
    train.add_argument("--batch-size", type=int, default=1, help="images per step (each with all its questions)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr-projector", type=float, default=2e-3)
    train.add_argument("--lr-lora", type=float, default=6e-4)
    train.add_argument("--warmup", type=int, default=30)
    train.add_argument("--rank", type=int, default=8, help="LoRA rank; 0 trains the projector only")
    train.add_argument("--extra-per-type", type=int, default=3, help="extra questions per type drawn per train scene")
    train.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast (2.5x slower than fp32 on a CPU without AMX or AVX512-BF16)")
    train.add_argument("--init-weights", type=Path, default=None,
                       help="continue from this weights file (projector and LoRA factors of the same rank)")
    train.add_argument("--standardise-images", type=int, default=16,
                       help="train images whose vision features standardise the projector's start (0: off)")
    train.add_argument("--ground-images", type=int, default=240,
                       help="stage 0: first teach the projector the words of each patch on this many train images")
    train.add_argument("--ground-steps", type=int, default=600)
    train.add_argument("--ground-lr", type=float, default=2e-3)
    train.add_argument("--checkpoint-minutes", type=float, default=5.0)
    train.add_argument("--max-minutes", type=float, default=110.0,
                       help="stop stage 1 after this much wall time (weights saved; the log says how many steps "
                            "ran), so that the whole command stays within 2 hours; 0: no limit")
    train.set_defaults(handler=_train_command)

    evaluate = commands.add_parser("eval", parents=[common], help="accuracy per question type",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--split", default="val", choices=("train", "val", "test"))
    evaluate.add_argument("--limit", type=int, default=None, help="first N images of the split only")
    evaluate.add_argument("--weights", type=Path, default=None, help="weights file (default: the committed ones)")
    evaluate.add_argument("--blank-image", action="store_true", help="replace every image by a white one")
    evaluate.add_argument("--max-new-tokens", type=int, default=4)
    evaluate.add_argument("--output", type=Path, default=None, help="also write the result with predictions (JSON)")
    evaluate.set_defaults(handler=_eval_command)

    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
