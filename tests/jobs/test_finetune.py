"""Fine-tuning end to end on tiny labelled shards: outputs, bad input, and scoring a saved model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from labelled_kit import FAST  # tests/evaluate, on the path through tests/jobs/conftest.py
from safetensors.torch import save_file

from soilnet.cli import main
from soilnet.config.base import load_config
from soilnet.config.finetune import FinetuneConfig, TargetConfig
from soilnet.data.labelled import DataError
from soilnet.evaluate.metrics import METRIC_NAMES
from soilnet.evaluate.plan import EvaluationError
from soilnet.jobs.finetune import run
from soilnet.schema import SampleSchema
from soilnet.train.regressor import PretrainedMismatch, build_model, modalities_of
from soilnet.train.targets import TargetTransform


def _cfg(shards, out, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"data.shards={shards}", f"output_dir={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def finetuned(finetuned_dir):
    return finetuned_dir


def test_metrics_json_has_model_and_baseline_sections(finetuned):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    for section in ("model", "baseline_rf"):
        assert set(METRIC_NAMES) <= set(metrics[section])
        assert metrics[section]["n"] == 300  # every labelled point is tested exactly once
    assert len(metrics["folds"]) == 3
    assert all("model" in f and "baseline_rf" in f and "conformal" in f for f in metrics["folds"])
    assert 0 <= metrics["conformal"]["coverage"] <= 1 and metrics["conformal"]["mean_width"] > 0
    assert metrics["split"]["kind"] == "spatial"


def test_bad_targets_are_dropped_and_counted(finetuned):
    data = json.loads((finetuned / "metrics.json").read_text())["data"]
    assert (data["missing"], data["nan"], data["negative"], data["labelled"]) == (1, 1, 1, 300)
    report = (finetuned / "report.md").read_text()
    assert "missing 1, NaN 1, negative 1" in report


def test_metrics_and_report_carry_the_learning_rate_table(finetuned):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    groups = metrics["lr_groups"]
    assert groups and all(g["name"].split(".")[0] in ("image_encoder", "climate_encoder", "head") for g in groups)
    cfg = load_config(FinetuneConfig, finetuned / "config.yaml", [])
    model = build_model(cfg.model, SampleSchema.from_dict(metrics["data"]["schema"]), modalities_of(cfg.modalities))
    assert sum(g["parameters"] for g in groups) == sum(p.numel() for p in model.parameters())
    report = (finetuned / "report.md").read_text()
    assert "## Learning rates" in report and f"| {groups[0]['name']} |" in report


def test_report_plots_and_model_are_written(finetuned):
    report = (finetuned / "report.md").read_text()
    assert "random forest" in report and "## Resolved config" in report and "spatially blocked" in report
    for png in ("observed_vs_predicted", "residual_histogram", "residual_map", "learning_curves", "interval_coverage"):
        assert (finetuned / f"{png}.png").stat().st_size > 1000
    assert (finetuned / "model.safetensors").is_file()
    assert (finetuned / "config.yaml").is_file()


def test_test_points_never_guide_training(finetuned):
    """Each point is predicted by the one fold that held it out; the epoch was chosen on validation points."""

    table = pd.read_csv(finetuned / "predictions.csv")
    assert table["id"].is_unique and len(table) == 300
    metrics = json.loads((finetuned / "metrics.json").read_text())
    for f in metrics["folds"]:
        parts = ("n_train", "n_val", "n_calibration", "n_test", "n_excluded_by_buffer", "n_unused_by_label_fraction")
        parts += ("n_excluded_by_inner_buffer",)  # training points near the validation / calibration blocks
        assert sum(f[k] for k in parts) == 300


def test_evaluate_scores_a_saved_model_on_new_shards(finetuned, tmp_path, kit):
    fresh = kit.write_shards(tmp_path / "fresh", n=60, seed=7, bad_targets=False)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(kit.write_yaml(tmp_path / "e.yaml")),
                f"data.shards={fresh}",
                f"output_dir={out}",
                f"checkpoint={finetuned}",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["n"] == 60 and metrics["baseline_rf"] is None


def test_without_coordinates_only_random_folds(tmp_path, kit):
    shards = kit.write_shards(
        tmp_path / "nocoords", n=90, with_coords=False, bad_targets=False, modalities=("climate",)
    )
    with pytest.raises(EvaluationError, match="only random k-fold"):
        run(_cfg(shards, tmp_path / "a", "modalities=climate", "eval.split.kind=spatial"))
    run(_cfg(shards, tmp_path / "b", "modalities=climate", "train.epochs=2", "final_model=false"))
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["split"]["kind"] == "random" and not metrics["split"]["has_coordinates"]
    assert "no coordinates" in (tmp_path / "b" / "report.md").read_text()


def test_missing_target_names_the_available_ones(labelled_shards, tmp_path):
    with pytest.raises(DataError, match=r"target 'clay' not in the shards; the targets are \['soc'\]"):
        run(_cfg(labelled_shards, tmp_path, "data.target=clay"))


def test_ground_truth_csv_columns_and_unknown_ids(labelled_shards, tmp_path):
    csv = tmp_path / "gt.csv"
    ids = [f"p{i:06d}" for i in range(0, 300, 2)] + ["x1", "x2"]
    rows = "".join(f"{i},{1 + k % 40}\n" for k, i in enumerate(ids))
    csv.write_text("\ufeffPoint_ID,OC\n" + rows, encoding="utf-8")  # LUCAS-style BOM
    with pytest.raises(DataError, match=r"target column 'SOC' not found; the columns are \['Point_ID', 'OC'\]"):
        run(
            _cfg(
                labelled_shards,
                tmp_path / "a",
                f"data.ground_truth.path={csv}",
                "data.ground_truth.id_column=Point_ID",
                "data.ground_truth.target_column=SOC",
            )
        )
    out = tmp_path / "b"
    run(
        _cfg(
            labelled_shards,
            out,
            f"data.ground_truth.path={csv}",
            "data.ground_truth.id_column=Point_ID",
            "data.ground_truth.target_column=OC",
            "train.epochs=2",
            "final_model=false",
            "eval.plots=false",
            "eval.split.kind=random",
        )
    )
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["labelled"] == 150 and data["ground_truth_ids_not_in_shards"] == 2
    assert (out / "ground_truth_ids_not_in_shards.txt").read_text().split() == ["x1", "x2"]


def test_pretrained_schema_mismatch_fails_before_training(labelled_shards, tmp_path, kit):
    other = {**kit.SCHEMA.to_dict(), "channels": list(kit.SCHEMA.channels[:7])}
    export = tmp_path / "enc.safetensors"
    save_file(
        {"image_encoder.w": __import__("torch").zeros(1)},
        str(export),
        metadata={"schema": json.dumps(other), "model": "{}"},
    )
    out = tmp_path / "out"
    with pytest.raises(PretrainedMismatch, match="channels"):
        run(_cfg(labelled_shards, out, f"pretrained={export}"))
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()


def test_target_transforms_round_trip():

    y = np.array([0.0, 5.0, 50.0, 100.0])
    seed = TargetTransform.fit(TargetConfig(transform="scale", max_value=87.0), y, standardize=False)
    assert np.allclose(seed.forward(y), np.clip(y / 87.0, 0, 1))  # the seed's clip(OC / OC_MAX, 0, 1)
    assert np.allclose(seed.inverse(seed.forward(y)), np.minimum(y, 87.0))
    log = TargetTransform.fit(TargetConfig(transform="log1p"), y)
    assert np.allclose(log.inverse(log.forward(y)), y)
    with pytest.raises(ValueError, match="max_value"):
        TargetConfig(transform="scale")


@pytest.mark.slow
def test_recovers_a_known_soc_function(tmp_path, kit):
    """SOC = 8 + 30 NDVI + 0.01 elevation + 0.1 pr (+ noise): held-out R² >= 0.8, pooled over spatial folds."""
    shards = kit.write_shards(tmp_path / "shards", n=600, seed=3, bad_targets=False)
    run(_cfg(shards, tmp_path / "out", "train.epochs=30", "final_model=false", "eval.plots=false"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"]["n"] == 600
    assert metrics["model"]["r2"] >= 0.8
