"""Training the DyVTE gates, the model frozen.

Two schemes, both seeded (all randomness comes from the ``seed`` argument):
- offline (``train_offline``): from the sweep's cached feature shards (``features-*.safetensors``
  written by ``exit.sweep.SweepWriter``), streamed shard by shard; every (sample, layer) pair is a
  training example of that layer's gate; cross-entropy per layer, summed over layers.
- online (``train_online``), the paper's: each step draws one exit layer k for the batch, labels
  the batch at k (full model vs. image removed after k, teacher-forced), and updates gate k only.
Held-out samples (a seeded split by sample id) are never trained on; ``evaluate`` reports each
layer's gate accuracy on them.

Optimiser: AdamW, cosine schedule with linear warm-up (3% of the steps by default), as in the
paper's script.

Data-parallel under torchrun (``torch.distributed`` initialised, gloo on CPU): every process walks
the same seeded order of global batches, computes the loss of its strided part of each batch
(summed, divided by the global batch size) and the gradients are summed over the processes before
each step, which is what one process does with the whole batch (DDP's scheme). The gates stay
identical on every process and equal the single-process gates within float tolerance.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.errors import UsageError
from exit.gates import DyVTEGates, select_features
from exit.sweep import LabelRule, SweepError, feature_shards, read_shard

ProgressFn = Callable[[Iterable], Iterable]


TAU_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
"""The thresholds :func:`evaluate_examples` replays DyVTE at on held-out samples."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (paper: lr 4e-5 in the text, 6e-5 in the script; 1 epoch; 3% warm-up)."""

    lr: float = 6e-5
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 128
    warmup_fraction: float = 0.03
    holdout_fraction: float = 0.2
    seed: int = 0
    label_rule: str = "cached"
    """Which labels to learn: "cached" (the sweep's own ``label``, its ``--min-agreement`` /
    ``--max-ce-ratio`` rule) or a rule of ``exit.frontier.LABEL_RULES`` computed from the sweep's
    tables ("answer" needs ``--answers``), optionally made monotone ("answer,monotone": safe from
    this layer on)."""


@dataclass
class TrainReport:
    """What training did and how well each layer's gate does on the held-out samples.

    Attributes:
        steps: optimiser steps taken. train_examples / heldout_samples: counts.
        layer_accuracy: per layer, accuracy on held-out samples (None: no held-out sample).
        layer_positive_rate: per layer, the fraction of held-out labels that say "exit".
        losses: mean training loss per step.
        tau_curve: DyVTE replayed on the held-out samples for each threshold of ``TAU_GRID`` (the
            gates asked after layers 0..L-2 until one fires, as in ``exit.gates.dyvte_exit``): per
            tau, ``exited_share``, ``mean_exit_layer`` (no exit counts as L - 1) and
            ``unsafe_share``, the share of samples that exit after a layer labelled unsafe. A
            way to choose tau on held-out training data instead of the test split.
    """

    steps: int = 0
    train_examples: int = 0
    heldout_samples: int = 0
    layer_accuracy: list[float | None] = field(default_factory=list)
    layer_positive_rate: list[float | None] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tau_curve: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def is_heldout(sample_id: str, fraction: float, seed: int) -> bool:
    """Seeded, order-independent split: a sample is held out iff its hash falls below ``fraction``."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_gradients(module: nn.Module) -> None:
    """Sum every parameter's gradient over the torch.distributed group (no-op outside one), in one
    all-reduce of a flat buffer.

    A parameter without a gradient on every process keeps none (so AdamW skips it, as it does in a
    single process); one with a gradient on some process gets zeros where it had none.
    """
    import torch.distributed as dist

    if _rank_world()[1] == 1:
        return
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        return
    device = parameters[0].device
    has_grad = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    dist.all_reduce(has_grad)
    active = [p for p, flag in zip(parameters, has_grad.tolist()) if flag > 0]
    if not active:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active])
    dist.all_reduce(flat)
    offset = 0
    for parameter in active:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).clone()
        offset += size


def _all_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if _rank_world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _split(folder: str | Path, settings: TrainSettings, heldout: bool,
           gates: DyVTEGates | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of each shard's training (or held-out) samples; with ``gates``, the
    features are those gates' inputs (taken out of cached "both" features if needed)."""
    relabelled = None if settings.label_rule == "cached" else rule_labels(folder, settings.label_rule)
    for path in feature_shards(folder):
        features, labels, ids, kind = read_shard(path)
        if relabelled is not None:
            known = [i in relabelled for i in ids]
            features, ids = features[torch.tensor(known, dtype=torch.bool)], [i for i in ids if i in relabelled]
            labels = torch.stack([relabelled[i] for i in ids]) if ids else labels[:0]
        keep = torch.tensor([is_heldout(i, settings.holdout_fraction, settings.seed) == heldout for i in ids], dtype=torch.bool)
        if bool(keep.any()):
            if gates is not None:
                features = select_features(features, kind, gates.config.inputs, gates.signature)
            yield features[keep], labels[keep]


@functools.lru_cache(maxsize=4)
def rule_labels(folder: str | Path, rule: str) -> dict[str, torch.Tensor]:
    """Per sample id, (layers,) int64 labels of ``rule`` ("NAME" or "NAME,monotone", NAME in
    ``exit.frontier.LABEL_RULES``) from a sweep folder's ``exit_sweep`` table, joined with its
    ``exit_answers`` table where the folder has one (``sweep --answers N``). The teacher-forced
    rules (paper, agreement, ce+D) need only the sweep, so a labels-only sweep, which costs about
    two thirds of an exit table, is enough to train on them.

    Raises:
        UsageError: an unknown rule, or a rule that needs the generated answers on a folder without them.
    """
    from analysis.schema import EXIT_ANSWERS
    from exit.frontier import ANSWER_LABEL_RULES, LABEL_RULES, join_exit_tables, monotone
    from exit.sweep import read_exit_answers, read_sweep

    name, _, flag = rule.partition(",")
    if name not in LABEL_RULES or flag not in ("", "monotone"):
        raise UsageError(f"expected a label rule 'cached' or one of {sorted(LABEL_RULES)} (optionally ',monotone'), "
                         f"found {rule!r}")
    sweep = read_sweep(folder)
    if any(Path(folder).glob(f"{EXIT_ANSWERS.name}-*.parquet")):
        frame = join_exit_tables(sweep, read_exit_answers(folder))
    elif name in ANSWER_LABEL_RULES:
        raise UsageError(f"expected an exit table (dyvte-exit sweep --answers N) in {folder} for label rule {name!r}, "
                         f"found only the teacher-forced sweep; use a rule of "
                         f"{sorted(set(LABEL_RULES) - set(ANSWER_LABEL_RULES))} or sweep with --answers")
    else:
        frame = sweep
    labels = LABEL_RULES[name](frame)
    labels = pd.Series(np.asarray(labels, dtype=bool), index=pd.MultiIndex.from_frame(frame[["sample_id", "layer"]]))
    if flag:
        labels = monotone(labels)
    table = labels.unstack("layer").sort_index(axis=1)
    return {str(i): torch.tensor(row.to_numpy(dtype=np.int64)) for i, row in table.iterrows()}


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def offline_plan(folder: str | Path, settings: TrainSettings = TrainSettings()) -> tuple[int, int]:
    """(training samples, optimiser steps) that :func:`train_offline` would take on ``folder``.

    Raises:
        SweepError: no training samples are left after the hold-out.
    """
    examples = sum(int(f.shape[0]) for f, _ in _split(folder, settings, heldout=False))
    if examples == 0:
        raise SweepError(f"expected training samples in {folder} after holding out {settings.holdout_fraction:.0%}, found none")
    return examples, math.ceil(examples / settings.batch_size) * settings.epochs


def train_offline(
    gates: DyVTEGates, folder: str | Path, settings: TrainSettings = TrainSettings(), progress: ProgressFn | None = None
) -> TrainReport:
    """Train ``gates`` in place on the cached features of a sweep folder; report held-out accuracy.

    Raises:
        FileNotFoundError: no feature shards. SweepError: the shards' features do not fit the gates.
    """
    kind = read_shard(feature_shards(folder)[0])[3]
    if kind not in (gates.config.inputs, "both"):
        raise SweepError(f"expected features of kind {gates.config.inputs!r} (or 'both') for these gates, "
                         f"found {kind!r} in {folder}")
    examples, total = offline_plan(folder, settings)
    if gates.config.shared:  # the shared gate's standardisation: the training rows' mean and deviation
        gates.fit_input_scale(features for features, _ in _split(folder, settings, heldout=False, gates=gates))
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _schedule(optimizer, total, settings.warmup_fraction)
    report = TrainReport(train_examples=examples)
    gates.train()
    epochs: Iterable[int] = range(settings.epochs)
    for _ in progress(epochs) if progress else epochs:
        # Stream shards; shuffle within a buffer of up to batch_size * 8 samples.
        buffer_f: list[torch.Tensor] = []
        buffer_l: list[torch.Tensor] = []
        for features, labels in _split(folder, settings, heldout=False, gates=gates):
            buffer_f.append(features)
            buffer_l.append(labels)
            if sum(len(b) for b in buffer_f) >= settings.batch_size * 8:
                _train_buffer(gates, optimizer, scheduler, buffer_f, buffer_l, settings, generator, report, final=False)
        _train_buffer(gates, optimizer, scheduler, buffer_f, buffer_l, settings, generator, report, final=True)
    gates.eval()
    evaluate(gates, folder, settings, report)
    return report


def _train_buffer(
    gates: DyVTEGates,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    buffer_f: list[torch.Tensor],
    buffer_l: list[torch.Tensor],
    settings: TrainSettings,
    generator: torch.Generator,
    report: TrainReport,
    final: bool,
) -> None:
    if not buffer_f:
        return
    features, labels = torch.cat(buffer_f), torch.cat(buffer_l)
    buffer_f.clear()
    buffer_l.clear()
    order = torch.randperm(len(features), generator=generator)
    stop = len(order) if final else len(order) - len(order) % settings.batch_size
    rank, world = _rank_world()
    for start in range(0, stop, settings.batch_size):
        index = order[start : start + settings.batch_size]
        local = index[rank::world]  # this process's part of the global batch
        loss = sum(
            nn.functional.cross_entropy(gates(layer, features[local, layer]), labels[local, layer], reduction="sum")
            for layer in range(features.shape[1])
        ) / (features.shape[1] * len(index))
        optimizer.zero_grad()
        loss.backward()
        all_reduce_gradients(gates)
        optimizer.step()
        scheduler.step()
        report.steps += 1
        report.losses.append(_all_sum([float(loss.detach())])[0])
    if stop < len(order):  # carry the remainder into the next buffer
        buffer_f.append(features[order[stop:]])
        buffer_l.append(labels[order[stop:]])


def evaluate(gates: DyVTEGates, folder: str | Path, settings: TrainSettings, report: TrainReport | None = None) -> TrainReport:
    """Per-layer accuracy of the gates (p(exit) > tau) on the held-out samples of a sweep folder."""
    return evaluate_examples(gates, _split(folder, settings, heldout=True, gates=gates), report)


def evaluate_examples(
    gates: DyVTEGates,
    examples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    report: TrainReport | None = None,
    reduce: bool = False,
) -> TrainReport:
    """Per-layer accuracy of the gates on (features (batch, layers, F), labels (batch, layers)) pairs.

    ``reduce=True``: each process saw a different part of the examples (torchrun); the counts are
    summed over the processes so every process reports the accuracy on all of them.
    """
    report = report or TrainReport()
    layers = gates.signature.num_layers
    correct = torch.zeros(layers)
    positive = torch.zeros(layers)
    replay = torch.zeros(len(TAU_GRID), 3)  # per tau: exits, sum of exit layers, unsafe exits
    count = 0
    with torch.no_grad():
        for features, labels in examples:
            labels = labels.long().cpu()
            count += len(features)
            p_exit = torch.stack([gates.p_exit(layer, features[:, layer]).cpu() for layer in range(layers)], dim=1)
            fires = p_exit > gates.config.tau
            correct += (fires.long() == labels).sum(dim=0)
            positive += labels.sum(dim=0)
            for index, tau in enumerate(TAU_GRID):
                replay[index] += _replay_dyvte(p_exit, labels, tau)
    if reduce:
        totals = _all_sum([*correct.tolist(), *positive.tolist(), *replay.flatten().tolist(), float(count)])
        correct, positive = torch.tensor(totals[:layers]), torch.tensor(totals[layers : 2 * layers])
        replay = torch.tensor(totals[2 * layers : -1]).view(len(TAU_GRID), 3)
        count = int(totals[-1])
    report.heldout_samples = count
    report.layer_accuracy = [float(c / count) if count else None for c in correct]
    report.layer_positive_rate = [float(p / count) if count else None for p in positive]
    report.tau_curve = [
        {"tau": tau, "exited_share": float(exits / count), "mean_exit_layer": float(layer_sum / count),
         "unsafe_share": float(unsafe / count)}
        for tau, (exits, layer_sum, unsafe) in zip(TAU_GRID, replay) if count
    ]
    return report


def _replay_dyvte(p_exit: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """(exits, sum of exit layers, unsafe exits) of DyVTE at ``tau`` on rows of per-layer p(exit)."""
    last = p_exit.shape[1] - 1
    fires = p_exit[:, :last] > tau  # the last layer is never asked: exiting after it changes nothing
    exited = fires.any(dim=1)
    first = torch.where(exited, fires.long().argmax(dim=1), torch.full_like(exited, last, dtype=torch.long))
    unsafe = exited & (labels.gather(1, first[:, None])[:, 0] == 0)
    return torch.tensor([float(exited.sum()), float(first.sum()), float(unsafe.sum())])


def online_step(
    gates: DyVTEGates,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, torch.Tensor],
    answer_mask: torch.Tensor,
    generator: torch.Generator,
    rule: LabelRule = LabelRule(),
) -> tuple[int, float]:
    """One step of the paper's online scheme: draw a layer k, label the batch at k, update gate k.

    Returns (k, loss). The model is frozen (no gradient reaches it). Under torchrun each process
    passes its part of the global batch (possibly empty) and the gradients are summed over them.
    """
    from exit.sweep import exit_labels_at

    layer = int(torch.randint(gates.signature.num_layers, (1,), generator=generator))
    rows = int(answer_mask.shape[0])
    global_rows = int(_all_sum([float(rows)])[0])
    optimizer.zero_grad()
    if rows:
        features, labels = exit_labels_at(model, inputs, answer_mask, layer, gates.config.inputs, rule)
        loss = nn.functional.cross_entropy(gates(layer, features), labels.long().to(features.device), reduction="sum")
        loss = loss / global_rows
        loss.backward()
        value = float(loss.detach())
    else:  # this process got no part of a batch smaller than the group
        value = 0.0
    all_reduce_gradients(gates)
    optimizer.step()
    return layer, _all_sum([value])[0]


def train_online(
    gates: DyVTEGates,
    model: nn.Module,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    settings: TrainSettings = TrainSettings(),
    steps: int | None = None,
    progress: ProgressFn | None = None,
    rule: LabelRule = LabelRule(),
) -> TrainReport:
    """The online scheme over ``batches`` of (teacher-forced inputs, answer mask); gates trained in place.

    The learning rate follows the cosine schedule over ``steps`` (or ``len(batches)``) when known.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total = steps if steps is not None else (len(batches) if hasattr(batches, "__len__") else None)  # type: ignore[arg-type]
    scheduler = _schedule(optimizer, total, settings.warmup_fraction) if total else None
    report = TrainReport()
    gates.train()
    iterator: Iterable = batches if progress is None else progress(batches)
    for inputs, answer_mask in iterator:
        if steps is not None and report.steps >= steps:
            break
        _, loss = online_step(gates, model, optimizer, inputs, answer_mask, generator, rule)
        if scheduler is not None:
            scheduler.step()
        report.steps += 1
        report.train_examples += int(_all_sum([float(answer_mask.shape[0])])[0])
        report.losses.append(loss)
    gates.eval()
    return report


def train_online_on_questions(
    gates: DyVTEGates,
    model: nn.Module,
    processor: Any,
    questions: Sequence[Any],
    image_folder: str | Path,
    settings: TrainSettings = TrainSettings(),
    rule: LabelRule = LabelRule(),
    progress: ProgressFn | None = None,
) -> TrainReport:
    """The online scheme on a question file's samples (reference answers teacher-forced).

    Samples are split by ``is_heldout``; the training ones are shuffled (seeded) each epoch and
    batched; afterwards every held-out sample is swept over all layers and each gate's accuracy
    is reported.
    """
    train = [q for q in questions if not is_heldout(q.question_id, settings.holdout_fraction, settings.seed)]
    heldout = [q for q in questions if is_heldout(q.question_id, settings.holdout_fraction, settings.seed)]
    if not train:
        raise SweepError(f"expected training samples after holding out {settings.holdout_fraction:.0%}, found none")
    missing = [q.question_id for q in questions if not q.answer]
    if missing:
        raise SweepError(f"expected a reference answer for every question, found none for {missing[:5]}")
    prepare = _TeacherForcedBatches(model, processor, image_folder, _global_batches(train, settings))
    report = train_online(gates, model, prepare, settings, progress=progress, rule=rule)
    rank, world = _rank_world()
    swept = _swept_heldout(model, prepare, heldout[rank::world], settings.batch_size, rule, gates.config.inputs)
    return evaluate_examples(gates, swept, report, reduce=world > 1)


def _global_batches(train: Sequence[Any], settings: TrainSettings) -> list[list[Any]]:
    """This process's part of every training batch: every process walks the same seeded global
    batches (shuffled each epoch) and labels its strided part of each."""
    generator = torch.Generator().manual_seed(settings.seed)
    order = [i for _ in range(settings.epochs) for i in torch.randperm(len(train), generator=generator).tolist()]
    rank, world = _rank_world()
    return [[train[i] for i in order[s : s + settings.batch_size]][rank::world]
            for s in range(0, len(order), settings.batch_size)]


class _TeacherForcedBatches:
    """Batches of questions as (teacher-forced inputs on the model's device, answer mask), made
    when iterated; ``len`` is the number of batches (for the learning-rate schedule)."""

    def __init__(self, model: nn.Module, processor: Any, image_folder: str | Path, batches: list[list[Any]]) -> None:
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.processor = processor
        self.image_folder = image_folder
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return (self.prepared(batch) for batch in self.batches)

    def prepared(self, batch: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batch of questions as model inputs (prompt + reference answer) and its answer mask."""
        from analysis.data import build_prompt, load_image
        from exit.sweep import teacher_forced_inputs

        if not batch:
            return {}, torch.zeros(0, 0, dtype=torch.bool)
        prompts = [build_prompt(self.processor, q) for q in batch]
        images = [[load_image(self.image_folder, name) for name in q.images] for q in batch]
        inputs, answer_mask = teacher_forced_inputs(self.processor, prompts, images, [str(q.answer) for q in batch])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, answer_mask


def _swept_heldout(
    model: nn.Module, prepare: _TeacherForcedBatches, heldout: Sequence[Any], batch_size: int, rule: LabelRule, kind: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of the held-out questions, swept over all layers batch by batch."""
    from exit.sweep import exit_sweep

    for start in range(0, len(heldout), batch_size):
        inputs, answer_mask = prepare.prepared(heldout[start : start + batch_size])
        result = exit_sweep(model, inputs, answer_mask, rule=rule, features=kind)
        assert result.features is not None
        yield result.features, result.label


__all__ = [
    "TAU_GRID",
    "TrainReport",
    "all_reduce_gradients",
    "TrainSettings",
    "evaluate",
    "evaluate_examples",
    "feature_shards",
    "is_heldout",
    "online_step",
    "read_shard",
    "train_offline",
    "train_online",
    "train_online_on_questions",
]
