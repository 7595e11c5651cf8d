"""Sampling settings and the next-token rule.

temperature 0 is argmax. Otherwise: top-k filter, then nucleus (top-p) filter on the model's own
distribution, then one draw from softmax(logits / temperature). top_k = 0 and top_p in {0, 1}
mean no filter. The nucleus is the smallest set of most likely tokens whose probability reaches p
(so it always holds the most likely token: a tiny top_p keeps that one alone).

Every finite temperature > 0 is exact, however small or large: the logits are divided in float64
after the largest kept logit is subtracted, so the quotients lie in [-inf, 0] and never overflow.
As the temperature falls towards 0 the draw becomes the argmax (tokens tied at the maximum share
the probability equally); as it grows, the draw becomes uniform over the kept tokens.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import numbers
from dataclasses import dataclass

import torch

from .errors import SamplingError


@dataclass(frozen=True)
class SamplingSettings:
    """Numbers may be any real type that converts to a float (int, float, NumPy scalars,
    Fraction, Decimal); integers any integral type. `validate` returns them as float and int."""

    seed: int = 0
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 0.7
    max_out_tokens: int = 6

    def validate(self) -> "SamplingSettings":
        """A copy with the numbers as float and int, or a SamplingError naming the first bad one."""
        seed = _integer("seed", self.seed, "in [0, 2**63)")
        top_p = _real("top_p", self.top_p, "in [0, 1] (0 or 1 = no filter)")
        top_k = _integer("top_k", self.top_k, ">= 0 (0 = no filter)")
        temperature = _real("temperature", self.temperature, ">= 0 (0 = greedy)")
        max_out_tokens = _integer("max_out_tokens", self.max_out_tokens, ">= 1")
        for name, ok, allowed in (
            ("seed", 0 <= seed < 2**63, "an integer in [0, 2**63)"),
            ("top_p", 0.0 <= top_p <= 1.0, "in [0, 1] (0 or 1 = no filter)"),
            ("top_k", top_k >= 0, "an integer >= 0 (0 = no filter)"),
            ("temperature", temperature >= 0, ">= 0 (0 = greedy)"),
            ("max_out_tokens", max_out_tokens >= 1, "an integer >= 1"),
        ):
            if not ok:
                raise SamplingError(f"{name} must be {allowed}, got {_shown(getattr(self, name))}")
        return dataclasses.replace(self, seed=seed, top_p=top_p, top_k=top_k, temperature=temperature,
                                   max_out_tokens=max_out_tokens)


def _shown(value) -> str:
    """repr(value) for a message, shortened in the middle (a 400-digit int stays readable)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-15:]}"


def _real(name: str, value, allowed: str) -> float:
    """`value` as a finite float, or a SamplingError saying what `name` takes."""
    # a bool is an int to Python, but True as a temperature is a mistake, not 1.0
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, ValueError):  # past float's range (a huge int or Fraction), Decimal sNaN
            number = math.nan
        if math.isfinite(number):
            return number
        raise SamplingError(f"{name} must be a finite number {allowed}, got {_shown(value)}")
    raise SamplingError(f"{name} must be a number {allowed}, got {_shown(value)} ({type(value).__name__})")


def _integer(name: str, value, allowed: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise SamplingError(f"{name} must be an integer {allowed}, got {_shown(value)} ({type(value).__name__})")


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
        # the most likely token always stays: a top_p below float32's range compares as 0 and
        # would otherwise remove every token
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution one draw is made from (one-hot at the argmax when temperature is 0)."""
    if settings.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    filtered = filter_logits(logits, settings.top_k, settings.top_p).double()
    # <= 0 after the shift, so any positive float64 temperature gives values in [-inf, 0]: no
    # inf - inf, no inf / inf; float32 would turn 5e-324 into 0 and 1e300 into inf
    shifted = filtered - filtered.amax(dim=-1, keepdim=True)
    return (shifted / float(settings.temperature)).softmax(dim=-1).to(logits.dtype)


def draw(logits: torch.Tensor, settings: SamplingSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row. logits: B x V float32; one generator per row keeps rows independent,
    so a row samples the same tokens alone or in a batch."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, settings)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
