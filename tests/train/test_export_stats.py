"""Pretraining normalisation statistics travel with the encoders: a real one-process DeepSpeed pretraining on a
channel and variable subset of the packed demo world, ``soilnet export``, then fine-tuning on another packed world
whose own statistics differ, so the statistics in use show which source they came from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pretrain_kit import cpu_env, free_port
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shards.pack import pack
from soilnet.config.base import load_config
from soilnet.config.finetune import FinetuneConfig
from soilnet.config.pack import PackConfig
from soilnet.jobs.finetune import run
from soilnet.schema import SampleSchema

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]
CHANNELS = [c for c in SampleSchema().channels if c != "SR_B2"]  # SR_B2 left out: positions shift
VARIABLES = ["aet", "def", "pdsi", "pet", "pr", "ro", "soil", "srad", "swe", "tmmx", "vap", "vpd", "vs"]  # no tmmn
SUBSET = [f"data.schema.channels=[{','.join(CHANNELS)}]", f"data.schema.climate_variables=[{','.join(VARIABLES)}]"]


def soilnet(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soilnet.cli", *args],
        env=cpu_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def manifest_stats(shards: Path, kind: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    table = json.loads((shards / "manifest.json").read_text())["stats"][kind]
    return np.array([table[n]["mean"] for n in names]), np.array([table[n]["std"] for n in names])


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory) -> Path:
    """Two steps of the demo pretraining on one process, on the channel/variable subset."""
    out = tmp_path_factory.mktemp("stats") / "pretrain"
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = soilnet(
        "pretrain",
        "--config",
        str(REPO / "configs/pretrain/demo.yaml"),
        f"output_dir={out}",
        f"data.shards={shards}",
        "train.steps=2",
        "train.global_batch_size=16",
        "checkpoint.every_steps=2",
        "train.tensorboard=false",
        *SUBSET,
        **env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def export(pretrained, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("stats-export") / "encoders.safetensors"
    proc = soilnet("export", "--checkpoint", str(pretrained), "--out", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


@pytest.fixture(scope="module")
def other_world(tmp_path_factory) -> Path:
    """32 labelled points of the same synthetic world at other places: its own statistics differ."""

    folder = tmp_path_factory.mktemp("finetune-world")
    cfg = load_config(
        PackConfig,
        REPO / "configs/preprocess/demo.yaml",
        [f"output_dir={folder}", "sampling.n=32", "sampling.seed=7", "shard.max_samples=16"],
    )
    assert pack(cfg) is not None
    return folder


def export_stats(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert "normalisation" in meta, sorted(meta)
    return json.loads(meta["normalisation"])


def test_export_records_the_pretraining_statistics_by_name_with_their_schema(export, shards):
    stats = export_stats(export)
    assert stats["schema"]["channels"] == CHANNELS and stats["schema"]["climate_variables"] == VARIABLES
    assert list(stats["image"]) == CHANNELS and list(stats["climate"]) == VARIABLES
    for kind, names in (("image", CHANNELS), ("climate", VARIABLES)):
        mean, std = manifest_stats(shards, kind, names)
        assert np.allclose([stats[kind][n]["mean"] for n in names], mean, rtol=1e-6)
        assert np.allclose([stats[kind][n]["std"] for n in names], std, rtol=1e-6)
    assert Path(stats["source"]) == shards / "manifest.json"


@pytest.mark.slow
def test_export_of_a_checkpoint_without_recorded_statistics_reads_the_pretraining_manifest(
    pretrained, export, shards, tmp_path
):
    old = tmp_path / "old"
    subprocess.run(["cp", "-r", str(pretrained), str(old)], check=True)
    for meta_file in (old / "checkpoints").glob("step_*/soilnet.json"):
        meta = json.loads(meta_file.read_text())
        meta.pop("normalisation")
        meta_file.write_text(json.dumps(meta))
    proc = soilnet("export", "--checkpoint", str(old), "--out", str(tmp_path / "a.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert export_stats(tmp_path / "a.safetensors") == export_stats(export)  # from config.data.shards
    gone = tmp_path / "nowhere"
    proc = soilnet("export", "--checkpoint", str(old), "--out", str(tmp_path / "b.safetensors"), "--shards", str(gone))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exporting without normalisation statistics" in proc.stderr and str(gone) in proc.stderr
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert "normalisation" not in f.metadata()


def finetune(world: Path, out: Path, *overrides: str) -> tuple[dict, str, dict]:
    """A one-epoch fine-tuning on ``world``: (metrics.json, report.md, the saved model's normaliser)."""

    cfg = load_config(
        FinetuneConfig,
        REPO / "configs/finetune/demo.yaml",
        [
            f"data.shards={world}",
            f"output_dir={out}",
            "train.epochs=1",
            "eval.split.kind=random",
            "eval.split.folds=2",
            "eval.baseline.enabled=false",
            "eval.plots=false",
            "train.threads=1",
            *SUBSET,
            *overrides,
        ],
    )
    assert run(cfg) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        normaliser = json.loads(f.metadata()["normaliser"])
    return json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text(), normaliser


def test_finetuning_from_an_export_normalises_with_the_pretraining_statistics_by_default(
    export, shards, other_world, tmp_path
):
    metrics, report, normaliser = finetune(other_world, tmp_path / "ft", f"pretrained={export}")
    for kind, names in (("image", CHANNELS), ("climate", VARIABLES)):
        mean, std = manifest_stats(shards, kind, names)
        own, _ = manifest_stats(other_world, kind, names)
        assert np.allclose(normaliser[f"{kind}_mean"], mean, rtol=1e-5)
        assert np.allclose(normaliser[f"{kind}_std"], std, rtol=1e-5)
        assert not np.allclose(normaliser[f"{kind}_mean"], own, rtol=1e-3)  # the other world's differ
    assert metrics["normalisation"]["used"] == "pretrained" and metrics["normalisation"]["requested"] == "pretrained"
    assert str(shards / "manifest.json") in metrics["normalisation"]["image"]
    assert "input normalisation: **pretrained** statistics" in report


def test_normalisation_data_uses_the_finetuning_data_statistics(export, other_world, tmp_path):
    metrics, report, normaliser = finetune(
        other_world, tmp_path / "ft", f"pretrained={export}", "data.normalisation=data"
    )
    for kind, names in (("image", CHANNELS), ("climate", VARIABLES)):
        mean, _ = manifest_stats(other_world, kind, names)
        assert np.allclose(normaliser[f"{kind}_mean"], mean, rtol=1e-5)
    assert metrics["normalisation"]["used"] == "data" and "warning" not in metrics["normalisation"]
    assert "input normalisation: **data** statistics (requested: data)" in report


def test_an_export_without_statistics_falls_back_to_the_data_statistics_with_a_warning(export, other_world, tmp_path):
    with safe_open(str(export), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "normalisation"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(export)), str(old), metadata=meta)
    metrics, report, normaliser = finetune(other_world, tmp_path / "ft", f"pretrained={old}")
    mean, _ = manifest_stats(other_world, "image", CHANNELS)
    assert np.allclose(normaliser["image_mean"], mean, rtol=1e-5)
    assert (
        metrics["normalisation"]["used"] == "data"
        and "no pretraining normalisation" in metrics["normalisation"]["warning"]
    )
    assert "**warning:**" in report and str(old) in report
