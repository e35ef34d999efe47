"""Targets: nothing clipped in silence, the log back-transform's bias, and a forest that learns the same target.

Unit tests on arrays, plus one small end-to-end run (2 folds, 2 epochs) on the tiny labelled shards of conftest.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor

from soilnet.config.base import load_config
from soilnet.config.finetune import FinetuneConfig, TargetConfig
from soilnet.data.labelled import load_labelled
from soilnet.evaluate import baseline
from soilnet.jobs.finetune import run
from soilnet.train.finetune import fit
from soilnet.train.regressor import modalities_of
from soilnet.train.targets import TargetRangeError, TargetTransform, check_range

SMALL = [
    "train.threads=1",
    "train.epochs=2",
    "train.batch_size=32",
    "eval.split.folds=2",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=20",
    "eval.plots=false",
    "final_model=false",
]


def _cfg(shards, out, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"data.shards={shards}", f"output_dir={out}", *SMALL, *extra])


# ------------------------------------------------------------------------------------------ out of range


def test_targets_above_max_value_are_an_error_naming_count_and_largest():
    y = np.array([10.0, 90.0, 20.0, 560.2, 87.0])
    ids = np.array(["a", "b", "c", "d", "e"])
    cfg = TargetConfig(transform="scale", max_value=87.0)
    with pytest.raises(TargetRangeError, match=r"2 of 5 targets.*560\.2.*'d'.*target\.max_value") as err:
        check_range(cfg, y, ids, "shards/manifest.json")
    assert "target.out_of_range=drop" in str(err.value)


def test_out_of_range_drop_keeps_the_rest_and_lists_the_dropped():
    y = np.array([10.0, 90.0, 20.0, 560.2, 87.0])
    ids = np.array(["a", "b", "c", "d", "e"])
    keep, dropped = check_range(TargetConfig(transform="scale", max_value=87.0, out_of_range="drop"), y, ids, "x")
    assert keep.tolist() == [True, False, True, False, True]  # 87 itself is in range
    assert dropped == [{"id": "b", "value": 90.0}, {"id": "d", "value": 560.2}]
    keep, dropped = check_range(TargetConfig(transform="log1p"), y, ids, "x")  # no max_value: nothing to check
    assert keep.all() and dropped == []


def test_out_of_range_is_an_error_before_training(labelled_shards, tmp_path):
    with pytest.raises(TargetRangeError, match=r"of 300 targets.*target\.max_value=45"):
        run(_cfg(labelled_shards, tmp_path / "out", "target.transform=scale", "target.max_value=45"))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_smearing_needs_log1p():
    with pytest.raises(ValueError, match="bias_correction=smearing.*log1p"):
        TargetConfig(transform="none", bias_correction="smearing")


# ------------------------------------------------------------------------------------------ smearing


def test_smearing_removes_the_log_back_transform_bias():
    """y = expm1(mu + e), e ~ N(0, 0.8²): expm1(mu) is the median, biased low for the mean by ~27 %;
    Duan's smearing from residuals in log1p space restores the mean: pred = (1 + expm1(mu)) * mean(exp(e)) - 1."""
    rng = np.random.default_rng(0)
    mu = rng.uniform(2, 4, 20000)
    y = np.expm1(mu + rng.normal(0, 0.8, mu.size))
    cfg = TargetConfig(transform="log1p", bias_correction="smearing")
    tf = TargetTransform.fit(cfg, y)
    scaled = tf.forward(np.expm1(mu))  # a model that predicts the conditional mean in log1p space exactly
    tf = tf.with_smearing(scaled, y)
    assert tf.smearing == pytest.approx(np.exp(0.8**2 / 2), rel=0.02)
    plain, corrected = tf.inverse(scaled, corrected=False), tf.inverse(scaled)
    assert np.allclose(corrected, (1 + plain) * tf.smearing - 1)
    assert np.mean(plain - y) / np.mean(y) < -0.2
    assert abs(np.mean(corrected - y)) / np.mean(y) < 0.02
    again = TargetTransform.from_dict(tf.to_dict())  # saved with the final model
    assert np.allclose(again.inverse(scaled), corrected)


# ------------------------------------------------------------------------------------------ baseline


def test_forest_learns_the_models_transform():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (400, 3)).astype(np.float32)
    y = np.expm1(3 * x[:, 0] + rng.normal(0, 0.5, 400))
    cfg = TargetConfig(transform="log1p", bias_correction="smearing")
    fitted = baseline.fit_predict_target(x[:300], y[:300], x[300:], cfg, n_estimators=30, seed=4)
    rf = RandomForestRegressor(n_estimators=30, max_features=1 / 3, random_state=4).fit(x[:300], np.log1p(y[:300]))
    assert np.allclose(fitted.uncorrected, np.expm1(rf.predict(x[300:])))
    assert fitted.transform["kind"] == "log1p" and fitted.transform["smearing"] > 1
    assert np.allclose(fitted.pred, (1 + fitted.uncorrected) * fitted.transform["smearing"] - 1)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def dropped_run(labelled_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets")
    extra = ["target.transform=log1p", "target.max_value=45", "target.out_of_range=drop"]
    run(_cfg(labelled_shards, out, *extra, "target.bias_correction=smearing"))
    return out, json.loads((out / "metrics.json").read_text())


def test_dropped_targets_are_listed_in_metrics_and_report(dropped_run):
    out, metrics = dropped_run
    dropped = metrics["data"]["above_max_value"]
    assert len(dropped) == metrics["data"]["dropped_above_max_value"] > 0
    assert all(d["value"] > 45 for d in dropped)
    assert metrics["model"]["n"] == metrics["data"]["labelled"] == 300 - len(dropped)
    report = (out / "report.md").read_text()
    assert f"{len(dropped)} points above target.max_value=45 left out" in report
    assert dropped[0]["id"] in report


def test_model_and_forest_in_both_units_with_their_transforms(dropped_run):
    out, metrics = dropped_run
    for who in ("model", "baseline_rf"):
        assert {"r2", "rmse", "log_r2", "log_rmse"} <= set(metrics[who])
        assert metrics["transforms"][who] == {"transform": "log1p", "bias_correction": "smearing"}
        b = metrics["bias_correction"][who]
        assert set(b) >= {"bias_corrected", "bias_uncorrected", "smearing_by_fold"}
        assert len(b["smearing_by_fold"]) == 2 and all(s > 0 for s in b["smearing_by_fold"])
        assert b["bias_corrected"] != b["bias_uncorrected"]
    report = (out / "report.md").read_text()
    assert "bias without correction" in report and "forest learns log1p" in report


@pytest.mark.parametrize("score", ["val_loss", "val_rmse"])
def test_early_stopping_keeps_the_epoch_best_on_the_chosen_validation_score(labelled_shards, score):
    cfg = FinetuneConfig.model_validate(
        {
            "data": {"shards": str(labelled_shards)},
            "target": {"transform": "log1p"},
            "train": {"epochs": 6, "patience": 6, "threads": 1, "lr": 3e-2, "early_stopping": score},
        }
    )
    data = load_labelled(cfg.data, modalities_of(cfg.modalities))
    rows = np.arange(len(data))
    fitted = fit(cfg, data, rows[:60], rows[60:100], seed=0, label="fold 0")
    assert fitted.best_epoch == int(np.argmin(fitted.history[score]))
