"""Fine-tuning's fit: regress a soil property from image patches and/or climate series, from scratch or from a
pretrained encoder export (:mod:`soilnet.train.regressor` holds the model, its inputs and its saved format).

Fine-tuning sets hold thousands of points, so every labelled sample sits in memory
(:mod:`soilnet.data.labelled`) and the evaluation trains each cross-validation fold in turn. Early stopping and
the choice of epoch use the validation points only; test points are touched once, for the final predictions.

One process trains with plain PyTorch. Given its place among several processes (``info``, from
:func:`soilnet.distributed.join_process_group`), every rank runs the same fit and :func:`fit` trains
data-parallel through a DeepSpeed engine (ZeRO stage 0): every rank draws the same global batches from the
shared seed, takes its own contiguous slice, and the loss is taken over the gathered predictions of the whole
global batch, so the update equals the single process's (up to float rounding) for models without batch
statistics. Both paths take the same steps through one :class:`Stepper` interface.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from soilnet.config.finetune import FinetuneConfig, FinetuneTrainConfig
from soilnet.data.augment import draw_flips, flip_batch
from soilnet.data.labelled import LabelledData
from soilnet.distributed import (
    DistInfo,
    any_rank,
    average_batchnorm_statistics,
    barrier,
    from_rank0,
    gather_batch,
    pick_device,
    rank_rows,
)
from soilnet.models.layer_decay import lr_groups, lr_table
from soilnet.progress import Progress as Report
from soilnet.progress import Scalars
from soilnet.train.checkpoint import rng_state, set_rng_state
from soilnet.train.deepspeed_config import adamw, deepspeed_config
from soilnet.train.optim import param_groups
from soilnet.train.regressor import (
    FitResult,
    Normaliser,
    apply_export_model,
    batch_inputs,
    build_model,
    load_encoders,
    modalities_of,
    predict_scaled,
)
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag, StoppedEarly
from soilnet.train.targets import TargetTransform

log = logging.getLogger("soilnet.finetune")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- targets


def loss_fn(name: str, huber_delta: float = 1.0):
    """``(pred, target) -> scalar`` on the training scale; both ``(B,)`` float32."""

    def rmse(p, t):
        return torch.sqrt(F.mse_loss(p, t) + 1e-12)

    def rmsle(p, t):
        return torch.sqrt(F.mse_loss(torch.log1p(F.relu(p)), torch.log1p(t.clamp_min(0))) + 1e-12)

    return {
        "rmse": rmse,
        "mse": F.mse_loss,
        "huber": lambda p, t: F.huber_loss(p, t, delta=huber_delta),
        "rmsle": rmsle,
    }[name]


# -------------------------------------------------------------------------------------------- optimiser


def _encoders(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in (getattr(model, "image_encoder", None), getattr(model, "climate_encoder", None)) if m is not None
    ]


def optimizer_groups(model: nn.Module, train_cfg: FinetuneTrainConfig) -> list[dict]:
    """AdamW groups for ``frozen``, ``full`` or ``lrd`` encoders (:func:`soilnet.models.layer_decay.lr_groups`,
    then :func:`soilnet.train.optim.param_groups`); frozen encoders stop requiring gradients."""
    groups = lr_groups(model, train_cfg.encoders, train_cfg.layer_decay)
    return param_groups(model, train_cfg.weight_decay, train_cfg.lr, groups)


def log_lr_groups(model: nn.Module, train_cfg: FinetuneTrainConfig, label: str) -> list[dict]:
    """Log and return the learning-rate table (:func:`soilnet.models.layer_decay.lr_table`) fine-tuning uses."""
    table = lr_table(lr_groups(model, train_cfg.encoders, train_cfg.layer_decay))
    log.info(
        "%s learning rates (encoders=%s, layer_decay=%g, lr=%g): %s",
        label,
        train_cfg.encoders,
        train_cfg.layer_decay,
        train_cfg.lr,
        ", ".join(f"{g['name']} x{g['lr_scale']:.3g} ({g['parameters']:,})" for g in table),
    )
    return table


# ------------------------------------------------------------------------------------------------ stepping


def engine_config(tc: FinetuneTrainConfig, world: int) -> dict:
    """ZeRO stage 0 (plain data parallelism: every rank keeps the whole fp32 model and optimizer) with torch's
    AdamW; each rank's micro batch is its share of ``train.batch_size``."""
    if tc.batch_size % world:
        raise ValueError(
            f"train.batch_size={tc.batch_size} must be a multiple of the {world} ranks of this run (each rank "
            "takes an equal share of every global batch)"
        )
    return deepspeed_config(
        global_batch=tc.batch_size,
        micro=tc.batch_size // world,
        accumulation=1,
        grad_clip=0.0,  # the single process does not clip; DeepSpeed's default (1.0) would
        optimizer=adamw(tc.lr, tc.weight_decay),
    )


def build_engine(model: nn.Module, tc: FinetuneTrainConfig, info: DistInfo):
    """``model`` wrapped in a DeepSpeed engine; on GPUs its batch norms become SyncBatchNorm, so normalisation
    uses the statistics of the whole global batch, as one process would (torch supports that on GPUs only)."""
    import deepspeed

    if info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.is_main:
        log.info(
            "data parallel: DeepSpeed ZeRO stage 0 on %d ranks (%s), %d of the %d rows of each global batch per rank",
            info.world_size,
            info.backend,
            tc.batch_size // info.world_size,
            tc.batch_size,
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, tc), config=engine_config(tc, info.world_size)
    )
    return engine


class Stepper(Protocol):
    """One optimisation step on a batch: this rank's rows in, the loss over the global batch out."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(
        self, image: torch.Tensor | None, climate: torch.Tensor | None, target: torch.Tensor, sizes: list[int]
    ) -> torch.Tensor:
        """image/climate: this rank's rows; target ``(sum(sizes),)``: the global batch's; returns the loss."""
        ...


class LocalStepper:
    """One process: plain AdamW on the whole batch."""

    def __init__(self, model: nn.Module, tc: FinetuneTrainConfig, criterion: Loss):
        self.model, self.criterion = model, criterion
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            optimizer_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay
        )

    def step(
        self, image: torch.Tensor | None, climate: torch.Tensor | None, target: torch.Tensor, sizes: list[int]
    ) -> torch.Tensor:
        loss = self.criterion(self.model(image, climate).reshape(-1), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


class EngineStepper:
    """One of several ranks: a DeepSpeed engine, the loss over the gathered predictions of the global batch."""

    def __init__(self, model: nn.Module, tc: FinetuneTrainConfig, criterion: Loss, info: DistInfo):
        self.engine = build_engine(model, tc, info)
        self.model, self.optimizer, self.criterion = self.engine.module, self.engine.optimizer, criterion

    def step(
        self, image: torch.Tensor | None, climate: torch.Tensor | None, target: torch.Tensor, sizes: list[int]
    ) -> torch.Tensor:
        loss = self.criterion(gather_batch(self.engine(image, climate).reshape(-1), sizes), target)
        self.engine.backward(loss)
        self.engine.step()
        return loss


def make_stepper(model: nn.Module, tc: FinetuneTrainConfig, criterion: Loss, info: DistInfo | None) -> Stepper:
    if info is None:
        return LocalStepper(model, tc, criterion)
    return EngineStepper(model, tc, criterion, info)


# ----------------------------------------------------------------------------------------------- resume


@dataclass
class Progress:
    """Where :func:`fit` stands: ``epoch`` (the one under way, or next), ``order`` (its permutation of the
    training rows, None between epochs), ``start`` (the first row of the next batch in ``order``), the running
    training-loss sum ``total`` over ``count`` rows, and the early-stopping state."""

    history: dict[str, list[float]]
    epoch: int = 0
    order: np.ndarray | None = None
    start: int = 0
    total: float = 0.0
    count: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    finished: bool = False


def stop_agreed(stop: StopFlag, info: DistInfo | None) -> bool:
    """Whether any rank has been signalled to stop (alone: whether this one has). Every rank calls it after
    every step, so all of them stop after the same step."""
    return any_rank(stop.raised, info)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_buffers()}


def training_state(
    p: Progress,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    gen: torch.Generator,
    info: DistInfo | None,
) -> dict:
    """Everything :func:`fit` needs to continue exactly: weights, optimizer, :class:`Progress`, the batch
    generators, and each rank's global RNG states and buffers (per-rank batch-norm statistics differ on CPUs).

    Tensors and plain values only (loadable with ``weights_only=True``). Of several ranks, every rank must call
    it (their RNG states and buffers are gathered to rank 0)."""
    mine = {"rng": rng_state(), "buffers": _buffers(model)}
    ranks: list = [mine]
    if info is not None:
        ranks = [None] * info.world_size
        dist.all_gather_object(ranks, mine)
    return {
        "kind": "training",
        "epoch": p.epoch,
        "order": None if p.order is None else torch.from_numpy(np.asarray(p.order, dtype=np.int64)),
        "start": p.start,
        "total": p.total,
        "count": p.count,
        "history": p.history,
        "best_val": p.best_val,
        "best_epoch": p.best_epoch,
        "best_state": p.best_state,
        "stale": p.stale,
        "finished": p.finished,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "batch_rng": json.dumps(rng.bit_generator.state),  # PCG64's 128-bit integers, as text
        "batch_gen": gen.get_state(),
        "ranks": ranks,
    }


def restore_training(
    state: dict,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    gen: torch.Generator,
    world: int,
    rank: int,
) -> Progress:
    """Load a :func:`training_state` into a freshly built model and optimizer; returns the progress to continue.

    A run resumed on another number of ranks takes rank ``rank % saved`` RNG states and buffers: it trains on,
    but not bit for bit as the uninterrupted run would have."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["batch_rng"])
    gen.set_state(state["batch_gen"])
    saved = state["ranks"]
    if len(saved) != world:
        log.warning("the checkpoint was written by %d ranks, this run has %d: not bit for bit", len(saved), world)
    mine = saved[rank % len(saved)]
    set_rng_state(mine["rng"])
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in mine["buffers"]:
                buf.copy_(mine["buffers"][name])
    order = state["order"]
    return Progress(
        history={k: list(v) for k, v in state["history"].items()},
        epoch=state["epoch"],
        order=None if order is None else order.numpy(),
        start=state["start"],
        total=state["total"],
        count=state["count"],
        best_val=state["best_val"],
        best_epoch=state["best_epoch"],
        best_state=state["best_state"],
        stale=state["stale"],
        finished=state["finished"],
    )


# -------------------------------------------------------------------------------------------------- fit


@dataclass
class Fitting:
    """What one :func:`fit` works with: the data and its prepared targets, the stepper (and through it the
    model and optimizer), the batch generators, and this process's place among the ranks."""

    cfg: FinetuneConfig
    data: LabelledData
    mods: tuple[str, ...]
    info: DistInfo | None
    stepper: Stepper
    transform: TargetTransform
    targets: torch.Tensor  # (N,) float32 on the training scale, every labelled point
    norm: Normaliser
    criterion: Loss
    device: torch.device
    rng: np.random.Generator
    gen: torch.Generator
    lr_info: list[dict]

    @property
    def model(self) -> nn.Module:
        return self.stepper.model

    @property
    def world(self) -> int:
        return self.info.world_size if self.info else 1

    @property
    def rank(self) -> int:
        return self.info.rank if self.info else 0


def prepare(
    cfg: FinetuneConfig,
    data: LabelledData,
    train_idx: np.ndarray,
    seed: int,
    export: tuple[dict, dict] | None,
    label: str,
    info: DistInfo | None,
) -> Fitting:
    """Seed everything, build the model (with the export's encoders), fit the target transform on the training
    rows and make the stepper; in this order, which the seeded draws depend on."""
    tc = cfg.train
    mods = modalities_of(cfg.modalities)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model_cfg = apply_export_model(cfg.model, export[1], mods) if export else cfg.model
    model = build_model(model_cfg, data.schema, mods)
    if export:
        load_encoders(model, export[0], mods, str(cfg.pretrained))
    lr_info = log_lr_groups(model, tc, label)  # other ranks log at WARNING level, so only rank 0 shows it
    device = info.device if info else pick_device(tc.device)
    model.to(device)
    transform = TargetTransform.fit(cfg.target, data.y[train_idx], standardize=tc.loss != "rmsle")
    targets = torch.from_numpy(transform.forward(data.y).astype(np.float32)).to(device)
    criterion = loss_fn(tc.loss, tc.huber_delta)
    stepper = make_stepper(model, tc, criterion, info)
    return Fitting(
        cfg, data, mods, info, stepper, transform, targets, Normaliser.of(data), criterion, device, rng, gen, lr_info
    )


def _resumed(f: Fitting, slot: tuple[ResumeStore, str] | None, label: str) -> Progress:
    p = Progress({"train_loss": [], "val_loss": [], "val_rmse": []}, finished=f.cfg.train.epochs <= 0)
    saved = slot[0].load(slot[1]) if slot else None
    if slot is not None and saved is not None:
        p = restore_training(saved, f.model, f.stepper.optimizer, f.rng, f.gen, f.world, f.rank)
        log.info("%s: resumed at epoch %d, row %d (%s)", label, p.epoch, p.start, slot[0].path(slot[1]))
    return p


def _save(f: Fitting, p: Progress, slot: tuple[ResumeStore, str] | None) -> None:
    if slot:
        slot[0].save(slot[1], training_state(p, f.model, f.stepper.optimizer, f.rng, f.gen, f.info))


def _step(f: Fitting, idx: np.ndarray) -> torch.Tensor:
    """One step on the global batch ``idx``: this rank's rows, augmented with the global batch's flips."""
    rows, sizes = rank_rows(len(idx), f.world, f.rank)
    flips = draw_flips(len(idx), f.gen) if "image" in f.mods and f.cfg.train.augment else None
    im, cl = batch_inputs(f.data, idx[rows], f.norm, f.mods)
    if im is not None and flips is not None:
        im = flip_batch(im, flips[rows])
    im = im.to(f.device) if im is not None else None
    cl = cl.to(f.device) if cl is not None else None
    return f.stepper.step(im, cl, f.targets[idx], sizes)


def _skipped(size: int, rows: int, world: int) -> bool:
    """Whether a batch of ``size`` of an epoch's ``rows`` is skipped (its samples come back next epoch): when some
    rank would get no row, or a batch of one would break batch-norm."""
    return (world > 1 and size < world) or (size < 2 and rows > 1)


def batches_per_epoch(rows: int, batch_size: int, world: int) -> int:
    """The steps of one epoch over ``rows`` training rows (the skipped batches left out)."""
    sizes = (min(batch_size, rows - start) for start in range(0, rows, batch_size))
    return sum(1 for size in sizes if not _skipped(size, rows, world))


def _train_epoch(
    f: Fitting,
    p: Progress,
    train_idx: np.ndarray,
    slot: tuple[ResumeStore, str] | None,
    stop,
    label: str,
    report: Report,
) -> None:
    """The rest of epoch ``p.epoch``'s batches; saves and raises :class:`StoppedEarly` when the ranks agree on
    a stop."""
    tc = f.cfg.train
    f.model.train()
    if tc.encoders == "frozen":
        for enc in _encoders(f.model):
            enc.eval()
    if p.order is None:
        p.order, p.start, p.total, p.count = f.rng.permutation(train_idx), 0, 0.0, 0
    order = p.order
    while p.start < len(order):
        start = p.start
        p.start += tc.batch_size
        idx = order[start : start + tc.batch_size]
        if _skipped(len(idx), len(order), f.world):
            continue
        loss = _step(f, idx)
        p.total += float(loss.detach()) * len(idx)
        p.count += len(idx)
        report.update(1)
        if stop is not None and stop_agreed(stop, f.info):
            _save(f, p, slot)
            barrier()  # rank 0 has written before any rank exits (srun ends the step on the first exit)
            where = f"{label} epoch {p.epoch}, row {min(p.start, len(order))} of {len(order)}"
            log.warning("rank %d: stopped on a signal at %s after saving; run again to resume", f.rank, where)
            raise StoppedEarly(f"stopped on a signal at {where}")


def _end_epoch(f: Fitting, p: Progress, val_idx: np.ndarray, label: str) -> None:
    """Score the epoch on the validation rows (rank 0's score on every rank), keep the best weights, and decide
    whether training has finished."""
    tc, data = f.cfg.train, f.data
    if f.info:
        average_batchnorm_statistics(f.model, f.world)
    val_scaled = predict_scaled(f.model, data, val_idx, f.norm, f.mods)
    val_loss = float(f.criterion(torch.from_numpy(val_scaled).float().to(f.device), f.targets[val_idx]))
    val_rmse = float(np.sqrt(np.mean((f.transform.inverse(val_scaled) - data.y[val_idx]) ** 2)))
    if f.info:
        val_loss, val_rmse = from_rank0([val_loss, val_rmse], f.info)
    train_loss = p.total / max(p.count, 1)
    p.history["train_loss"].append(train_loss)
    p.history["val_loss"].append(val_loss)
    p.history["val_rmse"].append(val_rmse)
    log.info("%s epoch %d: train %.4f  val %.4f  val RMSE %.3f", label, p.epoch, train_loss, val_loss, val_rmse)
    score = val_loss if tc.early_stopping == "val_loss" else val_rmse
    if score < p.best_val:
        p.best_val, p.best_epoch, p.stale = score, p.epoch, 0
        p.best_state = {k: v.detach().cpu().clone() for k, v in f.model.state_dict().items()}
    else:
        p.stale += 1
    p.epoch, p.order = p.epoch + 1, None
    p.finished = p.stale >= tc.patience or p.epoch >= tc.epochs


def _result(f: Fitting, p: Progress, train_idx: np.ndarray) -> FitResult:
    """The best epoch's weights, in eval mode, with the target transform (and its smearing factor)."""
    model = f.model
    if p.best_state is not None:
        model.load_state_dict(p.best_state)
    model.eval()
    transform = f.transform
    if f.cfg.target.bias_correction == "smearing":  # Duan's factor from the chosen weights' training residuals
        scaled = predict_scaled(model, f.data, train_idx, f.norm, f.mods)
        transform = transform.with_smearing(scaled, f.data.y[train_idx])
    return FitResult(model, transform, p.best_epoch, p.history, f.lr_info)


def _record_epoch(f: Fitting, p: Progress, scalars: Scalars | None) -> None:
    """The epoch just scored, to TensorBoard: its losses, validation RMSE and each parameter group's LR."""
    if scalars is None:
        return
    epoch = p.epoch - 1
    scalars.add_scalar("loss/train", p.history["train_loss"][-1], epoch)
    scalars.add_scalar("loss/val", p.history["val_loss"][-1], epoch)
    scalars.add_scalar("val/rmse", p.history["val_rmse"][-1], epoch)
    for i, group in enumerate(f.stepper.optimizer.param_groups):
        scalars.add_scalar(f"lr/{group.get('name', i)}", group["lr"], epoch)


def _report(f: Fitting, p: Progress, rows: int, label: str) -> Report:
    """Rank 0's progress over the fit's batches (every epoch's, as if none stopped early), resumed where ``p``
    stands."""
    tc = f.cfg.train
    per_epoch = batches_per_epoch(rows, tc.batch_size, f.world)
    done = p.epoch * per_epoch + (min(p.start // tc.batch_size, per_epoch) if p.order is not None else 0)
    stage = f"fit {label}".strip()
    return Report(stage, tc.epochs * per_epoch, "batch", initial=done, enabled=f.rank == 0 and not p.finished)


def fit(
    cfg: FinetuneConfig,
    data: LabelledData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    seed: int,
    export: tuple[dict, dict] | None = None,
    label: str = "",
    slot: tuple[ResumeStore, str] | None = None,
    stop: StopFlag | None = None,
    info: DistInfo | None = None,
    scalars: Scalars | None = None,
) -> FitResult:
    """Train on ``train_idx``; keep the weights of the epoch with the lowest validation RMSE (original units).

    Stops early after ``train.patience`` epochs without improvement. ``export``: (tensors, metadata) of a
    pretrained export, already checked against the data's schema.

    ``info`` None: plain PyTorch in this process. As one of several processes (``info`` from
    :func:`soilnet.distributed.join_process_group`), every rank calls it with the same arguments: the model
    trains in a DeepSpeed engine, every rank draws the same permutation and augmentation from ``seed`` and takes
    its share of each global batch (:func:`soilnet.distributed.rank_rows`); the loss is computed on the gathered
    predictions of the whole global batch, so the update equals the single process's up to float rounding
    (per-rank batch-norm statistics on CPUs are the exception, see :func:`build_engine`). A global batch with
    fewer rows than ranks is skipped. Validation runs on every rank (each holds all data) and rank 0's score
    decides, so all ranks stop at the same epoch.

    ``slot``: (store, key) to checkpoint into after every epoch and to resume from (:mod:`soilnet.train.resume`);
    a saved state that has finished training returns at once. ``stop``: after every step the ranks agree whether
    it was raised; if so, the state is saved and :class:`StoppedEarly` raised (a resumption continues exactly
    where this left off: same weights, optimizer, early-stopping state, batch order and RNG states).

    Rank 0 reports its progress over the batches (:mod:`soilnet.progress`, to stderr) and, given ``scalars`` (a
    TensorBoard writer the caller opened and closes), each epoch's losses, validation RMSE and learning rates.
    """
    f = prepare(cfg, data, train_idx, seed, export, label, info)
    p = _resumed(f, slot, label)
    with _report(f, p, len(train_idx), label) as report:
        while not p.finished:
            report.set_postfix(epoch=f"{p.epoch + 1}/{cfg.train.epochs}")
            _train_epoch(f, p, train_idx, slot, stop, label, report)
            _end_epoch(f, p, val_idx, label)
            _record_epoch(f, p, scalars)
            _save(f, p, slot)
    return _result(f, p, train_idx)
