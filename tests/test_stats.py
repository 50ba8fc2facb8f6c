"""The mathematics on synthetic attention with known answers."""

import math

import pytest
import torch

from analysis.layout import token_layout
from analysis.recorder import observed_group_sums
from analysis.stats import HEAD_MAX, HEAD_MEAN, group_means, group_sums, logit_group_sums, reduce_heads

IMG = 9
# system: 0,1   image: 2,3,4   text: 5,6,7 (7 = last)
INPUT_IDS = torch.tensor([[1, 2, IMG, IMG, IMG, 3, 4, 5]])


def causal_uniform(n: int) -> torch.Tensor:
    probs = torch.tril(torch.ones(n, n))
    return (probs / probs.sum(-1, keepdim=True))[None, None]


def test_uniform_causal_attention_gives_known_masses_and_entropies():
    layout = token_layout(INPUT_IDS, None, IMG)
    mass, entropy = group_means(causal_uniform(8), layout.query_membership(), layout.key_membership())
    # text queries at positions 5, 6, 7 see 6, 7, 8 keys: 2 system, 3 image, the rest text
    text_to_image = (3 / 6 + 3 / 7 + 3 / 8) / 3
    text_to_system = (2 / 6 + 2 / 7 + 2 / 8) / 3
    assert mass[0, 0, 2, 1].item() == pytest.approx(text_to_image, rel=1e-6)
    assert mass[0, 0, 2, 0].item() == pytest.approx(text_to_system, rel=1e-6)
    assert mass[0, 0, 3].tolist() == pytest.approx([2 / 8, 3 / 8, 3 / 8], rel=1e-6)
    assert mass[0, 0, 1, 2].item() == 0.0  # image queries never see later text (causality)
    assert mass[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert entropy[0, 0, 3].item() == pytest.approx(math.log(8), rel=1e-6)
    assert entropy[0, 0, 2].item() == pytest.approx((math.log(6) + math.log(7) + math.log(8)) / 3, rel=1e-6)


def test_one_hot_attention_puts_all_mass_on_one_group_with_zero_entropy():
    layout = token_layout(INPUT_IDS, None, IMG)
    probs = torch.zeros(1, 1, 8, 8)
    probs[..., torch.arange(8), torch.arange(8)] = 1.0  # each token attends to itself
    probs[0, 0, 7] = 0.0
    probs[0, 0, 7, 3] = 1.0  # the last token looks at one image token
    mass, entropy = group_means(probs, layout.query_membership(), layout.key_membership())
    assert mass[0, 0, 3].tolist() == [0.0, 1.0, 0.0]
    assert mass[0, 0, 2].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert mass[0, 0, 1].tolist() == [0.0, 1.0, 0.0]
    assert entropy.abs().max().item() == 0.0


def test_text_query_masses_sum_to_one_on_random_attention():
    torch.manual_seed(0)
    layout = token_layout(INPUT_IDS, None, IMG)
    scores = torch.randn(1, 3, 8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf"))
    mass, _ = group_means(scores.softmax(-1), layout.query_membership(), layout.key_membership())
    assert torch.allclose(mass.sum(-1), torch.ones(1, 3, 4), atol=1e-6)


def test_empty_group_is_nan_not_zero():
    layout = token_layout(torch.tensor([[1, IMG, IMG]]), None, IMG)  # prompt ends on an image token
    mass, entropy = group_means(causal_uniform(3), layout.query_membership(), layout.key_membership())
    assert torch.isnan(mass[0, 0, 2]).all() and torch.isnan(entropy[0, 0, 2])


def test_head_reductions():
    values = torch.tensor([[[1.0], [3.0]]])  # batch 1, two heads
    assert reduce_heads(values, "mean")[0].flatten().tolist() == [2.0]
    assert reduce_heads(values, "mean")[1] == [HEAD_MEAN]
    assert reduce_heads(values, "max")[0].flatten().tolist() == [3.0]
    assert reduce_heads(values, "max")[1] == [HEAD_MAX]
    assert reduce_heads(values, "all")[1] == [0, 1]
    with pytest.raises(ValueError, match="one of"):
        reduce_heads(values, "median")


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_chunked_recomputation_matches_full_softmax(chunk, mask_kind):
    """The fast path's chunked, GQA-aware recomputation equals reducing a full eager softmax."""
    torch.manual_seed(1)
    layout = token_layout(INPUT_IDS, None, IMG)
    query, key = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)  # 4 query heads share 2 KV heads
    causal = torch.ones(8, 8).tril().bool()[None, None]
    mask = {"none": None, "bool": causal, "float": torch.zeros(1, 1, 8, 8).masked_fill(~causal, -1e30)}[mask_kind]
    sums = observed_group_sums(query, key, mask, 0.25, layout.query_membership(), layout.key_membership(), chunk)
    mass, entropy = sums.means(layout.query_counts())
    full_key = key.repeat_interleave(2, dim=1)
    scores = (query @ full_key.transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf"))
    ref_mass, ref_entropy = group_means(scores.softmax(-1), layout.query_membership(), layout.key_membership())
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-7)


def test_logit_group_sums_known_answers_and_softmax_equivalence():
    """Uniform logits give entropy log(visible keys); random logits agree with softmax + xlogy."""
    layout = token_layout(INPUT_IDS, None, IMG)
    causal = torch.ones(8, 8).tril().bool()[None, None]
    lowest = torch.finfo(torch.float32).min
    uniform = torch.zeros(1, 2, 8, 8).masked_fill(~causal, lowest)
    sums = logit_group_sums(uniform, layout.query_membership(), layout.key_membership())
    visible = torch.arange(1, 9, dtype=torch.float32)
    expected = torch.einsum("q,bqg->bg", visible.log(), layout.query_membership().float())
    torch.testing.assert_close(sums.entropy, expected[:, None].expand(1, 2, -1))

    torch.manual_seed(2)
    logits = (torch.randn(1, 2, 8, 8) * 6).masked_fill(~causal, lowest)
    reference = group_sums(logits.softmax(-1), layout.query_membership(), layout.key_membership())
    sums = logit_group_sums(logits.clone(), layout.query_membership(), layout.key_membership())
    torch.testing.assert_close(sums.mass, reference.mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.entropy, reference.entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_fused_group_sums_equal_the_recomputed_ones(kv_heads, mask_kind):
    from analysis.stats import fused_group_sums

    torch.manual_seed(kv_heads)
    batch, heads, n, dim = 2, 4, 37, 16
    query, key = torch.randn(batch, heads, n, dim), torch.randn(batch, kv_heads, n, dim) * 2
    group = torch.randint(0, 3, (batch, n))
    group[1, :6] = -1  # left padding in row 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None, None].expand(batch, 1, n, n).clone()
    if mask_kind != "causal":
        allowed[1, :, :, :6] = False
        allowed[1, :, torch.arange(6), torch.arange(6)] = True  # padded queries see themselves only
    last = torch.zeros(batch, n, dtype=torch.bool)
    last[:, -1] = True
    query_membership = torch.stack([group == 0, group == 1, group == 2, last], dim=-1).float()
    key_membership = torch.stack([group == 0, group == 1, group == 2], dim=-1).float()
    if mask_kind == "causal":
        group[1, :6] = 0  # no padding under a plain causal mask
        query_membership = torch.stack([group == 0, group == 1, group == 2, last], dim=-1).float()
        key_membership = torch.stack([group == 0, group == 1, group == 2], dim=-1).float()
        mask = None
    elif mask_kind == "bool":
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    scale = dim ** -0.5
    scores = (query * scale) @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = logit_group_sums(scores, query_membership, key_membership)
    found = fused_group_sums(query, key, mask, scale, query_membership, key_membership)
    torch.testing.assert_close(found.mass, expected.mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found.entropy, expected.entropy, rtol=1e-5, atol=1e-4)
    assert not torch.isnan(found.mass).any() and not torch.isnan(found.entropy).any()
