"""The peers DyVTE is compared with, in the exit surgery's conventions: FastV, VTW, DyVTE + FastV.

All of them are reversible surgery on one model instance (``exit.surgery``): text tokens keep
their original positions (RoPE unchanged), each row of a padded batch is handled on its own, and
with the KV cache the layers after a removal hold only the image keys that are left.

- Static exit after layer K: ``visual_token_exit(model, K)`` (``exit.surgery``).
- FastV (Chen et al. 2024): after layer K each row keeps its top ``ceil((1 - R) * n_image)``
  image tokens, ranked by the last prompt token's attention to them in layer K, averaged over
  heads (ties: the earlier position is kept); the others leave the layers after K.
  ``fastv(model, K, R)``. Only layer K's attention probabilities are computed: under SDPA the
  decoder runs the registered ``OBSERVED_SDPA`` function (SDPA's output, unchanged) for the
  block, and an observer on layer K alone recomputes the last token's row from q and k in fp32;
  every other layer, and layer K's own output, stay SDPA. Under eager attention layer K's
  weights are read from its self-attention output. R = 0 keeps every token (bit-identical to the
  stock model); R = 1 drops them all (= static exit after K). Every prefill ranks anew, at its
  own last token (so a forward without cache over prompt + generated tokens ranks at the newest
  token); ``visual_token_exit(model, removals={K: pruning.dropped})`` replays one ranking.
- VTW (Lin et al. 2024): every image token leaves after one layer K for all samples, K = the
  first layer whose mean KL(full || exit after K) of the last prompt token's next-token
  distribution over n calibration samples is <= eta. ``vtw_kl_curve`` gives the per-sample
  curve, ``first_layer_within`` picks K; ``exit.evaluate.calibrate_vtw`` does both for a question
  file; evaluation is then a static exit after K.
- DyVTE + FastV (the paper's combination): FastV prunes after its layer K, and when a row's gate
  fires (after any layer, before or after K) every image token the row still has leaves.
  ``dyvte_fastv(model, gates, input_ids, attention_mask, K, R)``. The gates read the paper's
  input (text-token states, ``inputs="hidden"``) from the layer outputs of the stream as the
  surgery leaves it, so they keep working once FastV compacted it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.attention import path_of_model, running_attention
from analysis.errors import UsageError
from analysis.hooks import Hook, attached
from analysis.layout import IMAGE, token_layout
from analysis.recorder import LayerRecord
from exit.gates import GateMismatchError, GateSet, gate_features
from exit.surgery import ExitSurgeryError, VisualExit, check_attention_implementation, check_module_paths

__all__ = ["FastV", "dyvte_fastv", "fastv", "fastv_keep_count", "first_layer_within", "top_slots", "vtw_kl_curve"]

_SLACK = 1e-9


def fastv_keep_count(image_tokens: int, ratio: float) -> int:
    """Image tokens FastV keeps of ``image_tokens``: ``ceil((1 - ratio) * image_tokens)``, computed
    with a 1e-9 slack so that float error does not keep one more (``(1 - 0.7) * 10`` keeps 3)."""
    if not 0.0 <= ratio <= 1.0:
        raise UsageError(f"expected a FastV pruning ratio R in [0, 1], found {ratio}")
    return max(0, math.ceil((1.0 - ratio) * image_tokens - _SLACK))


class FastV:
    """FastV pruning on one model instance (see ``fastv``): a context manager, or ``attach()`` then
    ``remove()``.

    Constructing checks everything (layer, ratio, attention implementation, module paths) and
    attaches nothing; attaching attaches the surgery's hooks and the attention reader and, under
    SDPA, runs the decoder with the observed-SDPA function; removing undoes all three (idempotent).

    Attributes:
        layer: FastV ranks in this decoder layer's attention and prunes after it.
        ratio: share of each row's image tokens pruned.
        surgery: the underlying ``VisualExit`` (exit layers, token counts, stream slots).
        scores: (batch, seq) float32 of the last prefill: the last token's head-mean attention to
            each image token present at ``layer`` (NaN elsewhere).
        kept, dropped: (batch, seq) bool image positions FastV kept / dropped in the last prefill.
        weights_read: layers whose attention probabilities were read, one entry per read, since
            the handle was made (tests check it holds ``layer`` only).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        ratio: float,
        *,
        exit_layers: int | Sequence[int | None] | None = None,
        removals: Mapping[int, torch.Tensor] | None = None,
        compact: bool = True,
        adapter: ModelAdapter | None = None,
    ) -> None:
        self.adapter = adapter or resolve_adapter(model)
        num_layers = len(self.adapter.decoder_layers(model))
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ExitSurgeryError(f"expected the FastV layer K in 0..{num_layers - 1} (prune after it), found {layer!r}")
        fastv_keep_count(0, ratio)  # checks the ratio
        if layer in self.adapter.recurrent_layers(model):
            raise ExitSurgeryError(
                f"expected the FastV layer K to be an attention layer (its attention ranks the image tokens), found "
                f"layer {layer}, a recurrent (linear-attention) layer of {self.adapter.model_type!r} with no attention map; "
                f"attention layers: {self.adapter.attention_layers(model)}"
            )
        self.model = model
        self.layer = layer
        self.ratio = float(ratio)
        self.scores: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.weights_read: list[int] = []
        check_attention_implementation(self.adapter.attention_implementation(model), "FastV")
        self.surgery = VisualExit(model, exit_layers, removals=removals, compact=compact, adapter=self.adapter)
        path = self.adapter.attention_paths(model)[layer]
        self._observing = path_of_model(model, self.adapter)
        if self._observing.hook_kind == "forward":
            self._reader = Hook(path, self._read_eager)
        else:
            self._reader = Hook(path, self._observe_sdpa, kind=self._observing.hook_kind)
        check_module_paths(model, [self._reader])
        self._stack: ExitStack | None = None

    # public -------------------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        """True between ``attach()`` (or entering the block) and ``remove()`` (or leaving it)."""
        return self._stack is not None

    def attach(self) -> FastV:
        """Attach the surgery and the attention reader, and switch to the observing attention
        implementation under SDPA; returns the handle. A failure halfway undoes what was done.

        Raises:
            ExitSurgeryError: the handle is attached already, or the decoder's attention moved between
                eager and the SDPA path since the handle was made (its reader would not fit).
        """
        if self._stack is not None:
            raise ExitSurgeryError("expected a detached FastV handle to attach, found it attached already")
        if path_of_model(self.model, self.adapter) != self._observing:
            raise ExitSurgeryError(
                f"expected the decoder to run attention on the {self._observing.name!r} path as when the FastV handle "
                f"was made, found {self.adapter.attention_implementation(self.model)!r}"
            )
        with ExitStack() as stack:
            stack.enter_context(self.surgery)
            stack.enter_context(attached(self.model, [self._reader]))
            if self._observing.hook_kind != "forward":
                stack.enter_context(running_attention(self.model, self.adapter, self._observing.record_implementation))
            self._stack = stack.pop_all()
        return self

    def remove(self) -> None:
        """Restore the attention implementation and detach every hook (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> FastV:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def exit_layers(self) -> list[int | None]:
        """Per row of the last prefill: the layer after which its last image token left, or None."""
        return self.surgery.exit_layers

    def tokens_per_layer(self) -> torch.Tensor:
        """(batch, layers) tokens each layer processed per row in the last prefill (``VisualExit``)."""
        return self.surgery.tokens_per_layer()

    # attention readers ----------------------------------------------------------------------
    def _last_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        columns, present = self.surgery.stream_slots(self.layer)
        last_index = self.surgery.layout.last_index.to(columns.device)
        last = ((columns == last_index[:, None]) & present).float().argmax(dim=1)
        return columns, present, last

    def _observe_sdpa(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        if not self.surgery.prefilling:
            return
        columns, present, last = self._last_slots()
        batch, heads, _, dim = query.shape
        kv_heads, slots = key.shape[1], key.shape[2]
        if slots != columns.shape[1]:
            raise ExitSurgeryError(f"expected layer {self.layer} to see {columns.shape[1]} keys in the prefill, found {slots}")
        rows = torch.arange(batch, device=query.device)
        with torch.no_grad():
            q = query[rows, :, last.to(query.device)].float().view(batch, kv_heads, heads // kv_heads, dim)
            scores = torch.einsum("bkgd,bknd->bkgn", q * scaling, key.float()).reshape(batch, heads, slots)
            if mask is None:  # a plain causal mask (SDPA's unpadded prefill)
                visible = torch.arange(slots, device=query.device)[None, :] <= last.to(query.device)[:, None]
                scores = scores.masked_fill(~visible[:, None], -torch.inf)
            else:
                row = mask.expand(batch, *mask.shape[1:])[rows, :, last.to(mask.device)]  # batch 1-or-heads key
                if row.dtype == torch.bool:
                    scores = scores.masked_fill(~row.to(scores.device), -torch.inf)
                else:
                    scores = scores + row.to(scores.device).float()
            probabilities = scores.softmax(dim=-1).mean(dim=1)
        self._prune(probabilities, columns, present)

    def _read_eager(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.surgery.prefilling:
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise ExitSurgeryError(
                f"expected attention weights from decoder layer {self.layer}'s self-attention under eager attention, found None"
            )
        columns, present, last = self._last_slots()
        rows = torch.arange(weights.shape[0], device=weights.device)
        with torch.no_grad():
            probabilities = weights[rows, :, last.to(weights.device)].float().mean(dim=1)
        self._prune(probabilities, columns, present)

    def _prune(self, probabilities: torch.Tensor, columns: torch.Tensor, present: torch.Tensor) -> None:
        """Rank the image tokens present at the layer by ``probabilities`` (batch, slots) and drop the rest."""
        self.weights_read.append(self.layer)
        group = self.surgery.layout.group.to(columns.device)
        probabilities = probabilities.to(columns.device)
        candidates = (group.gather(1, columns) == IMAGE) & present
        kept_slots = top_slots(probabilities, candidates, self.ratio)
        scores = torch.full(group.shape, torch.nan, device=columns.device)
        kept = torch.zeros_like(group, dtype=torch.bool)
        dropped = torch.zeros_like(group, dtype=torch.bool)
        for target, slots, values in ((scores, candidates, probabilities), (kept, kept_slots, None),
                                      (dropped, candidates & ~kept_slots, None)):
            rows, where = slots.nonzero(as_tuple=True)
            target[rows, columns[rows, where]] = True if values is None else values[rows, where]
        self.scores, self.kept, self.dropped = scores, kept, dropped
        if bool(dropped.any()):
            self.surgery.request_removal(self.layer, dropped)


def top_slots(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """(batch, slots) bool: per row, the ``fastv_keep_count(n, ratio)`` candidates with the highest
    ``scores`` (n = the row's candidates); among equal scores the earlier slot wins.

    Args:
        scores: (batch, slots) float; candidates: (batch, slots) bool.
    """
    keep = torch.tensor([fastv_keep_count(int(n), ratio) for n in candidates.sum(dim=1).tolist()], device=scores.device)
    ranked = scores.masked_fill(~candidates, -torch.inf)
    # A stable sort keeps equal scores in slot order, so the earlier slot ranks first.
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < keep[:, None])


def fastv(
    model: nn.Module,
    layer: int,
    ratio: float,
    *,
    exit_layers: int | Sequence[int | None] | None = None,
    compact: bool = True,
) -> FastV:
    """FastV pruning for ``model``: a handle that attaches on entering the block (or on
    ``attach()``, then ``remove()``); making it attaches nothing.

    Args:
        layer: K; the image tokens are ranked in layer K's attention and pruned after it.
        ratio: R in [0, 1]; each row keeps ``ceil((1 - R) * n_image)`` image tokens.
        exit_layers: also exit (drop every remaining image token) after these layers, as in
            ``visual_token_exit``; e.g. FastV then a static exit.
        compact: as in ``visual_token_exit`` (False: mask the pruned keys, the exact reference).

    Example::

        with fastv(model, 2, 0.5) as pruning:
            out = model.generate(**batch, max_new_tokens=8)
        pruning.kept  # (batch, seq) image positions kept after layer 2
    """
    return FastV(model, layer, ratio, exit_layers=exit_layers, compact=compact)


def _stream_text_states(hidden: torch.Tensor, surgery: VisualExit, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gates' "hidden" input from a layer's output stream (compacted or not), as the recorder
    computes it on the full stream: mean of the text tokens after the image excluding the last,
    and the last prompt token."""
    columns, present = surgery.stream_slots(layer)
    layout = surgery.layout.to(hidden.device)
    columns, present = columns.to(hidden.device), present.to(hidden.device)
    hidden = hidden.detach().float()
    text = (layout.text_mask_excluding_last().gather(1, columns) & present).to(hidden.dtype)
    counts = text.sum(dim=1, keepdim=True)
    text_mean = torch.einsum("bs,bsd->bd", text, hidden) / torch.where(counts > 0, counts, torch.nan)
    last = ((columns == layout.last_index[:, None]) & present).float().argmax(dim=1)
    return text_mean, hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@contextmanager
def dyvte_fastv(
    model: nn.Module,
    gates: GateSet,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    ratio: float,
) -> Iterator[FastV]:
    """DyVTE gates and FastV together for the batch ``input_ids`` (the prompt): FastV prunes after
    ``layer``; a row whose gate fires after some layer drops every image token it still has.

    The gates are asked after each layer but the last, during the prefill only, for the rows that
    still hold image tokens (as ``dyvte_exit``). Only gates with the paper's input
    (``inputs="hidden"``) are supported here.

    Raises:
        GateMismatchError (a ValueError): gates that read attention statistics.
    """
    gates.check_model(model)
    if gates.config.inputs != "hidden":
        raise GateMismatchError(
            f"expected gates with inputs='hidden' for DyVTE + FastV (attention-statistics gates need the "
            f"recorder's full-length stream), found inputs={gates.config.inputs!r}"
        )
    adapter = resolve_adapter(model)
    layout = token_layout(input_ids, attention_mask, adapter.image_token_id(model))
    with FastV(model, layer, ratio, adapter=adapter) as pruning:
        surgery = pruning.surgery

        def after_layer(index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if index == surgery.num_layers - 1 or not surgery.prefilling:
                    return
                if surgery.layout.group.shape != layout.group.shape:  # not this batch's prefill
                    return
                pending = surgery.pending_rows()
                if not bool(pending.any()):
                    return
                hidden = output[0] if isinstance(output, tuple) else output
                text_mean, last = _stream_text_states(hidden, surgery, index)
                features = gate_features(LayerRecord(layer=index, text_mean=text_mean, last=last), "hidden")
                with torch.no_grad():
                    fires = gates.fires(index, features).to(pending.device) & pending
                if bool(fires.any()):
                    surgery.request_exit(index, fires)

            return hook

        with attached(model, [Hook(path, after_layer(i)) for i, path in enumerate(adapter.layer_paths(model))]):
            yield pruning


def vtw_kl_curve(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """(samples, layers) float64 KL(full || exit after layer k) of the last prompt token's next-token
    distribution, for every sample of ``batches`` (model inputs, left padded) and every layer k.

    KL(p || q) = sum_v p_v (log p_v - log q_v), in nats, from float64 log-softmax of the logits. The
    last column (exit after the last layer) is 0: that exit changes nothing.

    Raises:
        UsageError (a ValueError): a batch is right padded (its last column is not every row's last prompt
            token), or there is no batch.
    """
    num_layers = len(resolve_adapter(model).decoder_layers(model))
    curves: list[torch.Tensor] = []
    for inputs in batches:
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].bool().all()):
            raise UsageError(
                "expected left-padded batches (the last column holds each row's last prompt token), found right padding"
            )
        with torch.no_grad():
            full = model(**inputs, logits_to_keep=1).logits[:, -1].double().log_softmax(dim=-1)
            rows = []
            for k in range(num_layers):
                with VisualExit(model, k):
                    exit_logits = model(**inputs, logits_to_keep=1).logits[:, -1].double().log_softmax(dim=-1)
                rows.append((full.exp() * (full - exit_logits)).sum(dim=-1))
        curves.append(torch.stack(rows, dim=1).cpu())
    if not curves:
        raise UsageError("expected calibration samples for VTW, found none")
    return torch.cat(curves, dim=0)


def first_layer_within(kl_per_layer: Sequence[float] | torch.Tensor, eta: float) -> int:
    """VTW's layer: the first k with ``kl_per_layer[k] <= eta`` (the last layer if none is).

    Exit after the last layer changes nothing, so its KL is 0 and some layer always qualifies
    for eta >= 0.
    """
    values = [float(v) for v in kl_per_layer]
    if not values:
        raise UsageError("expected a KL value per layer, found none")
    if eta < 0:
        raise UsageError(f"expected eta >= 0, found {eta}")
    return next((k for k, value in enumerate(values) if value <= eta), len(values) - 1)
