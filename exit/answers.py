"""Every exit layer's generated answer from one teacher-forced pass (the exit table's answers).

The exit sweep (``exit.sweep``) runs the full model once over prompt + reference answer and the
non-image tokens of every exit branch k through layers k+1..L-1. That pass already holds every
key and value an exit after k needs to decode: layers 0..k are the full model's, layers k+1..L-1
the branch's at the kept tokens. This module turns them into one KV cache whose rows are the
pairs (exit layer k, question), k-major, cut to each row's prompt without its last token, and lets
the model's own greedy ``generate()`` continue from it: generate() runs each row's last prompt
token and then decodes, with the stopping rule, padding and position ids it uses for
``dyvte-exit eval``. While it decodes, every decoder layer after k has the image columns of row
(k, question) switched off in its mask.

Why that equals ``static:k``: in the layers after k an exit leaves only the non-image tokens,
with their original positions, and those are exactly the cache columns the mask keeps; masking a
key gives a softmax equal to dropping it. Layers 0..k see the whole prompt in both. So the answer
of row (k, question) is the answer ``generate()`` gives under ``visual_token_exit(model, k)``, up
to float rounding in the sums (tests/test_exit_table.py checks it token for token on tiny models).

Limits: families with 1-D positions (``ModelAdapter.positions == "1d"``): the cumulative-sum
position ids generate() gives a left-padded prompt are passed to the teacher-forced pass, so its
keys are the ones generate() would cache; families whose cache has sliding-window layers are
refused (their cache keeps only the window, not the prompt the table needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from analysis.adapters import ModelAdapter
from analysis.errors import DyVTEError
from analysis.hooks import Hook, attached
from analysis.layout import IMAGE, PADDING, TokenLayout
from analysis.schema import EXIT_ANSWERS
from analysis.scoring import exact_match
from exit.flops import DecoderShape, relative_prefill_flops
from exit.surgery import CompactLayout, compact_layout


class ExitAnswersError(DyVTEError, ValueError):
    """The exit table cannot generate answers for this model or these inputs."""


def check_answerable(adapter: ModelAdapter, config: Any = None) -> None:
    """Raise ExitAnswersError unless the family's positions are the 1-D ones generate() derives from
    the attention mask (M-RoPE families compute theirs from the image grids), its layers share no
    keys and values (a KV-reusing layer has no cache of its own to build), and, where ``config``
    (the model's) is given, no decoder layer is a sliding-window one (its cache keeps only the
    window, and the table's decoding cache holds every column), nor a recurrent one (the table builds its
    decoding cache by splicing each branch's keys and values into the full model's per column; a
    recurrent layer's state summarises its whole stream and cannot be spliced per column). All are
    known before the weights load."""
    recurrent = adapter.recurrent_layers(config) if config is not None else []
    if recurrent or (config is None and adapter.recurrent is not None):
        raise ExitAnswersError(
            f"expected attention decoder layers only for the exit table's answers, found recurrent (linear-attention) "
            f"layers {recurrent} in {adapter.model_type!r} (their state cannot be spliced per column into the table's "
            "decoding cache); run `dyvte-exit eval --method static:K` instead"
        )
    if adapter.positions != "1d":
        raise ExitAnswersError(
            f"expected a family with 1-D position ids for the exit table's answers, found {adapter.model_type!r} "
            f"with {adapter.positions!r} positions; run `dyvte-exit eval --method static:K` instead"
        )
    if adapter.kv_sharing is not None:
        raise ExitAnswersError(
            f"expected decoder layers with caches of their own for the exit table's answers, found {adapter.model_type!r}, "
            "whose KV-sharing layers read an earlier layer's keys and values (the table's decoding cache is built per "
            "layer from the sweep's branches); run `dyvte-exit eval --method static:K` instead"
        )
    layer_types = getattr(adapter.text_config(config), "layer_types", None) if config is not None else None
    sliding = [i for i, kind in enumerate(layer_types or []) if kind == "sliding_attention"]
    if sliding:
        raise ExitAnswersError(
            f"expected full-attention decoder layers for the exit table's answers, found sliding-window layers {sliding} "
            f"in {adapter.model_type!r} (their cache keeps only the window); run `dyvte-exit eval --method static:K` instead"
        )


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate()`` gives a left-padded batch: the count of real tokens before
    each token (0 at padding)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def exit_answer_ids(
    model: nn.Module,
    layout: TokenLayout,
    answer_mask: torch.Tensor,
    input_ids: torch.Tensor,
    kept: CompactLayout,
    full_cache: Any,
    branch_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    max_new_tokens: int,
    adapter: ModelAdapter,
    buffers: CacheBuffers | None = None,
) -> torch.Tensor:
    """(batch, layers, max_new_tokens) greedy answer token ids for the exit after every layer
    (the last: no exit), right-padded with the pad token id.

    Args:
        layout: the token layout of the teacher-forced batch (prompt + answer, left-padded).
        answer_mask: (batch, seq) bool, the reference answer's tokens.
        kept: the compact layout of the non-image real tokens (the sweep's branches' slots).
        full_cache: the full forward's KV cache (over prompt + answer).
        branch_cache: ``branch_cache[layer][k]`` = the branch of exit k's keys and values at
            ``layer`` (k < layer), over ``kept``'s slots.
        buffers: storage to build the decoding cache in (reuse one across batches).
    """
    num_layers = len(adapter.decoder_layers(model))
    device = input_ids.device
    prompt = (layout.group != PADDING).to(device) & ~answer_mask.to(device)
    last = prompt & (prompt.long().cumsum(1) == prompt.sum(1, keepdim=True))  # each row's last prompt token
    cached = compact_layout(prompt & ~last)  # the cache's columns: every prompt token but the last
    cache = _exit_cache(full_cache, branch_cache, kept, cached, num_layers, max_new_tokens, buffers or CacheBuffers())
    image = (layout.group.to(device) == IMAGE).gather(1, cached.index) & cached.valid
    prompt_ids = torch.cat([cached.gather(input_ids[..., None])[..., 0], input_ids[last][:, None]], dim=1)
    mask = torch.cat([cached.valid, torch.ones_like(cached.valid[:, :1])], dim=1).long()
    batch = input_ids.shape[0]
    removed = [(torch.arange(num_layers, device=device) < layer).repeat_interleave(batch)[:, None] & image.repeat(num_layers, 1)
               for layer in range(num_layers)]  # rows (k, question) whose image is gone at each layer
    hooks = [Hook(path, _masking(removed[layer], cache, layer), kind="forward_pre", with_kwargs=True)
             for layer, path in enumerate(adapter.layer_paths(model))]
    with torch.no_grad(), attached(model, hooks):
        output = model.generate(input_ids=prompt_ids.repeat(num_layers, 1), attention_mask=mask.repeat(num_layers, 1),
                                cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[:, prompt_ids.shape[1]:]
    pad = model.generation_config.pad_token_id
    ids = torch.full((new.shape[0], max_new_tokens), 0 if pad is None else int(pad), dtype=torch.long, device=device)
    ids[:, : new.shape[1]] = new
    return ids.view(num_layers, batch, max_new_tokens).transpose(0, 1).cpu()


class CacheBuffers:
    """Storage for the exit table's decoding caches, reused from batch to batch: the first touch of
    a fresh cache of several GB (page faults) costs about as much as generating with it."""

    def __init__(self) -> None:
        self._storage: dict[tuple[int, int], torch.Tensor] = {}

    def take(self, key: tuple[int, int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (dtype and device of ``like``) on the storage of ``key``."""
        numel = math.prod(shape)
        storage = self._storage.get(key)
        if storage is None or storage.numel() < numel or storage.dtype != like.dtype or storage.device != like.device:
            storage = self._storage[key] = like.new_empty(numel)
        return storage[:numel].view(shape)


class _InPlaceLayer(DynamicLayer):
    """A dynamic cache layer whose keys and values live in buffers allocated once (prompt columns
    plus room for the new tokens): generate()'s updates write in place instead of concatenating
    the whole cache again at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._buffers = (keys, values)
        self.device, self.is_initialized, self.length = keys.device, True, 0
        self._grow(length)

    def _grow(self, length: int) -> None:
        self.length = length
        self.keys, self.values = (buffer[:, :, :length] for buffer in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:
            raise ExitAnswersError(f"expected at most {self._buffers[0].shape[-2]} cached tokens, found {end}")
        self._buffers[0][:, :, start:end] = key_states
        self._buffers[1][:, :, start:end] = value_states
        self._grow(end)
        return self.keys, self.values


def _exit_cache(full_cache: Any, branch_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
                kept: CompactLayout, cached: CompactLayout, num_layers: int, room: int,
                buffers: CacheBuffers) -> DynamicCache:
    """The decoding cache of the rows (k, question), k-major, with ``room`` columns free for new
    tokens: at layer j, row (k, b) holds the full model's keys and values of b's cached prompt
    columns, with the kept tokens' ones replaced by branch k's where k < j (the image columns keep
    the full model's values; they are masked)."""
    batch, length = cached.index.shape
    column_of = torch.full((batch, max(int(cached.index.max()), int(kept.index.max())) + 1), -1,
                           dtype=torch.long, device=cached.index.device)
    rows, columns = cached.valid.nonzero(as_tuple=True)
    column_of[rows, cached.index[rows, columns]] = columns
    rows, slots = kept.valid.nonzero(as_tuple=True)
    target = column_of[rows, kept.index[rows, slots]]
    rows, slots, target = rows[target >= 0], slots[target >= 0], target[target >= 0]
    cache = DynamicCache()
    for layer in range(num_layers):
        cache_layer = full_cache.layers[layer]
        if type(cache_layer) is not DynamicLayer:
            raise ExitAnswersError(
                f"expected full-length KV cache layers for the exit table's answers, found {type(cache_layer).__name__} "
                f"at layer {layer} (a sliding-window layer keeps only its window)"
            )
        pair = []
        for index, full in enumerate((cache_layer.keys, cache_layer.values)):
            heads, width = full.shape[1], full.shape[3]
            buffer = buffers.take((layer, index), (num_layers * batch, heads, length + room, width), full)
            base = full.gather(2, cached.index[:, None, :, None].expand(-1, heads, -1, width))
            buffer.view(num_layers, batch, heads, -1, width)[:, :, :, :length] = base  # every exit row starts as the full model
            if layer > 0:  # branches k = 0..layer-1 hold their own kept tokens here
                branches = torch.stack([branch_cache[layer][k][index] for k in range(layer)])  # k b head slot dim
                exits = torch.arange(layer, device=rows.device)[:, None]
                view = buffer.transpose(1, 2)  # row column head dim, a view
                view[(exits * batch + rows).reshape(-1), target.repeat(layer)] = (
                    branches.transpose(2, 3)[exits, rows, slots].reshape(-1, heads, width))
            pair.append(buffer)
        cache.layers.append(_InPlaceLayer(pair[0], pair[1], length))
    return cache


def _masking(removed: torch.Tensor, cache: DynamicCache, layer: int) -> Any:
    """A pre-hook for decoder layer ``layer`` that switches off the ``removed`` (rows, cached
    columns) keys in the layer's mask during generate()."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not bool(removed.any()):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        queries = hidden.shape[1]
        keys = cache.layers[layer].get_seq_length() + queries
        off = torch.zeros(removed.shape[0], keys, dtype=torch.bool, device=removed.device)
        off[:, : removed.shape[1]] = removed
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(removed.shape[0], 1, queries, keys, dtype=torch.bool, device=removed.device).tril(keys - queries)
        mask = mask.expand(removed.shape[0], *mask.shape[1:])
        if mask.dtype == torch.bool:
            mask = mask & ~off[:, None, None, :]
        else:
            mask = mask.masked_fill(off[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    return hook


def answers_table(ids: torch.Tensor, tokenizer: Any, questions: Sequence[Any], tokens: torch.Tensor,
                  image_tokens: torch.Tensor, shape: DecoderShape) -> pa.Table:
    """The ``exit_answers`` table of one batch: a row per (question, exit layer), ordered by question then layer.

    Args:
        ids: ``exit_answer_ids``' output; questions: the batch's questions (question_id, category, answer).
        tokens, image_tokens: (batch,) prompt lengths without padding and image tokens per row.
        shape: the decoder's shape, for the static exit's relative prefill FLOPs.
    """
    texts = decode_answers(tokenizer, ids)
    rows: dict[str, list[Any]] = {column.name: [] for column in EXIT_ANSWERS.columns}
    layers = ids.shape[1]
    for b, question in enumerate(questions):
        n, m = int(tokens[b]), int(image_tokens[b])
        for k in range(layers):
            rows["sample_id"].append(question.question_id)
            rows["layer"].append(k)
            rows["category"].append(question.category or "uncategorised")
            rows["answer"].append(str(question.answer))
            rows["prediction"].append(texts[b][k])
            rows["correct"].append(bool(exact_match(texts[b][k], str(question.answer))))
            rows["same_as_full"].append(texts[b][k] == texts[b][layers - 1])
            rows["tokens"].append(n)
            rows["image_tokens"].append(m)
            rows["relative_prefill_flops"].append(relative_prefill_flops(shape, n, m, k if k < layers - 1 else None))
    return pa.Table.from_pydict(rows, schema=EXIT_ANSWERS.arrow_schema())


def decode_answers(tokenizer: Any, ids: torch.Tensor) -> list[list[str]]:
    """(batch, layers) answer strings of ``exit_answer_ids``' output, decoded as ``dyvte-exit eval``
    decodes its answers (special tokens skipped, stripped)."""
    batch, layers, _ = ids.shape
    texts: Sequence[str] = tokenizer.batch_decode(ids.reshape(batch * layers, -1), skip_special_tokens=True)
    return [[texts[b * layers + k].strip() for k in range(layers)] for b in range(batch)]


__all__ = [
    "CacheBuffers",
    "ExitAnswersError",
    "answers_table",
    "check_answerable",
    "decode_answers",
    "exit_answer_ids",
    "generation_position_ids",
]
