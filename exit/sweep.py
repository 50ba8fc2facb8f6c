"""Exit labels per (sample, layer): the exit sweep, and its parquet table.

For every sample and every decoder layer k, the model with the image tokens removed after k is
compared with the full model, teacher-forced on the reference answer:
  agreement = fraction of answer tokens whose argmax prediction is the same in both;
  ce_ratio  = answer cross-entropy with exit after k / answer cross-entropy of the full model;
  label     = agreement > 0.99 and ce_ratio < 1.03 (``LabelRule``).
At k = L-1 both are the same model, so the label is always 1.

Cost: the full model runs once; each layer's output states at the non-image tokens are kept, and
the exit branch for k runs only those tokens through layers k+1..L-1 (all branches that are
active at a layer go through it as one batch). The branch is exactly the surgery of
``exit.surgery`` (non-image tokens right-aligned, original positions, padding masked): each
layer after the exit gets its own inputs of the full forward gathered at the kept tokens, its
4-D mask (padding, causal, and what the family adds: Gemma3's sliding window counted in prompt
columns) and its cos/sin (Gemma3's local RoPE base on sliding layers, M-RoPE folded in), and
removing the image tokens after k is exactly masking them (tests/test_exit_surgery.py,
tests/test_families.py). A recurrent layer (Qwen3.5's Gated DeltaNet) gets the 2-D padding mask of
the kept slots, as in the surgery: the branch is the removal itself, which masking is not for it
(tests/test_recurrent_families.py). Per-token layer inputs (Gemma4's per-layer embeddings) are gathered at
the kept tokens too, and a KV-reusing layer (Gemma4) reads in branch k what the surgery gives it:
its source layer's keys and values of the full forward at the kept tokens where the source is at or
before k, the branch's own where it is after k (``_SharedKeys``). Logits follow the model's own head,
final soft-capping included.

The sweep is also an analysis result: ``sweep_table`` follows the conventions of
``analysis.schema`` (columns with dtypes and units, ``dyvte.table`` = "exit_sweep", a schema
version and provenance in the parquet metadata) and ``SweepWriter`` streams it to shards. With
``features=...`` the per-layer gate features of the same forward are returned too, and the
writer caches them (with the labels) as safetensors shards for ``exit.train``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.errors import DyVTEError
from analysis.hooks import Hook, attached
from analysis.io import AtomicFile, ParquetShard, parse_shard_file, read_table, shard_file_name, signals_held
from analysis.layout import IMAGE, PADDING, TokenLayout, token_layout
from analysis.schema import EXIT_ANSWERS, EXIT_SWEEP, SchemaError, validate_arrow_schema
from exit.answers import CacheBuffers, answers_table, check_answerable, exit_answer_ids, generation_position_ids
from exit.flops import DecoderShape
from exit.gates import GATE_INPUTS, GateFeatureBuilder, ModelSignature, gate_features, gate_recording
from exit.surgery import CompactLayout, attention_mask_for_keys, compact_layout

SWEEP_TABLE = EXIT_SWEEP.name
SWEEP_SCHEMA_VERSION = EXIT_SWEEP.version
SWEEP_COLUMNS = EXIT_SWEEP.columns
FEATURES_PREFIX = "features"


class SweepError(DyVTEError, ValueError):
    """The sweep's inputs do not describe a teacher-forced answer after an image prompt."""


@dataclass(frozen=True)
class LabelRule:
    """When exiting after a layer counts as safe (the paper's thresholds by default)."""

    min_agreement: float = 0.99
    max_ce_ratio: float = 1.03

    def label(self, agreement: torch.Tensor, ce_ratio: torch.Tensor) -> torch.Tensor:
        return (agreement > self.min_agreement) & (ce_ratio < self.max_ce_ratio)


@dataclass
class SweepResult:
    """The sweep of one batch; every tensor is (batch, layers) unless noted.

    Attributes:
        features: (batch, layers, features) float32 gate features of the full forward, or None.
        features_kind: which gate input the features are ("hidden", "attention", "both") or None.
    """

    agreement: torch.Tensor
    ce_exit: torch.Tensor
    ce_full: torch.Tensor  # (batch,)
    ce_ratio: torch.Tensor
    label: torch.Tensor
    n_answer: torch.Tensor  # (batch,)
    n_image: torch.Tensor  # (batch,)
    n_kept: torch.Tensor  # (batch,)
    rule: LabelRule
    features: torch.Tensor | None = None
    features_kind: str | None = None
    answer_ids: torch.Tensor | None = None  # (batch, layers, max_new_tokens) greedy answers, pad-filled

    @property
    def num_layers(self) -> int:
        return int(self.agreement.shape[1])


PER_TOKEN_INPUTS: dict[str, str] = {
    "input_ids": "the answer's ids",
    "attention_mask": "1",
    "token_type_ids": "0 (text)",
    "mm_token_type_ids": "0 (text)",
}
"""Processor outputs with one entry per token, and what the appended answer tokens get; every other
output (pixels, grids, image sizes, pixel masks) belongs to the images and is kept as it is."""


def teacher_forced_inputs(
    processor: Any, prompts: list[str], images: list[list[Any]], answers: list[str], append_eos: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Prompt + reference answer per row, left-padded, and the (batch, seq) bool mask of answer tokens.

    The prompts go through the processor as one batch, each with its own images (so the image
    placeholders, their expansion and every image-side input are the processor's, as in
    ``analysis.data.encode_questions``); the answer is tokenized on its own (no special tokens) and
    appended to each row's real tokens, with the tokenizer's eos if asked, so the answer tokens are
    exactly known. The per-token outputs (:data:`PER_TOKEN_INPUTS`) are padded on the left again.
    """
    if not len(prompts) == len(images) == len(answers):
        raise SweepError(
            f"expected as many prompts, image lists and answers, found {len(prompts)}, {len(images)}, {len(answers)}"
        )
    tokenizer = processor.tokenizer
    encoded = processor(images=[list(row) for row in images], text=list(prompts), padding=True, padding_side="left",
                        return_tensors="pt")
    answer_rows = []
    for answer in answers:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            answer_ids = [*answer_ids, tokenizer.eos_token_id]
        if not answer_ids:
            raise SweepError(f"expected a non-empty reference answer, found {answer!r}")
        answer_rows.append(torch.tensor(answer_ids, dtype=torch.long))
    real = encoded["attention_mask"].bool()
    length = max(int(real[row].sum()) + len(ids) for row, ids in enumerate(answer_rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = {key: value for key, value in encoded.items() if key not in PER_TOKEN_INPUTS}
    for key in (k for k in PER_TOKEN_INPUTS if k in encoded):
        padded = torch.full((len(answer_rows), length), pad if key == "input_ids" else 0, dtype=encoded[key].dtype)
        for row, answer_ids in enumerate(answer_rows):
            tail = {"input_ids": answer_ids, "attention_mask": torch.ones_like(answer_ids)}.get(key, torch.zeros_like(answer_ids))
            ids = torch.cat([encoded[key][row][real[row]], tail.to(padded.dtype)])
            padded[row, length - len(ids) :] = ids
        inputs[key] = padded
    answer_mask = torch.zeros(len(answer_rows), length, dtype=torch.bool)
    for row, answer_ids in enumerate(answer_rows):
        answer_mask[row, length - len(answer_ids) :] = True
    return inputs, answer_mask


def prompt_layout(layout: TokenLayout, answer_mask: torch.Tensor) -> TokenLayout:
    """The layout of the prompt alone inside a teacher-forced sequence: answer tokens belong to no
    group and ``last`` is the last prompt token. By causality, statistics and states recorded with
    it over prompt + answer equal those of a prompt-only forward, which is what the gates see at
    inference."""
    answer_mask = answer_mask.to(layout.group.device)
    positions = torch.arange(layout.seq_len, device=layout.group.device).expand_as(layout.group)
    first_answer = torch.where(answer_mask, positions, layout.seq_len).min(dim=1).values
    group = torch.where(answer_mask, PADDING, layout.group)
    return TokenLayout(group=group, last_index=first_answer - 1, image_token_id=layout.image_token_id)


@dataclass
class _AnswerTokens:
    """Where the answer tokens of a teacher-forced batch are, for the logits that predict them.

    Attributes:
        rows: (n_answer_tokens,) batch row of each answer token.
        predict_slots: (n_answer_tokens,) slot, in the compacted (non-image) stream, of the token
            that predicts it (the one before it).
        targets: (n_answer_tokens,) the answer token ids.
    """

    rows: torch.Tensor
    predict_slots: torch.Tensor
    targets: torch.Tensor


def exit_sweep(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    answer_mask: torch.Tensor,
    *,
    rule: LabelRule = LabelRule(),
    features: str | None = None,
    adapter: ModelAdapter | None = None,
    answers: int = 0,
    answer_buffers: CacheBuffers | None = None,
) -> SweepResult:
    """Exit statistics and labels for every row of ``inputs`` and every decoder layer.

    Args:
        model: a supported image-text model (eager or SDPA attention), frozen.
        inputs: model inputs (input_ids, attention_mask, pixel_values, ...) of prompt + answer.
        answer_mask: (batch, seq) bool, True at the reference answer's tokens (teacher-forced).
        rule: the label thresholds.
        features: also return the gate features of the full forward ("hidden", "attention", "both"),
            computed over the prompt only (``prompt_layout``), as the gates see it at inference.
        answers: also generate, for every exit layer, up to this many greedy answer tokens from
            the same pass (``exit.answers``; 0: none). The full forward then gets the position ids
            generate() gives the left-padded prompts. ``answer_buffers``: storage for the decoding
            cache, reused across calls (``exit.answers.CacheBuffers``).

    Raises:
        SweepError: an answer token is an image token or padding, or a row has no answer token.
        ExitAnswersError: answers were asked of a family the exit table cannot decode.
    """
    adapter = adapter or resolve_adapter(model)
    if features is not None and features not in GATE_INPUTS:
        raise SweepError(f"expected features to be one of {list(GATE_INPUTS)} or None, found {features!r}")
    device = next(model.parameters()).device
    layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    answer_mask = _checked_answer_mask(layout, answer_mask)
    keep = (layout.group != PADDING) & (layout.group != IMAGE)
    compact = compact_layout(keep.to(device))
    answer = _answer_tokens(compact, answer_mask.to(device), inputs["input_ids"].to(device))
    prompt = None if features is None else prompt_layout(layout, answer_mask)
    extra, branch_cache = None, None
    if answers > 0:
        check_answerable(adapter, model.config)
        extra = {"use_cache": True, "position_ids": generation_position_ids(layout.group != PADDING).to(device)}
        branch_cache = {}
    states, inputs_of, records, cache = _full_forward(model, inputs, compact, adapter, features, prompt, extra)
    with torch.no_grad():
        logits = _exit_logits(model, adapter, states, inputs_of, answer, layout.batch_size, branch_cache)
        agreement, ce_exit, ce_full, counts = answer_metrics(logits[-1], logits, answer.targets, answer.rows, layout.batch_size)
    ce_ratio = ce_exit / ce_full.clamp_min(1e-12)[:, None]
    gate_inputs = None
    if features is not None:
        features_of = GateFeatureBuilder(features, ModelSignature.of(model))
        gate_inputs = torch.stack([features_of(record) for record in records], dim=1).cpu()
    answer_ids = None
    if branch_cache is not None:
        answer_ids = exit_answer_ids(model, layout, answer_mask, inputs["input_ids"].to(device), compact, cache,
                                     branch_cache, answers, adapter, answer_buffers)
    return SweepResult(
        agreement=agreement.cpu(),
        ce_exit=ce_exit.cpu(),
        ce_full=ce_full.cpu(),
        ce_ratio=ce_ratio.cpu(),
        label=rule.label(agreement, ce_ratio).cpu(),
        n_answer=counts.long().cpu(),
        n_image=(layout.group == IMAGE).sum(1).cpu(),
        n_kept=keep.sum(1).cpu(),
        rule=rule,
        features=gate_inputs,
        features_kind=features,
        answer_ids=answer_ids,
    )


def _checked_answer_mask(layout: TokenLayout, answer_mask: torch.Tensor) -> torch.Tensor:
    """``answer_mask`` as bool on the layout's device, checked to mark each row's last real,
    non-image tokens (the whole answer after the prompt).

    Raises:
        SweepError: the mask has another shape, marks padding or image tokens, leaves a row
            without an answer token, or is not each row's tail.
    """
    group = layout.group
    answer_mask = answer_mask.to(group.device).bool()
    if answer_mask.shape != group.shape:
        raise SweepError(f"expected an answer mask of shape {tuple(group.shape)}, found {tuple(answer_mask.shape)}")
    keep = (group != PADDING) & (group != IMAGE)
    if bool((answer_mask & ~keep).any()):
        raise SweepError("expected answer tokens to be real, non-image tokens, found padding or image positions marked")
    if not bool(answer_mask.any(dim=1).all()):
        empty = (~answer_mask.any(1)).nonzero().flatten().tolist()
        raise SweepError(f"expected at least one answer token in every row, found rows {empty} without")
    positions = torch.arange(layout.seq_len, device=group.device).expand_as(group)
    first_answer = torch.where(answer_mask, positions, layout.seq_len).min(dim=1).values
    if not torch.equal(answer_mask, (positions >= first_answer[:, None]) & (group != PADDING)):
        raise SweepError("expected each row's answer to be its last real tokens (prompt, then the whole answer)")
    return answer_mask


def _answer_tokens(compact: CompactLayout, answer_mask: torch.Tensor, input_ids: torch.Tensor) -> _AnswerTokens:
    """The answer tokens of ``answer_mask`` (on the compact layout's device) and their predicting slots.

    Raises:
        SweepError: an answer token does not follow a real non-image token.
    """
    slot_of = torch.full(answer_mask.shape, -1, dtype=torch.long, device=compact.index.device)
    rows, slots = compact.valid.nonzero(as_tuple=True)
    slot_of[rows, compact.index[rows, slots]] = slots
    answer_rows, answer_positions = answer_mask.nonzero(as_tuple=True)
    predict_slots = slot_of[answer_rows, answer_positions - 1]
    if bool((answer_positions == 0).any()) or bool((predict_slots < 0).any()):
        raise SweepError("expected every answer token to follow a real non-image token (the one that predicts it)")
    return _AnswerTokens(rows=answer_rows, predict_slots=predict_slots, targets=input_ids[answer_rows, answer_positions])


def _full_forward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    compact: CompactLayout,
    adapter: ModelAdapter,
    features: str | None,
    prompt: TokenLayout | None,
    extra: dict[str, Any] | None = None,
) -> tuple[list[torch.Tensor | None], _KeptLayerInputs, list[Any], Any]:
    """Run the full model once; return each layer's output states at the kept tokens (compacted),
    each layer's own inputs gathered there (``_KeptLayerInputs``), with ``features`` the gate
    recorder's records over the ``prompt`` layout, and the forward's KV cache when ``extra``
    (more forward arguments) asks for one (``use_cache=True``), else None."""
    paths = adapter.layer_paths(model)
    states: list[torch.Tensor | None] = [None] * len(paths)
    inputs_of = _KeptLayerInputs(compact, adapter.text_config(model), frozenset(adapter.recurrent_layers(model)))
    token_inputs = adapter.layer_token_positions(model)
    shared = _SharedKeys(adapter, model, compact)

    def keep_inputs(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs_of.keep(layer, kwargs, hidden.dtype)
            inputs_of.keep_tokens(layer, {name: args[i] if i < len(args) else kwargs.get(name)
                                          for name, i in token_inputs.items()})

        return hook

    def keep_shared(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            shared.keep_full(layer, kwargs)

        return hook

    def keep_state(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            states[layer] = compact.gather(hidden.detach())

        return hook

    # Layer 0 never runs a branch: every branch starts after it.
    hooks = [Hook(path, keep_inputs(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > 0]
    hooks += [Hook(path, keep_state(i)) for i, path in enumerate(paths)]
    hooks += [Hook(paths[i], keep_shared(i), with_kwargs=True) for i in sorted(set(shared.sources.values()))]
    hooks += adapter.whole_stream_hooks()  # logits_to_keep=1 must not cut the KV-shared layers to one query
    records: list[Any] = []
    extra = extra or {"use_cache": False}
    with torch.no_grad(), attached(model, hooks):
        if features is None or prompt is None:
            output = model(**inputs, **extra, logits_to_keep=1)
        else:
            with gate_recording(model, prompt, features, adapter=adapter) as recording:
                output = model(**inputs, **extra, logits_to_keep=1)
            records = recording.records
    inputs_of.forward_done()
    inputs_of.shared = shared
    return states, inputs_of, records, output.get("cache") if extra.get("use_cache") else None


def _exit_logits(
    model: nn.Module,
    adapter: ModelAdapter,
    states: list[torch.Tensor | None],
    inputs_of: _KeptLayerInputs,
    answer: _AnswerTokens,
    batch: int,
    branch_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> list[torch.Tensor]:
    """(n_answer_tokens, vocab) float32 logits at the answer tokens for the exit after each layer
    k (the last entry: the full model, which the exit after the last layer is).

    The branch that exits after k runs the kept tokens' states from layer k through layers
    k+1..L-1; all branches active at a layer go through it as one batch. ``states`` is consumed.
    With ``branch_cache`` (a dict), each layer's keys and values of the branches are kept in it:
    ``branch_cache[layer][k]`` = (keys, values) of the branch that exited after k, over the
    compacted slots.
    """
    layers = adapter.decoder_layers(model)
    num_layers = len(layers)
    norm, head = adapter.final_norm(model), model.get_output_embeddings()
    # Gemma-style heads squash the logits: cap * tanh(logits / cap), as the model's forward does.
    cap = getattr(adapter.text_config(model), "final_logit_softcapping", None)

    def answer_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(norm(hidden[answer.rows, answer.predict_slots]))
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()  # (n_answer_tokens, vocab)

    full_logits = answer_logits(states[-1])
    exit_logits: list[torch.Tensor] = [torch.empty(0)] * num_layers
    branches: list[torch.Tensor] = []
    for layer in range(1, num_layers):
        branches.append(states[layer - 1])  # the branch that exits after layer - 1 starts here
        capture = None if branch_cache is None else _KeyValueCapture()
        extra = inputs_of.branch_kwargs(layer, len(branches))
        branches = _run_branches(layers[layer], branches, *inputs_of.layers.pop(layer), batch, capture, extra)
        inputs_of.shared.keep_branches(layer, extra)
        if capture is not None and branch_cache is not None:
            branch_cache[layer] = list(zip(capture.keys.split(batch), capture.values.split(batch)))
        states[layer - 1] = None  # no longer needed
    for k, branch in enumerate(branches):
        exit_logits[k] = answer_logits(branch)
    exit_logits[num_layers - 1] = full_logits
    return exit_logits


class _KeyValueCapture:
    """Stands in for a KV cache in one decoder layer call: keeps the keys and values the layer's
    attention hands it (what a cache would store) and gives them back unchanged."""

    keys: torch.Tensor
    values: torch.Tensor

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = keys, values
        return keys, values


def _run_branches(
    layer: nn.Module,
    branches: list[torch.Tensor],
    mask: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor | None,
    batch: int,
    capture: _KeyValueCapture | None = None,
    extra: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """Every active branch (``batch`` rows each) through one decoder layer, as one batch, with the
    layer's own inputs of the full forward (``_KeptLayerInputs``) repeated per branch, and ``extra``
    keyword arguments (per-token inputs and shared keys, already one block per branch)."""
    count = len(branches)
    cos, sin = position_embeddings
    hidden = layer(
        torch.cat(branches),
        **(extra or {}),
        attention_mask=_repeat_rows(mask, count, 0),
        position_embeddings=(_repeat_rows(cos, count, 0), _repeat_rows(sin, count, 0)),
        position_ids=None if position_ids is None else _repeat_rows(position_ids, count, -2),
        cache=capture,
        use_cache=capture is not None,
    )
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return list(hidden.split(batch))


class _KeptLayerInputs:
    """Each decoder layer's own inputs of the full forward (4-D mask, cos/sin, position ids),
    gathered at the kept (non-image, real) tokens of ``compact`` for the exit branches.

    A layer's own mask carries whatever its family adds to a padded causal mask (Gemma3's sliding
    window, counted in prompt columns; bidirectional image blocks, which no kept token is in), and
    its cos/sin carry its own RoPE (Gemma3's local base on sliding layers; M-RoPE folded in), so
    the branch sees exactly what ``exit.surgery`` gives the layer after a compaction. Layers
    handed the same tensor (one mask per layer type) share one gathered copy, and the full-length
    tensors are released after the forward.
    """

    def __init__(self, compact: CompactLayout, config: Any, recurrent: frozenset[int] = frozenset()) -> None:
        self.compact = compact
        self.config = config
        self.recurrent = recurrent  # recurrent layers take the 2-D padding mask of the kept slots (as in the surgery)
        self.layers: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {}
        self.tokens: dict[int, dict[str, torch.Tensor]] = {}  # per-token inputs (Gemma4's per-layer embeddings)
        self.shared: _SharedKeys | None = None  # keys and values of the storing layers (KV sharing)
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, gathered copy)
        self._plain: torch.Tensor | None = None

    def keep(self, layer: int, kwargs: dict, dtype: torch.dtype) -> None:
        """Record decoder layer ``layer``'s inputs (its forward kwargs; ``dtype`` of its hidden states)."""
        own = kwargs.get("attention_mask")
        if own is not None and not isinstance(own, torch.Tensor):
            raise SweepError(
                f"expected decoder layer {layer} to receive a 4-D attention mask tensor or None, found {type(own).__name__}"
            )
        if "position_embeddings" not in kwargs:
            raise SweepError(f"expected decoder layer {layer} to receive position_embeddings (cos, sin), found none")
        cos, sin = kwargs["position_embeddings"]
        position_ids = kwargs.get("position_ids")
        if layer in self.recurrent:
            mask = self._once(self.compact.valid, lambda: self.compact.valid.long())
        else:
            mask = self._plain_mask(dtype) if own is None else self._once(own, lambda: self._mask(own, dtype))
        self.layers[layer] = (
            mask,
            (self._once(cos, lambda: self.compact.gather(cos)), self._once(sin, lambda: self.compact.gather(sin))),
            None if position_ids is None else self._once(position_ids, lambda: self.compact.gather_positions(position_ids)),
        )

    def keep_tokens(self, layer: int, inputs: dict[str, torch.Tensor | None]) -> None:
        """Record decoder layer ``layer``'s per-token inputs (``ModelAdapter.layer_token_inputs``), gathered."""
        self.tokens[layer] = {name: self.compact.gather(value) for name, value in inputs.items() if value is not None}

    def branch_kwargs(self, layer: int, count: int) -> dict[str, Any]:
        """The extra keyword arguments of decoder layer ``layer`` for ``count`` branches: its per-token
        inputs repeated per branch, and the keys and values it reads where it reuses another layer's."""
        extra: dict[str, Any] = {name: _repeat_rows(value, count, 0) for name, value in self.tokens.pop(layer, {}).items()}
        if self.shared is not None:
            extra.update(self.shared.branch_kwargs(layer, count))
        return extra

    def forward_done(self) -> None:
        """Release the full-length tensors (the gathered copies stay in ``layers``)."""
        self._gathered.clear()

    def _once(self, tensor: torch.Tensor, make: Any) -> torch.Tensor:
        key = id(tensor)
        if key not in self._gathered or self._gathered[key][0] is not tensor:
            self._gathered[key] = (tensor, make())
        return self._gathered[key][1]

    def _plain_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Padded causal mask over the kept slots (where the model passed no mask: SDPA's causal skip)."""
        if self._plain is None:
            self._plain = attention_mask_for_keys(self.config, self.compact.valid, self.compact.length, dtype)
        return self._plain

    def _mask(self, own: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's own mask at the kept query rows and key columns; slots that hold no token
        (left padding of the compacted stream) get the plain padded causal mask, as in the surgery."""
        index, valid = self.compact.index, self.compact.valid
        own = own.expand(index.shape[0], *own.shape[1:])[:, 0]  # batch query key
        rows = torch.arange(index.shape[0], device=own.device)[:, None, None]
        gathered = own[rows, index[:, :, None], index[:, None, :]][:, None]  # batch 1 slot slot
        no_key = ~valid[:, None, None, :]
        if gathered.dtype == torch.bool:
            gathered = gathered & ~no_key
        else:
            gathered = gathered.masked_fill(no_key, torch.finfo(gathered.dtype).min)
        plain = self._plain_mask(dtype).to(device=gathered.device, dtype=gathered.dtype)
        return torch.where(valid[:, None, :, None], gathered, plain)


class _SharedKeys:
    """Keys and values of KV sharing (``ModelAdapter.kv_sharing``, Gemma4) for the exit branches.

    A layer j that reuses the keys and values of an earlier layer i reads, in the branch that exited
    after k, what the surgery gives it: the full forward's keys and values of layer i gathered at the
    kept tokens where i <= k (layer i ran before the exit), the branch's own of layer i where i > k.
    Branches are k-major (k = 0, 1, ...), so at layer j the first i branches' come from their run of
    layer i and the others' from the full forward.
    """

    def __init__(self, adapter: ModelAdapter, model: nn.Module, compact: CompactLayout) -> None:
        self.sources = adapter.kv_sources(model)
        self.sharing = adapter.kv_sharing
        self.layer_types = list(getattr(adapter.text_config(model), "layer_types", None) or ())
        self.compact = compact
        self.full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storing layer -> gathered at the kept slots
        self.branches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storing layer -> its branches' own
        self._mapping: Any = None  # the model's own mapping type, for the branches' copies

    def _gather(self, states: torch.Tensor) -> torch.Tensor:  # (batch, kv_head, seq, dim) -> kept slots
        index = self.compact.index
        return states.gather(2, index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3]))

    def keep_full(self, layer: int, kwargs: dict) -> None:
        """After storing layer ``layer`` of the full forward: keep what it stored, at the kept slots."""
        assert self.sharing is not None
        mapping = kwargs[self.sharing.states_kwarg]
        keys, values = mapping[self.layer_types[layer]]
        self._mapping = type(mapping)
        self.full[layer] = (self._gather(keys), self._gather(values))

    def branch_kwargs(self, layer: int, count: int) -> dict[str, Any]:
        """The shared-keys argument of ``layer`` for its ``count`` branches: a fresh mapping for a
        storing layer (its branches' keys and values are read from it after the call), the keys and
        values it reads for a reusing one, nothing for the others."""
        if self.sharing is None or self._mapping is None:
            return {}
        if layer in self.full:
            return {self.sharing.states_kwarg: self._mapping()}
        if layer not in self.sources:
            return {}
        source = self.sources[layer]
        # branches k < source ran layer ``source`` themselves (none where it is layer 0); k >= source read the full forward's
        own = self.branches.get(source)
        parts = [(own, 1)] if own is not None else []
        parts.append((self.full[source], count - (source if own is not None else 0)))
        keys = torch.cat([_repeat_rows(states[0], n, 0) for states, n in parts])
        values = torch.cat([_repeat_rows(states[1], n, 0) for states, n in parts])
        return {self.sharing.states_kwarg: self._mapping({self.layer_types[layer]: (keys, values)})}

    def keep_branches(self, layer: int, kwargs: dict[str, Any]) -> None:
        """After storing layer ``layer`` ran its branches: keep what they stored."""
        if self.sharing is not None and layer in self.full and self.sharing.states_kwarg in kwargs:
            self.branches[layer] = kwargs[self.sharing.states_kwarg][self.layer_types[layer]]


def _repeat_rows(tensor: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """``count`` copies of ``tensor`` concatenated along its batch axis ``dim`` (one per branch)."""
    return torch.cat([tensor] * count, dim=dim) if count > 1 else tensor


def answer_metrics(
    full_logits: torch.Tensor, exit_logits: list[torch.Tensor], targets: torch.Tensor, rows: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row answer metrics from logits at the answer tokens' predicting positions.

    Args:
        full_logits: (n_answer_tokens, vocab) of the full model; exit_logits: one such tensor per exit.
        targets: (n_answer_tokens,) the answer token ids; rows: (n_answer_tokens,) their batch row.

    Returns:
        agreement (batch, exits), ce_exit (batch, exits), ce_full (batch,), answer tokens per row (batch,).
    """
    rows = rows.to(full_logits.device)
    targets = targets.to(full_logits.device)
    counts = torch.zeros(batch, device=full_logits.device).index_add_(0, rows, torch.ones_like(targets, dtype=torch.float))

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, device=full_logits.device).index_add_(0, rows, values.float()) / counts

    full_argmax = full_logits.argmax(-1)
    ce_full = per_row(nn.functional.cross_entropy(full_logits, targets, reduction="none"))
    agreement = torch.stack([per_row(logits.argmax(-1) == full_argmax) for logits in exit_logits], dim=1)
    ce_exit = torch.stack(
        [per_row(nn.functional.cross_entropy(logits, targets, reduction="none")) for logits in exit_logits], dim=1
    )
    return agreement, ce_exit, ce_full, counts


# The table --------------------------------------------------------------------------------


def sweep_schema(provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The arrow schema of the sweep table (``analysis.schema.EXIT_SWEEP``) with the toolkit's metadata."""
    return EXIT_SWEEP.arrow_schema(provenance)


def validate_sweep_schema(schema: pa.Schema, where: str = "table") -> None:
    """Raise SchemaError unless ``schema`` is the sweep table's (metadata, version, columns)."""
    validate_arrow_schema(schema, where, expected=SWEEP_TABLE)


def sweep_table(result: SweepResult, sample_ids: list[str]) -> pa.Table:
    """One row per (sample, layer), ordered by sample then layer."""
    batch, layers = result.agreement.shape
    if len(sample_ids) != batch:
        raise SchemaError(f"expected {batch} sample ids (one per row), found {len(sample_ids)}")
    row = np.repeat(np.arange(batch), layers)

    def flat(tensor: torch.Tensor) -> np.ndarray:
        return tensor.reshape(-1).numpy()

    columns = {
        "sample_id": pa.array(np.asarray(sample_ids, dtype=object)[row], pa.string()),
        "layer": pa.array(np.tile(np.arange(layers, dtype=np.int32), batch), pa.int32()),
        "agreement": pa.array(flat(result.agreement).astype(np.float32), pa.float32()),
        "ce_exit": pa.array(flat(result.ce_exit).astype(np.float32), pa.float32()),
        "ce_full": pa.array(result.ce_full.numpy()[row].astype(np.float32), pa.float32()),
        "ce_ratio": pa.array(flat(result.ce_ratio).astype(np.float32), pa.float32()),
        "label": pa.array(flat(result.label).astype(bool), pa.bool_()),
        "n_answer": pa.array(result.n_answer.numpy()[row].astype(np.int32), pa.int32()),
        "n_image": pa.array(result.n_image.numpy()[row].astype(np.int32), pa.int32()),
        "n_kept": pa.array(result.n_kept.numpy()[row].astype(np.int32), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=sweep_schema())


class SweepWriter:
    """Stream sweep tables (and cached gate features) into ``out_dir``; a context manager.

    Files: ``exit_sweep-NNNNN.parquet`` (one row group per batch; an ``analysis.io.ParquetShard``,
    written under a hidden temporary name and renamed when complete, also after an exception) and,
    for batches with features, ``features-NNNNN-BBBBB.safetensors`` holding ``features`` (batch,
    layers, F) float32 and ``label`` (batch, layers) uint8, with the sample ids in the metadata
    (each an ``analysis.io.AtomicFile``: written under a temporary name, then renamed). ``tag``
    (``analysis.io.shard_tag``) names the files of one process of a data-parallel sweep:
    ``exit_sweep-shard000of002-00000.parquet``, ...
    """

    def __init__(
        self, out_dir: str | Path, provenance: dict[str, Any], rule: LabelRule = LabelRule(), *, tag: str = ""
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.provenance = {**provenance, "label_rule": asdict(rule)}
        self.tag = tag
        taken = [parsed[2] for p in self.out_dir.glob(f"{SWEEP_TABLE}-*.parquet")
                 if (parsed := parse_shard_file(p)) and parsed[1] == tag]
        self.shard = max(taken, default=-1) + 1
        self._table = ParquetShard(self.out_dir / shard_file_name(SWEEP_TABLE, tag, self.shard), sweep_schema(self.provenance))
        self._answers: ParquetShard | None = None  # exit_answers-*.parquet, opened by the first batch with answers
        self.batches = 0
        self.rows_written = 0
        self.files: list[Path] = []

    @property
    def final(self) -> Path:
        """The parquet shard's final name."""
        return self._table.path

    @property
    def partial(self) -> Path:
        """The hidden name the parquet shard is written under until ``close()``."""
        return self._table.file.partial

    def write(self, result: SweepResult, sample_ids: list[str], answers: pa.Table | None = None) -> None:
        """Append one batch: a row group of the table, with features one feature file, and with
        ``answers`` (``exit.answers.answers_table``) a row group of the ``exit_answers`` shard.
        Ctrl-C and SIGTERM wait until the batch is written whole (``analysis.io.signals_held``)."""
        table = sweep_table(result, sample_ids)
        with signals_held():
            self._table.write(table)
            if answers is not None:
                if self._answers is None:
                    name = shard_file_name(EXIT_ANSWERS.name, self.tag, self.shard)
                    self._answers = ParquetShard(self.out_dir / name, EXIT_ANSWERS.arrow_schema(self.provenance))
                self._answers.write(answers.replace_schema_metadata(self._answers.schema.metadata))
            if result.features is not None:
                self.files.append(self._write_features(result, sample_ids))
            self.batches += 1
            self.rows_written += table.num_rows

    def _write_features(self, result: SweepResult, sample_ids: list[str]) -> Path:
        assert result.features is not None
        tag = f"{self.tag}-" if self.tag else ""
        path = self.out_dir / f"{FEATURES_PREFIX}-{tag}{self.shard:05d}-{self.batches:05d}.safetensors"
        return write_feature_file(path, result.features, result.label, sample_ids, str(result.features_kind))

    def close(self) -> None:
        """Commit the parquet shard under its final name (idempotent; nothing if nothing was written)."""
        for shard in (self._table, self._answers):
            path = shard.close() if shard is not None else None
            if path is not None and path not in self.files:
                self.files.append(path)

    def __enter__(self) -> SweepWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_feature_file(path: Path, features: torch.Tensor, labels: torch.Tensor, sample_ids: Sequence[str],
                       kind: str) -> Path:
    """One batch's feature shard: (batch, layers, F) features, (batch, layers) labels, the sample
    ids and the features' kind; written atomically (never half a file under its final name)."""
    tensors = {"features": features.float().contiguous(), "label": labels.to(torch.uint8).contiguous()}
    metadata = {"sample_ids": json.dumps(list(sample_ids)), "features_kind": kind}
    with AtomicFile(path) as file:
        save_file(tensors, str(file.partial), metadata=metadata)
    return file.path


def read_sweep(path: str | Path) -> pd.DataFrame:
    """The sweep table of a file or a folder of ``exit_sweep-*.parquet`` shards, validated."""
    return read_table(path, SWEEP_TABLE)


def feature_shards(folder: str | Path) -> list[Path]:
    """The cached feature shards of a sweep folder, in order."""
    files = sorted(Path(folder).glob(f"{FEATURES_PREFIX}-*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"expected {FEATURES_PREFIX}-*.safetensors in {folder} (run the sweep with features), found none"
        )
    return files


def read_shard(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(features (batch, layers, F), labels (batch, layers) int64, sample ids, features kind) of one shard."""
    with safe_open(str(path), "pt") as shard:
        metadata = shard.metadata() or {}
        features, labels = shard.get_tensor("features"), shard.get_tensor("label").long()
    return features, labels, json.loads(metadata.get("sample_ids", "[]")), metadata.get("features_kind", "")


def read_exit_answers(path: str | Path) -> pd.DataFrame:
    """The ``exit_answers`` table (``dyvte-exit sweep --answers``) of a file or a folder of shards, validated."""
    return read_table(path, EXIT_ANSWERS.name)


def exit_labels_at(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    answer_mask: torch.Tensor,
    layer: int,
    features: str,
    rule: LabelRule = LabelRule(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate features at ``layer`` ((batch, F), prompt only) and exit labels at ``layer`` ((batch,) bool).

    Two forwards, as in the paper's online scheme: the full model (recorded) and the model with the
    image removed after ``layer`` (``exit.surgery``), both teacher-forced on the answer.
    """
    from exit.surgery import visual_token_exit

    adapter = resolve_adapter(model)
    layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    answer_mask = answer_mask.to(layout.group.device).bool()
    rows, positions = answer_mask.nonzero(as_tuple=True)
    if positions.numel() == 0 or bool((positions == 0).any()):
        raise SweepError("expected answer tokens after a prompt in every row, found none or one at position 0")
    targets = inputs["input_ids"][rows, positions]
    with torch.no_grad():
        with gate_recording(model, prompt_layout(layout, answer_mask), features, adapter=adapter) as recording:
            full = model(**inputs).logits[rows, positions - 1].float()
        with visual_token_exit(model, layer):
            exited = model(**inputs).logits[rows, positions - 1].float()
        agreement, ce_exit, ce_full, _ = answer_metrics(full, [exited], targets, rows, layout.batch_size)
    labels = rule.label(agreement[:, 0], ce_exit[:, 0] / ce_full.clamp_min(1e-12))
    return gate_features(recording.records[layer], features), labels


@dataclass(frozen=True)
class SweepRun:
    """What ``run_sweep`` wrote."""

    out_dir: Path
    samples: int
    rows: int
    files: list[Path]
    errors: int = 0  # questions left out (listed in the errors file)


def run_sweep(
    model: nn.Module,
    processor: Any,
    questions: list[Any],
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    provenance: dict[str, Any],
    features: str | None = "hidden",
    batch_size: int = 1,
    rule: LabelRule = LabelRule(),
    progress: bool = True,
    shard: Any = None,
    answers: int = 0,
    resume: bool = False,
    batches_per_file: int = 16,
) -> SweepRun:
    """Sweep every question (its ``answer`` is the reference) and stream the table and features to ``out_dir``.

    ``answers`` > 0 also generates every exit layer's answer (up to that many tokens, greedy, as
    ``dyvte-exit eval`` does) into the ``exit_answers`` table beside the sweep (``exit.answers``).

    Every ``batches_per_file`` batches the open shards are committed under their final names and
    new ones begin, so a killed sweep loses at most those batches; ``resume`` continues a stopped
    sweep in ``out_dir``: it removes what the killed writer left (hidden partial files, feature
    files of an uncommitted shard) and skips every question already in a committed shard or the
    errors file.

    ``shard`` (an ``analysis.distributed.Shard``; under torchrun the rank's) sweeps only every n-th
    question, into files named with the shard's tag; the shards' union is the single-process sweep.

    A question whose image is missing or unreadable (or that has no image) is listed in
    ``out_dir/_errors[-TAG]-00000.jsonl`` with its reason and the sweep goes on.

    Raises:
        SweepError: a question has no reference answer, or the folder already holds a sweep (without ``resume``).
    """
    from tqdm import tqdm

    from analysis.data import check_unique_ids
    from analysis.distributed import Shard, barrier

    shard = shard or Shard()
    check_unique_ids(questions)
    missing = [q.question_id for q in questions if not q.answer]
    if missing:
        raise SweepError(f"expected a reference answer for every question, found none for {missing[:5]}")
    done = _finished_samples(Path(out_dir), shard, resume, answers > 0)
    if shard.count > 1:
        barrier()  # under torchrun no process writes before every process has looked at the folder
    mine = [q for q in shard.select(questions) if q.question_id not in done]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    errors = _SweepErrors(Path(out_dir), shard.tag)
    rows, files, buffers = 0, [], CacheBuffers()
    chunks = [batches[i : i + batches_per_file] for i in range(0, len(batches), batches_per_file)]
    bar = tqdm(total=len(batches), desc="sweep", unit="batch", disable=not progress)
    for chunk in chunks:
        with SweepWriter(out_dir, provenance, rule, tag=shard.tag) as writer:
            for batch in chunk:
                _sweep_batch(model, processor, batch, image_folder, writer, errors, features, rule, answers, buffers)
                bar.update()
        rows, files = rows + writer.rows_written, files + writer.files
    bar.close()
    return SweepRun(Path(out_dir), len(mine) - errors.new_entries, rows, files, errors.new_entries)


def _finished_samples(out_dir: Path, shard: Any, resume: bool, answers: bool) -> set[str]:
    """The question ids a sweep in ``out_dir`` finished (with ``resume``; after cleaning what a
    killed writer left), or an empty set for a folder without this shard's sweep.

    Raises:
        SweepError: the folder holds a sweep and ``resume`` is off, or it holds another shard count's.
    """
    from analysis.io import tag_count

    found = [(path, parsed) for path in out_dir.glob(f"{SWEEP_TABLE}-*.parquet") if (parsed := parse_shard_file(path))]
    for _, parsed in found:
        if tag_count(parsed[1]) != shard.count or (parsed[1] == shard.tag and not resume):
            raise SweepError(f"expected a new or empty output folder, found a sweep in {out_dir}; "
                             "choose another --out (or --resume it)")
    if not resume or not out_dir.is_dir():
        return set()
    for partial in out_dir.glob(".*.partial"):
        partial.unlink()
    committed = {parsed[2] for _, parsed in found if parsed[1] == shard.tag}
    tag = f"{shard.tag}-" if shard.tag else ""
    for path in out_dir.glob(f"{FEATURES_PREFIX}-{tag}*.safetensors"):
        owned = re.fullmatch(rf"{FEATURES_PREFIX}-{re.escape(tag)}(\d{{5}})-\d{{5}}", path.stem)
        if owned and int(owned.group(1)) not in committed:
            path.unlink()  # the features of a shard whose table never committed
    done = set(read_sweep(out_dir)["sample_id"]) if committed else set()
    if answers and done:  # a question counts as done only with its answers too
        has_answers = any(out_dir.glob(f"{EXIT_ANSWERS.name}-*.parquet"))
        done &= set(read_exit_answers(out_dir)["sample_id"]) if has_answers else set()
    return done | {entry["sample_id"] for entry in _SweepErrors(out_dir, shard.tag).entries}


def _sweep_batch(model: nn.Module, processor: Any, batch: Sequence[Any], image_folder: str | Path, writer: SweepWriter,
                 errors: _SweepErrors, features: str | None, rule: LabelRule, answers: int,
                 buffers: CacheBuffers) -> None:
    """Sweep one batch of questions into ``writer`` (the ones that cannot load go to ``errors``)."""
    good = errors.loadable(processor, batch, image_folder)
    if not good:
        return
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs, answer_mask = teacher_forced_inputs(processor, [prompt for _, prompt, _ in good],
                                                [images for _, _, images in good], [str(q.answer) for q, _, _ in good])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    result = exit_sweep(model, inputs, answer_mask, rule=rule, features=features, answers=answers,
                        answer_buffers=buffers)
    table = None
    if result.answer_ids is not None:
        prompt_tokens = (inputs["attention_mask"].bool() & ~answer_mask.to(device)).sum(1)
        table = answers_table(result.answer_ids, processor.tokenizer, [q for q, _, _ in good], prompt_tokens,
                              result.n_image, DecoderShape.from_config(model.config))
    writer.write(result, [q.question_id for q, _, _ in good], table)


class _SweepErrors:
    """The questions a sweep leaves out, listed with their reasons in one errors file per shard."""

    def __init__(self, out_dir: Path, tag: str) -> None:
        from analysis.io import ERRORS_PREFIX, shard_file_name

        self.path = out_dir / shard_file_name(ERRORS_PREFIX, tag, 0, "jsonl")
        self.entries: list[dict[str, Any]] = (  # an earlier run's, kept when a sweep resumes
            [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else [])
        self.new_entries = 0

    def loadable(self, processor: Any, batch: Sequence[Any], image_folder: str | Path) -> list[tuple[Any, str, list[Any]]]:
        """(question, prompt, images) of each question of ``batch`` that can be loaded; the others are listed."""
        from analysis.data import DataError, load_question
        from analysis.io import atomic_write_text

        good = []
        for question in batch:
            try:
                images, prompt = load_question(processor, question, image_folder)
                good.append((question, prompt, images))
            except DataError as error:
                self.new_entries += 1
                self.entries.append({"sample_id": question.question_id, "question_id": question.question_id,
                                     "images": list(question.images), "error": type(error).__name__, "reason": str(error)})
                atomic_write_text(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries))
        return good


__all__ = [
    "LabelRule",
    "SWEEP_COLUMNS",
    "SweepError",
    "SweepResult",
    "SweepRun",
    "SweepWriter",
    "answer_metrics",
    "exit_labels_at",
    "exit_sweep",
    "prompt_layout",
    "feature_shards",
    "read_exit_answers",
    "read_shard",
    "read_sweep",
    "run_sweep",
    "sweep_schema",
    "sweep_table",
    "teacher_forced_inputs",
    "validate_sweep_schema",
]
