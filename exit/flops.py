"""FLOPs of an image-text decoder with and without visual-token exit, from its config.

Counted as the matrix products the kernels run (a multiply-add is 2 FLOPs), which is what
``torch.utils.flop_counter.FlopCounterMode`` counts; norms, softmax, rotary phases and
activations are left out (a few per cent of the total at these widths).

Decoder layer, ``n`` queries attending to ``m`` keys, hidden size ``d``, ``h`` query heads and
``g`` key/value heads of width ``e``, gated FFN of width ``f``::

    projections  2 n d e (2h + 2g)        q and o: h heads, k and v: g heads (GQA)
    attention    4 n m h e                q k^T and the weighted sum of v, every query head
    FFN          6 n d f                  gate, up and down

Where the layers differ (``DecoderShape.per_layer``, read from the config by
``DecoderShape.from_config``), each layer is counted with its own sizes: Gemma 4's global layers
have their own head width and key/value heads, its last layers reuse an earlier layer's keys and
values (no k and v products: ``2g`` becomes 0) and may run a double-wide FFN, its full-attention
layers may take the keys as values (``2g`` becomes ``g``), and each layer adds its per-layer input
(``4 n d p``, ``p = hidden_size_per_layer_input``), after a projection of every position
(``2 d L p``) before the first layer. Qwen3.5's full-attention queries carry an output gate
(``2h`` becomes ``3h``), and its linear-attention layers are counted by
``LinearAttentionShape`` (projections, convolution and the chunked recurrence: linear in the
tokens, no keys held).

Prefill, general form: decoder layer ``l`` processes the ``n_l`` tokens still present, so
``n = m = n_l`` there and the prefill costs ``sum over l of layer(n_l, n_l)``
(:func:`prefill_flops_for_counts`; ``VisualExit.tokens_per_layer`` gives the ``n_l`` of a run).
Prefill of ``T`` tokens of which ``I`` are image tokens, exit after layer ``k`` (0-based): layers
``0..k`` have ``n_l = T``; layers ``k+1 .. L-1`` have ``n_l = T - I``. FastV after layer ``K``
keeping ``J = ceil((1 - R) I)`` image tokens, then (DyVTE + FastV) an exit after layer
``k > K``: ``n_l = T`` for ``l <= K``, ``T - I + J`` for ``K < l <= k``, ``T - I`` after ``k``
(:func:`fastv_tokens_per_layer`; an exit at ``k <= K`` leaves ``T - I`` from ``k + 1`` on).
Attention is counted as the full ``n x m`` products that eager and SDPA compute (a causal kernel
could skip about half). The output head adds ``2 d V`` per position whose logits are computed.
FastV's ranking in layer ``K`` (one query row over ``T`` keys) is left out: under SDPA it costs
``2 T h e`` more in that layer, under eager nothing.

Decoding one token with ``c`` tokens already cached: ``n = 1`` and ``m = c + 1`` in layers up to
the exit, ``m = c + 1 - I`` after it (those layers hold no image keys and values); in general
``m = c_l + 1`` with ``c_l`` the tokens layer ``l`` holds in its cache
(:func:`decode_flops_for_counts`).

Vision tower (ViT: CLIP, SigLIP, DINOv2), ``N`` patch tokens (+1 class token where the family has
one) of width ``D``, MLP width ``F``, patch ``p``, ``C`` channels; then the projector::

    patch embedding  2 N (C p^2) D
    per layer        8 N' D^2 + 4 N'^2 D + 4 N' D F      (N' = N + class token)
    projector        2 I (D_in H + H d)                  (LLaVA's two linear layers)

The vision tower and the projector do not depend on the exit; they are reported apart so that
relative decoder savings are not diluted or inflated by them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DecoderShape",
    "LayerShape",
    "LinearAttentionShape",
    "VisionShape",
    "decode_flops",
    "decode_flops_for_counts",
    "fastv_tokens_per_layer",
    "layer_flops",
    "prefill_flops",
    "prefill_flops_for_counts",
    "relative_prefill_flops",
    "vision_flops",
]


def _field(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"expected one of the config fields {list(names)} in {type(config).__name__}, found none set")


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer that its FLOPs depend on.

    Attributes:
        heads: query heads (``h``).
        key_value_projections: key and value heads the layer projects, counted together (``2 g``;
            ``g`` where the values are the keys, Gemma 4's ``attention_k_eq_v``; 0 where the layer
            reuses an earlier layer's keys and values).
        head_dim: the width ``e`` of a head.
        intermediate: the FFN width one token runs through (``f``).
        other_per_token: FLOPs per token of the layer's further matrix products (Gemma 4's
            per-layer input gate and projection, ``4 d p``).
        query_gate: the query projection also writes a gate of the output (``h`` more heads'
            width: Qwen3.5's full-attention layers).
        linear_attention: set where the layer is a linear-attention (Gated DeltaNet) layer, which
            has no softmax attention: its sizes replace ``heads`` ... ``key_value_projections``.
    """

    heads: int
    key_value_projections: int
    head_dim: int
    intermediate: int
    other_per_token: int = 0
    query_gate: bool = False
    linear_attention: LinearAttentionShape | None = None


@dataclass(frozen=True)
class LinearAttentionShape:
    """The sizes of a Gated DeltaNet layer (Qwen3.5's linear-attention layers).

    Per token, projections ``2 d (2 a k + 2 b v + 2 b) + 2 b v d`` (queries, keys, values, the
    output gate, the decay and update rates; the output) and the depthwise causal convolution
    ``2 (2 a k + b v) w``. The recurrence runs in chunks of ``chunk`` tokens (the length padded up
    to whole chunks, ``P``): ``b P (4 C k + 6 k v + 2 C v)``, the products of the chunked delta rule
    (intra-chunk scores and updates, the state read and written once per chunk); one decoded token
    updates and reads the state, ``6 b k v``.

    Attributes:
        key_heads: ``a``, query and key heads (``linear_num_key_heads``).
        key_dim: ``k``, their width.
        value_heads: ``b``, value heads (``linear_num_value_heads``).
        value_dim: ``v``, their width.
        conv_kernel: ``w``, the convolution's width.
        chunk: ``C``, the tokens of one chunk of the prefill's recurrence.
    """

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    conv_kernel: int
    chunk: int = 64

    def flops(self, hidden: int, queries: int) -> int:
        """FLOPs of the layer's mixing for ``queries`` new tokens (one: a decoding step)."""
        a, k, b, v = self.key_heads, self.key_dim, self.value_heads, self.value_dim
        channels = 2 * a * k + b * v
        projections = 2 * queries * hidden * (channels + b * v + 2 * b) + 2 * queries * b * v * hidden
        convolution = 2 * queries * channels * self.conv_kernel
        if queries == 1:
            return projections + convolution + 6 * b * k * v
        padded = math.ceil(queries / self.chunk) * self.chunk
        recurrence = b * padded * (4 * self.chunk * k + 6 * k * v + 2 * self.chunk * v)
        return projections + convolution + recurrence


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder that its FLOPs depend on.

    ``heads``, ``kv_heads``, ``head_dim`` and ``intermediate`` describe every layer unless
    ``per_layer`` is set (a decoder whose layers differ, such as Gemma 4's); ``per_token`` is the
    FLOPs per position of matrix products outside the layers, logits apart (Gemma 4's per-layer
    input projection, ``2 d L p``), paid by every position whatever exits.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    per_layer: tuple[LayerShape, ...] = ()
    per_token: int = 0

    def __post_init__(self) -> None:
        if self.per_layer and len(self.per_layer) != self.layers:
            raise ValueError(f"expected {self.layers} layer shapes (one per decoder layer), found {len(self.per_layer)}")

    def layer(self, index: int) -> LayerShape:
        """The shape of decoder layer ``index``."""
        if self.per_layer:
            return self.per_layer[index]
        return LayerShape(self.heads, 2 * self.kv_heads, self.head_dim, self.intermediate)

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a model config (its ``text_config`` if it has one) or a text config.

        A heterogeneous config (``per_layer_config``: Gemma 4's global layers have their own head
        width and key/value heads) is read layer by layer, as are the layers that reuse an earlier
        layer's keys and values (``kv_sharing_modes``), values that are the keys
        (``attention_k_eq_v`` in the full-attention layers), double-wide FFNs in the reusing layers
        (``use_double_wide_mlp``), an experts block beside the FFN (``enable_moe_block``) and
        per-layer inputs (``hidden_size_per_layer_input``).
        """
        text = getattr(config, "text_config", None) or config
        layers = int(_field(text, "num_hidden_layers"))
        hidden = int(_field(text, "hidden_size"))
        per_layer = tuple(_layer_shape(text, index, hidden) for index in range(layers))
        first = per_layer[0]
        extra_width = int(getattr(text, "hidden_size_per_layer_input", None) or 0)
        return cls(
            layers=layers,
            hidden=hidden,
            heads=first.heads,
            kv_heads=int(getattr(_layer_config(text, 0), "num_key_value_heads", None) or first.heads),
            head_dim=first.head_dim,
            intermediate=first.intermediate,
            vocab=int(_field(text, "vocab_size")),
            per_layer=() if len(set(per_layer)) == 1 and first.other_per_token == 0 else per_layer,
            per_token=2 * hidden * layers * extra_width,
        )


def _layer_config(text: Any, index: int) -> Any:
    """Layer ``index``'s view of a text config (the config itself unless it is heterogeneous)."""
    return text.per_layer_config[index] if getattr(text, "is_heterogeneous", False) else text


def _layer_shape(text: Any, index: int, hidden: int) -> LayerShape:
    layer = _layer_config(text, index)
    heads = int(_field(layer, "num_attention_heads"))
    head_dim = int(getattr(layer, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(layer, "num_key_value_heads", None) or heads)
    modes = getattr(text, "kv_sharing_modes", None)
    reuses = modes is not None and modes[index] == "reuse"
    layer_types = getattr(text, "layer_types", None)
    values_are_keys = bool(getattr(text, "attention_k_eq_v", False)) and (
        layer_types is not None and layer_types[index] != "sliding_attention")
    width = _ffn_width(text, index) * (2 if reuses and getattr(text, "use_double_wide_mlp", False) else 1)
    if getattr(text, "enable_moe_block", False):  # Gemma 4: routed experts beside the dense FFN
        width += int(_field(text, "top_k_experts")) * int(_field(text, "moe_intermediate_size"))
    extra_width = int(getattr(text, "hidden_size_per_layer_input", None) or 0)
    linear = None
    if layer_types is not None and layer_types[index] == "linear_attention":
        linear = LinearAttentionShape(
            key_heads=int(_field(text, "linear_num_key_heads")), key_dim=int(_field(text, "linear_key_head_dim")),
            value_heads=int(_field(text, "linear_num_value_heads")),
            value_dim=int(_field(text, "linear_value_head_dim")), conv_kernel=int(_field(text, "linear_conv_kernel_dim")))
    return LayerShape(
        heads=heads,
        key_value_projections=0 if reuses else kv_heads * (1 if values_are_keys else 2),
        head_dim=head_dim,
        intermediate=width,
        other_per_token=4 * hidden * extra_width,
        query_gate=getattr(text, "model_type", None) in QUERY_GATED_TYPES,
        linear_attention=linear,
    )


QUERY_GATED_TYPES = frozenset({"qwen3_5_text", "qwen3_5_moe_text"})
"""Text configs whose full-attention query projection also writes an output gate (their configs
carry no field that says so)."""


def _ffn_width(text: Any, index: int) -> int:
    """Layer ``index``'s FFN width: dense (``intermediate_size``) in the first
    ``first_k_dense_replace`` layers (GLM-4.5V), in ``mlp_only_layers`` and off the
    ``decoder_sparse_step`` (Qwen-MoE), the experts' (:func:`_active_ffn_width`) elsewhere."""
    step = int(getattr(text, "decoder_sparse_step", None) or 1)
    dense = (index < int(getattr(text, "first_k_dense_replace", None) or 0)
             or index in (getattr(text, "mlp_only_layers", None) or ()) or (index + 1) % step != 0)
    return int(_field(text, "intermediate_size")) if dense else _active_ffn_width(text)


def _active_ffn_width(text: Any) -> int:
    """The FFN width one token runs through: ``intermediate_size``, or in a mixture-of-experts
    decoder the routed experts' (``num_experts_per_tok x moe_intermediate_size``) plus the shared
    experts' (``shared_expert_intermediate_size``, or ``n_shared_experts x moe_intermediate_size``).
    The router's small product is left out."""
    experts, width = getattr(text, "num_experts_per_tok", None), getattr(text, "moe_intermediate_size", None)
    if experts and width:
        shared = getattr(text, "shared_expert_intermediate_size", None) or (
            int(getattr(text, "n_shared_experts", None) or 0) * int(width))
        return int(experts) * int(width) + int(shared)
    return int(_field(text, "intermediate_size"))


def layer_flops(shape: DecoderShape, queries: int, keys: int, layer: int = 0) -> int:
    """FLOPs of decoder layer ``layer`` for ``queries`` tokens attending to ``keys`` keys (batch 1)."""
    sizes = shape.layer(layer)
    d, e = shape.hidden, sizes.head_dim
    ffn = 6 * queries * d * sizes.intermediate
    if sizes.linear_attention is not None:  # no keys held: the state carries them
        return sizes.linear_attention.flops(d, queries) + ffn + queries * sizes.other_per_token
    query_heads = sizes.heads * (3 if sizes.query_gate else 2)  # q (and its gate) and o
    projections = 2 * queries * d * e * (query_heads + sizes.key_value_projections)
    attention = 4 * queries * keys * sizes.heads * e
    return projections + attention + ffn + queries * sizes.other_per_token


def _exit_after(shape: DecoderShape, exit_layer: int | None) -> int:
    """The last layer that sees the image tokens (the last layer when there is no exit)."""
    if exit_layer is None or exit_layer >= shape.layers - 1:
        return shape.layers - 1
    if exit_layer < 0:
        raise ValueError(f"expected an exit layer in 0..{shape.layers - 1} or None, found {exit_layer}")
    return exit_layer


def prefill_flops(shape: DecoderShape, tokens: int, image_tokens: int, exit_layer: int | None = None,
                  logits_positions: int = 0) -> int:
    """Decoder FLOPs of one prefill of ``tokens`` tokens (``image_tokens`` of them image tokens).

    Args:
        exit_layer: the image tokens leave after this layer (None: they stay throughout).
        logits_positions: positions whose logits are computed (generate() computes 1; a plain
            forward computes all of them).
    """
    if not 0 <= image_tokens <= tokens:
        raise ValueError(f"expected 0 <= image_tokens <= tokens, found {image_tokens} image tokens of {tokens}")
    last_full = _exit_after(shape, exit_layer)
    counts = [tokens if index <= last_full else tokens - image_tokens for index in range(shape.layers)]
    return prefill_flops_for_counts(shape, counts, logits_positions)


def decode_flops(shape: DecoderShape, cached: int, image_tokens: int, exit_layer: int | None = None) -> int:
    """Decoder FLOPs of decoding one token with ``cached`` tokens before it, logits included."""
    last_full = _exit_after(shape, exit_layer)
    return decode_flops_for_counts(
        shape, [cached if index <= last_full else cached - image_tokens for index in range(shape.layers)])


def _counts(shape: DecoderShape, counts: Sequence[int], what: str) -> list[int]:
    values = [int(n) for n in counts]
    if len(values) != shape.layers or any(n < 0 for n in values):
        raise ValueError(f"expected {shape.layers} non-negative {what} (one per decoder layer), found {values}")
    return values


def prefill_flops_for_counts(shape: DecoderShape, tokens_per_layer: Sequence[int], logits_positions: int = 0) -> int:
    """Decoder FLOPs of one prefill in which layer ``l`` processes ``tokens_per_layer[l]`` tokens.

    ``prefill_flops(shape, T, I, k)`` equals this with ``[T] * (k + 1) + [T - I] * (L - 1 - k)``.
    """
    counts = _counts(shape, tokens_per_layer, "token counts")
    # every position enters the first layer, so counts[0] is the prompt's length
    return (sum(layer_flops(shape, n, n, index) for index, n in enumerate(counts)) + counts[0] * shape.per_token
            + 2 * logits_positions * shape.hidden * shape.vocab)


def decode_flops_for_counts(shape: DecoderShape, cached_per_layer: Sequence[int]) -> int:
    """Decoder FLOPs of decoding one token when layer ``l`` holds ``cached_per_layer[l]`` tokens in its
    cache (after removals the layers differ), logits included."""
    counts = _counts(shape, cached_per_layer, "cache lengths")
    return (sum(layer_flops(shape, 1, c + 1, index) for index, c in enumerate(counts)) + shape.per_token
            + 2 * shape.hidden * shape.vocab)


def fastv_tokens_per_layer(shape: DecoderShape, tokens: int, image_tokens: int, layer: int, ratio: float,
                           exit_layer: int | None = None) -> list[int]:
    """Tokens each decoder layer processes under FastV after ``layer`` (keeping
    ``ceil((1 - ratio) * image_tokens)`` image tokens), and optionally an exit after ``exit_layer``."""
    if not 0 <= image_tokens <= tokens:
        raise ValueError(f"expected 0 <= image_tokens <= tokens, found {image_tokens} image tokens of {tokens}")
    if not 0 <= layer < shape.layers:
        raise ValueError(f"expected the FastV layer in 0..{shape.layers - 1}, found {layer}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"expected a FastV pruning ratio in [0, 1], found {ratio}")
    kept = max(0, math.ceil((1.0 - ratio) * image_tokens - 1e-9))  # as exit.baselines.fastv_keep_count
    last_full = _exit_after(shape, exit_layer)
    counts = []
    for index in range(shape.layers):
        if index > last_full:
            counts.append(tokens - image_tokens)
        elif index > layer:
            counts.append(tokens - image_tokens + kept)
        else:
            counts.append(tokens)
    return counts


def relative_prefill_flops(shape: DecoderShape, tokens: int, image_tokens: int, exit_layer: int | None) -> float:
    """Prefill decoder FLOPs with the exit over those without (1.0: no saving)."""
    return prefill_flops(shape, tokens, image_tokens, exit_layer) / prefill_flops(shape, tokens, image_tokens, None)


@dataclass(frozen=True)
class VisionShape:
    """The sizes of a ViT vision tower and LLaVA-style projector that their FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    patch_size: int
    channels: int
    class_tokens: int
    projector_in: int
    projector_hidden: int
    text_hidden: int

    @classmethod
    def from_config(cls, config: Any) -> VisionShape:
        """From a LLaVA-style config (``vision_config``, ``text_config``, ``vision_feature_layer``)."""
        vision = _field(config, "vision_config")
        text = _field(config, "text_config")
        hidden = int(_field(vision, "hidden_size"))
        intermediate = getattr(vision, "intermediate_size", None) or int(hidden * _field(vision, "mlp_ratio"))
        feature_layer = getattr(config, "vision_feature_layer", -1)
        n_features = len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1
        has_class = getattr(vision, "model_type", "") in ("clip_vision_model", "dinov2")
        text_hidden = int(_field(text, "hidden_size"))
        return cls(
            layers=int(_field(vision, "num_hidden_layers")),
            hidden=hidden,
            intermediate=int(intermediate),
            patch_size=int(_field(vision, "patch_size")),
            channels=int(getattr(vision, "num_channels", 3)),
            class_tokens=1 if has_class else 0,
            projector_in=hidden * n_features,
            projector_hidden=int(getattr(config, "projector_hidden_size", None) or text_hidden),
            text_hidden=text_hidden,
        )


def vision_flops(shape: VisionShape, image_size: int, image_tokens: int) -> dict[str, int]:
    """FLOPs of the vision tower on one square image and of the projector on ``image_tokens``.

    Returns ``{"vision_tower": ..., "projector": ...}``.
    """
    patches = (image_size // shape.patch_size) ** 2
    tokens = patches + shape.class_tokens
    d = shape.hidden
    embed = 2 * patches * shape.channels * shape.patch_size**2 * d
    per_layer = 8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * shape.intermediate
    projector = 2 * image_tokens * (shape.projector_in * shape.projector_hidden
                                    + shape.projector_hidden * shape.text_hidden)
    return {"vision_tower": embed + shape.layers * per_layer, "projector": projector}
