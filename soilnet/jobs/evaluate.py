"""``soilnet evaluate``: cross-validated metrics for the fine-tuned model and the random-forest baseline on the
same folds, split-conformal intervals, plots and a report; or, with ``checkpoint``, a saved model scored on
other labelled shards. ``soilnet finetune`` (:mod:`soilnet.jobs.finetune`) runs the same cross-validation.

Launched as several processes (data-parallel fine-tuning), every rank runs the same folds in the same order;
only rank 0 fits the baseline and writes files. The cross-validation checkpoints every fold and epoch under
``output_dir/checkpoints`` (:mod:`soilnet.train.resume`), stops on SIGUSR2/SIGTERM after saving and resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from soilnet.atomic import write_text
from soilnet.config.base import save_resolved, to_plain
from soilnet.config.finetune import EvaluateConfig, FinetuneConfig
from soilnet.data.labelled import MISSING_IDS_FILE, LabelledData, files_to_write
from soilnet.distributed import DistInfo, join_process_group, leave_process_group
from soilnet.evaluate.aoa import AOA_FILE, run_reference, save_reference
from soilnet.evaluate.aoa import summary as aoa_summary
from soilnet.evaluate.checkpoint import score_checkpoint
from soilnet.evaluate.crossval import cross_validate, prepare
from soilnet.evaluate.folds import Context, fit_final
from soilnet.evaluate.outputs import (
    checkpoint_plots,
    cross_validation_plots,
    write_metrics_and_report,
    write_predictions,
)
from soilnet.evaluate.plan import SplitPlan, load_inputs
from soilnet.evaluate.pooling import predictions_table
from soilnet.progress import Scalars
from soilnet.train.model_card import finetune_card, write_card
from soilnet.train.regressor import MODEL_FILE, save_model
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag, StoppedEarly, ignore_stop_signals, stop_on_signals


@contextmanager
def joined(cfg: FinetuneConfig) -> Iterator[tuple[DistInfo | None, bool]]:
    """Join the process group when this process is one of several and set up logging; gives this process's
    place (None when alone) and whether it writes the job's files (alone, or rank 0). Leaves the group on the
    way out, however the job ends (:func:`soilnet.distributed.leave_process_group` says why)."""
    info = join_process_group(cfg.train.device)
    writes = info is None or info.is_main
    # the other ranks compute what rank 0 logs; they only warn
    logging.basicConfig(level=logging.INFO if writes else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        yield info, writes
    finally:
        leave_process_group()


def write_labelled_files(out: Path, data: LabelledData) -> None:
    """What reading the labelled data leaves to write (:func:`soilnet.data.labelled.files_to_write`)."""
    for name, text in files_to_write(data).items():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / name, text)


def tensorboard_writers(out: Path) -> Callable[[str], Scalars]:
    """Opens a TensorBoard writer per fit under ``out/tensorboard/<part>`` (``fold0``, ..., ``final``)."""
    from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf); only with train.tensorboard

    return lambda part: SummaryWriter(str(out / "tensorboard" / part))


def _final_model(ctx: Context, plan: SplitPlan, histories: dict, out: Path, writes: bool) -> dict:
    """Train the final model for predict-map; saved (``out/model.safetensors``) when ``writes``, with its area of
    applicability beside it (``out/aoa.npz``, :mod:`soilnet.evaluate.aoa`) from the labelled data and the folds."""
    final = fit_final(ctx, plan, histories)
    path = out / MODEL_FILE
    section = {"path": str(path), **final.section}
    if writes:
        section["path"] = str(save_model(out, final.fitted, ctx.cfg, ctx.data, final.model_cfg, final.conformal))
        reference = run_reference(ctx.data, plan.folds, ctx.inputs.mods)
        section["aoa"] = aoa_summary(reference, save_reference(out / AOA_FILE, reference))
    return section


def _cross_validate_and_write(
    cfg: FinetuneConfig, out: Path, info: DistInfo | None, final_model: bool, resume: ResumeStore, stop: StopFlag
) -> dict:
    """Cross-validate ``cfg`` and, on the process that writes, write predictions.csv, model.safetensors and
    MODEL_CARD.md (with ``final_model``), the plots, metrics.json and report.md into ``out``; returns the
    metrics (``baseline_rf`` None on the other processes)."""
    writes = info is None or info.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    inputs = load_inputs(cfg)
    if writes:
        write_labelled_files(out, inputs.data)
    scalars = tensorboard_writers(out) if writes and cfg.train.tensorboard else None
    ctx, plan = prepare(cfg, inputs, writes, info, resume, stop, scalars)
    pooled, metrics = cross_validate(ctx, plan)
    if ctx.data.missing_ids and writes:
        metrics["data"]["ground_truth_ids_not_in_shards_file"] = str(out / MISSING_IDS_FILE)
    if writes:
        write_predictions(out / "predictions.csv", predictions_table(pooled, ctx.data))
    if final_model:
        metrics["final_model"] = _final_model(ctx, plan, pooled.histories, out, writes)
    if not writes:
        return metrics
    if cfg.eval.plots:
        metrics["plots"] = cross_validation_plots(ctx.data, pooled, metrics, out)
    write_metrics_and_report(out, metrics, to_plain(cfg))
    if final_model:  # after metrics.json: the card quotes it
        export_meta = ctx.inputs.export[1] if ctx.inputs.export else None
        write_card(out / MODEL_FILE, finetune_card(metrics, to_plain(cfg), ctx.data, export_meta))
    return metrics


def cross_validation(cfg: FinetuneConfig, out: Path, info: DistInfo | None, final_model: bool) -> dict | None:
    """The cross-validation as a job that can be stopped and run again: SIGUSR2/SIGTERM are caught from the
    start, every fold and epoch is checkpointed under ``out/checkpoints`` and resumed from there (refused when
    the config differs), and the resolved config is saved beside the outputs. Returns None when it stopped on a
    signal after saving (run the same command again to continue)."""
    with stop_on_signals(StopFlag()) as flag:
        # checked before config.yaml is rewritten, so that a refused resumption changes nothing
        store = ResumeStore.open(cfg, out, info)
        if store.writes:
            save_resolved(cfg, out)
        try:
            metrics = _cross_validate_and_write(cfg, out, info, final_model, store, flag)
        except StoppedEarly:
            metrics = None
    if metrics is None:
        ignore_stop_signals()
        return None
    store.clear()
    return metrics


def score_saved_model(cfg: EvaluateConfig, out: Path) -> dict:
    """Score ``cfg.checkpoint`` on every point of ``cfg.data.shards`` and write metrics.json, report.md and
    the plots into ``out``."""
    scored = score_checkpoint(cfg)
    write_labelled_files(out, scored.data)
    metrics = scored.metrics
    if cfg.eval.plots:
        metrics["plots"] = checkpoint_plots(scored.data, scored.pred, out)
    write_metrics_and_report(out, metrics, to_plain(cfg))
    return metrics


def run(cfg: EvaluateConfig) -> int | dict:
    """``soilnet evaluate``: cross-validation (or, with ``checkpoint``, scoring a saved model). Of several
    processes, only rank 0 writes (and scores a checkpoint). Cross-validation stops on SIGUSR2/SIGTERM and
    resumes as ``soilnet finetune`` does (:func:`cross_validation`)."""
    out = Path(cfg.output_dir)
    with joined(cfg) as (info, writes):
        if cfg.checkpoint:
            if not writes:
                return 0  # scoring a saved model is one process's work
            save_resolved(cfg, out)
            metrics = score_saved_model(cfg, out)
        else:
            result = cross_validation(cfg, out, info, final_model=cfg.final_model)
            if result is None:
                return {"stopped_early": True}
            metrics = result
    if not writes:
        return 0
    m = metrics["model"]
    print(f"soilnet evaluate: model R2 {m['r2']:.3f} RMSE {m['rmse']:.3f} (n={m['n']}); metrics {out / 'metrics.json'}")
    for name, p in metrics.get("plots", {}).items():
        print(f"soilnet evaluate: plot {name}: {p}")
    return 0
