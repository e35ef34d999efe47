"""``soilnet finetune`` in a batch log (stderr a file, not a terminal): progress lines over each fit's batches and
over the folds, with done / total, a rate and an ETA, beside the per-epoch lines; TensorBoard logs per fold and
for the final model behind ``train.tensorboard``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from labelled_kit import FAST, write_yaml  # tests/evaluate, on the path through tests/jobs/conftest.py

from soilnet.config.base import load_config
from soilnet.config.finetune import FinetuneConfig
from soilnet.jobs.finetune import run

REPO = Path(__file__).resolve().parents[2]
RATE_ETA = r"[\d.e+-]+ {unit}/s, ETA (\d+:\d\d:\d\d|\?)"
FIT = re.compile(r"^fit (fold \d|final): (\d+)/(\d+) batches \(\d+%\), " + RATE_ETA.format(unit="batches") + r", epoch")
FOLDS = re.compile(r"^cross-validation: (\d)/3 folds \(\d+%\), " + RATE_ETA.format(unit="folds") + "$")


@pytest.fixture(scope="module")
def logged(labelled_shards, tmp_path_factory) -> tuple[Path, str]:
    """A ``soilnet finetune`` run as a batch job runs it: its output_dir and its stderr, read from a file."""
    out = tmp_path_factory.mktemp("ft_log")
    argv = [sys.executable, "-m", "soilnet.cli", "finetune", "--config", str(write_yaml(out / "cfg.yaml"))]
    argv += [f"data.shards={labelled_shards}", f"output_dir={out}", *FAST, "eval.plots=false"]
    env = {**os.environ, "SOILNET_PROGRESS_S": "0"}
    with (out / "slurm.err").open("w") as err:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    log = (out / "slurm.err").read_text()
    assert proc.returncode == 0, log[-3000:]
    return out, log


def test_finetune_writes_batch_progress_with_an_eta_for_every_fit(logged):
    _, log = logged
    lines = log.splitlines()
    fits = [m for m in map(FIT.match, lines) if m]
    assert {m[1] for m in fits} == {"fold 0", "fold 1", "fold 2", "final"}
    for label in ("fold 0", "final"):
        done = [int(m[2]) for m in fits if m[1] == label]
        assert done == list(range(1, len(done) + 1))  # every batch with SOILNET_PROGRESS_S=0
        assert all(int(m[3]) % 8 == 0 for m in fits)  # total: train.epochs=8 epochs of batches
    assert any(m[4] != "?" for m in fits)
    assert any(ln.startswith("fit final: finished ") for ln in lines)
    assert re.search(r"fold 0 epoch 0: train [\d.]+  val [\d.]+  val RMSE [\d.]+", log)  # the per-epoch lines stay


def test_the_cross_validation_reports_its_folds(logged):
    _, log = logged
    folds = [m for m in map(FOLDS.match, log.splitlines()) if m]
    assert [int(m[1]) for m in folds] == [1, 2, 3]
    assert "cross-validation: finished 3/3 folds (100%) in " in log
    assert "\r" not in log  # no bar in a log


def test_tensorboard_event_files_per_fold_and_for_the_final_model(logged):
    out, _ = logged
    for part in ("fold0", "fold1", "fold2", "final"):
        assert list((out / "tensorboard" / part).glob("events.out.tfevents.*")), part


def test_tensorboard_scalars_are_losses_validation_rmse_and_learning_rates(logged):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, _ = logged
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard" / "fold0"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/train", "loss/val", "val/rmse"} <= set(tags)
    assert any(t.startswith("lr/") for t in tags)
    assert [e.step for e in acc.Scalars("val/rmse")] == list(range(len(acc.Scalars("val/rmse"))))


def test_no_tensorboard_with_the_switch_off(labelled_shards, tmp_path):
    overrides = [f"data.shards={labelled_shards}", f"output_dir={tmp_path}", *FAST]
    overrides += ["train.epochs=1", "final_model=false", "eval.plots=false", "train.tensorboard=false"]
    assert run(load_config(FinetuneConfig, None, overrides)) == 0
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "tensorboard").exists()
