"""Train the demo LLaVA (:mod:`analysis.demo.model`) on ShapesVQA (:mod:`analysis.demo.shapes`), and its command line.

Two stages on a CPU budget; the vision tower and the language model stay frozen. Stage 0
(:mod:`analysis.demo.grounding`) standardises the projector and teaches it, by regression on the
train split's scene annotations, to map each image patch to the word embeddings of what covers
it, so that image tokens start out readable by the language model. Stage 1 (:func:`train_demo`)
trains the projector together with small low-rank adapters (:mod:`analysis.demo.lora`) on the
decoder's linear layers, on the questions. The result is one small safetensors file
(:func:`analysis.demo.lora.save_demo_weights`) that :func:`analysis.demo.model.apply_demo_weights`
merges on load, so the loaded model is a stock ``LlavaForConditionalGeneration``.

Training format. Each question about an image is its own single-turn chat, token for token the
prompt :func:`analysis.data.build_prompt` gives at inference, followed by the answer; the loss is
on the answer tokens and the end-of-turn token only (:func:`encode_branches`). The questions of
one image share the prompt up to the image tokens, so that prefix runs once per image and the
questions continue from its key/value cache as one batch (:func:`branched_answer_loss`; equal to
separate forwards, tested). No question sees another's answer: an earlier version packed them
into one multi-turn chat, where later questions were answered by earlier answers and the loss
fell without the image being used. Besides the split's own questions, extra questions about the
same train scenes are drawn with :func:`analysis.demo.shapes.ask` (seeded, :func:`pack_split`).

The ``eval`` command measures weights with :func:`analysis.demo.evaluation.evaluate_demo`.

Command line::

    # train with the settings of the committed weights (weights/MODEL_CARD.md: under 2 hours
    # on 2 cores, capped by --max-minutes; OMP_WAIT_POLICY=PASSIVE avoids a large slow-down when
    # cores are shared)
    OMP_WAIT_POLICY=PASSIVE python -m analysis.demo.training train --out runs/demo-train --seed 0
    # evaluate the committed weights on the first 60 test images, and with a blank image instead
    python -m analysis.demo.training eval --split test --limit 60
    python -m analysis.demo.training eval --split test --limit 60 --blank-image
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.data import load_image, read_questions
from analysis.demo.evaluation import chance_by_type, evaluate_demo
from analysis.demo.grounding import ground_projector, standardise_projector
from analysis.demo.inputs import (
    cache_keyword,
    expand_image_tokens,
    image_features,
    image_seq_length,
    input_embeds,
    pad_token_id,
    tokenize,
)
from analysis.demo.lora import LORA_TARGETS, LoraAdapters, restore_demo_weights, save_demo_weights
from analysis.demo.shapes import QUESTION_TYPES, SCENES_FILE, ask, read_scenes
from analysis.io import atomic_write_text

__all__ = [
    "IGNORE",
    "EncodedImage",
    "PackedExample",
    "TrainConfig",
    "branched_answer_loss",
    "encode_branches",
    "extra_questions",
    "main",
    "pack_split",
    "train_demo",
]

IGNORE = -100
"""The label of tokens without loss (prompt and padding), as ``cross_entropy``'s ``ignore_index``."""


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
    for _category, text, answer in turns:
        messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = tokenize(processor, processor.apply_chat_template(messages, add_generation_prompt=True))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = tokenize(processor, processor.apply_chat_template(messages))
        if full[:len(prompt)] != prompt:
            raise ValueError(f"question {text!r}: the chat template's rendering with the answer does not extend the prompt")
        end = len(full)
        while end > len(prompt) and not processor.tokenizer.decode(full[end - 1:end]).strip():
            end -= 1  # the answer and its end-of-turn token, without the whitespace after it
        full = expand_image_tokens(full[:end], image_token_id, n_image_tokens)
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
# The loss of one image's questions
# --------------------------------------------------------------------------------------------

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
    embeds = input_embeds(model, prefix, features)
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
                            **{cache_keyword(language_model): cache}).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][selected]).float()
    wanted = targets[selected]
    loss = nn.functional.cross_entropy(logits, wanted, reduction="sum")
    return loss, selected.sum(), (logits.argmax(-1) == wanted).detach()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

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


def _set_lr(optimiser: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Set every parameter group's learning rate for ``step`` (its base rate times the schedule)."""
    factor = _lr_factor(step, config)
    for group in optimiser.param_groups:
        group["lr"] = group["base_lr"] * factor
    return factor


def _optimiser(projector: nn.Module, adapters: LoraAdapters | None, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the projector (``lr_projector``) and the adapters (``lr_lora``), no weight decay."""
    groups = [{"params": list(projector.parameters()), "lr": config.lr_projector, "base_lr": config.lr_projector}]
    if adapters is not None:
        groups.append({"params": list(adapters.parameters()), "lr": config.lr_lora, "base_lr": config.lr_lora})
    return torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.999))


def _start_projector(model: nn.Module, processor: Any, examples: Sequence[PackedExample], image_folder: str | Path,
                     config: TrainConfig, adapters: LoraAdapters | None, generator: torch.Generator,
                     out: Path | None, progress: bool) -> None:
    """The start of stage 1: the ``init_weights`` file if given; otherwise the projector is
    standardised on ``standardise_images`` images and then, if ``ground_images``, grounded
    (stage 0; its held-out figures go to ``out/grounding.json``)."""
    if config.init_weights is not None:
        restore_demo_weights(config.init_weights, model, adapters)
        return
    if config.standardise_images <= 0:
        return
    pick = _standardise_pick(len(examples), config, generator)
    sample = torch.cat([image_features(model, processor.image_processor(
        load_image(image_folder, examples[i].image), return_tensors="pt")["pixel_values"]) for i in pick])
    standardise_projector(model, sample)
    if config.ground_images > 0:
        grounded = ground_projector(model, processor, examples, image_folder, read_scenes(image_folder),
                                    config.ground_images, config.ground_steps, config.ground_lr, config.seed,
                                    progress=progress)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "grounding.json", json.dumps(grounded, indent=2) + "\n")


def _standardise_pick(count: int, config: TrainConfig, generator: torch.Generator) -> list[int]:
    """The example indices whose vision features standardise the projector's start."""
    return torch.randperm(count, generator=generator)[:config.standardise_images].tolist()


@dataclass(frozen=True)
class TrainingImages:
    """The train images a run of :func:`train_demo` used, replayed from its config (no training).

    Attributes:
        standardise: the images whose vision features standardised the projector's start.
        grounding: stage 0's images (the last eighth held out from the fit, still read).
        questions: stage 1's images, in the order they were visited (``config.steps *
            config.batch_size`` of them, repeats included if a run visits more than the split).
    """

    standardise: tuple[str, ...]
    grounding: tuple[str, ...]
    questions: tuple[str, ...]

    def all(self) -> set[str]:
        """Every image the run read in any stage."""
        return {*self.standardise, *self.grounding, *self.questions}


def training_images(model: nn.Module, examples: Sequence[PackedExample], config: TrainConfig,
                    scenes: dict[str, Any] | None = None) -> TrainingImages:
    """The images a run of :func:`train_demo` with ``config`` on ``examples`` uses, by drawing the
    same seeded random numbers in the same order (the adapters' initialisation on ``model``, whose
    shapes decide how many numbers that takes, then the standardising pick, then the visit order);
    ``model`` is left unchanged. ``scenes``: the split's scene annotations, for stage 0."""
    from analysis.demo.grounding import grounding_examples

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if config.rank > 0:
        LoraAdapters(model, config.rank, config.alpha, config.targets, generator)  # draws only; never attached
    fresh = config.init_weights is None and config.standardise_images > 0
    pick = _standardise_pick(len(examples), config, generator) if fresh else []
    grounding = fresh and config.ground_images > 0
    grounded = grounding_examples(examples, scenes or {}, config.ground_images, config.seed) if grounding else []
    order = _visit_order(len(examples), config.steps * config.batch_size, generator)[: config.steps * config.batch_size]
    return TrainingImages(tuple(examples[i].image for i in pick), tuple(e.image for e in grounded),
                          tuple(examples[i].image for i in order))


def _visit_order(count: int, needed: int, generator: torch.Generator) -> list[int]:
    """At least ``needed`` example indices: seeded random permutations of ``range(count)``, one after another."""
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return order


def _start_run_folder(out: Path, config: TrainConfig) -> None:
    """Create the run folder with its ``config.json`` and an empty ``log.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    (out / "log.jsonl").write_text("")


@dataclass(frozen=True)
class _TokenIds:
    """The token facts every step needs: the image token, how many it expands to, the pad token."""

    image: int
    image_tokens: int
    pad: int


def _token_ids(model: nn.Module, processor: Any) -> _TokenIds:
    return _TokenIds(int(model.config.image_token_id), image_seq_length(model, processor),
                     pad_token_id(processor.tokenizer))


def _encode_batch(model: nn.Module, processor: Any, batch: Sequence[PackedExample], image_folder: str | Path,
                  ids: _TokenIds) -> list[tuple[EncodedImage, torch.Tensor]]:
    """Each example's branches and its image's vision features."""
    encoded = []
    for example in batch:
        pixels = processor.image_processor(load_image(image_folder, example.image), return_tensors="pt")["pixel_values"]
        encoded.append((encode_branches(processor, example.turns, ids.image, ids.image_tokens),
                        image_features(model, pixels)))
    return encoded


def _train_step(model: nn.Module, encoded: Sequence[tuple[EncodedImage, torch.Tensor]],
                optimiser: torch.optim.Optimizer, autocast: Any, pad: int) -> tuple[float, int, int]:
    """One optimiser step over the images of a batch: gradients accumulated image by image, the
    loss averaged over all their answer tokens. Returns (loss sum, correct tokens, answer tokens)."""
    total_tokens = sum(sum(label != IGNORE for labels in item.labels for label in labels[1:])
                       for item, _ in encoded)
    loss_sum, hits = 0.0, 0
    optimiser.zero_grad(set_to_none=True)
    for item, features in encoded:
        with autocast:
            loss, _, correct = branched_answer_loss(model, item, features, pad)
        (loss / total_tokens).backward()
        loss_sum += float(loss.detach())
        hits += int(correct.sum())
    optimiser.step()
    return loss_sum, hits, total_tokens


def _append_log(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _question_stage(model: nn.Module, processor: Any, examples: Sequence[PackedExample], order: list[int],
                    image_folder: str | Path, config: TrainConfig, optimiser: torch.optim.Optimizer,
                    adapters: LoraAdapters | None, out: Path | None, progress: bool) -> list[dict[str, Any]]:
    """Stage 1: ``config.steps`` steps over the images in ``order``, ``config.batch_size`` per step.

    With ``out``, every step's record is appended to ``out/log.jsonl`` and the weights are saved
    every ``checkpoint_minutes``, at the last step and when ``max_minutes`` have passed (which
    also ends the stage). The adapters, if any, must already be applied. Returns the records.
    """
    from tqdm.auto import tqdm

    ids = _token_ids(model, processor)
    records: list[dict[str, Any]] = []
    last_checkpoint = start = time.time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    model.train(False)  # no dropout in these models, but keep eval-mode semantics
    bar = tqdm(range(config.steps), desc="train", disable=not progress)
    for step in bar:
        factor = _set_lr(optimiser, step, config)
        batch = [examples[i] for i in order[step * config.batch_size:(step + 1) * config.batch_size]]
        loss_sum, hits, total_tokens = _train_step(model, _encode_batch(model, processor, batch, image_folder, ids),
                                                   optimiser, autocast, ids.pad)
        record = {"step": step + 1, "loss": loss_sum / total_tokens, "token_accuracy": hits / total_tokens,
                  "tokens": total_tokens, "lr_factor": factor, "elapsed_s": time.time() - start}
        records.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.2f}")
        if out is not None:
            _append_log(out, record)
        out_of_time = config.max_minutes is not None and time.time() - start > 60 * config.max_minutes
        if out is not None and (time.time() - last_checkpoint > 60 * config.checkpoint_minutes
                                or step + 1 == config.steps or out_of_time):
            save_demo_weights(out / "demo_weights.safetensors", model, adapters,
                              {"config": asdict(config), "steps_done": step + 1, "wall_s": round(time.time() - start, 1)})
            last_checkpoint = time.time()
        if out_of_time:
            break
    return records


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
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # adapters, then standardising, then the order
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    adapters = LoraAdapters(model, config.rank, config.alpha, config.targets, generator) if config.rank > 0 else None
    optimiser = _optimiser(projector, adapters, config)
    out = Path(out_dir) if out_dir is not None else None
    _start_projector(model, processor, examples, image_folder, config, adapters, generator, out, progress)
    order = _visit_order(len(examples), config.steps * config.batch_size, generator)
    if out is not None:
        _start_run_folder(out, config)
    with adapters.applied(model) if adapters is not None else nullcontext():
        records = _question_stage(model, processor, examples, order, image_folder, config, optimiser, adapters,
                                  out, progress)
    projector.requires_grad_(False)
    return adapters, records


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

EXAMPLES = """examples:
  # train as for the committed weights: grounding on 240 images, then 1150 images with their questions
  OMP_WAIT_POLICY=PASSIVE python -m analysis.demo.training train --out runs/demo-train --seed 0
  # the train images the committed weights' run read (the exit gates' data must avoid them)
  python -m analysis.demo.training images --out analysis/demo/weights/training_images.json
  # a quick smoke run
  python -m analysis.demo.training train --out runs/smoke --steps 2 --batch-size 1
  # accuracy of the committed weights on the first 60 test images, then with a blank image
  python -m analysis.demo.training eval --split test --limit 60
  python -m analysis.demo.training eval --split test --limit 60 --blank-image
  # accuracy of a training run's weights
  python -m analysis.demo.training eval --weights runs/demo-train/demo_weights.safetensors
"""


def _config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(data_root=str(args.data_root), steps=args.steps, batch_size=args.batch_size,
                         lr_projector=args.lr_projector, lr_lora=args.lr_lora, warmup=min(args.warmup, args.steps),
                         rank=args.rank, extra_per_type=args.extra_per_type, image_size=args.image_size,
                         seed=args.seed, threads=args.threads, bf16=args.bf16,
                         checkpoint_minutes=args.checkpoint_minutes, max_minutes=args.max_minutes or None,
                         standardise_images=args.standardise_images, ground_images=args.ground_images,
                         ground_steps=args.ground_steps, ground_lr=args.ground_lr,
                       init_weights=None if args.init_weights is None else str(args.init_weights))


def _train_command(args: argparse.Namespace) -> int:
    from analysis.demo.model import load_demo_model
    from analysis.demo.shapes import ensure_split

    config = _config_of(args)
    torch.set_num_threads(config.threads)
    folder = ensure_split(config.data_root, config.split, image_size=config.image_size)
    model, processor = load_demo_model(image_size=config.image_size, weights="random")
    examples = pack_split(folder, config.extra_per_type, config.seed)
    start = time.time()
    train_demo(model, processor, examples, folder, config, args.out)
    print(f"trained {config.steps} steps in {time.time() - start:.0f} s; weights: {Path(args.out) / 'demo_weights.safetensors'}")
    return 0


def _images_command(args: argparse.Namespace) -> int:
    from analysis.demo.model import load_demo_model
    from analysis.demo.shapes import ensure_split

    config = _config_of(args)
    folder = ensure_split(config.data_root, config.split, image_size=config.image_size)
    model, _ = load_demo_model(image_size=config.image_size, weights="random")
    examples = pack_split(folder, config.extra_per_type, config.seed)
    scenes = read_scenes(folder) if config.ground_images > 0 else None
    used = training_images(model, examples, config, scenes)
    record = {"config": asdict(config), "split_images": len(examples), "images_read": len(used.all()),
              "command": "python -m analysis.demo.training images " + " ".join(sys.argv[2:]),
              **{stage: list(getattr(used, stage)) for stage in ("standardise", "grounding", "questions")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"{len(used.all())} of {len(examples)} train images read by a run with this config; listed in {args.out}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from analysis.demo.model import load_demo_model
    from analysis.demo.shapes import ensure_split

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
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(result | {"predictions": predictions}, indent=2) + "\n")
    return 0


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
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


def _add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--split", default="val", choices=("train", "val", "test"))
    evaluate.add_argument("--limit", type=int, default=None, help="first N images of the split only")
    evaluate.add_argument("--weights", type=Path, default=None, help="weights file (default: the committed ones)")
    evaluate.add_argument("--blank-image", action="store_true", help="replace every image by a white one")
    evaluate.add_argument("--max-new-tokens", type=int, default=4)
    evaluate.add_argument("--output", type=Path, default=None, help="also write the result with predictions (JSON)")
    evaluate.set_defaults(handler=_eval_command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.demo.training",
        description="Train the demo LLaVA's projector and LoRA adapters on ShapesVQA, or evaluate weights.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", type=Path, default=Path(".cache/shapesvqa"),
                        help="folder of the ShapesVQA splits (generated there if missing)")
    common.add_argument("--image-size", type=int, default=336, help="image side in pixels (336: 576 image tokens)")
    common.add_argument("--threads", type=int, default=2, help="torch threads")
    _add_train_arguments(commands.add_parser("train", parents=[common], help="train, saving weights periodically",
                                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter))
    _add_eval_arguments(commands.add_parser("eval", parents=[common], help="accuracy per question type",
                                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter))
    images = commands.add_parser("images", parents=[common], epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 help="list the train images a `train` run with these options reads (replayed, no training)")
    _add_train_arguments(images)
    images.set_defaults(handler=_images_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.demo.training {train,eval} ...`` (see ``--help``)."""
    args = _parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
