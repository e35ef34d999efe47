"""Typed configs: unknown keys and wrong types fail before any work, naming the key and the file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from soilnet.config import ConfigError, load_config, save_resolved
from soilnet.config.pretrain import PretrainConfig


def _write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_dotted_overrides_are_typed_and_applied(tmp_path):
    path = _write(tmp_path, {"train": {"steps": 5}})
    cfg = load_config(PretrainConfig, path, ["train.steps=7", "train.lr=0.5", "data.schema.channels=[NDVI, SR_B1]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5
    assert cfg.data.schema_.build().channels == ("SR_B1", "NDVI")


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, {"train": {"stepz": 5}})
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert "train.stepz" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = _write(tmp_path, {"train": {"steps": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert "train.steps" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(PretrainConfig, _write(tmp_path, {}, "ok.yaml"), ["train.global_batch_size=[1]"])


def test_unknown_channel_name_is_rejected_at_load(tmp_path):
    path = _write(tmp_path, {"data": {"schema": {"channels": ["SR_B1", "NDWI"]}}})
    with pytest.raises(ConfigError, match="NDWI"):
        load_config(PretrainConfig, path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")


def test_include_merges_under_the_including_file(tmp_path):
    _write(tmp_path, {"train": {"steps": 3, "lr": 0.1}}, "base.yaml")
    path = _write(tmp_path, {"include": ["base.yaml"], "train": {"steps": 9}})
    cfg = load_config(PretrainConfig, path)
    assert cfg.train.steps == 9 and cfg.train.lr == 0.1


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, None, ["train.steps=11"])
    out = save_resolved(cfg, tmp_path)
    again = load_config(PretrainConfig, out)
    assert again == cfg


def test_cli_reports_config_errors_before_work(tmp_path):
    path = _write(tmp_path, {"bogus": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "soilnet.cli", "pretrain", "--config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown key 'bogus'" in proc.stderr and str(path) in proc.stderr


@pytest.mark.parametrize(
    "command",
    ["pack", "pretrain", "finetune", "evaluate", "model-summary", "sample", "import-soilnet", "export", "predict-map"],
)
def test_every_subcommand_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "soilnet.cli", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: soilnet" in proc.stdout
