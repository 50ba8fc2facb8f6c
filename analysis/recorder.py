"""Record per-layer attention statistics (and, on request, text-token states) during a forward.

``record_attention(model, layout)`` is a context manager. Inside it, every forward whose
sequence is the layout's (the prefill) is observed layer by layer; other forwards (decoding
steps of generate()) pass through untouched. Attention is reduced to group statistics inside
the hook: no layer's map is kept.

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
from analysis.schema import statistics_table
from analysis.stats import GroupSums, fused_group_sums, fused_kernel_name, group_sums, logit_group_sums

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
            from the prompt's (the layers after a visual-token exit), else None.
    """

    layer: int
    mass: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    text_mean: torch.Tensor | None = None
    last: torch.Tensor | None = None
    query_counts: torch.Tensor | None = None
    key_counts: torch.Tensor | None = None


@dataclass
class AttentionRecorder:
    """The result of a recording block; filled while the block runs.

    Attributes:
        layout: the token groups of the batch being recorded.
        attention: how attention was observed ("sdpa" or "eager").
        records: one LayerRecord per decoder layer and recorded forward, in layer order
            (empty when ``keep=False``: consumers then receive them through ``on_layer``).
        forwards_recorded: prefills observed; forwards_skipped: other forwards (decoding steps).
    """

    layout: TokenLayout
    attention: str
    num_layers: int
    records: list[LayerRecord] = field(default_factory=list)
    kernel: str | None = None  # the fast path's statistics kernel (fused_kernel_name, or RECOMPUTED); None: eager
    forwards_recorded: int = 0
    forwards_skipped: int = 0

    def to_table(self, sample_ids: Sequence[str], heads: str = "mean") -> pa.Table:
        """The recorded statistics as a long-format table following ``analysis.schema``."""
        if not self.records or self.records[0].mass is None:
            raise RecordingError(
                "expected recorded attention statistics, found none: run a forward over the layout's "
                f"{self.layout.seq_len} tokens inside the recording block"
            )
        if len(self.records) != self.num_layers:
            raise RecordingError(
                f"expected one record per decoder layer ({self.num_layers}) from a single forward, "
                f"found {len(self.records)}; record each forward in its own block"
            )
        return statistics_table(self.records, self.layout, sample_ids, heads)

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


def _text_states(hidden: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = hidden.detach().float()
    text = layout.text_mask_excluding_last().to(hidden.dtype)
    counts = text.sum(dim=1, keepdim=True)
    text_mean = torch.einsum("bs,bsd->bd", text, hidden) / torch.where(counts > 0, counts, torch.nan)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), layout.last_index]
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
    ) -> None:
        self.recorder = recorder
        self.index_of_attention = index_of_attention
        self.layout = recorder.layout.to(device)
        self.prompt_groups = _LayerGroups.of(self.layout, False)
        self.record_attention, self.record_states = record_attention, record_states
        self.keep, self.on_layer, self.query_chunk = keep, on_layer, query_chunk
        self.describe_implementation = describe_implementation
        self.stream = stream
        self.fused = fused
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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
        length = self.groups_at(layer).layout.seq_len
        return num_queries == num_keys == length and batch == self.recorder.layout.batch_size

    def observe_sdpa(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        """Attention observer of the fast path: group sums recomputed from query and key."""
        layer = self.index_of_attention[id(module)]
        if not self.is_prefill(layer, query.shape[2], key.shape[2], query.shape[0]):
            return
        groups = self.groups_at(layer)
        with torch.no_grad():
            if self.fused and fused_kernel_name(query.device) is not None:
                sums = fused_group_sums(query, key, mask, scaling, groups.query_membership, groups.key_membership)
                self.recorder.kernel = fused_kernel_name(query.device)
            else:
                chunk = self.query_chunk or default_query_chunk(query.shape[2])
                sums = observed_group_sums(query, key, mask, scaling, groups.query_membership, groups.key_membership,
                                           chunk)
                self.recorder.kernel = RECOMPUTED
        self.pending[layer] = groups.means(sums, self.prompt_groups)

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
            if not self.is_prefill(layer, hidden.shape[1], hidden.shape[1], hidden.shape[0]):
                if layer == 0:
                    self.recorder.forwards_skipped += 1
                return
            self.finish_layer(layer, hidden)

        return hook

    def finish_layer(self, layer: int, hidden: torch.Tensor) -> None:
        record = LayerRecord(layer=layer)
        groups = self.groups_at(layer)
        if groups.changed:
            record.query_counts, record.key_counts = groups.query_counts, groups.key_counts
        if self.record_attention:
            if layer not in self.pending:
                raise RecordingError(
                    f"expected attention statistics for decoder layer {layer} before its output, found "
                    f"none: its self-attention did not run {self.recorder.attention!r} attention as requested"
                )
            record.mass, record.entropy = self.pending.pop(layer)
        if self.record_states:
            record.text_mean, record.last = _text_states(hidden, groups.layout)
        if layer == 0:
            self.recorder.forwards_recorded += 1
        if self.keep:
            self.recorder.records.append(record)
        if self.on_layer is not None:
            self.on_layer(record)


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
) -> Iterator[AttentionRecorder]:
    """Observe a model's decoder layer by layer for the duration of the block.

    Args:
        model: a supported image-text model (see ``analysis.adapters``).
        layout: token groups of the batch that will be run (``analysis.layout.token_layout``).
        attention: one of ``analysis.attention.ATTENTION_CHOICES``: "sdpa" (fast path, statistics
            on the side) or "eager" (weights from the hook).
        record_attention: compute group masses and entropies.
        record_states: also compute the text-token states the exit gates consume.
        keep: keep every LayerRecord on the recorder; False hands them to ``on_layer`` only.
        on_layer: called with each LayerRecord right after its decoder layer ran.
        query_chunk: queries per chunk of the recomputed fast path (default: ``default_query_chunk``).
        fused: on the fast path, compute the statistics with one fused attention call whose values
            are the key-group indicators and the keys (``analysis.stats.fused_group_sums``) where
            the device has such a kernel; False, or a device without one, recomputes q k^T in
            query chunks beside SDPA. ``recorder.kernel`` says which ran.

    Yields:
        The AttentionRecorder that fills up while the block runs.
    """
    path = attention_path(attention)
    adapter = adapter or resolve_adapter(model)
    layers = adapter.decoder_layers(model)
    recorder = AttentionRecorder(layout=layout, attention=path.name, num_layers=len(layers))
    observer = _LayerObserver(
        recorder,
        {id(layers[i].get_submodule(adapter.attention_attr)): i for i in range(len(layers))},
        next(model.parameters()).device,
        record_attention=record_attention,
        record_states=record_states,
        keep=keep,
        on_layer=on_layer,
        query_chunk=query_chunk,
        describe_implementation=lambda: adapter.attention_implementation(model),
        stream=lambda layer: layer_stream(model, layer),
        fused=fused,
    )
    hooks = [Hook(p, observer.after_layer(i)) for i, p in enumerate(adapter.layer_paths(model))]
    if record_attention:
        read = observer.observe_sdpa if path.hook_kind == "attention_observer" else observer.observe_eager
        hooks += [Hook(p, read, kind=path.hook_kind) for p in adapter.attention_paths(model)]
    implementation = path.record_implementation if record_attention else None
    with attached(model, hooks), running_attention(model, adapter, implementation):
        yield recorder
