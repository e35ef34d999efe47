"""``soilnet finetune``: cross-validated evaluation of the fine-tuning config (with the baseline and intervals,
:mod:`soilnet.jobs.evaluate`), then a final model on every labelled point for mapping."""

from __future__ import annotations

import time
from pathlib import Path

from soilnet.config.finetune import FinetuneConfig
from soilnet.jobs.evaluate import cross_validation, joined


def run(cfg: FinetuneConfig) -> int | dict:
    """``soilnet finetune``: writes metrics.json, report.md, plots and model.safetensors.

    Launched as several processes, every rank trains data-parallel and only rank 0 writes and reports.
    Checkpoints every fold and epoch under ``output_dir/checkpoints`` (:mod:`soilnet.train.resume`) and resumes
    from them; on SIGUSR2/SIGTERM it saves and returns ``{"stopped_early": True}`` (``soilnet finetune`` exits
    with 75)."""
    start = time.time()
    out = Path(cfg.output_dir)
    with joined(cfg) as (info, writes):
        metrics = cross_validation(cfg, out, info, final_model=cfg.final_model)
    if metrics is None:
        return {"stopped_early": True}
    if not writes:
        return 0
    m, rf = metrics["model"], metrics.get("baseline_rf") or {}
    print(
        f"soilnet finetune: model R2 {m['r2']:.3f} RMSE {m['rmse']:.3f} (n={m['n']}); "
        f"baseline RF R2 {rf.get('r2', float('nan')):.3f}; {time.time() - start:.0f} s"
    )
    print(f"soilnet finetune: metrics {out / 'metrics.json'}, report {out / 'report.md'}")
    for name, p in metrics.get("plots", {}).items():
        print(f"soilnet finetune: plot {name}: {p}")
    return 0
