"""Paired win rates with a confidence interval (DESIGN 3.4: every model sampled with the same seeds).

A sample pair (same prompt, same seed) counts 1 if the candidate scores higher, 0 if lower, ½ on a tie.
The interval is Wilson's score interval on that proportion; ties count as half a win, which keeps the
point estimate unbiased and the interval slightly conservative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from statsmodels.stats.proportion import proportion_confint


@dataclass(frozen=True)
class WinRate:
    rate: float
    low: float
    high: float
    n: int


def wilson_interval(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval (statsmodels; clipped to [0, 1]); (0, 1) when there is no sample."""
    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    return float(low), float(high)


def paired_win_rate(candidate: torch.Tensor, baseline: torch.Tensor, confidence: float = 0.95) -> WinRate:
    """candidate, baseline: (N,) scores of the same N (prompt, seed) samples."""
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired scores differ in shape: {tuple(candidate.shape)} vs {tuple(baseline.shape)}")
    wins = (candidate > baseline).double() + 0.5 * (candidate == baseline).double()
    n = int(wins.numel())
    low, high = wilson_interval(float(wins.sum()), n, confidence)
    return WinRate(rate=float(wins.mean()) if n else 0.0, low=low, high=high, n=n)
