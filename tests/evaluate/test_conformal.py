"""Split-conformal intervals: the quantile rank, and empirical coverage near the nominal level."""

import numpy as np
import pytest

from soilnet.evaluate import conformal


def test_quantile_uses_the_finite_sample_rank():
    scores = np.arange(1, 10, dtype=float)  # n = 9
    assert conformal.conformal_quantile(scores, 0.8) == 8.0  # ceil(10 * 0.8) = 8th smallest
    assert conformal.conformal_quantile(scores, 0.95) == np.inf  # ceil(10 * 0.95) = 10 > n


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_coverage_on_exchangeable_data(level):
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(200):
        x = rng.uniform(0, 10, 400)
        y = 2 * x + 5 + rng.standard_t(4, 400) * 2  # heavy-tailed noise
        pred = 2 * x + 5.5  # a slightly biased model
        q = conformal.calibrate(y[:200], pred[:200], level)
        lo, hi = conformal.intervals(pred[200:], q, lower_bound=None)
        covered.append(conformal.coverage(y[200:], lo, hi)["coverage"])
    # Marginal guarantee: mean coverage >= level (upper bound level + 1/(n+1)).
    assert level <= np.mean(covered) <= level + 0.02


def test_intervals_clip_at_zero_and_report_width():
    lo, hi = conformal.intervals(np.array([1.0, 10.0]), 2.0)
    assert lo.tolist() == [0.0, 8.0] and hi.tolist() == [3.0, 12.0]
    c = conformal.coverage(np.array([0.5, 13.0]), lo, hi)
    assert c == {"coverage": 0.5, "mean_width": pytest.approx((3.0 + 4.0) / 2), "n": 2}


def test_log_space_intervals_cover_and_widen_with_the_prediction():
    rng = np.random.default_rng(1)
    covered = []
    for _ in range(100):
        x = rng.uniform(1, 4, 400)
        y = np.exp(x + rng.normal(0, 0.3, 400))  # multiplicative (log-normal) noise
        pred = np.exp(x)
        q = conformal.calibrate(y[:200], pred[:200], 0.9, space="log")
        lo, hi = conformal.intervals(pred[200:], q, space="log")
        covered.append(conformal.coverage(y[200:], lo, hi)["coverage"])
    assert 0.9 <= np.mean(covered) <= 0.92
    lo, hi = conformal.intervals(np.array([10.0, 100.0]), 0.5, space="log")
    assert (hi - lo)[1] > 5 * (hi - lo)[0]
