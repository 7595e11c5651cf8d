"""Sampling semantics: nucleus, top-k, temperature, seeds, validation."""

import math

import pytest
import torch

from magma_ipu import SamplingError
from magma_ipu.sampling import SamplingSettings, draw, filter_logits, next_token_probs

PROBS = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 2 (0.1), 0 (0.05)


def kept(logits):
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "p, expected",
    [(0.3, {1}), (0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}), (0.85, {1, 3, 4}),
     (0.9, {1, 3, 4, 2}), (0.99, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4}), (0.0, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(filter_logits(PROBS.log(), top_k=0, top_p=p)) == expected


def test_top_p_nucleus_is_minimal_on_random_distributions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(50, generator=gen) * 3
        p = torch.rand((), generator=gen).item() * 0.98 + 0.01
        keep = kept(filter_logits(logits, 0, p))
        probs = logits.softmax(-1)
        mass = probs[list(keep)].sum().item()
        assert mass >= p - 1e-6
        smallest_kept = min(probs[i].item() for i in keep)
        assert mass - smallest_kept < p + 1e-6  # dropping any kept token falls short of p
        assert all(probs[i] <= smallest_kept for i in set(range(50)) - keep)


def test_top_k_keeps_the_k_largest():
    assert kept(filter_logits(PROBS.log(), top_k=2, top_p=0.0)) == {1, 3}
    assert kept(filter_logits(PROBS.log(), top_k=0, top_p=0.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(PROBS.log(), top_k=50, top_p=0.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(PROBS.log(), top_k=3, top_p=0.5)) == {1, 3}


def test_temperature_applies_after_filtering():
    settings = SamplingSettings(top_k=2, top_p=0.0, temperature=0.5)
    probs = next_token_probs(PROBS.log(), settings)
    expected = torch.tensor([0.4, 0.3]) ** 2
    expected /= expected.sum()
    assert torch.allclose(probs[[1, 3]], expected, atol=1e-6)
    assert probs[[0, 2, 4]].sum().item() == 0
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 1.0]])
    assert draw(logits, SamplingSettings(temperature=0), []).tolist() == [1, 0]


def test_draws_follow_the_distribution_and_the_seed():
    logits = PROBS.log()[None]
    settings = SamplingSettings(temperature=1.0, top_p=0.0)
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.cat([draw(logits, settings, [gen]) for _ in range(4000)]), minlength=5)
    assert torch.allclose(counts / 4000, PROBS, atol=0.03)
    runs = [[draw(logits, settings, [torch.Generator().manual_seed(9)]).item() for _ in range(1)] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(
    "field, value, pattern",
    [("top_p", 1.5, r"top_p must be in \[0, 1\]"), ("top_p", -0.1, "top_p"), ("top_p", float("nan"), "top_p"),
     ("temperature", -1, "temperature must be >= 0"), ("top_k", -1, "top_k must be an integer >= 0"),
     ("top_k", 2.5, "top_k"), ("max_out_tokens", 0, "max_out_tokens must be an integer >= 1"),
     ("seed", 1.5, "seed must be an integer"), ("seed", "7", "seed must be an integer"), ("seed", -3, "seed"),
     ("seed", True, "seed")],
)
def test_out_of_range_settings_name_the_field(field, value, pattern):
    with pytest.raises(SamplingError, match=pattern):
        SamplingSettings(**{field: value}).validate()
    assert issubclass(SamplingError, ValueError)
