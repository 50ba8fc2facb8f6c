"""Reversible removal of image tokens after a decoder layer, per row, KV-cache aware.

``visual_token_exit(model, exit_layers)`` attaches hooks (through ``analysis.hooks.attached``) to
one model instance and returns a ``VisualExit`` handle: use it as a context manager or call
``remove()``. While attached, every prefill of the model drops the image tokens of row ``b``
from the decoder layers after ``exit_layers[b]``; text tokens keep their original positions
(RoPE cos/sin are taken at the original position ids), so removal after layer k gives the same
text-token outputs as masking the image keys for every query in the layers after k.

How (per prefill, derived from input_ids and the attention mask; no fixed offsets):
- While some rows of the batch have not exited, the rows that have exited keep their slots and
  their image keys are masked in the later layers (exact, no saving for that row yet).
- Once every row has exited, the stream is compacted: each row's non-image real tokens are
  gathered right-aligned (left padding) into one shorter length shared by the batch, with their
  position ids and cos/sin gathered alongside and a rebuilt padding + causal mask. From then on
  the layers, and their KV-cache layers, hold no image keys and values.
- Before the decoder's final norm the compacted states are scattered back to the original
  positions, so the model's outputs keep their shape (the decoder layers themselves, and anything
  observing them, see the compacted stream). Logits are valid at non-image positions only: at
  removed image positions (and padding) they come from the state the stream held when the
  image was removed.

Decoding with the KV cache (``generate()``; ``DynamicCache``): positions of new tokens come from
the model as usual (layer 0, which always holds the full length); the attention mask of every
layer after an exit is rebuilt from that layer's own stored slots plus the new tokens, since the
cache layers differ in length. Decoding never changes an exit decision.

Limits: eager and SDPA attention only (and the recorder's observed SDPA); ``DynamicCache`` only
(static and sliding caches are rejected while decoding); inputs must carry ``input_ids`` and a 2-D
attention mask (or none); beam search, whose cache reordering mixes rows, is not supported with per-row exits
(an exit shared by all rows is unaffected by reordering but untested).

The exit layer of a row is fixed up front (``exit_layers``) or decided during the prefill by
calling ``VisualExit.request_exit(layer, rows)`` right after ``layer`` ran (what the gates do).
A row that never exits, or exits after the last layer, leaves the model untouched: with no exit
in the batch every hook returns without changing anything, so outputs are bit-identical to the
stock model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.hooks import OBSERVED_SDPA, Hook, attached
from analysis.layout import IMAGE, PADDING, TokenLayout, token_layout

SUPPORTED_ATTENTION: tuple[str, ...] = ("eager", "sdpa", OBSERVED_SDPA)
NO_EXIT = -1
"""Value of a row's exit layer when it does not exit (yet)."""


class ExitSurgeryError(RuntimeError):
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


def attention_mask_for_keys(
    config: Any, key_valid: torch.Tensor, query_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """A 4-D causal mask over ``key_valid.shape[1]`` key slots whose queries are the last ``query_length``.

    Built by the mask function registered for ``config._attn_implementation`` (bool for SDPA,
    additive float for eager), exactly as transformers builds a padded causal mask: key slot j is
    visible to query slot i iff j <= i and ``key_valid[:, j]``.
    """
    implementation = config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ExitSurgeryError(
            f"expected the decoder to run one of {list(SUPPORTED_ATTENTION)} attention, found {implementation!r}"
        )
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
    exit_layer: torch.Tensor  # (batch,) int64, NO_EXIT = not exited
    decoding: bool = False
    attention_mask: torch.Tensor | None = None  # (batch, seen + new) bool while decoding
    layer_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # prefill key slots per layer
    compact: CompactLayout | None = None
    compact_from: int | None = None
    snapshot: torch.Tensor | None = None  # full stream when it was compacted


class VisualExit:
    """Handle of an attached exit surgery; a context manager, or call ``remove()``.

    Attributes:
        model: the model instance the hooks are attached to.
        num_layers: decoder layers of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        exit_layers: int | Sequence[int | None] | None = None,
        *,
        compact: bool = True,
        adapter: ModelAdapter | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or resolve_adapter(model)
        layer_paths = self.adapter.layer_paths(model)
        self.num_layers = len(layer_paths)
        self._plan = _exit_plan(exit_layers, self.num_layers)
        self._compact = compact
        self._config = self.adapter.text_config(model)
        self._image_token_id = self.adapter.image_token_id(model)
        self._run: _Run | None = None
        hooks = [Hook("", self._before_model, kind="forward_pre", with_kwargs=True)]
        hooks += [
            Hook(path, self._before_layer(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(layer_paths)
        ]
        # The decoder's layers keep the compacted stream; the final norm gets it back at full length.
        hooks.append(Hook(self.adapter.final_norm_path, self._before_final_norm, kind="forward_pre"))
        self._stack = ExitStack()
        self._stack.enter_context(attached(model, hooks))

    # public -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook of this surgery (idempotent); ``exit_layers`` stays readable."""
        self._stack.close()

    def __enter__(self) -> VisualExit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def exit_layers(self) -> list[int | None]:
        """Exit layer of each row of the last prefill (None: did not exit)."""
        if self._run is None:
            raise ExitSurgeryError("expected a prefill to have run under the surgery, found none")
        return [None if v == NO_EXIT else int(v) for v in self._run.exit_layer.tolist()]

    @property
    def layout(self) -> TokenLayout:
        """Token groups of the last prefill."""
        if self._run is None:
            raise ExitSurgeryError("expected a prefill to have run under the surgery, found none")
        return self._run.layout

    def pending_rows(self) -> torch.Tensor:
        """(batch,) bool: rows of the current prefill that have not exited yet."""
        if self._run is None:
            raise ExitSurgeryError("expected a prefill to be running under the surgery, found none")
        return self._run.exit_layer == NO_EXIT

    def request_exit(self, layer: int, rows: torch.Tensor) -> None:
        """Make ``rows`` ((batch,) bool) exit after ``layer``; call it right after ``layer`` ran.

        Rows that already exited keep their earlier exit. Only valid during a prefill.
        """
        run = self._run
        if run is None or run.decoding:
            raise ExitSurgeryError("expected request_exit during a prefill; decoding never changes an exit")
        if not 0 <= layer < self.num_layers:
            raise ExitSurgeryError(f"expected an exit layer in 0..{self.num_layers - 1}, found {layer}")
        if run.compact_from is not None and layer >= run.compact_from:
            raise ExitSurgeryError(f"expected exits before layer {run.compact_from} (the stream is compacted), found {layer}")
        rows = rows.to(run.exit_layer.device).bool()
        if rows.shape != run.exit_layer.shape:
            raise ExitSurgeryError(f"expected rows of shape {tuple(run.exit_layer.shape)}, found {tuple(rows.shape)}")
        run.exit_layer = torch.where(rows & (run.exit_layer == NO_EXIT), layer, run.exit_layer)

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
            layout = token_layout(input_ids, attention_mask, self._image_token_id)
            self._run = _Run(layout=layout, exit_layer=self._initial_exits(layout.batch_size, input_ids.device))
            return
        run = self._run
        if run is None or run.layout.batch_size != input_ids.shape[0]:
            before = "no prefill" if run is None else f"a prefill of {run.layout.batch_size} rows"
            raise ExitSurgeryError(
                "expected decoding steps to follow a prefill of the same batch under this surgery, "
                f"found a cache of {past} tokens and {before}"
            )
        for i in run.layer_keys:
            if not isinstance(cache.layers[i], DynamicLayer) or cache.layers[i].is_sliding:
                raise ExitSurgeryError(f"expected a DynamicCache, found a {type(cache.layers[i]).__name__} at layer {i}")
        total = past + input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], total, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape[1] != total:
            raise ExitSurgeryError(
                f"expected an attention mask over {total} tokens while decoding, found {attention_mask.shape[1]}"
            )
        run.decoding = True
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
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.decoding:
                keys = run.layer_keys.get(layer)
                if keys is None:
                    return None
                new_keys = run.attention_mask[:, run.layout.seq_len :].to(keys.device)
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                if cache is not None and cache.get_seq_length(layer) + hidden.shape[1] != keys.shape[1] + new_keys.shape[1]:
                    raise ExitSurgeryError(
                        f"expected decoder layer {layer}'s cache to hold {keys.shape[1] + new_keys.shape[1] - hidden.shape[1]} "
                        f"tokens, found {cache.get_seq_length(layer)}"
                    )
                mask = attention_mask_for_keys(self._config, torch.cat([keys, new_keys], 1), hidden.shape[1], hidden.dtype)
                return args, {**kwargs, "attention_mask": mask}
            exited = (run.exit_layer != NO_EXIT) & (run.exit_layer < layer)
            if not bool(exited.any()):
                return None
            group = run.layout.group.to(hidden.device)
            if run.compact is None and self._compact and bool(exited.all()):
                run.compact = compact_layout((group != PADDING) & (group != IMAGE))
                run.compact_from = layer
                run.snapshot = hidden
                hidden = run.compact.gather(hidden)
                args = (hidden, *args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, "hidden_states": hidden}
            if run.compact is not None:
                keys = run.compact.valid
                cos, sin = kwargs["position_embeddings"]
                kwargs = {**kwargs, "position_embeddings": (run.compact.gather(cos), run.compact.gather(sin))}
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = run.compact.gather(kwargs["position_ids"])
            else:
                keys = (group != PADDING) & ~((group == IMAGE) & exited[:, None])
            run.layer_keys[layer] = keys
            mask = attention_mask_for_keys(self._config, keys, hidden.shape[1], hidden.dtype)
            return args, {**kwargs, "attention_mask": mask}

        return hook

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
    compact: bool = True,
) -> VisualExit:
    """Attach image-token exit to ``model``; returns the handle (context manager or ``remove()``).

    Args:
        model: a supported image-text model (``analysis.adapters``) running eager or SDPA attention.
        exit_layers: exit after this decoder layer: one int for every row, one value per row
            (None = that row does not exit), or None to decide during the prefill with
            ``request_exit`` (as the DyVTE gates do).
        compact: remove the image tokens once every row has exited (True), or only mask their keys
            (False; the exact reference, no saving).

    Example::

        with visual_token_exit(model, exit_layers=[3, None]) as surgery:
            out = model.generate(**batch, max_new_tokens=8)
        surgery.exit_layers  # [3, None]
    """
    return VisualExit(model, exit_layers, compact=compact)


__all__ = [
    "CompactLayout",
    "ExitSurgeryError",
    "NO_EXIT",
    "SUPPORTED_ATTENTION",
    "VisualExit",
    "attention_mask_for_keys",
    "compact_layout",
    "visual_token_exit",
]
