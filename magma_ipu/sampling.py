"""Sampling settings and the next-token rule.

temperature 0 is argmax. Otherwise: top-k filter, then nucleus (top-p) filter on the model's own
distribution, then one draw from softmax(logits / temperature). top_k = 0 and top_p in {0, 1}
mean no filter. The nucleus is the smallest set of most likely tokens whose probability reaches p.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import SamplingError


@dataclass(frozen=True)
class SamplingSettings:
    seed: int = 0
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 0.7
    max_out_tokens: int = 6

    def validate(self) -> "SamplingSettings":
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed must be in [0, 2**63), got {self.seed}")
        if not _is_real(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in [0, 1] (0 or 1 = no filter), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = no filter), got {self.top_k!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if (
            isinstance(self.max_out_tokens, bool)
            or not isinstance(self.max_out_tokens, numbers.Integral)
            or self.max_out_tokens < 1
        ):
            raise SamplingError(f"max_out_tokens must be an integer >= 1, got {self.max_out_tokens!r}")
        return self


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits of removed tokens to -inf. logits: ... x V (float32)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        remove_sorted = mass_before >= top_p  # the nucleus already reached p without this one
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution one draw is made from (one-hot at the argmax when temperature is 0)."""
    if settings.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    filtered = filter_logits(logits, settings.top_k, settings.top_p)
    return (filtered / settings.temperature).softmax(dim=-1)


def draw(logits: torch.Tensor, settings: SamplingSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row. logits: B x V float32; one generator per row keeps rows independent,
    so a row samples the same tokens alone or in a batch."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, settings)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
