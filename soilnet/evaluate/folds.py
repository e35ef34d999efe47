"""One cross-validation fold: train the model on its training part (early stopping on its validation part),
predict its test and calibration points, and fit the random-forest baseline on the same rows; and the final
model on every labelled point. Each fold's results are checkpointed (:mod:`soilnet.train.resume`), so a
resumed run skips the folds that have finished.

Of several processes (data-parallel fine-tuning), every rank runs the same folds in the same order; only rank
0 fits the baseline (the others pass no features).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from soilnet.config.finetune import FinetuneConfig
from soilnet.config.model import ModelConfig
from soilnet.data.labelled import LabelledData
from soilnet.distributed import DistInfo
from soilnet.evaluate.baseline import fit_predict_target
from soilnet.evaluate.conformal import calibrate
from soilnet.evaluate.plan import FoldParts, Inputs, SplitPlan, carve_final
from soilnet.progress import Scalars
from soilnet.train.finetune import fit
from soilnet.train.regressor import FitResult, apply_export_model, predict
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag

log = logging.getLogger("soilnet.evaluate")


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@dataclass
class FoldResult:
    """A fold's training history and chosen epoch, and its predictions ``(n,)`` float64 in original units: on
    the test points (with and without the back-transform's bias correction, and its smearing factor), on the
    calibration points, and the baseline's on the test points (None without the baseline)."""

    parts: FoldParts
    history: dict[str, list[float]]
    best_epoch: int
    lr_groups: list[dict]
    p_test: np.ndarray
    p_test_uncorrected: np.ndarray
    smearing: float
    p_cal: np.ndarray
    rf_test: np.ndarray | None = None
    rf_test_uncorrected: np.ndarray | None = None
    rf_smearing: float = 1.0

    def state(self) -> dict:
        """The fold's results as the resume store keeps them (tensors and plain values)."""
        out = {
            "kind": "results",
            "history": self.history,
            "best_epoch": self.best_epoch,
            "lr_groups": self.lr_groups,
            "p_test": _tensor(self.p_test),
            "p_test_uncorrected": _tensor(self.p_test_uncorrected),
            "smearing": self.smearing,
            "p_cal": _tensor(self.p_cal),
            "rf_test": None,
        }
        if self.rf_test is not None and self.rf_test_uncorrected is not None:
            out["rf_test"] = _tensor(self.rf_test)
            out["rf_test_uncorrected"] = _tensor(self.rf_test_uncorrected)
            out["rf_smearing"] = self.rf_smearing
        return out

    @classmethod
    def from_state(cls, parts: FoldParts, saved: dict) -> FoldResult:
        rf = saved.get("rf_test")
        return cls(
            parts,
            saved["history"],
            saved["best_epoch"],
            saved["lr_groups"],
            saved["p_test"].numpy(),
            saved.get("p_test_uncorrected", saved["p_test"]).numpy(),
            float(saved.get("smearing", 1.0)),
            saved["p_cal"].numpy(),
            None if rf is None else rf.numpy(),
            None if rf is None else saved.get("rf_test_uncorrected", rf).numpy(),
            float(saved.get("rf_smearing", 1.0)),
        )


@dataclass
class Context:
    """What every fold of one run shares: the config, the inputs, the baseline's features (None: no baseline
    on this process), this process's place among the ranks, the resume store, the stop flag and ``scalars``: the
    job's opener of a TensorBoard writer per fit (``fold<k>``, ``final``; None: no TensorBoard here)."""

    cfg: FinetuneConfig
    inputs: Inputs
    feats: np.ndarray | None
    info: DistInfo | None = None
    resume: ResumeStore | None = None
    stop: StopFlag | None = None
    scalars: Callable[[str], Scalars] | None = None

    @property
    def data(self) -> LabelledData:
        return self.inputs.data

    def fit(
        self, train: np.ndarray, val: np.ndarray, seed: int, label: str, part: str, slot: tuple | None
    ) -> FitResult:
        """:func:`soilnet.train.finetune.fit` with this run's config, data, export, ranks and stop flag, reporting
        to TensorBoard's ``part`` (``fold<k>``, ``final``) when the job opens writers."""
        scalars = self.scalars(part) if self.scalars else None
        try:
            return fit(
                self.cfg, self.data, train, val, seed, self.inputs.export, label, slot, self.stop, self.info, scalars
            )
        finally:
            if scalars is not None:
                scalars.close()


def _baseline(ctx: Context, parts: FoldParts, result: FoldResult) -> None:
    """The random forest on the fold's training and validation rows, in the model's target transform."""
    assert ctx.feats is not None
    cfg, data = ctx.cfg, ctx.data
    fit_rows = np.concatenate([parts.train, parts.val])
    rf = fit_predict_target(  # the same target transform and bias correction as the model
        ctx.feats[fit_rows],
        data.y[fit_rows],
        ctx.feats[parts.test],
        cfg.target,
        n_estimators=cfg.eval.baseline.n_estimators,
        min_samples_leaf=cfg.eval.baseline.min_samples_leaf,
        seed=cfg.train.seed + parts.index,
    )
    result.rf_test = np.asarray(rf.pred, dtype=np.float64)
    result.rf_test_uncorrected = np.asarray(rf.uncorrected, dtype=np.float64)
    result.rf_smearing = float(rf.transform["smearing"])


def run_fold(ctx: Context, parts: FoldParts) -> FoldResult:
    """Fold ``parts.index``'s results: read from the resume store when the fold has finished before; otherwise
    trained (resuming from the fold's last checkpoint) and saved there, replacing the fold's training state."""
    cfg, data, index, mods = ctx.cfg, ctx.data, parts.index, ctx.inputs.mods
    key = f"fold_{index}"
    saved = ctx.resume.load(key) if ctx.resume else None
    if ctx.resume is not None and saved is not None and saved["kind"] == "results":
        log.info("fold %d: finished before; results from %s", index, ctx.resume.path(key))
        return FoldResult.from_state(parts, saved)
    slot = (ctx.resume, key) if ctx.resume else None
    fitted = ctx.fit(parts.train, parts.val, cfg.train.seed + index, f"fold {index}", f"fold{index}", slot)
    result = FoldResult(
        parts,
        fitted.history,
        fitted.best_epoch,
        fitted.lr_groups,
        np.asarray(predict(fitted, data, parts.test, mods), dtype=np.float64),
        np.asarray(predict(fitted, data, parts.test, mods, False), dtype=np.float64),
        float(fitted.transform.smearing),
        np.asarray(predict(fitted, data, parts.cal, mods), dtype=np.float64),
    )
    if ctx.feats is not None:
        _baseline(ctx, parts, result)
    if ctx.resume:
        ctx.resume.save(key, result.state())
    return result


@dataclass
class FinalModel:
    """The model trained on every labelled point (minus its validation and calibration parts) for predict-map,
    its model config, and ``section``: what metrics.json says of it."""

    fitted: FitResult
    model_cfg: ModelConfig
    conformal: dict
    section: dict


def fit_final(ctx: Context, plan: SplitPlan, histories: dict) -> FinalModel:
    """Train the final model (adds its curves to ``histories`` as ``final``) and calibrate its intervals."""
    cfg, data, export = ctx.cfg, ctx.data, ctx.inputs.export
    val, cal, train, _ = carve_final(cfg, data, plan)
    slot = (ctx.resume, "final") if ctx.resume else None
    fitted = ctx.fit(train, val, cfg.train.seed + 999, "final", "final", slot)
    histories["final"] = fitted.history
    p_cal = predict(fitted, data, cal, ctx.inputs.mods)
    conformal = {
        "level": cfg.eval.conformal.level,
        "space": cfg.eval.conformal.space,
        "half_width": calibrate(data.y[cal], p_cal, cfg.eval.conformal.level, cfg.eval.conformal.space),
        "n_calibration": len(cal),
    }
    model_cfg = apply_export_model(cfg.model, export[1], ctx.inputs.mods) if export else cfg.model
    section = {"n_train": len(train), "n_val": len(val), "best_epoch": fitted.best_epoch, "conformal": conformal}
    return FinalModel(fitted, model_cfg, conformal, section)
