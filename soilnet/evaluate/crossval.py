"""Cross-validation of a fine-tuning config: the folds in turn (:mod:`soilnet.evaluate.folds`), pooled
(:mod:`soilnet.evaluate.pooling`).

Per fold, the non-test points are carved into training, validation and calibration parts
(:mod:`soilnet.evaluate.plan`). The baseline trains on the training and validation parts, in the model's target
transform; neither model sees calibration or test points. Targets above ``target.max_value`` are an error or
dropped and listed (:mod:`soilnet.evaluate.targets`).
"""

from __future__ import annotations

from collections.abc import Callable

from soilnet.config.finetune import FinetuneConfig
from soilnet.distributed import DistInfo
from soilnet.evaluate.baseline import summary_features
from soilnet.evaluate.folds import Context, run_fold
from soilnet.evaluate.plan import Inputs, SplitPlan, carve_fold, plan_split
from soilnet.evaluate.pooling import Pooled, add_fold, pooled_metrics
from soilnet.evaluate.targets import apply_target_range
from soilnet.progress import Progress, Scalars
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag


def prepare(
    cfg: FinetuneConfig,
    inputs: Inputs,
    baseline: bool,
    info: DistInfo | None = None,
    resume: ResumeStore | None = None,
    stop: StopFlag | None = None,
    scalars: Callable[[str], Scalars] | None = None,
) -> tuple[Context, SplitPlan]:
    """Apply the target range, plan the folds, and compute the baseline's features when ``baseline`` and
    ``eval.baseline.enabled`` (of several processes only the one that writes fits the baseline). ``scalars``:
    opens a TensorBoard writer per fit (:class:`soilnet.evaluate.folds.Context`)."""
    data = apply_target_range(cfg.target, inputs.data, str(cfg.data.shards))
    inputs = Inputs(inputs.mods, data, inputs.export)
    plan = plan_split(cfg, data)
    feats = None
    if cfg.eval.baseline.enabled and baseline:
        feats, _ = summary_features(data.image, data.climate, data.schema.channels, data.schema.climate_variables)
    return Context(cfg, inputs, feats, info, resume, stop, scalars), plan


def cross_validate(ctx: Context, plan: SplitPlan) -> tuple[Pooled, dict]:
    """Every fold in turn, pooled; returns the pooled arrays and metrics.json's content so far. The main process
    reports the folds done (:mod:`soilnet.progress`)."""
    pooled = Pooled(len(ctx.data))
    main = ctx.info is None or ctx.info.is_main
    with Progress("cross-validation", len(plan.folds), "fold", enabled=main) as progress:
        for fold in plan.folds:
            parts = carve_fold(ctx.cfg, ctx.data, plan, fold)
            add_fold(pooled, run_fold(ctx, parts), ctx.cfg, ctx.data)
            progress.update(1)
    metrics = pooled_metrics(pooled, ctx.cfg, ctx.data, plan.info, ctx.inputs.mods, ctx.feats is not None)
    return pooled, metrics
