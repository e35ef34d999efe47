"""``soilnet evaluate``: cross-validated metrics for the fine-tuned model and the random-forest baseline on the
same folds, split-conformal intervals, plots and a report. Fine-tuning calls :func:`evaluate` too.

Per fold, the non-test points are carved into training, validation (early stopping and epoch choice) and
calibration (conformal) parts; under a spatial split these are carved by whole blocks and buffered, like the test
fold; under a random split points with identical inputs stay together (:mod:`soilnet.evaluate.splits`).
The baseline trains on the training and validation parts, in the model's target transform; neither model sees
calibration or test points. Targets above ``target.max_value`` are an error or dropped and listed
(:mod:`soilnet.evaluate.targets`).

Launched as several processes (data-parallel fine-tuning, see :mod:`soilnet.train.finetune`), every rank runs
the same folds in the same order, and only rank 0 fits the baseline and writes files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soilnet.config.base import save_resolved, to_plain
from soilnet.config.finetune import EvaluateConfig, FinetuneConfig
from soilnet.data.labelled import LabelledData, load_labelled
from soilnet.evaluate import baseline as B
from soilnet.evaluate import conformal as C
from soilnet.evaluate import plots as P
from soilnet.evaluate import splits as SP
from soilnet.evaluate import targets as TG
from soilnet.evaluate.metrics import regression_metrics
from soilnet.evaluate.report import write_report
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag, StoppedEarly, ignore_stop_signals, stop_on_signals

log = logging.getLogger("soilnet.evaluate")

COVERAGE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class EvaluationError(ValueError):
    """A run that cannot be evaluated as configured."""


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, obj: dict) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def plan_split(cfg: FinetuneConfig, data: LabelledData) -> tuple[list[SP.Fold], np.ndarray | None, dict]:
    """The folds, the block ID per point (spatial) or None (random), and a description for the report."""
    sc = cfg.eval.split
    coords = SP.has_coordinates(data.lon, data.lat)
    kind = sc.kind if sc.kind != "auto" else ("spatial" if coords else "random")
    info = {"requested": sc.kind, "kind": kind, "folds": sc.folds, "seed": sc.seed, "has_coordinates": coords}
    if kind == "spatial" and not coords:
        n_missing = int(np.sum(~(np.isfinite(data.lon) & np.isfinite(data.lat))))
        why = (" (the manifest's import.coordinates is 'none': the data set was imported without --points or "
               "georeferenced images)" if data.coordinates == "none" else "")  # fmt: skip
        raise EvaluationError(
            f"eval.split.kind=spatial needs coordinates, but {n_missing} of {len(data)} points have none{why}; "
            "without coordinates only random k-fold is possible (eval.split.kind=random)"
        )
    groups, info["identical_inputs"] = SP.identical_input_groups(data.image, data.climate)
    if kind == "random":
        folds = SP.random_kfold(len(data), sc.folds, sc.seed, groups)
        info["note"] = (
            "random k-fold: points have no coordinates, so spatial blocking is impossible; nearby points may fall "
            "in training and test folds, which flatters the scores"
            if not coords
            else "random k-fold (as in the seed); nearby points may fall in training and test folds"
        ) + "; points with identical inputs are kept on one side of every split"
        return folds, groups, info
    buffer_km = sc.block_km if sc.buffer_km is None else sc.buffer_km
    folds = SP.spatial_kfold(data.lon, data.lat, sc.folds, sc.block_km, buffer_km, sc.seed)
    info.update(block_km=sc.block_km, buffer_km=buffer_km)
    info["note"] = (
        f"spatially blocked k-fold: {sc.block_km:g} km blocks, training points within {buffer_km:g} km of a test "
        "point excluded"
    )
    return folds, SP.spatial_blocks(data.lon, data.lat, sc.block_km), info


def writes_outputs(cfg: FinetuneConfig) -> bool:
    """Whether this process writes the job's files: a single process does, and of several only rank 0.

    Joins the process group when there are several (:func:`soilnet.train.finetune.distributed_context`)."""
    from soilnet.train import finetune as FT

    info = FT.distributed_context(cfg.train.device)
    return info is None or info.is_main


def _load(cfg: FinetuneConfig, out: Path | None):
    from soilnet.train import finetune as FT

    mods = FT.modalities_of(cfg.modalities)
    data = load_labelled(cfg.data, mods, out)
    export = None
    if cfg.pretrained:
        tensors, meta = FT.read_export(cfg.pretrained)
        from soilnet.schema import SampleSchema

        FT.check_export_schema(SampleSchema.from_dict(meta["schema"]), data.schema, mods, cfg.pretrained)
        export = (tensors, meta)
    FT.choose_normalisation(data, export[1] if export else None, cfg.data.normalisation, str(cfg.pretrained))
    log.info("labelled data: %s; inputs normalised with %s statistics", data.counts, data.normalisation["used"])
    return mods, data, export


def evaluate_resumably(cfg: FinetuneConfig, out: Path, final_model: bool = False) -> dict | None:
    """:func:`evaluate` as a job that can be stopped and run again: SIGUSR2/SIGTERM are caught from the start,
    every fold and epoch is checkpointed under ``out/checkpoints`` and resumed from there (refused when the config
    differs), and the resolved config is saved beside the outputs. Returns None when it stopped on a signal after
    saving (run the same command again to continue)."""
    from soilnet.train import finetune as FT

    with stop_on_signals(StopFlag()) as flag:
        # checked before config.yaml is rewritten, so that a refused resumption changes nothing
        store = ResumeStore.open(cfg, out, FT.distributed_context(cfg.train.device))
        if store.writes:
            save_resolved(cfg, out)
        try:
            metrics = evaluate(cfg, out, final_model=final_model, resume=store, stop=flag)
        except StoppedEarly:
            metrics = None
    if metrics is None:
        ignore_stop_signals()
        return None
    store.clear()
    return metrics


def evaluate(
    cfg: FinetuneConfig,
    out: Path,
    final_model: bool = False,
    resume: ResumeStore | None = None,
    stop: StopFlag | None = None,
) -> dict:
    """Cross-validate ``cfg`` and write metrics.json, predictions.csv, plots and report.md into ``out``.

    Of several processes, every rank trains its share and gets the metrics; only rank 0 writes and fits the
    baseline (``baseline_rf`` is None on the others).

    ``resume``: checkpoint each fold's training (every epoch) and its results there, and skip the folds whose
    results are there already. ``stop``: a :class:`StopFlag` that makes training save and raise
    :class:`StoppedEarly` (see :func:`soilnet.train.finetune.fit`)."""
    writes = writes_outputs(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    mods, data, export = _load(cfg, out if writes else None)
    data = TG.apply_target_range(cfg.target, data, str(cfg.data.shards))
    folds, blocks, split_info = plan_split(cfg, data)
    buffer_km = split_info.get("buffer_km")  # validation and calibration are buffered like the test fold
    level, space = cfg.eval.conformal.level, cfg.eval.conformal.space
    cal_frac, val_frac = cfg.eval.conformal.calibration_fraction, cfg.train.val_fraction
    feats = None
    if cfg.eval.baseline.enabled and writes:
        feats, _ = B.summary_features(data.image, data.climate, data.schema.channels, data.schema.climate_variables)

    n = len(data)
    pred = np.full(n, np.nan)
    rf_pred = np.full(n, np.nan)
    raw, rf_raw, smearing = np.full(n, np.nan), np.full(n, np.nan), {"model": [], "baseline_rf": []}
    lower, upper = np.full(n, np.nan), np.full(n, np.nan)
    fold_of = np.full(n, -1)
    fold_rows, histories = [], {}
    level_hits = {lv: [] for lv in COVERAGE_LEVELS}
    level_widths = {lv: [] for lv in COVERAGE_LEVELS}
    for fold in folds:
        rng = np.random.default_rng(cfg.eval.split.seed * 1000 + fold.index)
        pool = fold.train
        if cfg.train.label_fraction < 1:
            pool = np.sort(rng.choice(pool, max(3, round(cfg.train.label_fraction * len(pool))), replace=False))
        val, cal, train, inner = SP.carve_buffered(
            pool, (val_frac, cal_frac), rng, blocks, data.lon, data.lat, buffer_km
        )
        if len(train) < 2 or len(val) == 0 or len(cal) == 0:
            raise EvaluationError(
                f"fold {fold.index}: too few points (train {len(train)}, val {len(val)}, "
                f"calibration {len(cal)}); use fewer folds or smaller blocks"
            )
        test = fold.test
        done = _fold_results(cfg, data, fold.index, (train, val, cal, test), export, feats, resume, stop)
        histories[f"fold {fold.index}"] = done["history"]
        lr_groups = done["lr_groups"]  # the same table for every fold: one model config
        p_test, p_cal = done["p_test"].numpy(), done["p_cal"].numpy()
        q = C.calibrate(data.y[cal], p_cal, level, space)
        lo, hi = C.intervals(p_test, q, space=space)
        pred[test], lower[test], upper[test], fold_of[test] = p_test, lo, hi, fold.index
        raw[test] = done.get("p_test_uncorrected", done["p_test"]).numpy()
        smearing["model"].append(float(done.get("smearing", 1.0)))
        for lv in COVERAGE_LEVELS:
            lo_l, hi_l = C.intervals(p_test, C.calibrate(data.y[cal], p_cal, lv, space), space=space)
            level_hits[lv].append((data.y[test] >= lo_l) & (data.y[test] <= hi_l))
            level_widths[lv].append(hi_l - lo_l)
        row = {
            "fold": fold.index,
            "n_train": len(train),
            "n_val": len(val),
            "n_calibration": len(cal),
            "n_test": len(test),
            "n_excluded_by_buffer": len(fold.excluded),
            "n_excluded_by_inner_buffer": len(inner),
            "n_unused_by_label_fraction": len(fold.train) - len(pool),
            "best_epoch": done["best_epoch"],
            "epochs_run": len(done["history"]["val_loss"]),
            "model": regression_metrics(data.y[test], p_test),
            "conformal": {"level": level, "space": space, "half_width": q, **C.coverage(data.y[test], lo, hi)},
        }
        if feats is not None:
            rf_test = done["rf_test"].numpy()
            rf_pred[test] = rf_test
            rf_raw[test] = done.get("rf_test_uncorrected", done["rf_test"]).numpy()
            smearing["baseline_rf"].append(float(done.get("rf_smearing", 1.0)))
            row["baseline_rf"] = regression_metrics(data.y[test], rf_test)
        fold_rows.append(row)
        log.info(
            "fold %d: model R2 %.3f RMSE %.3f | RF R2 %s",
            fold.index,
            row["model"]["r2"],
            row["model"]["rmse"],
            f"{row['baseline_rf']['r2']:.3f}" if "baseline_rf" in row else "-",
        )

    tested = fold_of >= 0
    metrics = {
        "model": regression_metrics(data.y[tested], pred[tested]),
        "baseline_rf": regression_metrics(data.y[tested], rf_pred[tested]) if feats is not None else None,
        "conformal": {
            "level": level,
            "space": space,
            "method": "split-conformal, absolute residuals, per fold",
            **C.coverage(data.y[tested], lower[tested], upper[tested]),
        },
        "coverage_by_level": [
            {
                "level": lv,
                "coverage": float(np.mean(np.concatenate(level_hits[lv]))),
                "mean_width": float(np.mean(np.concatenate(level_widths[lv]))),
            }
            for lv in COVERAGE_LEVELS
        ],
        "folds": fold_rows,
        "split": split_info,
        "target": {"name": data.target, "unit": data.unit, **to_plain(cfg.target)},
        "transforms": TG.transforms_section(cfg.target, feats is not None),
        "bias_correction": TG.bias_section(
            cfg.target,
            data.y[tested],
            {"model": pred[tested], **({"baseline_rf": rf_pred[tested]} if feats is not None else {})},
            {"model": raw[tested], "baseline_rf": rf_raw[tested]},
            smearing,
        ),
        "data": {**data.counts, "shards": cfg.data.shards, "schema": data.schema.to_dict()},
        "modalities": list(mods),
        "pretrained": cfg.pretrained,
        "normalisation": data.normalisation,
        "lr_groups": lr_groups,
    }
    if data.missing_ids and writes:
        metrics["data"]["ground_truth_ids_not_in_shards_file"] = str(out / "ground_truth_ids_not_in_shards.txt")

    table = pd.DataFrame(
        {
            "id": data.ids,
            "lon": data.lon,
            "lat": data.lat,
            "fold": fold_of,
            "observed": data.y,
            "predicted": pred,
            "lower": lower,
            "upper": upper,
            "baseline_rf": rf_pred,
        }
    )
    if writes:
        tmp = out / "predictions.csv.tmp"
        table[tested].to_csv(tmp, index=False)
        tmp.replace(out / "predictions.csv")

    if final_model:
        metrics["final_model"] = _final_model(
            cfg, data, blocks, export, out, histories, writes, resume, stop, buffer_km=buffer_km
        )
    if not writes:
        return metrics
    if cfg.eval.plots:
        metrics["plots"] = _plots(data, tested, pred, rf_pred, metrics, histories, out)
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", metrics, to_plain(cfg))
    return metrics


def _fold_results(cfg, data, index: int, parts, export, feats, resume: ResumeStore | None, stop) -> dict:
    """Fold ``index``'s results: its training history and chosen epoch, predictions on its test and calibration
    points ``(n,)`` and the baseline's on its test points (None without features), as float64 tensors.

    Read from ``resume`` when the fold has finished before; otherwise trained (resuming from the fold's last
    checkpoint) and saved there, replacing the fold's training state."""
    from soilnet.train import finetune as FT

    key = f"fold_{index}"
    saved = resume.load(key) if resume else None
    if saved is not None and saved["kind"] == "results":
        log.info("fold %d: finished before; results from %s", index, resume.path(key))
        return saved
    train, val, cal, test = parts
    slot = (resume, key) if resume else None
    fitted = FT.fit(cfg, data, train, val, cfg.train.seed + index, export, f"fold {index}", slot, stop)
    mods = FT.modalities_of(cfg.modalities)
    done = {
        "kind": "results",
        "history": fitted.history,
        "best_epoch": fitted.best_epoch,
        "lr_groups": fitted.lr_groups,
        "p_test": torch.from_numpy(np.asarray(FT.predict(fitted, data, test, mods), dtype=np.float64)),
        "p_test_uncorrected": torch.from_numpy(np.asarray(FT.predict(fitted, data, test, mods, False), np.float64)),
        "smearing": fitted.transform.smearing,
        "p_cal": torch.from_numpy(np.asarray(FT.predict(fitted, data, cal, mods), dtype=np.float64)),
        "rf_test": None,
    }
    if feats is not None:
        fit_rows = np.concatenate([train, val])
        rf = B.fit_predict_target(  # the same target transform and bias correction as the model
            feats[fit_rows],
            data.y[fit_rows],
            feats[test],
            cfg.target,
            n_estimators=cfg.eval.baseline.n_estimators,
            min_samples_leaf=cfg.eval.baseline.min_samples_leaf,
            seed=cfg.train.seed + index,
        )
        done["rf_test"] = torch.from_numpy(np.asarray(rf.pred, dtype=np.float64))
        done["rf_test_uncorrected"] = torch.from_numpy(np.asarray(rf.uncorrected, dtype=np.float64))
        done["rf_smearing"] = float(rf.transform["smearing"])
    if resume:
        resume.save(key, done)
    return done


def _final_model(
    cfg, data, blocks, export, out: Path, histories: dict, writes=True, resume=None, stop=None, buffer_km=None
) -> dict:
    """One model on every labelled point (minus its validation and calibration parts) for predict-map; saved
    when ``writes``."""
    from soilnet.train import finetune as FT

    rng = np.random.default_rng(cfg.eval.split.seed * 1000 + 999)
    fractions = (cfg.train.val_fraction, cfg.eval.conformal.calibration_fraction)
    val, cal, train, _ = SP.carve_buffered(np.arange(len(data)), fractions, rng, blocks, data.lon, data.lat, buffer_km)
    slot = (resume, "final") if resume else None
    fitted = FT.fit(cfg, data, train, val, cfg.train.seed + 999, export, "final", slot, stop)
    histories["final"] = fitted.history
    p_cal = FT.predict(fitted, data, cal, FT.modalities_of(cfg.modalities))
    conformal = {
        "level": cfg.eval.conformal.level,
        "space": cfg.eval.conformal.space,
        "half_width": C.calibrate(data.y[cal], p_cal, cfg.eval.conformal.level, cfg.eval.conformal.space),
        "n_calibration": len(cal),
    }
    model_cfg = FT.apply_export_model(cfg.model, export[1], FT.modalities_of(cfg.modalities)) if export else cfg.model
    path = FT.save_model(out, fitted, cfg, data, model_cfg, conformal) if writes else out / FT.MODEL_FILE
    return {
        "path": str(path),
        "n_train": len(train),
        "n_val": len(val),
        "best_epoch": fitted.best_epoch,
        "conformal": conformal,
    }


def _plots(data, tested, pred, rf_pred, metrics, histories, out: Path) -> dict:
    obs, p = data.y[tested], pred[tested]
    rf = rf_pred[tested] if metrics["baseline_rf"] else None
    plots = {
        "observed_vs_predicted": P.observed_vs_predicted(obs, p, out / "observed_vs_predicted.png", data.unit, rf),
        "residual_histogram": P.residual_histogram(obs, p, out / "residual_histogram.png", data.unit),
        "learning_curves": P.learning_curves(histories, out / "learning_curves.png"),
        "interval_coverage": P.interval_coverage(
            [r["level"] for r in metrics["coverage_by_level"]],
            [r["coverage"] for r in metrics["coverage_by_level"]],
            [r["mean_width"] for r in metrics["coverage_by_level"]],
            out / "interval_coverage.png",
            data.unit,
        ),
    }
    if SP.has_coordinates(data.lon[tested], data.lat[tested]):
        plots["residual_map"] = P.residual_map(
            data.lon[tested], data.lat[tested], obs, p, out / "residual_map.png", data.unit
        )
    return {k: str(v) for k, v in plots.items()}


def evaluate_checkpoint(cfg: EvaluateConfig, out: Path) -> dict:
    """Score a saved fine-tuned model on every point of ``data.shards`` (an independent test set)."""
    from soilnet.config.schema import SchemaConfig
    from soilnet.train import finetune as FT

    model = FT.load_model(cfg.checkpoint)
    s = model.schema
    data_cfg = cfg.data.model_copy(deep=True)
    data_cfg.schema_ = SchemaConfig(
        channels=list(s.channels),
        climate_variables=list(s.climate_variables),
        first_month=s.months[0],
        last_month=s.months[-1],
        patch_size=s.patch_size,
        pixel_size_m=s.pixel_size_m,
    )
    data = load_labelled(data_cfg, model.modalities, out)
    if data.schema != model.schema:
        raise EvaluationError(
            f"{cfg.data.shards}: schema differs from the model's: " + "; ".join(data.schema.differences(model.schema))
        )
    pred = model.predict(data.image, data.climate)
    q = float(model.conformal.get("half_width", math.inf))
    lo, hi = C.intervals(pred, q, space=model.conformal.get("space", "original"))
    metrics = {
        "model": regression_metrics(data.y, pred),
        "baseline_rf": None,
        "conformal": {"level": model.conformal.get("level"), "half_width": q, **C.coverage(data.y, lo, hi)},
        "split": {
            "kind": "independent",
            "note": f"every point of {cfg.data.shards} is a test point for the "
            f"model in {cfg.checkpoint}; no baseline, since no training data is given",
        },
        "target": model.target,
        "data": {**data.counts, "shards": cfg.data.shards},
        "folds": [],
    }
    if cfg.eval.plots:
        plots = {
            "observed_vs_predicted": P.observed_vs_predicted(
                data.y, pred, out / "observed_vs_predicted.png", data.unit
            ),
            "residual_histogram": P.residual_histogram(data.y, pred, out / "residual_histogram.png", data.unit),
        }
        if SP.has_coordinates(data.lon, data.lat):
            plots["residual_map"] = P.residual_map(
                data.lon, data.lat, data.y, pred, out / "residual_map.png", data.unit
            )
        metrics["plots"] = {k: str(v) for k, v in plots.items()}
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", metrics, to_plain(cfg))
    return metrics


def run(cfg: EvaluateConfig) -> int | dict:
    """``soilnet evaluate``: cross-validation (or, with ``checkpoint``, scoring a saved model). Of several
    processes, only rank 0 writes (and scores a checkpoint). Cross-validation stops on SIGUSR2/SIGTERM and
    resumes as ``soilnet finetune`` does (:func:`evaluate_resumably`)."""
    out = Path(cfg.output_dir)
    writes = writes_outputs(cfg)
    # the other ranks compute what rank 0 logs; they only warn
    logging.basicConfig(level=logging.INFO if writes else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if cfg.checkpoint:
        if not writes:
            return 0  # scoring a saved model is one process's work
        save_resolved(cfg, out)
        metrics = evaluate_checkpoint(cfg, out)
    else:
        metrics = evaluate_resumably(cfg, out, final_model=cfg.final_model)
        if metrics is None:
            return {"stopped_early": True}
    if not writes:
        return 0
    m = metrics["model"]
    print(f"soilnet evaluate: model R2 {m['r2']:.3f} RMSE {m['rmse']:.3f} (n={m['n']}); metrics {out / 'metrics.json'}")
    for name, p in metrics.get("plots", {}).items():
        print(f"soilnet evaluate: plot {name}: {p}")
    return 0
