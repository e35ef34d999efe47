"""Cross-modal contrastive pretraining with DeepSpeed, resumable on any world size (``soilnet pretrain`` runs it
through :func:`soilnet.jobs.pretrain.run`, which joins the process group and opens the run's outputs).

One process per device, started by torchrun, srun, submitit or nothing (:mod:`soilnet.distributed`). Each step
takes global batch ``G`` of the global sample order (:mod:`soilnet.data.order`), ``G / W`` per rank, embeds both
modalities in micro-batches of ``train.micro_batch_size`` (GradCache when a rank holds several,
:mod:`soilnet.train.gradcache`), and contrasts them against the whole global batch (:mod:`soilnet.losses`). The
micro-batch is fixed for the run's life, so BatchNorm sees the same samples on any world size. The run resumes from
its newest complete checkpoint in ``output_dir/checkpoints`` by itself, converting the checkpoint to a universal one
when the world size has changed. On SIGUSR2 or SIGTERM every rank agrees (an all-reduce of the flag with each step's
statistics, :class:`StepStats`) to save a checkpoint together; :func:`train` then returns
``{"stopped_early": True}`` and ``soilnet pretrain`` exits with 75 (EX_TEMPFAIL): run it again to continue. A NaN
or infinite loss on any rank, found by the same all-reduce before the optimizer step, stops every rank with the
state of before that step saved (exit 2).

The steps: :func:`prepare` (the resume check, :func:`plan_resume`; the engine, :func:`build_engine`; the resumed
state, :func:`resume_state`), then :func:`train` (the loop), reporting to the :class:`Observers` the job opened.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

import soilnet
from soilnet.config.base import ConfigError, to_plain
from soilnet.config.pretrain import PretrainConfig
from soilnet.data import BatchSizeError, LoaderSpec, ShardSet, build_loader, micro_batch, open_shards
from soilnet.data.augment import AugmentSpec
from soilnet.data.device import DeviceBatches
from soilnet.data.manifest import DataError
from soilnet.data.order import steps_per_epoch
from soilnet.distributed import DistInfo, all_reduce_sum, gather_no_grad
from soilnet.losses import ContrastiveLoss, ContrastiveOutput, retrieval_metrics
from soilnet.models import build_contrastive_model
from soilnet.progress import Progress, Scalars
from soilnet.schema import SampleSchema
from soilnet.train import checkpoint
from soilnet.train.deepspeed_config import adamw, deepspeed_config
from soilnet.train.export import shard_statistics
from soilnet.train.gradcache import RunningStats, grad_cache
from soilnet.train.optim import build_client_optimizer, check_optimizer, param_groups
from soilnet.train.schedule import lr_at, scaled_lr
from soilnet.train.signals import StopFlag, stop_signals_blocked

log = logging.getLogger("soilnet.pretrain")


class PretrainModule(nn.Module):
    """The contrastive model plus its loss (whose temperature may be learnable), as one module for DeepSpeed.

    ``forward(image (b, C, H, W), climate (b, T, F), keys (b,) int64 | None, image2 | None)`` returns
    ``(loss (), z_img (b, D), z_clim (b, D), cross-modal output)``.
    """

    def __init__(self, model: nn.Module, loss: ContrastiveLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, image, climate, keys=None, image2=None):
        z_img, z_clim = self.model(image, climate)
        # the second view goes through the image branch only; its climate output is discarded
        z_img2 = self.model(image2, climate)[0] if image2 is not None else None
        total, out = self.loss(z_img, z_clim, keys, z_img2)
        return total, z_img, z_clim, out


def grad_cache_step(
    engine,
    micro: int,
    image: torch.Tensor,
    climate: torch.Tensor,
    keys: torch.Tensor | None,
    image2: torch.Tensor | None,
    world: int,
):
    """One step over this rank's ``b / micro`` accumulation micro-batches through GradCache
    (:func:`soilnet.train.gradcache.grad_cache`): the loss sees the whole global batch, the gradients are the
    full-batch ones, DeepSpeed reduces them across ranks once, after the last micro-batch.

    image: (b, C, H, W); climate: (b, T, F); keys: (b,) int64 or None; image2: (b, C, H, W) or None.
    Returns what ``PretrainModule.forward`` returns, detached.
    """

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(last)
        # the surrogates' gradients already sum to the step's gradient: no division by the accumulation steps
        engine.backward(surrogate, scale_wrt_gas=False)

    module = engine.module
    return grad_cache(module.model, module.loss, micro, image, climate, keys, image2, backward, world)


def restore_buffers(module: nn.Module, ref: checkpoint.CheckpointRef) -> None:
    """Copy buffers (e.g. BatchNorm running statistics) from the source checkpoint's model file: a universal
    checkpoint restores parameters and optimizer state only."""
    files = [ref.path / "mp_rank_00_model_states.pt", ref.path / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        log.warning("%s: no model states file; buffers (e.g. BatchNorm statistics) start afresh", ref.path)
        return
    state = torch.load(found, map_location="cpu", weights_only=True).get("module") or {}
    for name, buf in module.named_buffers():
        if name in state and state[name].shape == buf.shape:
            buf.copy_(state[name].to(buf.dtype))


def code_version() -> str:
    """The package version plus the git commit of the checkout when there is one."""
    root = Path(soilnet.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{getattr(soilnet, '__version__', '0')}+{sha}" if sha else str(getattr(soilnet, "__version__", "0"))


def precision(cfg: PretrainConfig, info: DistInfo) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if info.device.type == "cuda" else "fp32"
    return cfg.train.precision


def engine_config(
    cfg: PretrainConfig, world: int, prec: str, peak_lr: float, universal: bool, micro: int | None = None
) -> dict:
    """The DeepSpeed config: ``cfg.deepspeed`` over what the job derives; batch sizes are always derived: ``micro``
    samples per device and forward (default ``G / world``), accumulated over ``G / (world * micro)`` micro-batches.
    """
    t = cfg.train
    micro = micro or micro_batch(t.global_batch_size, world)
    return deepspeed_config(
        global_batch=t.global_batch_size,
        micro=micro,
        accumulation=accumulation_steps(t.global_batch_size, micro, world),
        grad_clip=t.grad_clip,
        bf16=prec == "bf16",
        optimizer=adamw(peak_lr, t.weight_decay, t.betas) if t.optimizer == "adamw" else None,
        overrides=cfg.deepspeed,
        load_universal=universal,
    )


def zero_stage(cfg: PretrainConfig) -> int:
    return int((cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0))


def accumulation_steps(global_batch: int, micro: int, world: int, recorded_in: Path | None = None) -> int:
    """Micro-batches each of ``world`` ranks accumulates per step: ``G / (world * micro)``; raises saying what to
    change when ``world`` does not divide the ``G / micro`` micro-batches of a step. ``recorded_in``: the
    checkpoint whose micro-batch a resume keeps (named in the error)."""
    if global_batch % micro:
        raise BatchSizeError(
            f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size={micro}: set "
            f"train.micro_batch_size to a divisor of {global_batch}"
        )
    n = global_batch // micro
    if n % world:
        fits = ", ".join(str(w) for w in range(1, n + 1) if n % w == 0)
        source = f"recorded in {recorded_in}, which a resume keeps" if recorded_in else "per process and forward"
        new_run = (
            f"or start a new run (new output_dir) with train.micro_batch_size a divisor of {global_batch // world}"
            if global_batch % world == 0
            else f"train.global_batch_size does not divide by {world} either"
        )
        raise BatchSizeError(
            f"a step's {n} micro-batch(es) of train.micro_batch_size={micro} samples ({source}; "
            f"train.global_batch_size={global_batch}) cannot be shared by {world} processes: run on a number of "
            f"processes that divides {n} ({fits}); {new_run}"
        )
    return n // world


def micro_batch_size(cfg: PretrainConfig, world: int, resume: checkpoint.CheckpointRef | None) -> int:
    """Samples per device and forward pass: ``train.micro_batch_size``, else the resumed run's, else ``G / world``.

    BatchNorm normalises each micro-batch by its own statistics, so the micro-batch is part of the function being
    trained and stays fixed for a run's life: a resume on another world size keeps it and changes the number of
    accumulated micro-batches instead. Checkpoints written before it was recorded had one micro-batch per rank.
    A resume that asks for another one, or another global batch, is refused (use a new output_dir).
    """
    t = cfg.train
    if resume is None:
        return t.micro_batch_size or micro_batch(t.global_batch_size, world)
    meta = resume.meta
    if meta.get("global_batch_size") != t.global_batch_size:
        raise DataError(
            f"{resume.path}: was trained with train.global_batch_size={meta.get('global_batch_size')}, "
            f"this run asks for {t.global_batch_size}; resume with the same global batch or use a new output_dir"
        )
    recorded = int(meta.get("micro_batch_size") or t.global_batch_size // int(meta["world_size"]))
    if t.micro_batch_size not in (None, recorded):
        raise ConfigError(
            f"{resume.path}: was trained with train.micro_batch_size={recorded}, this run asks for "
            f"{t.micro_batch_size}; BatchNorm statistics depend on it: leave it unset (or {recorded}) to resume, or "
            "use a new output_dir"
        )
    return recorded


def checkpoint_meta(cfg: PretrainConfig, base: dict, step: int, samples: int, shards) -> dict:
    """``soilnet.json`` of the checkpoint after ``step`` steps and ``samples`` samples; ``base``: world size, batch
    sizes and ZeRO stage; ``shards``: the run's :class:`~soilnet.data.shards.ShardSet`."""
    d, t = cfg.data, cfg.train
    return {
        **base,
        "step": step,
        "samples": samples,
        "loader": {"samples_seen": samples, "seed": d.seed, "global_batch_size": t.global_batch_size},
        "config": to_plain(cfg),
        "schema": shards.schema.to_dict(),
        "normalisation": shard_statistics(shards),  # travels into `soilnet export` for fine-tuning
        "model": to_plain(cfg.model),
        "code_version": code_version(),
        "time": time.time(),
    }


class NonFiniteLossError(ValueError):
    """A step's loss was NaN or infinite on some rank; every rank stopped before the optimizer took the step. A
    ``ValueError``, so ``soilnet`` reports it as one line and exits 2, not 75: a rerun meets the same step again, so
    nothing requeues it by itself."""


def stop_on_nonfinite(
    engine, root: Path, start: checkpoint.StepStart, meta: dict, info: DistInfo, ranks: int, loss, ids, cfg
) -> NonFiniteLossError:
    """Every rank, when ``ranks`` > 0 ranks met a non-finite loss in the step after ``meta["step"]``: put back the
    buffers (BatchNorm statistics) of before that step, save that state with its RNG states (the step's forward
    and backward ran, the optimizer did not), and return the error to raise. ``ids``: this rank's global sample ids
    of the step, logged when its own loss is the non-finite one (a bad sample is then among them)."""
    step = int(meta["step"])
    value = float(loss.detach().float().sum())
    if not torch.isfinite(loss.detach()).all():
        shown = ids.tolist()[:64]
        more = " ..." if len(ids) > len(shown) else ""
        log.error(
            "rank %d: the loss of step %d is %s; this rank's batch held global sample ids %s%s",
            info.rank,
            step + 1,
            value,
            shown,
            more,
        )
    start.restore_buffers(engine.module)
    path = checkpoint.save(engine, root, step, meta, info.rank, cfg.checkpoint.keep_last, rng=start.rng)
    return NonFiniteLossError(
        f"step {step + 1}: the loss is not finite on {ranks} of {info.world_size} rank(s); the optimizer did not take "
        f"that step. The state before it is saved as {path} (step {step}). Rerun unchanged, it resumes there and meets "
        "the same step: lower train.lr, warm up longer (train.warmup_samples) or go back to an earlier checkpoint "
        "(remove the newer step folders), and check the shards with `soilnet verify --shards DIR`"
    )


def loader_spec(
    cfg: PretrainConfig, rank: int, world: int, image_dtype: torch.dtype = torch.float32, pin_memory: bool = False
) -> LoaderSpec:
    """What ``rank`` of ``world`` reads under ``cfg``: the data section's order, augmentation and threads;
    ``pin_memory`` for a GPU."""
    d = cfg.data
    aug = AugmentSpec(d.augment, d.pad, d.flips, d.rotate, d.spectral_jitter, d.climate_jitter)
    return LoaderSpec(
        seed=d.seed,
        global_batch=cfg.train.global_batch_size,
        rank=rank,
        world=world,
        augment=aug,
        two_views=cfg.loss.simclr_weight > 0,
        num_workers=d.num_workers,
        threads=d.loader_threads,
        image_dtype=image_dtype,
        pin_memory=pin_memory,
    )


@dataclass(frozen=True)
class ResumePlan:
    """How the run starts: the checkpoint it resumes (None: from scratch), the ZeRO stage, ``micro`` samples per
    device and forward accumulated over ``acc`` micro-batches per step, and the tag DeepSpeed loads (``universal``:
    the checkpoint converted to a universal one, for another world size)."""

    resume: checkpoint.CheckpointRef | None
    stage: int
    micro: int
    acc: int
    load_tag: str = ""
    universal: bool = False

    def same_world(self, world: int) -> bool:
        """Whether the run resumes a checkpoint of ``world`` ranks (whose RNG states it then restores)."""
        return self.resume is not None and self.resume.meta.get("world_size") == world

    def resumed_ref(self) -> checkpoint.CheckpointRef:
        """The checkpoint DeepSpeed loads (the resumed one, or its universal conversion)."""
        assert self.resume is not None
        return checkpoint.CheckpointRef(self.resume.root, self.load_tag, self.resume.meta)


def check_batch_layout(
    cfg: PretrainConfig, world: int, resume: checkpoint.CheckpointRef | None
) -> tuple[int, int, int]:
    """(ZeRO stage, micro-batch, accumulation steps) of this run on ``world`` ranks; raises on a layout it cannot
    train (an optimizer the stage does not take, GradCache under ZeRO stage 3)."""
    t = cfg.train
    stage = zero_stage(cfg)
    check_optimizer(t.optimizer, stage)
    micro = micro_batch_size(cfg, world, resume)
    acc = accumulation_steps(t.global_batch_size, micro, world, resume.path if resume else None)
    if acc > 1 and stage >= 3:
        raise ConfigError(
            f"{acc} micro-batches of train.micro_batch_size={micro} per process go through GradCache, which needs "
            f"whole parameters (ZeRO stage <= 2); under stage 3 run on {t.global_batch_size // micro} processes"
        )
    return stage, micro, acc


def plan_resume(cfg: PretrainConfig, info: DistInfo, root: Path) -> ResumePlan:
    """The resume check: the newest complete checkpoint under ``root`` and whether this run can continue it (the
    same global batch, micro-batch and ZeRO layout); rank 0 prunes, and a checkpoint of another world size is
    converted to a universal one."""
    resume = checkpoint.latest(root)
    stage, micro, acc = check_batch_layout(cfg, info.world_size, resume)
    if resume is None:
        return ResumePlan(None, stage, micro, acc)
    was = int(resume.meta.get("zero_stage", 0))
    if was != stage and 0 in (was, stage):
        # stage 0 keeps the whole optimizer state in mp_rank_00_model_states.pt, stages >= 1 in per-rank
        # partitions; DeepSpeed converts neither layout into the other
        raise ConfigError(
            f"{resume.path}: was written under deepspeed.zero_optimization.stage={was}, this run asks for "
            f"stage {stage}; resume with stage {was} or use a new output_dir"
        )
    # stage 0: every rank holds the whole state, which loads as it is on any world size
    universal = resume.meta.get("world_size") != info.world_size and was > 0
    if info.rank == 0:
        checkpoint.prune(root, cfg.checkpoint.keep_last)
    load_tag = checkpoint.ensure_universal(resume, info.rank) if universal else resume.tag
    return ResumePlan(resume, stage, micro, acc, load_tag, universal)


def build_engine(
    cfg: PretrainConfig, info: DistInfo, schema: SampleSchema, plan: ResumePlan, prec: str, peak: float
) -> tuple[Any, Any]:
    """The DeepSpeed engine over a freshly seeded :class:`PretrainModule`, and its optimizer."""
    import deepspeed  # heavy (CUDA/CPU op builders); only a training process needs it

    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_contrastive_model(cfg.model, schema)
    loss_fn = ContrastiveLoss(cfg.loss.temperature, cfg.loss.learnable_temperature, cfg.loss.simclr_weight)
    module = PretrainModule(model, loss_fn)
    groups = param_groups(module, t.weight_decay)
    client_opt = build_client_optimizer(t.optimizer, groups, peak, t.betas, t.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups if client_opt is None else None,
        optimizer=client_opt,
        config=engine_config(cfg, info.world_size, prec, peak, plan.universal, plan.micro),
    )
    return engine, optimizer


def resume_state(engine, root: Path, plan: ResumePlan, info: DistInfo, seed: int) -> tuple[int, int]:
    """Load the planned checkpoint into ``engine`` (buffers too, for a universal one) and this rank's RNG states
    (a fresh seed per rank on another world size); returns (step, samples), (0, 0) without one."""
    if plan.resume is None:
        return 0, 0
    path, client = engine.load_checkpoint(str(root), tag=plan.load_tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / plan.load_tag}")
    if plan.universal:
        restore_buffers(engine.module, plan.resume)
    meta = (client or {}).get("soilnet", plan.resume.meta)
    step, samples = int(meta["step"]), int(meta["samples"])
    if plan.same_world(info.world_size):
        checkpoint.load_rng(plan.resumed_ref(), info.rank)
    else:
        torch.manual_seed(seed + step * 1000 + info.rank)
    if info.rank == 0:
        log.info("resumed from %s at step %d (%d samples)", root / plan.load_tag, step, samples)
    return step, samples


@dataclass
class PretrainState:
    """A prepared run: its shards, engine and optimizer, how it started, and where it is (``step``, ``samples``)."""

    cfg: PretrainConfig
    info: DistInfo
    root: Path
    shards: ShardSet
    plan: ResumePlan
    engine: Any
    optimizer: Any
    peak: float
    dtype: torch.dtype
    step: int = 0
    samples: int = 0

    @property
    def loss_fn(self) -> ContrastiveLoss:
        return self.engine.module.loss

    def base_meta(self) -> dict:
        """What every checkpoint of the run records about its layout (:func:`checkpoint_meta`'s ``base``)."""
        t = self.cfg.train
        return {
            "world_size": self.info.world_size,
            "global_batch_size": t.global_batch_size,
            "micro_batch_size": self.plan.micro,
            "zero_stage": self.plan.stage,
        }

    def meta(self) -> dict:
        """``soilnet.json`` of a checkpoint at the current step."""
        return checkpoint_meta(self.cfg, self.base_meta(), self.step, self.samples, self.shards)


def prepare(cfg: PretrainConfig, info: DistInfo) -> PretrainState:
    """Everything before the loop on this rank of the joined process group: the shards, the resume check, the
    engine, and the resumed state."""
    root = Path(cfg.output_dir) / "checkpoints"
    shards = open_shards(cfg.data.shards, cfg.data.schema_)
    t = cfg.train
    steps_per_epoch(shards.samples, t.global_batch_size)
    plan = plan_resume(cfg, info, root)
    prec = precision(cfg, info)
    peak = scaled_lr(t.lr, t.global_batch_size, t.base_batch_size, t.lr_scaling)
    engine, optimizer = build_engine(cfg, info, shards.schema, plan, prec, peak)
    step, samples = resume_state(engine, root, plan, info, t.seed)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    return PretrainState(cfg, info, root, shards, plan, engine, optimizer, peak, dtype, step, samples)


class Records(Protocol):
    """A JSON-lines log (``metrics.jsonl``, ``samples.jsonl``)."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


@dataclass
class Observers:
    """Where rank 0 reports a run besides its checkpoints; the job opens and closes them
    (:mod:`soilnet.jobs.pretrain`), the loop only writes to them. Empty on the other ranks."""

    metrics: Records | None = None  # metrics.jsonl: one record per logged step
    samples: Records | None = None  # samples.jsonl: the global sample ids of each step (data.log_sample_ids)
    scalars: Scalars | None = None  # TensorBoard (train.tensorboard)
    progress: Progress | None = None  # steps done, rate and ETA (train.progress); without it, a log line per record


@dataclass
class StepStats:
    """One step's numbers, this rank's and then summed over the ranks (:meth:`all_reduced`): ranks whose stop flag
    is raised, corrupt and read samples since start, the loss, the retrieval sums of
    :func:`soilnet.losses.retrieval_metrics`, and ranks whose loss is not finite."""

    stop: float
    corrupt: float
    read: float
    loss: float
    count: float
    top1: float
    top5: float
    rank: float
    emb_std: float
    nonfinite: float

    @classmethod
    def local(cls, flag: StopFlag, reads: torch.Tensor, loss: torch.Tensor, metrics: dict[str, torch.Tensor]):
        """This rank's; ``reads``: float32 (corrupt samples, samples read) since start."""
        loss = loss.detach()
        return cls(
            stop=float(flag.raised),
            corrupt=float(reads[0]),
            read=float(reads[1]),
            loss=float(loss.float()),
            **{k: float(v) for k, v in metrics.items()},
            nonfinite=float(not bool(torch.isfinite(loss).all())),
        )

    def all_reduced(self, device: torch.device | str) -> StepStats:
        """The sums over all ranks: one all-reduce of the fields, packed by name into one float32 tensor."""
        names = [f.name for f in dataclasses.fields(self)]
        packed = torch.tensor([getattr(self, n) for n in names], dtype=torch.float32, device=device)
        return StepStats(**dict(zip(names, all_reduce_sum(packed).cpu().tolist(), strict=True)))


@dataclass
class Window:
    """Throughput since the last record: its start, the time spent waiting for batches, the steps taken."""

    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0


def open_loader(state: PretrainState) -> Iterator[dict]:
    """This rank's batches from the current step, in the compute dtype, on the device and augmented there
    (:class:`~soilnet.data.device.DeviceBatches`: pinned, the next batch's copy overlapping the step on a GPU);
    then the RNG states once more."""
    cfg, info = state.cfg, state.info
    # the loader hands images over in the compute dtype: half the bytes to write and to copy to the GPU in bf16
    cuda = info.device.type == "cuda"
    spec = loader_spec(cfg, info.rank, info.world_size, image_dtype=state.dtype, pin_memory=cuda)
    with stop_signals_blocked():  # workers start here
        loader = iter(DeviceBatches(build_loader(state.shards, spec, start_step=state.step), spec, info.device))
    if state.plan.same_world(info.world_size):
        # once more now: building the loader draws from the RNGs (the DataLoader's base seed), which the run that
        # saved them did before its first step, so a resumed run continues from exactly the states it saved
        checkpoint.load_rng(state.plan.resumed_ref(), info.rank)
    return loader


def set_lr(state: PretrainState) -> float:
    """Set and return the LR of the samples this step brings the count to: step 1 already learns, the last step
    hits the floor."""
    t = state.cfg.train
    total = t.steps * t.global_batch_size
    lr = lr_at(state.samples + t.global_batch_size, state.peak, t.warmup_samples, total, t.min_lr_ratio)
    for g in state.optimizer.param_groups:
        g["lr"] = lr
    return lr


def forward_backward(
    state: PretrainState, batch: dict, running: RunningStats
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ContrastiveOutput]:
    """The step's forward and backward passes (through GradCache over several micro-batches); returns
    ``PretrainModule.forward``'s output."""
    engine, info, dtype = state.engine, state.info, state.dtype
    image = batch["image"].to(info.device, dtype)
    climate = batch["climate"].to(info.device, dtype)
    keys = batch["climate_key"].to(info.device) if state.cfg.loss.mask_identical_climate else None
    image2 = batch["image2"].to(info.device, dtype) if "image2" in batch else None
    if state.plan.acc > 1:
        return grad_cache_step(engine, state.plan.micro, image, climate, keys, image2, info.world_size)
    loss, z_img, z_clim, cm = engine(image, climate, keys, image2)
    engine.backward(loss)
    if running and info.world_size > 1:  # every rank holds the mean over the global batch's micro-batches
        running.set_mean(running.flat(), 1, info.world_size)
    return loss, z_img, z_clim, cm


def check_corrupt(stats: StepStats, max_fraction: float) -> None:
    """Raise when the corrupt samples read so far (all ranks) exceed ``data.max_corrupt_fraction``."""
    if stats.corrupt > max_fraction * stats.read:
        raise DataError(
            f"{stats.corrupt:.0f} of {stats.read:.0f} samples read were corrupt, above data.max_corrupt_fraction="
            f"{max_fraction} (see the warnings above for which samples and shards)"
        )


def step_record(state: PretrainState, stats: StepStats, lr: float, window: Window) -> dict:
    """The ``metrics.jsonl`` record of the step just taken (``stats``: all ranks' sums)."""
    t, world = state.cfg.train, state.info.world_size
    elapsed = time.perf_counter() - window.start
    sps = window.steps * t.global_batch_size / max(elapsed, 1e-9)
    return {
        "step": state.step,
        "samples": state.samples,
        "epoch": state.samples // (steps_per_epoch(state.shards.samples, t.global_batch_size) * t.global_batch_size),
        "loss": stats.loss / world,
        "lr": lr,
        "temperature": float(state.loss_fn.temperature.detach().float().cpu()),
        "top1": stats.top1 / stats.count,
        "top5": stats.top5 / stats.count,
        "mean_positive_rank": stats.rank / stats.count,
        "embedding_std": stats.emb_std / stats.count,
        "samples_per_s": sps,
        "samples_per_s_per_device": sps / world,
        "data_wait_fraction": window.wait / max(elapsed, 1e-9),
        "corrupt_samples": int(stats.corrupt),
    }


def report(state: PretrainState, rec: dict, observers: Observers) -> None:
    """Rank 0: the record to the metrics log and TensorBoard, and to the progress report or the log."""
    assert observers.metrics is not None
    observers.metrics.write(rec)
    if observers.scalars is not None:
        for k, v in rec.items():
            if k not in ("step", "samples"):
                observers.scalars.add_scalar(f"pretrain/{k}", v, state.samples)
    sps, wait = rec["samples_per_s"], rec["data_wait_fraction"]
    if observers.progress is None:
        log.info(
            "step %d/%d loss %.4f lr %.3g samples/s %.1f (%.1f per device) data wait %.0f%% top1 %.2f",
            state.step,
            state.cfg.train.steps,
            rec["loss"],
            rec["lr"],
            sps,
            sps / state.info.world_size,
            100 * wait,
            rec["top1"],
        )
    else:
        observers.progress.set_postfix(loss=f"{rec['loss']:.4f}", samples_per_s=f"{sps:.1f}", data_wait=f"{wait:.2f}")


def log_sample_ids(state: PretrainState, ids: torch.Tensor, observers: Observers) -> None:
    """Every rank (a gather): the step's global sample ids to ``samples.jsonl`` on rank 0."""
    info = state.info
    gathered = gather_no_grad(ids.to(info.device if info.backend == "nccl" else "cpu"))
    if observers.samples is not None:
        observers.samples.write({"step": state.step, "ids": gathered.cpu().tolist()})


def next_batch(loader: Iterator[dict], window: Window, state: PretrainState, reads: torch.Tensor) -> dict:
    """The batch of the current step, its wait counted in ``window`` and its corrupt samples in ``reads``."""
    t0 = time.perf_counter()
    batch = next(loader)
    window.wait += time.perf_counter() - t0
    assert batch["step"] == state.step, (batch["step"], state.step)
    reads += torch.tensor([len(batch["corrupt"]), state.plan.micro * state.plan.acc], dtype=torch.float32)
    for msg in batch["corrupt"]:
        log.warning("rank %d: skipped a corrupt sample: %s", state.info.rank, msg)
    return batch


def take_step(
    state: PretrainState,
    loader: Iterator[dict],
    flag: StopFlag,
    reads: torch.Tensor,
    window: Window,
    running: RunningStats,
) -> tuple[StepStats, float, torch.Tensor]:
    """One optimizer step, agreed by all ranks: the batch, forward and backward, the all-reduce of
    :class:`StepStats` before the update (a non-finite loss on any rank stops every rank before it), the update.
    Returns (all ranks' statistics, the step's LR, this rank's global sample ids of the step)."""
    start = checkpoint.StepStart.take(state.engine.module)  # to save this state if the step's loss is not finite
    batch = next_batch(loader, window, state, reads)
    lr = set_lr(state)
    loss, z_img, z_clim, cm = forward_backward(state, batch, running)
    info = state.info
    stats = StepStats.local(flag, reads, loss, retrieval_metrics(cm, z_img, z_clim))
    stats = stats.all_reduced(info.device if info.backend == "nccl" else "cpu")
    if stats.nonfinite > 0:
        raise stop_on_nonfinite(
            state.engine, state.root, start, state.meta(), info, int(stats.nonfinite), loss, batch["ids"], state.cfg
        )
    state.engine.step()
    state.step += 1
    state.samples += state.cfg.train.global_batch_size
    return stats, lr, batch["ids"]


def train(state: PretrainState, flag: StopFlag, observers: Observers) -> dict:
    """The loop, from ``state.step`` to ``train.steps`` or a stop signal (after a checkpoint all ranks save); returns
    ``{"steps", "samples", "output_dir", "checkpoint", "stopped_early"}``."""
    cfg, info, t = state.cfg, state.info, state.cfg.train
    loader = open_loader(state)
    running = RunningStats(state.engine.module)  # BatchNorm statistics, made the same on every rank after each step
    reads = torch.zeros(2)  # [corrupt samples, samples read] on this rank since start
    window, stopped = Window(), False
    while state.step < t.steps:
        stats, lr, ids = take_step(state, loader, flag, reads, window, running)
        if cfg.debug.sigkill_after_step == state.step:
            os.kill(os.getpid(), signal.SIGKILL)
        window.steps += 1
        stop_now = stats.stop > 0
        check_corrupt(stats, cfg.data.max_corrupt_fraction)
        if cfg.data.log_sample_ids:
            log_sample_ids(state, ids, observers)
        if info.rank == 0 and (state.step % t.log_every_steps == 0 or state.step == t.steps or stop_now):
            report(state, step_record(state, stats, lr, window), observers)
            window = Window()
        if observers.progress is not None:
            observers.progress.update(1)
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == t.steps or stop_now:
            checkpoint.save(state.engine, state.root, state.step, state.meta(), info.rank, cfg.checkpoint.keep_last)
        if stop_now and state.step < t.steps:
            stopped = True
            # every rank says where it stopped: the ranks' logs show that they agreed
            log.warning(
                "rank %d: stopped on a signal at step %d after saving; run again to resume", info.rank, state.step
            )
            break
    latest = checkpoint.latest(state.root)
    return {
        "steps": state.step,
        "samples": state.samples,
        "output_dir": str(Path(cfg.output_dir)),
        "checkpoint": str(latest.path) if latest else None,
        "stopped_early": stopped,
    }
