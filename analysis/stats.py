"""Pure tensor mathematics of group attention statistics: no hooks, no I/O.

For one layer, head h, query group Q and key group K (method.md, section 2):
    mass(Q->K)    = mean over queries q in Q of  sum over keys k in K of A[h, q, k]
    entropy(Q)    = mean over queries q in Q of  -sum_k A[h, q, k] * log A[h, q, k]   (nats)
Statistics are accumulated as sums over query chunks (``GroupSums``) and divided by the group
sizes once at the end, so a caller never needs more than one chunk of an attention map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.errors import UsageError
from analysis.vocabulary import HEAD_MAX, HEAD_MEAN, HEAD_REDUCTIONS  # noqa: F401 (re-exported)


@dataclass
class GroupSums:
    """Running sums of one layer's statistics.

    Attributes:
        mass: (batch, head, query_group, key_group) sum over the group's queries of key-group mass.
        entropy: (batch, head, query_group) sum over the group's queries of row entropy.
    """

    mass: torch.Tensor
    entropy: torch.Tensor

    def add(self, other: GroupSums) -> None:
        self.mass += other.mass
        self.entropy += other.entropy

    def means(self, query_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Divide by the number of queries per group; an empty group gives NaN, never a made-up 0."""
        counts = query_counts.to(self.mass.dtype)[:, None, :]
        counts = torch.where(counts > 0, counts, torch.nan)
        return self.mass / counts[..., None], self.entropy / counts


def group_sums(
    probs: torch.Tensor,
    query_membership: torch.Tensor,
    key_membership: torch.Tensor,
) -> GroupSums:
    """Sum the statistics of a chunk of attention rows into groups.

    Args:
        probs: (batch, head, query, key) post-softmax attention rows; rows outside every query
            group (padding) must be finite, they get weight 0.
        query_membership: (batch, query, query_group) 0/1 weights of these query rows.
        key_membership: (batch, key, key_group) 0/1 weights of the keys.
    """
    probs = probs.float()
    query_membership = query_membership.float()
    key_mass = torch.matmul(probs, key_membership.float()[:, None])  # batch head query key_group
    mass = torch.einsum("bhqk,bqg->bhgk", key_mass, query_membership)
    row_entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # batch head query
    entropy = torch.einsum("bhq,bqg->bhg", row_entropy, query_membership)
    return GroupSums(mass=mass, entropy=entropy)


def logit_group_sums(
    logits: torch.Tensor,
    query_membership: torch.Tensor,
    key_membership: torch.Tensor,
) -> GroupSums:
    """:func:`group_sums` of ``softmax(logits)``, without forming the normalised map or its log.

    With t = logits - max, e = exp(t) and Z = sum e over a row, the row's key-group mass is
    (e @ key_membership) / Z and its entropy is log Z - (sum e * t) / Z, so the only full-size
    passes are the shift, the exponential and one multiply-add (no division, no log over the
    map), which is what keeps the SDPA fast path close to a plain forward. ``logits`` (fp32,
    already scaled and masked with a large finite negative value, never -inf) is overwritten.

    Args:
        logits: (batch, head, query, key) attention logits; modified in place.
        query_membership: (batch, query, query_group) 0/1 weights of these query rows.
        key_membership: (batch, key, key_group) 0/1 weights of the keys.
    """
    shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
    weights = torch.exp(shifted)
    key_membership = key_membership.float()
    # One more column for keys in no group (padding), so the row normaliser Z comes out of the same
    # product instead of another pass over the map. F.linear with a contiguous (group, key) matrix
    # is several times faster on CPU than matmul against a broadcast (key, group) one.
    outside = 1.0 - key_membership.sum(dim=-1, keepdim=True)
    membership = torch.cat([key_membership, outside], dim=-1).transpose(1, 2).contiguous()  # batch group+1 key
    rows = torch.stack([F.linear(weights[b], membership[b]) for b in range(weights.shape[0])])
    normaliser = rows.sum(dim=-1)  # batch head query
    key_mass = rows[..., :-1] / normaliser[..., None]
    weighted_logits = torch.einsum("bhqk,bhqk->bhq", weights, shifted)
    row_entropy = torch.log(normaliser) - weighted_logits / normaliser
    query_membership = query_membership.float()
    mass = torch.einsum("bhqk,bqg->bhgk", key_mass, query_membership)
    entropy = torch.einsum("bhq,bqg->bhg", row_entropy, query_membership)
    return GroupSums(mass=mass, entropy=entropy)


def group_means(
    probs: torch.Tensor,
    query_membership: torch.Tensor,
    key_membership: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass (batch, head, query_group, key_group) and entropy (batch, head, query_group) of a whole map."""
    sums = group_sums(probs, query_membership, key_membership)
    return sums.means(query_membership.sum(dim=1))


def reduce_heads(values: torch.Tensor, heads: str) -> tuple[torch.Tensor, list[int]]:
    """Keep heads or reduce them, along dim 1.

    Args:
        values: (batch, head, ...) per-head statistics.
        heads: "all" keeps every head; "mean" and "max" reduce over heads (NaN propagates).

    Returns:
        The values with dim 1 kept or of size 1, and the ``head`` labels of that dim
        (0..H-1, or [HEAD_MEAN] / [HEAD_MAX]).
    """
    if heads == "all":
        return values, list(range(values.shape[1]))
    if heads == "mean":
        return values.mean(dim=1, keepdim=True), [HEAD_MEAN]
    if heads == "max":
        return values.amax(dim=1, keepdim=True), [HEAD_MAX]
    raise UsageError(f"expected heads to be one of {list(HEAD_REDUCTIONS)}, found {heads!r}")


FusedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], "tuple[torch.Tensor, torch.Tensor]"
]
"""kernel(query, key, value, additive_mask_or_None_for_causal, scale) -> (output, logsumexp): a fused
attention kernel that also returns each row's log-normaliser. Key and value may have fewer heads than
the query (grouped-query attention): query head h reads kv head h // (heads // kv_heads), as
transformers' ``repeat_kv`` lays them out."""


def _cpu_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, mask is None, attn_mask=mask, scale=scale
    )
    return output, logsumexp


FUSED_KERNELS: dict[str, FusedKernel] = {"cpu": _cpu_flash}
"""Per device type, the fused kernel the statistics run on (PyTorch's flash attention for CPU,
which returns the log-normaliser); a device without one uses :func:`logit_group_sums` instead."""


def fused_kernel_name(device: torch.device | str) -> str | None:
    """Which fused statistics kernel a tensor on ``device`` uses, or None (the recomputed path)."""
    kind = torch.device(device).type
    return f"{kind}:flash_attention_with_logsumexp" if kind in FUSED_KERNELS else None


def fused_kernel_inputs(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                        key_membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What :func:`fused_group_sums` hands the fused kernel, in fp32: the query with zero columns,
    the values [keys | key-group indicators] (also the kernel's keys: the zeros leave every score
    unchanged) and the additive mask (None: plain causal). Arguments as :func:`fused_group_sums`."""
    batch, heads, num_queries, _ = query.shape
    key = key.float()
    indicators = key_membership.float()[:, None].expand(batch, key.shape[1], -1, -1)
    width = indicators.shape[-1]
    # Zero columns on the query make any extra key columns add exactly 0 to every score, so the keys
    # widened to the values' width can be the values themselves: [K | indicators], once per KV head.
    value = torch.cat([key, indicators], dim=-1)
    padded_query = torch.cat([query.float(), key.new_zeros(()).expand(batch, heads, num_queries, width)], dim=-1)
    mask = None
    if attention_mask is not None:
        mask = (torch.zeros(attention_mask.shape, device=key.device).masked_fill_(~attention_mask, -math.inf)
                if attention_mask.dtype == torch.bool else attention_mask.float())
    return padded_query, value, mask


def fused_group_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_membership: torch.Tensor,
    key_membership: torch.Tensor,
) -> GroupSums:
    """Group sums of softmax(q k^T * scaling + mask) from one fused attention call, in fp32.

    With A = softmax(s), the mass of query q over key group G is (A @ 1_G)_q: the output of
    attention whose values are the key-group indicator columns. Its entropy is
    H_q = logsumexp_q - sum_k A_qk s_qk with sum_k A_qk s_qk = scaling * q . (A @ K)_q, so the
    keys themselves as extra values and the kernel's log-normaliser give it. The values are
    [keys | indicators]; the kernel needs equal head widths, so q gets zero columns and the keys
    are the values (the zeros leave every score unchanged; the scale is passed explicitly). Keys
    and values keep their KV heads (the kernel shares them across a group's query heads). No
    (query, key) map is formed.

    Args:
        query: (batch, head, q, dim); key: (batch, kv_head, k, dim) with head = kv_head * groups.
        attention_mask: bool (batch, 1, q, k) with True = attend, an additive float mask, or None
            for a plain causal mask.
        query_membership: (batch, q, query_group); key_membership: (batch, k, key_group).
    """
    dim = query.shape[-1]
    padded_query, value, mask = fused_kernel_inputs(query, key, attention_mask, key_membership)
    output, logsumexp = FUSED_KERNELS[query.device.type](padded_query, value, value, mask, scaling)
    row_mass = output[..., dim:]
    row_entropy = logsumexp - scaling * torch.einsum("bhqd,bhqd->bhq", query.float(), output[..., :dim])
    member = query_membership.float()
    if attention_mask is not None:  # a padded row sees no key (NaN) and is in no query group: drop it
        real = (member.sum(dim=-1) > 0)[:, None, :]
        row_mass = torch.where(real[..., None], row_mass, 0.0)
        row_entropy = torch.where(real, row_entropy, 0.0)
    return GroupSums(mass=torch.einsum("bhqk,bqg->bhgk", row_mass, member),
                     entropy=torch.einsum("bhq,bqg->bhg", row_entropy, member))
