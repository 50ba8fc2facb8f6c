"""Reversible removal of image tokens after decoder layers, per row, KV-cache aware.

``visual_token_exit(model, exit_layers)`` makes a ``VisualExit`` handle for one model instance:
making it checks the plan, the module paths and the attention implementation and attaches
nothing; entering it as a context manager (or calling ``attach()``) attaches its hooks through
``analysis.hooks.attached``, and leaving it (or ``remove()``) detaches them. While attached, every
prefill of the model drops the image tokens of row ``b``
from the decoder layers after ``exit_layers[b]``; text tokens keep their original positions
(RoPE cos/sin are taken at the original position ids), so removal after layer k gives the same
text-token outputs as masking the image keys for every query in the layers after k.

The general form is a removal plan over the prompt's image positions: each image position of a
row leaves after some layer, or never. An exit after layer k removes every image position of the
row that is still there after k; ``removals={k: positions}`` (up front) or
``VisualExit.request_removal(k, positions)`` (during the prefill) removes only the given image
positions after k, which is what FastV does (``exit.baselines``). Both combine: FastV after K,
then the rest of the row's image tokens at its exit (DyVTE + FastV).

How (per prefill, derived from input_ids and the attention mask; no fixed offsets):
- While some rows of the batch have removed nothing that the stream still holds, the rows that
  have keep their slots and the removed keys are masked in the later layers (exact, no saving for
  that row yet): the layer's own 4-D mask is kept with those keys switched off, so whatever the
  family adds to a causal mask (Gemma3's bidirectional image blocks, sliding windows) still holds
  for the other rows.
- Once every row has removed tokens the stream still holds, the stream is compacted: each row's
  remaining real tokens are gathered right-aligned (left padding) into one shorter length shared
  by the batch, with their position ids (also M-RoPE's (3, batch, seq) ones) and the layer's
  cos/sin (M-RoPE is already folded into them; Gemma3's sliding and full layers each bring their
  own) gathered alongside, and the layer's own mask gathered at the kept rows and columns (a
  padding + causal mask where the model passed none). From then on the layers, and their
  KV-cache layers, hold no removed keys and values. A later removal (a gate firing after FastV
  pruned) compacts again, by the same rule, from the compacted stream. For exits alone this is
  one compaction, once every row has exited.
- Layer inputs with one entry per token besides the states (``ModelAdapter.layer_token_inputs``:
  Gemma4's per-layer embeddings, which the model hands every layer at full length) are gathered at
  the kept slots of every compacted layer, as cos/sin are.
- KV sharing (``ModelAdapter.kv_sharing``: Gemma4's later layers read the keys and values of the
  last earlier layer of their type): a reusing layer j reads what its source i computed over i's
  stream. Where i ran at full length or on another compaction than j (i at or before the exit, or a
  removal between them), those keys and values are gathered at j's slots, so j sees no key that has
  left and every text key; where i ran on j's stream they are j's already. While decoding, j attends
  to i's cache (which decoding reads) with the columns gone before j switched off. A copy of the
  shared mapping carries the gathered keys, so the storing layers keep writing into the model's own.
- A family whose text model runs its later layers on the last queries only under generate()'s
  ``logits_to_keep`` (``ModelAdapter.query_slicing``: Gemma4's KV-shared layers) gets 0 there in a
  prefill that removes, or may remove, tokens, so every layer holds the whole (kept) stream.
- Recurrent layers (``ModelAdapter.recurrent``: Qwen3.5's Gated DeltaNet layers) carry a state that
  decays at every token of their stream, so masking a token is not removing it: with such layers
  the stream is compacted as soon as any row removes tokens (rows that removed nothing keep all of
  theirs) and ``compact=False`` is refused. They get the 2-D padding mask of the compacted slots,
  which zeroes the left padding's inputs so their states stay zero there, as in the stock model;
  while decoding, their conv and recurrent states (built from the kept tokens) are left as they are.
- Before the decoder's final norm the compacted states are scattered back to the original
  positions, so the model's outputs keep their shape (the decoder layers themselves, and anything
  observing them, see the compacted stream). Logits are valid at kept positions only: at
  removed image positions (and padding) they come from the state the stream held when it was
  last compacted.

Decoding with the KV cache (``generate()``; ``DynamicCache``): positions of new tokens come from
the model as usual (layer 0, which always holds the full length); the attention mask of every
layer after a removal is rebuilt from that layer's own stored slots plus the new tokens, since the
cache layers differ in length. At a sliding-window layer (a sliding cache layer, or one the text
config's ``layer_types`` / ``sliding_window`` make sliding) the window counts prompt columns, as
the stock mask does, over the slots the cache layer still holds.
Decoding never changes an exit or removal decision.

Limits: eager and SDPA attention only (and the recorder's observed SDPA); ``DynamicCache`` only,
with dynamic or dynamic sliding-window layers (static caches are rejected while decoding); inputs
must carry ``input_ids`` and a 2-D attention mask (or none); beam search, whose cache reordering
mixes rows, is not supported with per-row exits (an exit shared by all rows is unaffected by
reordering but untested). Tested per family in tests/test_families.py.

The exit layer of a row is fixed up front (``exit_layers``) or decided during the prefill by
calling ``VisualExit.request_exit(layer, rows)`` right after ``layer`` ran (what the gates do);
likewise removals (``removals`` up front, ``request_removal`` during the prefill, any time
before layer + 1 starts). A row that never exits, or exits after the last layer, leaves the model
untouched: with nothing removed in the batch every hook returns without changing anything, so
outputs are bit-identical to the stock model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.attention import DECODER_IMPLEMENTATIONS
from analysis.errors import DyVTEError
from analysis.hooks import Hook, attached, missing_paths, missing_paths_message
from analysis.layout import IMAGE, PADDING, TokenLayout, token_layout

SUPPORTED_ATTENTION = DECODER_IMPLEMENTATIONS
NO_EXIT = -1
"""Value of a row's exit layer when it does not exit (yet)."""


class ExitSurgeryError(DyVTEError, RuntimeError):
    """The exit surgery was asked for something it cannot do, or the model ran inputs it cannot follow."""


@dataclass
class CompactLayout:
    """Where each row's kept tokens sit in the compacted stream.

    Attributes:
        index: (batch, length) int64 original position of each slot (0 in padding slots).
        valid: (batch, length) bool, True where the slot holds a kept (non-image, real) token.
    """

    index: torch.Tensor
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.index.shape[1])

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Slots of ``tensor`` (batch or 1, seq, ...) -> (batch, length, ...)."""
        tensor = tensor.expand(self.index.shape[0], *tensor.shape[1:])
        rows = torch.arange(self.index.shape[0], device=self.index.device)[:, None]
        return tensor[rows, self.index]

    def gather_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids (batch or 1, seq), or with leading axes such as M-RoPE's (3, batch, seq),
        gathered along the sequence -> (..., batch, length)."""
        if position_ids.dim() < 2:
            raise ExitSurgeryError(f"expected position ids of shape (..., batch, seq), found {tuple(position_ids.shape)}")
        leading = position_ids.shape[:-2]
        flat = position_ids.reshape(-1, *position_ids.shape[-2:])
        gathered = torch.stack([self.gather(part) for part in flat])
        return gathered.reshape(*leading, *gathered.shape[-2:])

    def scatter(self, compact: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """A copy of ``into`` (batch, seq, ...) with the valid slots of ``compact`` written back."""
        out = into.clone()
        rows, slots = self.valid.nonzero(as_tuple=True)
        out[rows, self.index[rows, slots]] = compact[rows, slots].to(out.dtype)
        return out


def compact_layout(keep: torch.Tensor) -> CompactLayout:
    """Right-aligned compaction of the positions where ``keep`` (batch, seq) bool is True.

    Kept tokens keep their order; every row gets ``max(keep.sum(1))`` slots, unused slots first.
    """
    if keep.dim() != 2:
        raise ExitSurgeryError(f"expected a (batch, seq) keep mask, found shape {tuple(keep.shape)}")
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    rank = keep.long().cumsum(dim=1) - 1
    slot = rank + (length - counts)[:, None]
    rows, positions = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], length, dtype=torch.bool, device=keep.device)
    index[rows, slot[rows, positions]] = positions
    valid[rows, slot[rows, positions]] = True
    return CompactLayout(index=index, valid=valid)


def check_attention_implementation(implementation: str, user: str = "") -> None:
    """Raise ExitSurgeryError unless the decoder's attention ``implementation`` is one the surgery
    handles (``SUPPORTED_ATTENTION``); ``user`` names who asks, for the message."""
    if implementation not in SUPPORTED_ATTENTION:
        raise ExitSurgeryError(
            f"expected the decoder to run one of {list(SUPPORTED_ATTENTION)} attention"
            f"{' for ' + user if user else ''}, found {implementation!r}"
        )


def check_module_paths(model: nn.Module, hooks: Sequence[Hook]) -> None:
    """Raise ExitSurgeryError unless every hook's path names a module of ``model`` (what
    ``analysis.hooks.attached`` checks on entry, checked here when a handle is made)."""
    missing = missing_paths(model, list(hooks))
    if missing:
        raise ExitSurgeryError(missing_paths_message(model, missing))


def attention_mask_for_keys(
    config: Any, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """A 4-D causal mask over ``key_valid.shape[1]`` key slots whose queries are the last ``query_length``.

    Built by the mask function registered for ``config._attn_implementation`` (bool for SDPA,
    additive float for eager), exactly as transformers builds a padded causal mask: key slot j is
    visible to query slot i iff j <= i and ``key_valid[:, j]``.
    """
    implementation = config._attn_implementation
    check_attention_implementation(implementation)
    kv_length = int(key_valid.shape[1])
    mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=int(key_valid.shape[0]),
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_valid,
        allow_is_causal_skip=False,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=key_valid.device,
    )
    assert mask is not None
    return mask


def check_recurrent_removal(adapter: ModelAdapter, model: nn.Module, compact: bool) -> None:
    """Raise ExitSurgeryError unless removing tokens from a decoder with recurrent layers can be exact:
    those layers must get a compacted stream (masking a token still decays their state over its slot),
    so ``compact`` must be on and the stream compactable after every layer (no deepstack)."""
    recurrent = adapter.recurrent_layers(model)
    if not recurrent:
        return
    if not compact:
        raise ExitSurgeryError(
            f"expected compact=True for {adapter.model_type!r}: its recurrent (linear-attention) layers {recurrent} decay "
            "their state at every token of their stream, so masking removed tokens is not removing them"
        )
    if adapter.first_compactable_layer(model) > 0:
        raise ExitSurgeryError(
            f"expected a stream that may be compacted after every layer for {adapter.model_type!r}, found vision features "
            f"added up to layer {adapter.first_compactable_layer(model)} besides recurrent layers {recurrent}"
        )


def _without_keys(mask: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """A 4-D mask (bool: True = attend, or additive float) with the ``removed`` (batch, key) keys masked."""
    removed = removed[:, None, None, :].to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~removed
    return mask.masked_fill(removed, torch.finfo(mask.dtype).min)


def _exit_plan(exit_layers: int | Sequence[int | None] | None, num_layers: int) -> list[int] | int | None:
    def check(value: int | None) -> int:
        if value is None:
            return NO_EXIT
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_layers:
            raise ExitSurgeryError(
                f"expected an exit layer in 0..{num_layers - 1} (exit after that decoder layer) or None, found {value!r}"
            )
        return int(value)

    if exit_layers is None:
        return None
    if isinstance(exit_layers, int):
        return check(exit_layers)
    return [check(value) for value in exit_layers]


@dataclass
class _Run:
    """State of one prefill and the decoding steps that follow it."""

    layout: TokenLayout
    drop_layer: torch.Tensor  # (batch, seq) int64: the layer after which each position leaves, NO_EXIT = stays
    decoding: bool = False
    seen: int = 0  # tokens of the prompt and the decoding steps so far (the cache's columns)
    current_layer: int = -1  # the last decoder layer the prefill entered
    attention_mask: torch.Tensor | None = None  # (batch, seen + new) bool while decoding
    layer_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # prefill key slots per layer
    layer_columns: dict[int, torch.Tensor] = field(default_factory=dict)  # their columns in the prompt
    layer_held: dict[int, torch.Tensor] = field(default_factory=dict)  # slots holding a token (left or not)
    # (columns, visible) of the prefill's cached keys a layer attends to while decoding: its own, or for
    # a KV-reusing layer those of the layer it reads (with the tokens gone before it switched off)
    decoding_slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    compact: CompactLayout | None = None
    compact_from: int | None = None  # the first layer that ran on a compacted stream
    snapshot: torch.Tensor | None = None  # full stream when it was last compacted

    def removed_before(self, layer: int) -> torch.Tensor:
        """(batch, seq) bool: positions that left after a layer before ``layer``."""
        return (self.drop_layer != NO_EXIT) & (self.drop_layer < layer)

    def remove(self, layer: int, positions: torch.Tensor) -> None:
        """Positions ((batch, seq) bool) leave after ``layer``, or earlier where they already do."""
        later = (self.drop_layer == NO_EXIT) | (self.drop_layer > layer)
        self.drop_layer = torch.where(positions.to(self.drop_layer.device) & later, layer, self.drop_layer)


def _removal_plan(removals: Mapping[int, torch.Tensor] | None, num_layers: int) -> dict[int, torch.Tensor]:
    plan: dict[int, torch.Tensor] = {}
    for layer, positions in (removals or {}).items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ExitSurgeryError(
                f"expected removal layers in 0..{num_layers - 1} (removed after that decoder layer), found {layer!r}"
            )
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
            found = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ExitSurgeryError(f"expected (batch, seq) bool positions to remove after layer {layer}, found {found}")
        plan[int(layer)] = positions.bool()
    return plan


class VisualExit:
    """Exit surgery on one model instance: a context manager, or ``attach()`` then ``remove()``.

    Constructing checks everything (the plan, the module paths, the attention implementation)
    and attaches nothing; entering the block (or ``attach()``) attaches the hooks through
    ``analysis.hooks.attached``, leaving it (or ``remove()``, idempotent) detaches them. What the
    last prefill did (``exit_layers``, ``tokens_per_layer()``, ...) stays readable after removal.

    Attributes:
        model: the model instance the hooks are attached to.
        num_layers: decoder layers of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        exit_layers: int | Sequence[int | None] | None = None,
        *,
        removals: Mapping[int, torch.Tensor] | None = None,
        compact: bool = True,
        adapter: ModelAdapter | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or resolve_adapter(model)
        layer_paths = self.adapter.layer_paths(model)
        self.num_layers = len(layer_paths)
        self._plan = _exit_plan(exit_layers, self.num_layers)
        self._removals = _removal_plan(removals, self.num_layers)
        self._compact = compact
        self._first_compact = self.adapter.first_compactable_layer(model)
        self._config = self.adapter.text_config(model)
        self._image_token_id = self.adapter.image_token_id(model)
        # Recurrent layers (a hybrid decoder's linear attention) carry a state that decays at every
        # token of their stream, so a masked token is not a removed one: they only ever see the kept tokens.
        self._recurrent = frozenset(self.adapter.recurrent_layers(model))
        check_recurrent_removal(self.adapter, model, compact)
        check_attention_implementation(self.adapter.attention_implementation(model), "the exit surgery")
        self._kv_sources = self.adapter.kv_sources(model)
        self._token_inputs = self.adapter.layer_token_positions(model)
        self._run: _Run | None = None
        self._hooks = [Hook("", self._before_model, kind="forward_pre", with_kwargs=True)]
        self._hooks += [
            Hook(path, self._before_layer(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(layer_paths)
        ]
        # A prefill that may remove tokens runs every query through every layer (Gemma4's KV-shared
        # layers would otherwise see only the last one under generate()).
        self._hooks += self.adapter.whole_stream_hooks(when=self._may_remove)
        # The decoder's layers keep the compacted stream; the final norm gets it back at full length.
        self._hooks.append(Hook(self.adapter.final_norm_path, self._before_final_norm, kind="forward_pre"))
        # Observers (the recorder) learn from it which tokens each layer of a prefill holds.
        self._hooks.append(Hook("", self._layer_stream, kind="layer_stream"))
        check_module_paths(model, self._hooks)
        self._stack: ExitStack | None = None

    # public -------------------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        """True between ``attach()`` (or entering the block) and ``remove()`` (or leaving it)."""
        return self._stack is not None

    def attach(self) -> VisualExit:
        """Attach the hooks (through ``analysis.hooks.attached``); returns the handle.

        Raises:
            ExitSurgeryError: the handle is attached already.
        """
        if self._stack is not None:
            raise ExitSurgeryError("expected a detached exit surgery to attach, found it attached already")
        stack = ExitStack()
        stack.enter_context(attached(self.model, self._hooks))
        self._run = None  # a new attachment never follows the prefill of an earlier one
        self._stack = stack
        return self

    def remove(self) -> None:
        """Detach every hook of this surgery (idempotent); ``exit_layers`` stays readable."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> VisualExit:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _may_remove(self) -> bool:
        """True while a prefill runs that removes tokens, or may (exits decided during it)."""
        run = self._run
        if run is None or run.decoding:
            return False
        return self._plan is None or bool((run.drop_layer != NO_EXIT).any())

    def _current(self) -> _Run:
        if self._run is None:
            raise ExitSurgeryError("expected a prefill to have run under the surgery, found none")
        return self._run

    @property
    def exit_layers(self) -> list[int | None]:
        """Exit layer of each row of the last prefill: the layer after which its last image token
        left (None: some image token stayed to the end)."""
        run = self._current()
        image = run.layout.group.to(run.drop_layer.device) == IMAGE
        gone = (run.drop_layer != NO_EXIT) | ~image
        last = torch.where(image, run.drop_layer, NO_EXIT).max(dim=1).values
        return [int(layer) if bool(done) else None for layer, done in zip(last.tolist(), gone.all(dim=1).tolist())]

    @property
    def layout(self) -> TokenLayout:
        """Token groups of the last prefill."""
        return self._current().layout

    @property
    def drop_layers(self) -> torch.Tensor:
        """(batch, seq) int64 of the last prefill: the layer after which each prompt position left
        (NO_EXIT: it stayed; only image positions ever leave)."""
        return self._current().drop_layer.clone()

    def tokens_per_layer(self) -> torch.Tensor:
        """(batch, num_layers) int64: the real tokens of each row that each decoder layer of the last
        prefill processed, counted as if the row ran alone (what its FLOPs depend on)."""
        run = self._current()
        real = run.layout.group.to(run.drop_layer.device) != PADDING
        return torch.stack([(real & ~run.removed_before(i)).sum(dim=1) for i in range(self.num_layers)], dim=1)

    def stream_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where decoder layer ``layer`` of the running prefill stands, once its input is set up:
        ``(columns, present)``, (batch, slots) int64 prompt position of each slot of its stream and
        (batch, slots) bool, True where the slot holds a token that has not left (its keys are seen)."""
        run = self._current()
        if layer in run.layer_columns:
            return run.layer_columns[layer], run.layer_keys[layer]
        group = run.layout.group.to(run.drop_layer.device)
        return torch.arange(group.shape[1], device=group.device).expand_as(group), group != PADDING

    def _layer_stream(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``analysis.hooks.layer_stream``'s answer for this surgery: ``stream_slots(layer)`` while
        a prefill runs, once the layer's input is set up; None otherwise."""
        run = self._run
        if run is None or run.decoding or layer > run.current_layer:
            return None
        return self.stream_slots(layer)

    @property
    def prefilling(self) -> bool:
        """True while a prefill runs (or ran last) under the surgery, False once decoding started."""
        return self._run is not None and not self._run.decoding

    def pending_rows(self) -> torch.Tensor:
        """(batch,) bool: rows of the current prefill with image tokens that have not left yet."""
        run = self._current()
        image = run.layout.group.to(run.drop_layer.device) == IMAGE
        return (image & (run.drop_layer == NO_EXIT)).any(dim=1)

    def _check_request(self, layer: int) -> _Run:
        run = self._run
        if run is None or run.decoding:
            raise ExitSurgeryError("expected exits and removals during a prefill; decoding never changes them")
        if not 0 <= layer < self.num_layers:
            raise ExitSurgeryError(f"expected an exit layer in 0..{self.num_layers - 1}, found {layer}")
        if layer < run.current_layer:
            raise ExitSurgeryError(
                f"expected a removal after a layer that has not been followed yet (the prefill is at layer "
                f"{run.current_layer}), found one after layer {layer}"
            )
        return run

    def request_exit(self, layer: int, rows: torch.Tensor) -> None:
        """Make ``rows`` ((batch,) bool) exit after ``layer``: their image tokens still present leave.

        Call it right after ``layer`` ran (before layer + 1 starts). Image tokens that leave earlier
        (an earlier exit, or an earlier removal) keep their earlier layer. Only valid during a prefill.
        """
        run = self._check_request(layer)
        rows = rows.to(run.drop_layer.device).bool()
        if rows.shape != run.drop_layer.shape[:1]:
            raise ExitSurgeryError(f"expected rows of shape {tuple(run.drop_layer.shape[:1])}, found {tuple(rows.shape)}")
        image = run.layout.group.to(run.drop_layer.device) == IMAGE
        run.remove(layer, image & rows[:, None])

    def request_removal(self, layer: int, positions: torch.Tensor) -> None:
        """Make the image tokens at ``positions`` ((batch, seq) bool over the prompt) leave after ``layer``.

        Call it before layer + 1 starts (from inside ``layer`` is fine: FastV ranks in its attention).
        Positions that leave earlier keep their earlier layer. Only valid during a prefill.

        Raises:
            ExitSurgeryError: a position is not an image token of its row, or the shape is not the prompt's.
        """
        run = self._check_request(layer)
        run.remove(layer, self._image_positions(run, positions, f"removal after layer {layer}"))

    def _image_positions(self, run: _Run, positions: torch.Tensor, what: str) -> torch.Tensor:
        group = run.layout.group.to(run.drop_layer.device)
        positions = positions.to(group.device).bool()
        if positions.shape[0] != group.shape[0] or positions.shape[1] > group.shape[1]:
            raise ExitSurgeryError(
                f"expected {what} over the prompt's (batch, seq) = {tuple(group.shape)} positions, found {tuple(positions.shape)}"
            )
        if positions.shape[1] < group.shape[1]:  # a prompt followed by generated tokens (recomputation)
            positions = torch.cat([positions, positions.new_zeros(group.shape[0], group.shape[1] - positions.shape[1])], 1)
        if bool((positions & (group != IMAGE)).any()):
            row, column = (positions & (group != IMAGE)).nonzero()[0].tolist()
            raise ExitSurgeryError(
                f"expected {what} to name image positions only, found position {column} of row {row}, which is not an image token"
            )
        return positions

    # hooks --------------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if input_ids is None:
            raise ExitSurgeryError("expected input_ids (the image positions are read from them), found inputs_embeds only")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ExitSurgeryError(
                f"expected a 2-D (batch, seq) attention mask, found shape {tuple(attention_mask.shape)}"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._run = self._start_prefill(input_ids, attention_mask)
        else:
            # The run counts what was seen: cache.get_seq_length() reads the first attention layer's cache,
            # which after an exit holds fewer slots where recurrent layers come first (Qwen3.5).
            self._start_decoding(input_ids, attention_mask, cache, past if self._run is None else self._run.seen)

    def _start_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Run:
        """The run of a new prefill, with the exits and removals planned up front."""
        layout = token_layout(input_ids, attention_mask, self._image_token_id)
        run = _Run(layout=layout, drop_layer=torch.full_like(layout.group, NO_EXIT), seen=layout.seq_len)
        exits = self._initial_exits(layout.batch_size, input_ids.device)
        image = layout.group == IMAGE
        for layer in sorted(set(exits.tolist()) - {NO_EXIT}):
            run.remove(layer, image & (exits == layer)[:, None])
        for layer in sorted(self._removals):
            run.remove(layer, self._image_positions(run, self._removals[layer], f"the removal after layer {layer}"))
        return run

    def _start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any, past: int
    ) -> None:
        """Check that a decoding step follows this surgery's prefill in a DynamicCache; keep its mask."""
        run = self._run
        if run is None or run.layout.batch_size != input_ids.shape[0]:
            before = "no prefill" if run is None else f"a prefill of {run.layout.batch_size} rows"
            raise ExitSurgeryError(
                "expected decoding steps to follow a prefill of the same batch under this surgery, "
                f"found a cache of {past} tokens and {before}"
            )
        for i in sorted({self._kv_sources.get(layer, layer) for layer in run.decoding_slots}):
            layer_cache = cache.layers[i]  # a KV-reusing layer's own is a placeholder: its source's is read
            sliding_ok = isinstance(layer_cache, DynamicSlidingWindowLayer) and not layer_cache.record_past
            if not isinstance(layer_cache, DynamicLayer) or (layer_cache.is_sliding and not sliding_ok):
                raise ExitSurgeryError(
                    f"expected a DynamicCache (dynamic or dynamic sliding-window layers), found a "
                    f"{type(layer_cache).__name__} at layer {i}"
                )
        total = past + input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], total, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape[1] != total:
            raise ExitSurgeryError(
                f"expected an attention mask over {total} tokens while decoding, found {attention_mask.shape[1]}"
            )
        run.decoding = True
        run.seen = total
        run.attention_mask = attention_mask.bool()

    def _initial_exits(self, batch: int, device: torch.device) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            return torch.full((batch,), NO_EXIT, dtype=torch.long, device=device)
        if isinstance(plan, int):
            return torch.full((batch,), plan, dtype=torch.long, device=device)
        if len(plan) != batch:
            raise ExitSurgeryError(f"expected one exit layer per row ({batch} rows), found {len(plan)}")
        return torch.tensor(plan, dtype=torch.long, device=device)

    def _before_layer(self, layer: int) -> Any:
        """The forward pre-hook of decoder layer ``layer``: its inputs while decoding or prefilling."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.decoding:
                return self._decoding_inputs(run, layer, hidden, args, kwargs)
            return self._prefill_inputs(run, layer, hidden, args, kwargs)

        return hook

    def _decoding_inputs(
        self, run: _Run, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """A decoding step's mask at ``layer`` over the slots its cache layer kept from the prefill
        plus the new tokens (None: the prefill removed nothing before this layer). A KV-reusing layer
        attends to the keys its source layer hands it: that layer's slots, minus the tokens gone
        before this layer."""
        slots = run.decoding_slots.get(layer)
        if slots is None:
            return None
        columns, keys = slots
        new_keys = run.attention_mask[:, run.layout.seq_len :].to(keys.device)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        valid = torch.cat([keys, new_keys], 1)
        source = self._kv_sources.get(layer)
        if source is None:
            if cache is not None and cache.get_seq_length(layer) + hidden.shape[1] != valid.shape[1]:
                raise ExitSurgeryError(
                    f"expected decoder layer {layer}'s cache to hold {valid.shape[1] - hidden.shape[1]} "
                    f"tokens, found {cache.get_seq_length(layer)}"
                )
            visible = None
        else:
            visible = self._shared_keys(layer, kwargs)[0].shape[-2]
        window = self._sliding_window(layer if source is None else source, cache)
        if window is None:
            if visible is not None and visible != valid.shape[1]:
                raise ExitSurgeryError(
                    f"expected KV-reusing decoder layer {layer} to read the {valid.shape[1]} keys of layer {source}, "
                    f"found {visible}"
                )
            mask = attention_mask_for_keys(self._config, valid, hidden.shape[1], hidden.dtype)
        else:
            if visible is None:
                visible = self._sliding_visible(layer, cache, valid, hidden)
            mask = self._sliding_decoding_mask(run, columns, valid, hidden, window, visible)
        return args, {**kwargs, "attention_mask": mask}

    def _prefill_inputs(
        self, run: _Run, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """The prefill's inputs of ``layer``: the stream (re)compacted once every row has dropped
        tokens it still holds, else the removed keys masked (None: nothing removed yet)."""
        run.current_layer = layer
        removed = run.removed_before(layer).to(hidden.device)
        if run.compact is None and not bool(removed.any()):
            return None
        group = run.layout.group.to(hidden.device)
        real = group != PADDING
        if run.compact is None:
            held = real
            columns = torch.arange(group.shape[1], device=group.device).expand_as(group)
        else:
            held, columns = run.compact.valid, run.compact.index
        gone = held & removed.gather(1, columns)  # slots of the stream whose token has left
        leaving = gone.any(dim=1)
        # Masking equals removal in attention layers only: with recurrent layers any row's removal compacts.
        ready = bool(leaving.any()) if self._recurrent else bool(leaving.all())
        if self._compact and layer >= self._first_compact and ready:
            # Every row (with recurrent layers: some row) drops tokens the stream still holds: (re)compact.
            hidden = self._recompact(run, layer, hidden, real & ~removed)
            args = (hidden, *args[1:]) if args else args
            if not args:
                kwargs = {**kwargs, "hidden_states": hidden}
            held, columns = run.compact.valid, run.compact.index
            gone = torch.zeros_like(held)
        keys = held & ~gone
        own = kwargs.get("attention_mask")
        if own is not None and not isinstance(own, torch.Tensor):
            raise ExitSurgeryError(
                f"expected decoder layer {layer} to receive a 4-D attention mask tensor or None, found {type(own).__name__}"
            )
        if layer in self._recurrent:
            # The 2-D padding mask a recurrent layer takes: it zeroes the padding slots' inputs, so the
            # compacted stream's left padding leaves its state at zero, as the stock model's does.
            mask = keys.long()
            if run.compact is not None:
                kwargs = self._compacted_positions(run.compact, kwargs)
        elif run.compact is not None:
            kwargs = self._compacted_positions(run.compact, kwargs)
            mask = self._compacted_mask(own, keys, held, columns, hidden)
        elif own is None:
            mask = attention_mask_for_keys(self._config, keys, hidden.shape[1], hidden.dtype)
        else:
            mask = _without_keys(own.expand(hidden.shape[0], *own.shape[1:]), ~keys)
        if run.compact is not None:
            args, kwargs = self._compacted_token_inputs(run.compact, args, kwargs)
        run.layer_keys[layer] = keys
        run.layer_columns[layer] = columns
        run.layer_held[layer] = held
        if layer not in self._recurrent:  # a recurrent layer decodes from its states, which hold the kept tokens only
            run.decoding_slots[layer] = (columns, keys)
        if layer in self._kv_sources:
            kwargs = self._reused_keys(run, layer, removed, columns, kwargs)
        return args, {**kwargs, "attention_mask": mask}

    def _slots_of(self, run: _Run, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, held) of decoder layer ``layer``'s stream in the running prefill: the prompt
        column of each slot and whether it holds a token (gone or not); the full prompt where
        nothing had been removed before the layer."""
        if layer in run.layer_columns:
            return run.layer_columns[layer], run.layer_held[layer]
        group = run.layout.group
        return torch.arange(group.shape[1], device=group.device).expand_as(group), group != PADDING

    def _shared_keys(self, layer: int, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) KV-reusing decoder layer ``layer`` is handed (``KVSharing.states_kwarg``)."""
        assert self.adapter.kv_sharing is not None
        shared = kwargs.get(self.adapter.kv_sharing.states_kwarg)
        kind = self._config.layer_types[layer]
        if shared is None or kind not in shared:
            raise ExitSurgeryError(
                f"expected KV-reusing decoder layer {layer} to receive the {kind!r} keys and values in "
                f"{self.adapter.kv_sharing.states_kwarg!r}, found none"
            )
        return shared[kind]

    def _reused_keys(self, run: _Run, layer: int, removed: torch.Tensor, columns: torch.Tensor, kwargs: dict) -> dict:
        """A KV-reusing layer's prefill inputs: the keys and values of its source layer, computed over
        the source's stream, gathered at this layer's slots where the streams differ (the source ran
        before a compaction: at full length, image keys included); its decoding slots are the
        source's (the source's cache is what decoding reads), minus the tokens gone before it."""
        source = self._kv_sources[layer]
        source_columns, source_held = (t.to(columns.device) for t in self._slots_of(run, source))
        run.decoding_slots[layer] = (source_columns, source_held & ~removed.gather(1, source_columns))
        if source_columns.shape == columns.shape and torch.equal(source_columns, columns):
            return kwargs  # the same stream: the source's keys are this layer's slots already
        slot_of = torch.zeros_like(run.layout.group, device=columns.device)
        rows, slots = source_held.nonzero(as_tuple=True)
        slot_of[rows, source_columns[rows, slots]] = slots
        index = slot_of.gather(1, columns)  # (batch, slots of this layer): the source's slot of each

        def gather(states: torch.Tensor) -> torch.Tensor:  # (batch, kv_head, source slots, dim)
            return states.gather(2, index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3]))

        assert self.adapter.kv_sharing is not None
        name = self.adapter.kv_sharing.states_kwarg
        shared = kwargs[name]
        keys, values = self._shared_keys(layer, kwargs)
        # A copy for this layer alone: the storing layers keep writing into the model's own mapping.
        mine = type(shared)(dict(shared))
        mine[self._config.layer_types[layer]] = (gather(keys), gather(values))
        return {**kwargs, name: mine}

    def _compacted_token_inputs(self, compact: CompactLayout, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The layer's per-token inputs (``ModelAdapter.layer_token_inputs``, Gemma4's per-layer
        embeddings), which the model hands every layer at full length, gathered at the compacted slots."""
        args = list(args)
        for name, position in self._token_inputs.items():
            if position < len(args):
                if args[position] is not None:
                    args[position] = compact.gather(args[position])
            elif kwargs.get(name) is not None:
                kwargs = {**kwargs, name: compact.gather(kwargs[name])}
        return tuple(args), kwargs

    def _recompact(self, run: _Run, layer: int, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Compact the stream (``hidden``, full or compacted) to the ``keep`` (batch, seq) positions
        before ``layer``; keep the full-length stream as the snapshot; return the compacted states."""
        full = hidden if run.compact is None else run.compact.scatter(hidden, run.snapshot)
        run.compact = compact_layout(keep)
        if run.compact_from is None:
            run.compact_from = layer
        run.snapshot = full
        return run.compact.gather(full)

    @staticmethod
    def _compacted_positions(compact: CompactLayout, kwargs: dict) -> dict:
        """The layer's cos/sin and position ids gathered at the compacted slots."""
        cos, sin = kwargs["position_embeddings"]
        kwargs = {**kwargs, "position_embeddings": (compact.gather(cos), compact.gather(sin))}
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = compact.gather_positions(kwargs["position_ids"])
        return kwargs

    def _compacted_mask(
        self, own: torch.Tensor | None, keys: torch.Tensor, held: torch.Tensor, columns: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """The mask of a layer on the compacted stream: the padded causal mask over ``keys``, or
        where the model passed its own mask, that mask at the kept slots."""
        mask = attention_mask_for_keys(self._config, keys, hidden.shape[1], hidden.dtype)
        if own is not None:
            # The model's own mask (padding, causal, and whatever else the family adds: sliding
            # windows over prompt columns, bidirectional image blocks) at the kept slots; slots
            # that hold no token keep the plain padding mask.
            own = own.expand(hidden.shape[0], *own.shape[1:])[:, 0]  # batch query key
            rows = torch.arange(hidden.shape[0], device=own.device)[:, None, None]
            gathered = own[rows, columns[:, :, None], columns[:, None, :]][:, None]  # batch 1 slot slot
            gathered = _without_keys(gathered, ~keys)
            mask = torch.where(held[:, None, :, None], gathered, mask)
        return mask

    def _sliding_window(self, layer: int, cache: Any) -> int | None:
        """The sliding window of decoder layer ``layer``, or None for a full-attention layer: the cache
        layer's when it is a sliding one, else the text config's (``layer_types``, or a
        ``sliding_window`` without ``layer_types``, which Mistral applies to every layer)."""
        if cache is not None and isinstance(cache.layers[layer], DynamicSlidingWindowLayer):
            return int(cache.layers[layer].sliding_window)
        window = getattr(self._config, "sliding_window", None)
        layer_types = getattr(self._config, "layer_types", None)
        if window is None or (layer_types is not None and layer_types[layer] != "sliding_attention"):
            return None
        return int(window)

    def _sliding_visible(self, layer: int, cache: Any, valid: torch.Tensor, hidden: torch.Tensor) -> int:
        """Key slots a sliding-window layer's attention gets while decoding: what its cache layer
        stored plus the new tokens."""
        layer_cache = cache.layers[layer] if cache is not None else None
        if isinstance(layer_cache, DynamicSlidingWindowLayer):
            stored = layer_cache.keys.shape[-2] if layer_cache.is_initialized else 0
        else:  # a full cache layer under a sliding mask keeps every slot
            stored = valid.shape[1] - hidden.shape[1]
        return stored + hidden.shape[1]

    def _sliding_decoding_mask(
        self, run: _Run, prefill_columns: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor, window: int,
        visible: int,
    ) -> torch.Tensor:
        """Mask of a decoding step at a sliding-window layer after an exit, over its last ``visible``
        key slots (``prefill_columns``: the prompt columns of the prefill's slots, then the new tokens).

        The window counts prompt columns (as the stock mask does), not the slots the layer keeps;
        the cache layer holds the last ``window - 1`` slots it was given, which always include every
        kept token within ``window - 1`` columns of the new ones, so masking by columns is exact.
        """
        seen = run.attention_mask.shape[1]
        new_columns = torch.arange(run.layout.seq_len, seen, device=valid.device).expand(valid.shape[0], -1)
        columns = torch.cat([prefill_columns.to(valid.device), new_columns], 1)
        columns, valid = columns[:, -visible:], valid[:, -visible:]
        query = columns[:, -hidden.shape[1] :]
        allowed = valid[:, None, :] & (columns[:, None, :] <= query[:, :, None])
        allowed &= query[:, :, None] - columns[:, None, :] < window
        allowed = allowed[:, None]  # batch 1 query key
        if self._config._attn_implementation == "eager":
            return torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
        return allowed

    def _before_final_norm(self, module: nn.Module, args: tuple) -> tuple | None:
        run = self._run
        if run is None or run.decoding or run.compact is None or run.snapshot is None:
            return None
        restored = run.compact.scatter(args[0], run.snapshot)
        run.snapshot = None  # release the full-length copy
        return (restored, *args[1:])


def visual_token_exit(
    model: nn.Module,
    exit_layers: int | Sequence[int | None] | None = None,
    *,
    removals: Mapping[int, torch.Tensor] | None = None,
    compact: bool = True,
) -> VisualExit:
    """Image-token exit for ``model``: a handle that attaches on entering the block (or on
    ``attach()``, then ``remove()``); making it attaches nothing.

    Args:
        model: a supported image-text model (``analysis.adapters``) running eager or SDPA attention.
        exit_layers: exit after this decoder layer: one int for every row, one value per row
            (None = that row does not exit), or None to decide during the prefill with
            ``request_exit`` (as the DyVTE gates do).
        removals: ``{layer: positions}``, (batch, seq) bool image positions of the prompt that leave
            after ``layer`` (a longer prefill, the prompt plus generated tokens, keeps the plan for
            the prompt's columns); e.g. FastV's pruning replayed (``FastV.dropped``).
        compact: remove the tokens once every row has removed some (True), or only mask their keys
            (False; the exact reference, no saving).

    Example::

        with visual_token_exit(model, exit_layers=[3, None]) as surgery:
            out = model.generate(**batch, max_new_tokens=8)
        surgery.exit_layers  # [3, None]

        surgery = visual_token_exit(model, 3).attach()  # handle use
        ...
        surgery.remove()
    """
    return VisualExit(model, exit_layers, removals=removals, compact=compact)


__all__ = [
    "CompactLayout",
    "ExitSurgeryError",
    "NO_EXIT",
    "SUPPORTED_ATTENTION",
    "VisualExit",
    "attention_mask_for_keys",
    "check_attention_implementation",
    "check_module_paths",
    "check_recurrent_removal",
    "compact_layout",
    "visual_token_exit",
]
