"""Metric formulas against values computed by hand."""

import math

import numpy as np
import pytest

from soilnet.evaluate import metrics
from soilnet.evaluate.baseline import summary_features

OBS = np.array([1.0, 2.0, 3.0, 4.0])
PRED = np.array([1.5, 2.0, 2.5, 5.0])  # errors +0.5, 0, -0.5, +1


def test_hand_computed_values():
    m = metrics.regression_metrics(OBS, PRED)
    assert m["n"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt(1.5 / 4))  # squared errors sum to 1.5
    assert m["mae"] == pytest.approx(2.0 / 4)
    assert m["bias"] == pytest.approx(1.0 / 4)  # mean(pred - obs)
    assert m["r2"] == pytest.approx(1 - 1.5 / 5.0)  # SS_tot around mean 2.5 is 5
    # IQR of obs with linear interpolation: Q1 = 1.75, Q3 = 3.25
    assert m["rpiq"] == pytest.approx(1.5 / math.sqrt(1.5 / 4))
    # Lin's CCC with population moments: cov 1.375, var_o 1.25, var_p 1.8125, (2.5 - 2.75)^2 = 0.0625
    assert m["ccc"] == pytest.approx(2 * 1.375 / (1.25 + 1.8125 + 0.0625))
    lo = [math.log1p(v) for v in OBS]
    lp = [math.log1p(v) for v in PRED]
    sq = sum((a - b) ** 2 for a, b in zip(lo, lp, strict=True))
    assert m["log_rmse"] == pytest.approx(math.sqrt(sq / 4))
    mean_lo = sum(lo) / 4
    assert m["log_r2"] == pytest.approx(1 - sq / sum((a - mean_lo) ** 2 for a in lo))


def test_perfect_prediction_and_ccc_penalises_shift():
    m = metrics.regression_metrics(OBS, OBS)
    assert m["rmse"] == 0 and m["r2"] == 1 and m["ccc"] == pytest.approx(1.0)
    shifted = metrics.regression_metrics(OBS, OBS + 1.0)
    # Pearson r would be 1; the concordance coefficient is not.
    assert shifted["ccc"] < 1 and shifted["bias"] == pytest.approx(1.0)


def test_negative_predictions_are_clipped_before_the_log():
    m = metrics.regression_metrics(np.array([0.0, 1.0]), np.array([-5.0, 1.0]))
    assert m["log_rmse"] == pytest.approx(0.0)


def test_pooled_differs_from_batch_average():
    """Pooling computes on all predictions; averaging per-batch R² (the seed's way) would give another number."""
    rng = np.random.default_rng(0)
    obs = rng.lognormal(3, 0.5, 200)
    pred = obs + rng.normal(0, 5, 200)
    pooled = metrics.r2(obs, pred)
    per_batch = np.mean([metrics.r2(obs[i : i + 20], pred[i : i + 20]) for i in range(0, 200, 20)])
    assert pooled == pytest.approx(metrics.regression_metrics(obs, pred)["r2"])
    assert pooled != pytest.approx(per_batch)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.regression_metrics(OBS, PRED[:3])
    with pytest.raises(ValueError, match="finite"):
        metrics.regression_metrics(OBS, np.array([1.0, np.nan, 2.0, 3.0]))


def test_baseline_features_from_float16_patches_do_not_overflow():

    image = np.full((2, 3, 64, 64), 3000.0, dtype=np.float16)  # elevation-like values, sum > float16 max
    climate = np.array([[[1.0, np.nan], [3.0, np.nan]]] * 2, dtype=np.float32)  # (N=2, T=2, F=2)
    x, names = summary_features(image, climate, ("a", "b", "c"), ("u", "v"))
    assert x.shape == (2, 3 * 2 + 2 * 2) and len(names) == x.shape[1]
    assert np.allclose(x[:, :6], 3000.0)
    assert names[6:] == ["u_mean", "v_mean", "u_std", "v_std"]
    assert np.allclose(x[0, 6:], [2.0, 0.0, 1.0, 0.0])  # all-NaN variable -> 0
