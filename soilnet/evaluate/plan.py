"""What a cross-validation evaluates: the labelled points and the pretrained export as the run needs them, the
folds, and each fold's carving into training, validation (early stopping, epoch choice) and calibration
(conformal) parts; under a spatial split these are carved by whole blocks and buffered like the test fold,
under a random split points with identical inputs stay together (:mod:`soilnet.evaluate.splits`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from soilnet.config.finetune import FinetuneConfig
from soilnet.data.labelled import LabelledData, load_labelled
from soilnet.evaluate.splits import (
    Fold,
    buffer_parts,
    carve,
    has_coordinates,
    identical_input_groups,
    random_kfold,
    spatial_blocks,
    spatial_kfold,
)
from soilnet.schema import SampleSchema
from soilnet.train.regressor import check_export_schema, choose_normalisation, modalities_of, read_export

log = logging.getLogger("soilnet.evaluate")


class EvaluationError(ValueError):
    """A run that cannot be evaluated as configured."""


@dataclass
class Inputs:
    """The run's modalities, its labelled points and the pretrained export (tensors, metadata) or None."""

    mods: tuple[str, ...]
    data: LabelledData
    export: tuple[dict, dict] | None


def load_inputs(cfg: FinetuneConfig) -> Inputs:
    """Read the labelled points and the export, check that they fit, and normalise as ``data.normalisation``
    asks (:func:`soilnet.train.regressor.choose_normalisation`)."""
    mods = modalities_of(cfg.modalities)
    data = load_labelled(cfg.data, mods)
    export = None
    if cfg.pretrained:
        tensors, meta = read_export(cfg.pretrained)
        check_export_schema(SampleSchema.from_dict(meta["schema"]), data.schema, mods, cfg.pretrained)
        export = (tensors, meta)
    choose_normalisation(data, export[1] if export else None, cfg.data.normalisation, str(cfg.pretrained))
    log.info("labelled data: %s; inputs normalised with %s statistics", data.counts, data.normalisation["used"])
    return Inputs(mods, data, export)


@dataclass
class SplitPlan:
    """The folds, the block ID per point (spatial) or identical-input group (random), and a description of
    the split for the report (``info``)."""

    folds: list[Fold]
    groups: np.ndarray | None
    info: dict

    @property
    def buffer_km(self) -> float | None:
        """Validation and calibration parts are buffered like the test fold (None: no buffer)."""
        return self.info.get("buffer_km")


def _random_note(coords: bool) -> str:
    return (
        "random k-fold: points have no coordinates, so spatial blocking is impossible; nearby points may fall "
        "in training and test folds, which flatters the scores"
        if not coords
        else "random k-fold (as in the seed); nearby points may fall in training and test folds"
    ) + "; points with identical inputs are kept on one side of every split"


def _no_coordinates(data: LabelledData) -> EvaluationError:
    n_missing = int(np.sum(~(np.isfinite(data.lon) & np.isfinite(data.lat))))
    why = ""
    if data.coordinates == "none":
        why = (
            " (the manifest's import.coordinates is 'none': the data set was imported without --points or "
            "georeferenced images)"
        )
    return EvaluationError(
        f"eval.split.kind=spatial needs coordinates, but {n_missing} of {len(data)} points have none{why}; "
        "without coordinates only random k-fold is possible (eval.split.kind=random)"
    )


def plan_split(cfg: FinetuneConfig, data: LabelledData) -> SplitPlan:
    """The folds of ``eval.split`` (``auto``: spatial with coordinates, else random)."""
    sc = cfg.eval.split
    coords = has_coordinates(data.lon, data.lat)
    kind = sc.kind if sc.kind != "auto" else ("spatial" if coords else "random")
    info: dict = {"requested": sc.kind, "kind": kind, "folds": sc.folds, "seed": sc.seed, "has_coordinates": coords}
    if kind == "spatial" and not coords:
        raise _no_coordinates(data)
    groups, info["identical_inputs"] = identical_input_groups(data.image, data.climate)
    if kind == "random":
        info["note"] = _random_note(coords)
        return SplitPlan(random_kfold(len(data), sc.folds, sc.seed, groups), groups, info)
    buffer_km = sc.block_km if sc.buffer_km is None else sc.buffer_km
    folds = spatial_kfold(data.lon, data.lat, sc.folds, sc.block_km, buffer_km, sc.seed)
    info.update(block_km=sc.block_km, buffer_km=buffer_km)
    info["note"] = (
        f"spatially blocked k-fold: {sc.block_km:g} km blocks, training points within {buffer_km:g} km of a test "
        "point excluded"
    )
    return SplitPlan(folds, spatial_blocks(data.lon, data.lat, sc.block_km), info)


@dataclass
class FoldParts:
    """One fold's rows: ``train``, ``val``, ``cal`` (calibration), ``test``; ``inner``: dropped by the buffer
    around validation and calibration. ``excluded``: how many the buffer around the test fold dropped;
    ``unused``: how many of the fold's training rows ``train.label_fraction`` left out."""

    index: int
    train: np.ndarray
    val: np.ndarray
    cal: np.ndarray
    test: np.ndarray
    inner: np.ndarray
    excluded: int
    unused: int


def carve_fold(cfg: FinetuneConfig, data: LabelledData, plan: SplitPlan, fold: Fold) -> FoldParts:
    """Carve validation and calibration parts out of ``fold``'s training rows (seeded per fold)."""
    rng = np.random.default_rng(cfg.eval.split.seed * 1000 + fold.index)
    pool = fold.train
    if cfg.train.label_fraction < 1:
        pool = np.sort(rng.choice(pool, max(3, round(cfg.train.label_fraction * len(pool))), replace=False))
    fractions = (cfg.train.val_fraction, cfg.eval.conformal.calibration_fraction)
    carved = carve(pool, fractions, rng, plan.groups)
    val, cal, train, inner = buffer_parts(carved, data.lon, data.lat, plan.buffer_km)
    if len(train) < 2 or len(val) == 0 or len(cal) == 0:
        raise EvaluationError(
            f"fold {fold.index}: too few points (train {len(train)}, val {len(val)}, "
            f"calibration {len(cal)}); use fewer folds or smaller blocks"
        )
    return FoldParts(fold.index, train, val, cal, fold.test, inner, len(fold.excluded), len(fold.train) - len(pool))


def carve_final(cfg: FinetuneConfig, data: LabelledData, plan: SplitPlan) -> tuple[np.ndarray, ...]:
    """The final model's validation, calibration, training parts of every labelled point (and the buffered)."""
    rng = np.random.default_rng(cfg.eval.split.seed * 1000 + 999)
    fractions = (cfg.train.val_fraction, cfg.eval.conformal.calibration_fraction)
    carved = carve(np.arange(len(data)), fractions, rng, plan.groups)
    val, cal, train, inner = buffer_parts(carved, data.lon, data.lat, plan.buffer_km)
    return val, cal, train, inner
