"""Error bars for evaluation scores: how large a gain must be before it is more than noise.

An accuracy measured on ``n`` held-out examples is an estimate, and a second draw of ``n``
examples would give a different one. These functions say by how much: the binomial standard
error, a normal-approximation confidence interval, a percentile bootstrap, and the paired
difference of two models scored on the same examples.
"""

import math
import random
from dataclasses import dataclass
from statistics import NormalDist


def _check_level(level: float) -> float:
    """The two-sided normal quantile of a confidence level, e.g. 1.96 for 0.95."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def binomial_standard_error(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the spread of an accuracy ``p`` measured on ``n`` independent examples."""
    if not 0 <= p <= 1:
        raise ValueError(f"an accuracy lies in [0, 1], got {p}")
    if n < 1:
        raise ValueError(f"need at least one example, got n={n}")
    return math.sqrt(p * (1 - p) / n)


def accuracy_confidence_interval(p: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The normal-approximation interval p ± z·SE, clipped to [0, 1]."""
    half_width = _check_level(level) * binomial_standard_error(p, n)
    return max(0.0, p - half_width), min(1.0, p + half_width)


def bootstrap_confidence_interval(
    outcomes: list[float], level: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example ``outcomes`` (1 right, 0 wrong).

    Resample the examples with replacement, recompute the mean each time, and keep the middle
    ``level`` of those means. It needs no formula, so it works for any per-example score.
    """
    _check_level(level)
    if not outcomes:
        raise ValueError("need at least one outcome to resample")
    rng = random.Random(seed)  # a fixed seed: the same outcomes always give the same interval
    n = len(outcomes)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(num_resamples))
    tail = (1 - level) / 2
    return means[int(tail * num_resamples)], means[math.ceil((1 - tail) * num_resamples) - 1]


def paired_difference(
    before: list[float], after: list[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``after - before`` over the same examples, with its confidence interval.

    Scoring both models on the same examples and differencing per example cancels the part of
    the noise that comes from which examples were drawn, so the interval is narrower than the
    two separate intervals suggest. Returns (difference, lower, upper).
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"need two equally long, non-empty lists, got {len(before)} and {len(after)}")
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)  # sample variance of the differences
    half_width = _check_level(level) * math.sqrt(variance / n)
    return mean, mean - half_width, mean + half_width


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound at 0 and 1, where p ± z·SE collapses.

    It inverts the score test: the proportions p whose test would not reject successes / n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _check_level(level)
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class Score:
    """A score measured on ``n`` items, with its 95% confidence interval."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f} to {self.high:.3f}, n = {self.n})"


def score(outcomes: list[float]) -> Score:
    """The mean of per-item outcomes with its interval: Wilson's for 0/1 outcomes."""
    if not outcomes:
        raise ValueError("there are no outcomes to score")
    n = len(outcomes)
    if set(outcomes) <= {0, 1}:
        return Score(sum(outcomes) / n, *wilson_interval(int(sum(outcomes)), n), n)
    mean, low, high = paired_difference([0.0] * n, list(outcomes))  # the mean of the outcomes
    return Score(mean, low, high, n)


def paired_score(before: list[float], after: list[float]) -> Score:
    """``after - before`` on the same items, with the paired difference's interval."""
    mean, low, high = paired_difference(before, after)
    return Score(mean, low, high, len(before))
