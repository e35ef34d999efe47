"""``benchmarks/ssl_gain.py`` at toy sizes: real packing, DeepSpeed pretraining (2 variants x 2 seeds, 2 steps each),
export and fine-tuning; the JSON's shape, identical architectures in both arms, paired runs and the inductive
exclusion. The numbers themselves mean nothing at this size (docs/benchmarks.md has the real run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from soilnet.config.base import load_config
from soilnet.config.finetune import FinetuneConfig
from soilnet.schema import SampleSchema
from soilnet.train.regressor import build_model

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ssl_gain", REPO / "benchmarks" / "ssl_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ssl_gain_pairs_identical_architectures_over_seeds_in_both_variants(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = load_benchmark()
    out = tmp_path / "bench"
    args = "--samples 40 --pretrain-steps 2 --pretrain-seeds 2 --seeds 2 --fractions 1 --budget epochs"
    bench.main(["--out", str(out), *args.split(), "train.epochs=1", "train.patience=1", "train.threads=1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    for variant in ("transductive", "inductive"):
        row = summary[variant]["100%"]
        assert {"gain", "ci_low", "ci_high", "seeds"} <= row.keys()
        assert row["seeds"] == {"finetune": 2, "pretrain": 2, "pairs": 4}
        assert row["ci_low"] <= row["gain"] <= row["ci_high"]
    arch = summary["architecture"]
    assert arch["identical"] and arch["scratch"] == arch["ssl"] and len(arch["ssl"]) == 1
    # the config's own model is another architecture: the scratch arm was aligned to the export's encoders
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/demo.yaml", [])
    schema = SampleSchema.from_dict(json.loads((out / "world_labelled" / "manifest.json").read_text())["schema"])
    assert bench.fingerprint(build_model(cfg.model, schema, ("image", "climate")))["sha256"] != arch["ssl"][0]
    # pairs: same folds and training sets in both arms for each fine-tuning seed
    for seed in range(2):
        folds = [
            json.loads((out / "runs" / f"{tag}_100pct_seed{seed}" / "metrics.json").read_text())["folds"]
            for tag in ("scratch", "ssl_transductive_p0", "ssl_inductive_p1")
        ]
        sizes = [[(f["n_train"], f["n_test"]) for f in fs] for fs in folds]
        assert sizes[0] == sizes[1] == sizes[2]
    check = summary["inductive_check"]
    assert check["inductive_points_in_a_labelled_block"] == 0
    assert check["min_distance_to_a_labelled_point_km"] > check["buffer_km"]
    assert summary["normalisation"] == {"scratch": ["data"], "ssl": ["pretrained"]}
