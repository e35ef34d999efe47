"""``soilnet pretrain``: the pretraining job. Joins the process group, catches the stop signals, writes the resolved
config and opens rank 0's outputs (``metrics.jsonl``, ``samples.jsonl``, TensorBoard, the progress report, the loss
plot), around the training code of :mod:`soilnet.train.pretrain`.

``run`` returns ``{"steps", "samples", "output_dir", "checkpoint", "stopped_early"}``; with ``stopped_early``
(SIGUSR2 or SIGTERM, after every rank saved a checkpoint) ``soilnet pretrain`` exits with 75 (EX_TEMPFAIL): run it
again to continue.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from soilnet.atomic import atomic_file, write_text
from soilnet.config.base import save_resolved
from soilnet.config.pretrain import PretrainConfig
from soilnet.distributed import DistInfo, init_distributed, leave_process_group
from soilnet.progress import Progress
from soilnet.train import checkpoint
from soilnet.train.pretrain import Observers, PretrainState, prepare, train
from soilnet.train.signals import StopFlag, ignore_stop_signals, stop_on_signals

log = logging.getLogger("soilnet.pretrain")


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (and optionally ``samples.jsonl``); on resume, lines after the resumed step are
    dropped so a rerun reproduces the file of an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            write_text(path, "".join(ln + "\n" for ln in kept))
        self.f = open(path, "a")  # noqa: SIM115 - open for the run's life, closed by close()

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def plot_loss(metrics_file: Path, out: Path) -> None:
    """The loss over samples seen, from ``metrics.jsonl``, as a PNG written atomically."""
    import matplotlib  # heavy; only with train.plot, and the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    fig, ax = pyplot.subplots(figsize=(6, 4))
    ax.plot([r["samples"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("samples seen")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("pretraining loss")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    pyplot.close(fig)


def open_observers(cfg: PretrainConfig, out: Path, rank: int, step: int) -> Observers:
    """Rank 0's outputs, continuing a run resumed at ``step``; none on the other ranks."""
    if rank != 0:
        return Observers()
    t = cfg.train
    observers = Observers(
        metrics=MetricsLog(out / "metrics.jsonl", step),
        samples=MetricsLog(out / "samples.jsonl", step) if cfg.data.log_sample_ids else None,
    )
    if t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard, protobuf); only with train.tensorboard

        observers.scalars = SummaryWriter(str(out / "tensorboard"))
    if t.progress:
        observers.progress = Progress("pretrain", t.steps, "step", initial=step)
    return observers


def close_observers(observers: Observers, cfg: PretrainConfig, out: Path) -> None:
    """Close rank 0's outputs at the end of the loop, and draw the loss plot (train.plot)."""
    if observers.progress is not None:
        observers.progress.close()
    if observers.metrics is not None:
        observers.metrics.close()
        if cfg.train.plot:
            plot_loss(out / "metrics.jsonl", out / "loss.png")
    if observers.samples is not None:
        observers.samples.close()
    if observers.scalars is not None:
        observers.scalars.close()


def pretrain(cfg: PretrainConfig, flag: StopFlag) -> dict:
    """Join the process group, prepare the run, write its config, open its outputs, train, close them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    info: DistInfo = init_distributed(cfg.distributed.backend)
    out = Path(cfg.output_dir)
    state: PretrainState = prepare(cfg, info)
    if info.rank == 0:
        save_resolved(cfg, out)
    observers = open_observers(cfg, out, info.rank, state.step)
    result = train(state, flag, observers)
    close_observers(observers, cfg, out)
    return result


def report_lost_peer(cfg: PretrainConfig, err: RuntimeError) -> None:
    """Say how to go on when a multi-rank run fails as gloo and nccl report a dead peer (a crashed rank, a lost
    node): resubmit, it resumes from the last complete checkpoint."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    last = checkpoint.latest(Path(cfg.output_dir) / "checkpoints")
    where = f"step {last.meta['step']} in {last.path}" if last else "none yet"
    log.error(
        "rank %d failed: %s. If another rank or its node was lost, resubmit the same command: it resumes from the "
        "last complete checkpoint (%s).",
        torch.distributed.get_rank(),
        str(err).splitlines()[0][:300],
        where,
    )


def run(cfg: PretrainConfig) -> dict:
    """Pretrain as configured; returns ``{"steps", "samples", "output_dir", "checkpoint", "stopped_early"}``.

    SIGUSR2/SIGTERM are caught from the start (a signal during start-up stops the run after its first step).
    """
    with stop_on_signals(StopFlag()) as flag:
        try:
            result = pretrain(cfg, flag)
        except RuntimeError as err:  # gloo and nccl report a dead peer (a crashed rank, a lost node) this way
            report_lost_peer(cfg, err)
            raise
    leave_process_group()  # not after a lost peer: tearing down a broken group can hang on nccl
    if result["stopped_early"]:
        ignore_stop_signals()  # srun may SIGTERM this rank while it exits (see ignore_stop_signals)
    return result
