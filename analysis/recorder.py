"""Record per-layer attention statistics (and, on request, text-token states) during a forward.

``record_attention(model, layout)`` is a context manager. Inside it, every forward whose
sequence is the layout's (the prefill) is observed layer by layer; other forwards (decoding
steps of generate()) pass through untouched. Attention is reduced to group statistics inside
the hook: no layer's map is kept.

With ``generated=True`` the decoding steps of ``generate()`` inside the block are recorded too:
each step's query (the token generated before it) is a group of its own, ``generated`` with its
step index, over the prompt's key groups and the answer so far (``GENERATED_KEY_GROUPS``); the
KV cache must hold the whole prompt in every layer (no token-removing exit while decoding) but
a sliding-window layer's, which holds the latest positions.

Two ways to observe attention give the same numbers:
- ``attention="sdpa"`` (fast, default): the decoder runs the registered attention function
  ``OBSERVED_SDPA``, whose output is SDPA's; the statistics are recomputed on the side from
  query and key in query chunks, so extra memory stays below one layer's head x query x key map.
- ``attention="eager"``: the decoder runs eager attention and the weights it returns are read in
  a forward hook on each self-attention module.
The decoder's attention implementation is switched for the block and restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.attention import attention_path, running_attention
from analysis.errors import DyVTEError
from analysis.hooks import Hook, attached, layer_stream
from analysis.layout import PADDING, TokenLayout
from analysis.schema import generated_statistics_table, statistics_table
from analysis.stats import GroupSums, fused_group_sums, fused_kernel_name, group_sums, logit_group_sums
from analysis.vocabulary import GENERATED_KEY_GROUPS, PROMPT_STEP, QUERY_GROUPS

RECOMPUTED = "recomputed: q k^T and exp beside SDPA, fp32 query chunks"
"""``AttentionRecorder.kernel`` when the fast path recomputed the statistics (no fused kernel)."""


class RecordingError(DyVTEError, RuntimeError):
    """Attention could not be observed the way that was asked for."""


@dataclass
class LayerRecord:
    """What was observed at one decoder layer during one prefill.

    Attributes:
        layer: index of the decoder layer.
        mass: (batch, head, query_group, key_group) float32 mean attention mass, or None when
            attention was not recorded. Groups follow QUERY_GROUPS and KEY_GROUPS.
        entropy: (batch, head, query_group) float32 mean row entropy in nats, or None.
        text_mean: (batch, hidden) float32 mean of the layer's output states over the text tokens
            after the image excluding the last token, or None when states were not asked for.
        last: (batch, hidden) float32 output state of the last prompt token, or None.
        query_counts, key_counts: (batch, groups) int64 group sizes at this layer when they differ
            from the prompt's (the layers after a visual-token exit), else None; a decoding step's
            key_counts follow GENERATED_KEY_GROUPS.
        step: PROMPT_STEP for the prefill; s >= 0 for decoding step s, whose one query is the s-th
            generated token (mass (batch, head, 1, len(GENERATED_KEY_GROUPS)), entropy (batch, head, 1)).
    """

    layer: int
    mass: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    text_mean: torch.Tensor | None = None
    last: torch.Tensor | None = None
    query_counts: torch.Tensor | None = None
    key_counts: torch.Tensor | None = None
    step: int = PROMPT_STEP


@dataclass
class AttentionRecorder:
    """The result of a recording block; filled while the block runs.

    Attributes:
        layout: the token groups of the batch being recorded.
        attention: how attention was observed ("sdpa" or "eager").
        records: one LayerRecord per decoder layer and recorded forward, in layer order
            (empty when ``keep=False``: consumers then receive them through ``on_layer``).
        forwards_recorded: prefills observed; forwards_skipped: other forwards (decoding steps).
        generated: with ``generated=True``, one LayerRecord per decoder layer and decoding step.
        steps_recorded: decoding steps recorded.
        layers_without_attention: decoder layers with no attention map (a hybrid decoder's
            recurrent layers, ``ModelAdapter.recurrent_layers``): their records carry states only
            (mass and entropy None) and the statistics table has no rows for them.
    """

    layout: TokenLayout
    attention: str
    num_layers: int
    records: list[LayerRecord] = field(default_factory=list)
    kernel: str | None = None  # the fast path's statistics kernel (fused_kernel_name, or RECOMPUTED); None: eager
    forwards_recorded: int = 0
    forwards_skipped: int = 0
    generated: list[LayerRecord] = field(default_factory=list)
    steps_recorded: int = 0
    layers_without_attention: list[int] = field(default_factory=list)

    def to_table(self, sample_ids: Sequence[str], heads: str = "mean", steps: Sequence[int] | None = None) -> pa.Table:
        """The recorded statistics as a long-format table following ``analysis.schema``: the
        prompt's rows, then those of the recorded decoding steps.

        Args:
            steps: per row, how many decoding steps to keep (its answer's tokens; a row that ended
                before the batch did has fewer); default every recorded step for every row.
        """
        mapped = [record for record in self.records if record.mass is not None]
        if not mapped:
            raise RecordingError(
                "expected recorded attention statistics, found none: run a forward over the layout's "
                f"{self.layout.seq_len} tokens inside the recording block"
            )
        if len(self.records) != self.num_layers:
            raise RecordingError(
                f"expected one record per decoder layer ({self.num_layers}) from a single forward, "
                f"found {len(self.records)}; record each forward in its own block"
            )
        prompt = statistics_table(mapped, self.layout, sample_ids, heads)  # no rows (not made-up ones) for unmapped layers
        if not self.generated:
            return prompt
        if steps is None:
            steps = [self.steps_recorded] * len(sample_ids)
        if max(steps, default=0) > self.steps_recorded:
            raise RecordingError(f"expected at most {self.steps_recorded} decoding steps per row (recorded), "
                                 f"found a request for {max(steps)}")
        return pa.concat_tables([prompt, generated_statistics_table(self.generated, sample_ids, steps, heads)])

    def to_frame(self, sample_ids: Sequence[str], heads: str = "mean") -> Any:
        """The recorded statistics as a pandas DataFrame (see ``to_table``)."""
        return self.to_table(sample_ids, heads).to_pandas()


def default_query_chunk(num_queries: int) -> int:
    """Queries per chunk of the fast path: a quarter of the map, so its three fp32 buffers
    (scores, probabilities, entropy terms) stay below one layer's full head x query x key map."""
    return max(1, math.ceil(num_queries / 4))


def observed_group_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_membership: torch.Tensor,
    key_membership: torch.Tensor,
    query_chunk: int,
) -> GroupSums:
    """Group sums of softmax(q k^T * scaling + mask) computed chunk by chunk, in fp32.

    Args:
        query: (batch, head, q, dim); key: (batch, kv_head, k, dim) with head = kv_head * groups.
        attention_mask: bool (batch, 1, q, k) with True = attend, an additive float mask, or None
            for a plain causal mask (what SDPA's mask function returns for unpadded prefill).
        query_membership: (batch, q, query_group); key_membership: (batch, k, key_group).
    """
    batch, heads, num_queries, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    key = key.float()
    lowest = torch.finfo(torch.float32).min
    total: GroupSums | None = None
    for start in range(0, num_queries, query_chunk):
        stop = min(num_queries, start + query_chunk)
        size = stop - start
        chunk_mask = None if attention_mask is None else attention_mask[:, :, start:stop]
        # Keys after the chunk's last query are invisible under a causal mask: skip them.
        visible = stop
        if chunk_mask is not None:
            later = chunk_mask[..., stop:]
            if later.numel() and (bool(later.any()) if later.dtype == torch.bool else bool((later > lowest / 2).any())):
                visible = num_keys
        # Query heads sharing a KV head multiply against it together, so K/V are never repeated;
        # the scaling goes on the (small) query chunk rather than on the (large) logits.
        chunk_query = query[:, :, start:stop].float().mul(scaling).reshape(batch, kv_heads, groups * size, dim)
        scores = torch.matmul(chunk_query, key[:, :, :visible].transpose(-1, -2))
        scores = scores.view(batch, heads, size, visible)
        if chunk_mask is None:
            # Plain causal: keys before the chunk are visible to all its queries, so only the
            # diagonal block needs masking.
            above_diagonal = torch.ones(size, size, dtype=torch.bool, device=query.device).triu_(1)
            scores[..., start:stop].masked_fill_(above_diagonal, lowest)
        elif chunk_mask.dtype == torch.bool:
            scores.masked_fill_(~chunk_mask[..., :visible], lowest)
        else:
            scores.add_(chunk_mask[..., :visible].float()).clamp_(min=lowest)
        sums = logit_group_sums(scores, query_membership[:, start:stop], key_membership[:, :visible])
        del scores
        if total is None:
            total = sums
        else:
            total.add(sums)
    assert total is not None
    return total


@dataclass(frozen=True)
class SelectedQueries:
    """The query rows of some query groups, gathered per row of the batch (left-aligned; a row
    with fewer of them fills its slots with other positions whose membership is 0).

    Attributes:
        index: (batch, n) int64 position of each slot. membership: (batch, n, query_group) 0/1,
            zero outside the selected groups and in the filler slots.
    """

    index: torch.Tensor
    membership: torch.Tensor

    def local_index(self, offset: int) -> torch.Tensor:
        """The slots' rows in a forward whose queries start at position ``offset`` (the earlier
        positions come from the KV cache); filler slots before it read row 0 (membership 0)."""
        return (self.index - offset).clamp_min(0)

    def gather_query(self, query: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(batch, head, n, dim) of (batch, head, q, dim), whose queries are positions ``offset``.. ."""
        index = self.local_index(offset)
        return query.gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))

    def gather_mask(self, mask: torch.Tensor | None, num_keys: int, offset: int = 0) -> torch.Tensor:
        """The attention mask of the gathered rows, (batch, 1 or head, n, keys) (the mask's query
        rows are positions ``offset``..); None (plain causal) becomes the explicit causal mask of
        the slots' positions."""
        batch = self.index.shape[0]
        if mask is None:
            keys = torch.arange(num_keys, device=self.index.device)
            return (keys[None, None, None, :] <= self.index[:, None, :, None])
        mask = mask.expand(batch, -1, -1, -1)
        index = self.local_index(offset)
        return mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))


def selected_query_rows(query_membership: torch.Tensor, columns: Sequence[int]) -> SelectedQueries:
    """The rows of the query groups ``columns`` (indices into QUERY_GROUPS) of a (batch, q, group) membership."""
    keep = torch.zeros(query_membership.shape[-1], dtype=query_membership.dtype, device=query_membership.device)
    keep[list(columns)] = 1
    membership = query_membership * keep
    selected = membership.sum(dim=-1) > 0  # (batch, q)
    count = selected.sum(dim=1)
    width = max(1, int(count.max()))
    # stable sort puts each row's selected positions first, in order
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]
    filled = torch.arange(width, device=index.device)[None, :] < count[:, None]
    gathered = membership.gather(1, index[..., None].expand(-1, -1, membership.shape[-1])) * filled[..., None]
    return SelectedQueries(index, gathered)


def _text_states(hidden: torch.Tensor, layout: TokenLayout, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(text mean, last) states of a layer output whose positions start at ``offset`` (the
    layout's text tokens and last token all lie there; ``record_attention``'s ``cached_prefix``)."""
    hidden = hidden.detach().float()
    text = layout.text_mask_excluding_last()[:, offset:].to(hidden.dtype)
    counts = text.sum(dim=1, keepdim=True)
    text_mean = torch.einsum("bs,bsd->bd", text, hidden) / torch.where(counts > 0, counts, torch.nan)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), layout.last_index - offset]
    return text_mean, last


@dataclass(frozen=True)
class _LayerGroups:
    """A layer's token groups with what the reductions need (memberships and counts)."""

    layout: TokenLayout
    query_membership: torch.Tensor
    key_membership: torch.Tensor
    query_counts: torch.Tensor
    key_counts: torch.Tensor
    changed: bool  # True when the groups differ from the prompt's (tokens left before this layer)
    _selected: dict[tuple[int, ...], SelectedQueries] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, layout: TokenLayout, changed: bool) -> _LayerGroups:
        return cls(layout, layout.query_membership(), layout.key_membership(), layout.query_counts(),
                   layout.key_counts(), changed)

    def means(self, sums: GroupSums, prompt: _LayerGroups) -> tuple[torch.Tensor, torch.Tensor]:
        """Group means; a key group the prompt has but this layer lost is absent (NaN), not 0."""
        mass, entropy = sums.means(self.query_counts)
        if self.changed:
            gone = (self.key_counts == 0) & (prompt.key_counts > 0)  # (batch, key_group)
            mass = mass.masked_fill(gone[:, None, None, :], torch.nan)
        return mass, entropy

    def selected_rows(self, columns: Sequence[int]) -> SelectedQueries:
        """The rows of the query groups ``columns`` (:func:`selected_query_rows`), gathered once:
        every layer that holds the prompt's groups shares them."""
        key = tuple(columns)
        if key not in self._selected:
            self._selected[key] = selected_query_rows(self.query_membership, key)
        return self._selected[key]


class _LayerObserver:
    """The hooks of one recording block: attention reduced inside the attention hook, then one
    LayerRecord per decoder layer handed on after the layer's output.

    Only forwards over the layout's whole sequence (the prefill) are observed; decoding steps pass.
    """

    def __init__(
        self,
        recorder: AttentionRecorder,
        index_of_attention: dict[int, int],
        device: torch.device,
        *,
        record_attention: bool,
        record_states: bool,
        keep: bool,
        on_layer: Callable[[LayerRecord], None] | None,
        query_chunk: int | None,
        describe_implementation: Callable[[], str],
        stream: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] = lambda layer: None,
        fused: bool = True,
        record_generated: bool = False,
        sliding_layers: Sequence[int] = (),
        query_groups: Sequence[str] | None = None,
        cached_prefix: int = 0,
    ) -> None:
        self.recorder = recorder
        self.cached_prefix = cached_prefix
        self.index_of_attention = index_of_attention
        self.layout = recorder.layout.to(device)
        self.prompt_groups = _LayerGroups.of(self.layout, False)
        self.record_attention, self.record_states = record_attention, record_states
        self.keep, self.on_layer, self.query_chunk = keep, on_layer, query_chunk
        self.describe_implementation = describe_implementation
        self.stream = stream
        self.fused = fused
        self.record_generated = record_generated
        self.sliding_layers = frozenset(sliding_layers)
        self.query_columns = None if query_groups is None else [QUERY_GROUPS.index(g) for g in query_groups]
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending_generated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.mapped_layers = frozenset(index_of_attention.values())  # the layers with an attention map

    def groups_at(self, layer: int) -> _LayerGroups:
        """The token groups decoder layer ``layer`` holds: the prompt's, or, after a visual-token
        exit (a surgery's layer stream), those of the tokens that remain in its stream."""
        stream = self.stream(layer)
        if stream is None:
            return self.prompt_groups
        columns, present = (t.to(self.layout.group.device) for t in stream)
        group = torch.where(present, self.layout.group.gather(1, columns), PADDING)
        if group.shape == self.layout.group.shape and torch.equal(group, self.layout.group):
            return self.prompt_groups  # nothing has left yet
        is_last = present & (columns == self.layout.last_index[:, None])
        return _LayerGroups.of(TokenLayout(group, is_last.int().argmax(dim=1), self.layout.image_token_id), True)

    def is_prefill(self, layer: int, num_queries: int, num_keys: int, batch: int) -> bool:
        """A forward over the layout's whole sequence (its queries after the cached prefix, if any)."""
        length = self.groups_at(layer).layout.seq_len
        queries = length - self.cached_prefix
        return num_queries == queries and num_keys == length and batch == self.recorder.layout.batch_size

    def is_decoding(self, num_queries: int, batch: int) -> bool:
        """A decoding step of generate() (one new query per row) that the block records."""
        return self.record_generated and num_queries == 1 and batch == self.recorder.layout.batch_size

    def generated_groups(self, layer: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query membership (batch, 1, 1), key membership (batch, keys, len(GENERATED_KEY_GROUPS)),
        key counts (batch, len(GENERATED_KEY_GROUPS))) of the running decoding step: the prompt's
        key groups at its positions, then the answer so far (this step's query included).

        Raises:
            RecordingError: the layer's cache holds fewer keys than the prompt and the answer so far
                (a token-removing exit, or a sliding cache shorter than the prompt).
        """
        step, prompt = self.recorder.steps_recorded, self.prompt_groups.key_membership
        batch, length = prompt.shape[0], prompt.shape[1]
        seen = length + step + 1  # positions so far: the prompt, the answer before this step, this step's token
        if num_keys < seen and layer not in self.sliding_layers:
            raise RecordingError(
                f"expected decoder layer {layer} to attend over the whole prompt ({length} positions) and the "
                f"{step + 1} generated tokens at decoding step {step}, found {num_keys} keys: decoding statistics need "
                "every layer's cache to keep the prompt (no visual-token exit)"
            )
        keys = prompt.new_zeros(batch, max(seen, num_keys), len(GENERATED_KEY_GROUPS))
        keys[:, :length, : prompt.shape[-1]] = prompt
        keys[:, length:seen, -1] = 1  # a static cache's later slots are in no group (and masked)
        # a sliding-window layer's cache holds the latest positions only
        keys = keys[:, seen - num_keys : seen] if num_keys < seen else keys[:, :num_keys]
        return prompt.new_ones(batch, 1, 1), keys, keys.sum(dim=1).long()

    def _sums(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, query_membership: torch.Tensor,
              key_membership: torch.Tensor) -> GroupSums:
        with torch.no_grad():
            if self.fused and fused_kernel_name(query.device) is not None:
                self.recorder.kernel = fused_kernel_name(query.device)
                return fused_group_sums(query, key, mask, scaling, query_membership, key_membership)
            self.recorder.kernel = RECOMPUTED
            chunk = self.query_chunk or default_query_chunk(query.shape[2])
            return observed_group_sums(query, key, mask, scaling, query_membership, key_membership, chunk)

    def observe_sdpa(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        """Attention observer of the fast path: group sums recomputed from query and key."""
        layer = self.index_of_attention[id(module)]
        if not self.is_prefill(layer, query.shape[2], key.shape[2], query.shape[0]):
            if self.is_decoding(query.shape[2], query.shape[0]):
                query_membership, key_membership, counts = self.generated_groups(layer, key.shape[2])
                if mask is None:  # SDPA's mask function leaves it out when every key is visible
                    mask = torch.ones(query.shape[0], 1, 1, key.shape[2], dtype=torch.bool, device=query.device)
                sums = self._sums(query, key, mask, scaling, query_membership, key_membership)
                self.pending_generated[layer] = (*sums.means(query_membership.sum(dim=1).long()), counts)
            return
        groups = self.groups_at(layer)
        if self.query_columns is None:
            sums = self._sums(query, key, mask, scaling, groups.query_membership, groups.key_membership)
            self.pending[layer] = groups.means(sums, self.prompt_groups)
            return
        # The selected rows' (query x key) map is small (the text and last queries: tens of rows),
        # so it is formed directly: cheaper than a fused kernel's fixed cost per call.
        rows = groups.selected_rows(self.query_columns)
        offset = self.cached_prefix
        with torch.no_grad():
            sums = observed_group_sums(rows.gather_query(query, offset), key, rows.gather_mask(mask, key.shape[2], offset),
                                       scaling, rows.membership, groups.key_membership, rows.index.shape[1])
        self.recorder.kernel = RECOMPUTED
        mass, entropy = groups.means(sums, self.prompt_groups)
        others = [g for g in range(len(QUERY_GROUPS)) if g not in self.query_columns]
        mass[:, :, others], entropy[:, :, others] = torch.nan, torch.nan  # not recorded: never a made-up 0
        self.pending[layer] = (mass, entropy)

    def observe_eager(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of the eager path: group sums of the weights ``self_attn`` returns."""
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RecordingError(
                "expected attention weights as the second output of the self-attention module under "
                f"eager attention, found None (the decoder runs {self.describe_implementation()!r})"
            )
        layer = self.index_of_attention[id(module)]
        if not self.is_prefill(layer, weights.shape[2], weights.shape[3], weights.shape[0]):
            if self.is_decoding(weights.shape[2], weights.shape[0]):
                query_membership, key_membership, counts = self.generated_groups(layer, weights.shape[3])
                with torch.no_grad():
                    sums = group_sums(weights, query_membership, key_membership)
                self.pending_generated[layer] = (*sums.means(query_membership.sum(dim=1).long()), counts)
            return
        groups = self.groups_at(layer)
        chunk = self.query_chunk or default_query_chunk(weights.shape[2])
        with torch.no_grad():
            sums: GroupSums | None = None
            for start in range(0, weights.shape[2], chunk):
                part = group_sums(
                    weights[:, :, start : start + chunk], groups.query_membership[:, start : start + chunk],
                    groups.key_membership,
                )
                if sums is None:
                    sums = part
                else:
                    sums.add(part)
        assert sums is not None
        self.pending[layer] = groups.means(sums, self.prompt_groups)

    def after_layer(self, layer: int) -> Callable[..., None]:
        """The forward hook of decoder layer ``layer``: builds and hands on its LayerRecord."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not self.is_prefill(layer, hidden.shape[1], hidden.shape[1] + self.cached_prefix, hidden.shape[0]):
                if layer == 0:
                    self.recorder.forwards_skipped += 1
                if self.record_attention and self.is_decoding(hidden.shape[1], hidden.shape[0]):
                    self.finish_generated(layer)
                return
            self.finish_layer(layer, hidden)

        return hook

    def finish_generated(self, layer: int) -> None:
        """Keep decoder layer ``layer``'s record of the running decoding step (none for a layer without
        an attention map)."""
        if layer in self.mapped_layers and layer not in self.pending_generated:
            raise RecordingError(
                f"expected attention statistics for decoder layer {layer} at decoding step "
                f"{self.recorder.steps_recorded}, found none: its self-attention did not run "
                f"{self.recorder.attention!r} attention as requested"
            )
        if layer in self.mapped_layers:
            mass, entropy, counts = self.pending_generated.pop(layer)
            self.recorder.generated.append(
                LayerRecord(layer=layer, mass=mass, entropy=entropy, key_counts=counts, step=self.recorder.steps_recorded))
        if layer == self.recorder.num_layers - 1:
            self.recorder.steps_recorded += 1

    def finish_layer(self, layer: int, hidden: torch.Tensor) -> None:
        record = LayerRecord(layer=layer)
        groups = self.groups_at(layer)
        if groups.changed:
            record.query_counts, record.key_counts = groups.query_counts, groups.key_counts
        if self.record_attention and layer in self.mapped_layers:
            if layer not in self.pending:
                raise RecordingError(
                    f"expected attention statistics for decoder layer {layer} before its output, found "
                    f"none: its self-attention did not run {self.recorder.attention!r} attention as requested"
                )
            record.mass, record.entropy = self.pending.pop(layer)
        if self.record_states:
            record.text_mean, record.last = _text_states(hidden, groups.layout, self.cached_prefix)
        if layer == 0:
            self.recorder.forwards_recorded += 1
        if self.keep:
            self.recorder.records.append(record)
        if self.on_layer is not None:
            self.on_layer(record)


def _check_cached_prefix(layout: TokenLayout, cached_prefix: int, hook_kind: str, query_groups: Sequence[str] | None,
                         generated: bool) -> None:
    """Raise RecordingError unless a recording of the positions after ``cached_prefix`` can hold
    everything it reads (see ``record_attention``)."""
    if hook_kind != "attention_observer" or query_groups is None or generated:
        raise RecordingError("expected the fast path (attention='sdpa') with query_groups and without generated=True "
                             "for a recording after a cached prefix, found another setting")
    if not 0 < cached_prefix < layout.seq_len:
        raise RecordingError(f"expected a cached prefix shorter than the {layout.seq_len} positions, found {cached_prefix}")
    columns = [QUERY_GROUPS.index(g) for g in query_groups]
    prefix = slice(0, cached_prefix)
    inside = layout.query_membership()[:, prefix, columns].sum() + layout.text_mask_excluding_last()[:, prefix].sum()
    if bool(inside > 0) or bool((layout.last_index < cached_prefix).any()):
        raise RecordingError(f"expected every recorded query ({list(query_groups)}, the text tokens and the last token) "
                             f"after the cached prefix of {cached_prefix} positions, found some inside it")


@contextmanager
def record_attention(
    model: nn.Module,
    layout: TokenLayout,
    *,
    attention: str = "sdpa",
    record_attention: bool = True,
    record_states: bool = False,
    keep: bool = True,
    on_layer: Callable[[LayerRecord], None] | None = None,
    query_chunk: int | None = None,
    adapter: ModelAdapter | None = None,
    fused: bool = True,
    generated: bool = False,
    query_groups: Sequence[str] | None = None,
    cached_prefix: int = 0,
) -> Iterator[AttentionRecorder]:
    """Observe a model's decoder layer by layer for the duration of the block.

    Args:
        model: a supported image-text model (see ``analysis.adapters``).
        layout: token groups of the batch that will be run (``analysis.layout.token_layout``).
        attention: one of ``analysis.attention.ATTENTION_CHOICES``: "sdpa" (fast path, statistics
            on the side) or "eager" (weights from the hook).
        record_attention: compute group masses and entropies (at the layers with an attention map:
            a hybrid decoder's recurrent layers have none, ``recorder.layers_without_attention``).
        record_states: also compute the text-token states the exit gates consume.
        keep: keep every LayerRecord on the recorder; False hands them to ``on_layer`` only.
        on_layer: called with each LayerRecord right after its decoder layer ran.
        query_chunk: queries per chunk of the recomputed fast path (default: ``default_query_chunk``).
        fused: on the fast path, compute the statistics with one fused attention call whose values
            are the key-group indicators and the keys (``analysis.stats.fused_group_sums``) where
            the device has such a kernel; False, or a device without one, recomputes q k^T in
            query chunks beside SDPA. ``recorder.kernel`` says which ran.
        generated: also record the decoding steps of ``generate()`` run inside the block, into
            ``recorder.generated`` (whatever ``keep`` says); needs ``record_attention``.
        query_groups: on the fast path, compute the statistics of these query groups only (names
            of QUERY_GROUPS; the others are NaN): the attention call then runs over their rows
            alone, which is what makes the gates' statistics (text and last) cheap. None: all.
        cached_prefix: the forwards in the block run only the layout's positions from this one on,
            the earlier ones coming from the KV cache (a prefix shared by the rows, run once): their
            tokens count as keys as usual. Needs the fast path with ``query_groups``, whose tokens
            (and the text tokens and last token the states read) must all lie at or after it.

    Yields:
        The AttentionRecorder that fills up while the block runs.
    """
    path = attention_path(attention)
    unknown = sorted(set(query_groups or ()) - set(QUERY_GROUPS))
    if unknown:
        raise RecordingError(f"expected query groups among {list(QUERY_GROUPS)}, found {unknown}")
    if generated and not record_attention:
        raise RecordingError("expected record_attention=True with generated=True (decoding steps record attention), "
                             "found record_attention=False")
    if cached_prefix:
        _check_cached_prefix(layout, cached_prefix, path.hook_kind, query_groups, generated)
    adapter = adapter or resolve_adapter(model)
    layers = adapter.decoder_layers(model)
    mapped = adapter.attention_layers(model)  # a hybrid decoder's recurrent layers have no map to observe
    recorder = AttentionRecorder(layout=layout, attention=path.name, num_layers=len(layers),
                                 layers_without_attention=[i for i in range(len(layers)) if i not in mapped])
    observer = _LayerObserver(
        recorder,
        {id(layers[i].get_submodule(adapter.attention_attr)): i for i in mapped},
        next(model.parameters()).device,
        record_attention=record_attention,
        record_states=record_states,
        keep=keep,
        on_layer=on_layer,
        query_chunk=query_chunk,
        describe_implementation=lambda: adapter.attention_implementation(model),
        stream=lambda layer: layer_stream(model, layer),
        fused=fused,
        record_generated=generated,
        query_groups=query_groups,
        cached_prefix=cached_prefix,
        sliding_layers=[i for i, kind in enumerate(getattr(adapter.text_config(model), "layer_types", None) or ())
                        if kind == "sliding_attention"],
    )
    hooks = [Hook(p, observer.after_layer(i)) for i, p in enumerate(adapter.layer_paths(model))]
    hooks += adapter.whole_stream_hooks()  # every layer of a prefill sees every query (Gemma4's KV-shared layers)
    if record_attention:
        read = observer.observe_sdpa if path.hook_kind == "attention_observer" else observer.observe_eager
        paths = adapter.attention_paths(model)
        hooks += [Hook(paths[i], read, kind=path.hook_kind) for i in mapped]
    implementation = path.record_implementation if record_attention else None
    with attached(model, hooks), running_attention(model, adapter, implementation):
        yield recorder
