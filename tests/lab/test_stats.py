"""Error bars: the formulas against the textbook values and against each other."""

import math
import statistics

import pytest

from fieldguide.lab.stats import (
    accuracy_confidence_interval,
    binomial_standard_error,
    bootstrap_confidence_interval,
    paired_difference,
)


@pytest.mark.parametrize(
    ("p", "n", "expected"),
    [
        (0.5, 200, 0.035355),  # the evaluation page's example
        (0.5, 100, 0.05),
        (0.9, 100, 0.03),
        (0.0, 50, 0.0),
        (1.0, 1, 0.0),
    ],
)
def test_binomial_standard_error(p, n, expected):
    assert binomial_standard_error(p, n) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("p", "n", "level", "expected"),
    [
        (0.5, 200, 0.95, (0.430704, 0.569296)),  # 1.959964 standard errors each side
        (0.5, 100, 0.90, (0.417757, 0.582243)),  # 1.644854
        (0.98, 20, 0.95, (0.918643, 1.0)),  # clipped at 1
        (0.02, 20, 0.95, (0.0, 0.081357)),  # clipped at 0
    ],
)
def test_normal_interval(p, n, level, expected):
    assert accuracy_confidence_interval(p, n, level) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("hits", "n"), [(100, 200), (150, 200), (60, 300)])
def test_the_bootstrap_agrees_with_the_normal_interval_on_large_samples(hits, n):
    outcomes = [1] * hits + [0] * (n - hits)
    normal = accuracy_confidence_interval(hits / n, n)
    bootstrap = bootstrap_confidence_interval(outcomes, num_resamples=4000)
    assert bootstrap == pytest.approx(normal, abs=0.01)


def test_the_bootstrap_is_reproducible_and_brackets_the_mean():
    outcomes = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    low, high = bootstrap_confidence_interval(outcomes, seed=5)
    assert (low, high) == bootstrap_confidence_interval(outcomes, seed=5)
    assert low <= statistics.mean(outcomes) <= high


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([0, 1, 0, 1, 1, 0, 0, 1], [1, 1, 0, 1, 1, 1, 0, 1]),
        ([0.2, 0.4, 0.1, 0.9], [0.3, 0.4, 0.5, 0.7]),
        ([1] * 50 + [0] * 50, [1] * 70 + [0] * 30),
    ],
)
def test_paired_difference_is_a_normal_interval_on_the_differences(before, after):
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    half = 1.959964 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.mean(diffs)
    assert paired_difference(before, after) == pytest.approx((mean, mean - half, mean + half), abs=1e-5)


def test_a_paired_interval_is_narrower_when_the_models_agree_on_most_examples():
    # Two models that get the same 180 examples right or wrong and differ on 20: pairing
    # removes the noise they share, so the difference is pinned down far better than by
    # treating the two accuracies (0.45 and 0.55) as independent measurements.
    before = [1] * 90 + [0] * 90 + [0] * 20
    after = [1] * 90 + [0] * 90 + [1] * 20
    diff, low, high = paired_difference(before, after)
    unpaired_se = math.hypot(binomial_standard_error(0.45, 200), binomial_standard_error(0.55, 200))
    assert diff == pytest.approx(0.1)
    assert high - low < (2 * 1.96 * unpaired_se) / 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: binomial_standard_error(1.2, 10), "accuracy lies in"),
        (lambda: binomial_standard_error(0.5, 0), "at least one example"),
        (lambda: accuracy_confidence_interval(0.5, 10, level=1.0), "confidence level"),
        (lambda: bootstrap_confidence_interval([]), "at least one outcome"),
        (lambda: bootstrap_confidence_interval([1, 0], level=0), "confidence level"),
        (lambda: paired_difference([1, 0], [1]), "equally long"),
        (lambda: paired_difference([], []), "non-empty"),
    ],
)
def test_bad_input_is_an_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
