"""Pure tensor mathematics of group attention statistics: no hooks, no I/O.

For one layer, head h, query group Q and key group K (method.md, section 2):
    mass(Q->K)    = mean over queries q in Q of  sum over keys k in K of A[h, q, k]
    entropy(Q)    = mean over queries q in Q of  -sum_k A[h, q, k] * log A[h, q, k]   (nats)
Statistics are accumulated as sums over query chunks (``GroupSums``) and divided by the group
sizes once at the end, so a caller never needs more than one chunk of an attention map.
"""

from __future__ import annotations

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
