"""Sampling semantics: nucleus, top-k, temperature, seeds, validation."""

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
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


def realistic_logits(rows=3, vocab=50400, seed=0):
    """float32 logits of a language model's magnitude: a few tokens far above a broad floor."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3 - 10
    logits[:, :5] += torch.tensor([30.0, 28.0, 27.5, 25.0, 20.0])
    return logits


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-38, 1e-30, 1e-8, 1e-4, 0.7, 1e4, 1e38, 1e300,
                                         1.7976931348623157e308])
@pytest.mark.parametrize("top_p, top_k", [(0.0, 0), (1e-300, 0), (0.5, 0), (0.9, 40), (1.0, 3)])
def test_every_accepted_temperature_gives_a_distribution(temperature, top_p, top_k):
    logits = realistic_logits()
    settings = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k).validate()
    probs = next_token_probs(logits, settings)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    assert (probs[~kept] == 0).all()  # the filters hold at any temperature
    if temperature <= 1e-8:  # the limit at 0: the argmax
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and (probs.max(-1).values == 1).all()
    if temperature >= 1e38:  # the limit at infinity: uniform over the kept tokens
        uniform = kept / kept.sum(-1, keepdim=True)
        assert torch.allclose(probs, uniform.float(), rtol=1e-4, atol=1e-12)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert kept.gather(-1, draw(logits, settings, gens)[:, None]).all()


def test_a_tiny_top_p_keeps_the_most_likely_token_alone():
    logits = realistic_logits()
    for top_p in (1e-300, 5e-324, 1e-45, 1e-8):
        keep = torch.isfinite(filter_logits(logits, 0, top_p))
        assert torch.equal(keep.sum(-1), torch.ones(3, dtype=torch.long))
        assert keep.gather(-1, logits.argmax(-1, keepdim=True)).all()


def test_tokens_tied_at_the_maximum_share_a_tiny_temperature():
    probs = next_token_probs(torch.tensor([1.0, 3.0, 3.0, 0.0]), SamplingSettings(temperature=1e-300, top_p=0.0))
    assert probs.tolist() == [0.0, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("value", [Fraction(1, 2), Decimal("0.5"), np.float32(0.5), np.float64(0.5), np.float16(0.5)])
def test_real_numbers_of_any_type_become_floats(value):
    settings = SamplingSettings(temperature=value, top_p=value, top_k=np.int64(3), seed=np.uint8(7),
                                max_out_tokens=np.int32(2)).validate()
    assert (settings.temperature, settings.top_p, settings.top_k, settings.seed, settings.max_out_tokens) == (
        0.5, 0.5, 3, 7, 2)
    assert [type(getattr(settings, f)) for f in ("temperature", "top_p", "top_k", "seed", "max_out_tokens")] == [
        float, float, int, int, int]
    gen = torch.Generator().manual_seed(0)
    assert draw(PROBS.log()[None], settings, [gen]).shape == (1,)


@pytest.mark.parametrize(
    "field, value, pattern",
    [("temperature", True, r"temperature must be a number >= 0 \(0 = greedy\), got True \(bool\)"),
     ("temperature", "0.5", r"temperature must be a number .*got '0.5' \(str\)"),
     ("temperature", None, "temperature must be a number"),
     ("temperature", float("inf"), "temperature must be a finite number"),
     ("temperature", float("nan"), "temperature must be a finite number"),
     ("temperature", 10**400, "temperature must be a finite number"),
     ("temperature", Fraction(10**400, 3), "temperature must be a finite number"),
     ("temperature", Decimal("Infinity"), "temperature must be a finite number"),
     ("temperature", Decimal("sNaN"), "temperature must be a finite number"),
     ("temperature", torch.tensor(0.5), r"temperature must be a number .*\(Tensor\)"),
     ("temperature", complex(0.5, 0), r"\(complex\)"),
     ("temperature", -1e-300, r"temperature must be >= 0"),
     ("top_p", False, r"top_p must be a number in \[0, 1\]"),
     ("top_p", np.float64("nan"), "top_p must be a finite number"),
     ("top_p", Fraction(3, 2), r"top_p must be in \[0, 1\]"),
     ("top_k", np.bool_(True), "top_k must be an integer"),
     ("top_k", 3.0, r"top_k must be an integer >= 0 \(0 = no filter\), got 3.0 \(float\)"),
     ("max_out_tokens", "5", "max_out_tokens must be an integer"),
     ("seed", 2**63, r"seed must be an integer in \[0, 2\*\*63\)"),
     ("seed", np.float64(3), "seed must be an integer")],
)
def test_other_types_and_non_finite_numbers_are_refused_by_name(field, value, pattern):
    with pytest.raises(SamplingError, match=pattern):
        SamplingSettings(**{field: value}).validate()
