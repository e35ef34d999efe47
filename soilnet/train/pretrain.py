"""``soilnet pretrain``: cross-modal contrastive pretraining with DeepSpeed, resumable on any world size.

One process per device, started by torchrun, srun, submitit or nothing (:mod:`soilnet.distributed`). Each step
takes global batch ``G`` of the global sample order (:mod:`soilnet.data.order`), ``G / W`` per rank, embeds both
modalities in micro-batches of ``train.micro_batch_size`` (GradCache when a rank holds several,
:mod:`soilnet.train.gradcache`), and contrasts them against the whole global batch (:mod:`soilnet.losses`). The
micro-batch is fixed for the run's life, so BatchNorm sees the same samples on any world size. The run resumes from
its newest complete checkpoint in ``output_dir/checkpoints`` by itself, converting the checkpoint to a universal one
when the world size has changed. On SIGUSR2 or SIGTERM every rank agrees (an all-reduce of the flag with each step's
metrics) to save a checkpoint together; ``run`` then returns ``{"stopped_early": True}`` and ``soilnet pretrain``
exits with 75 (EX_TEMPFAIL): run it again to continue. A NaN or infinite loss on any rank, found by the same
all-reduce before the optimizer step, stops every rank with the state of before that step saved (exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

import soilnet
from soilnet.config.base import ConfigError, save_resolved, to_plain
from soilnet.config.pretrain import PretrainConfig
from soilnet.data import BatchSizeError, LoaderSpec, build_loader, micro_batch, open_shards
from soilnet.data.augment import AugmentSpec
from soilnet.data.manifest import DataError
from soilnet.data.order import steps_per_epoch
from soilnet.distributed import DistInfo, all_reduce_sum, gather_no_grad, init_distributed
from soilnet.losses import ContrastiveLoss, retrieval_metrics
from soilnet.train import checkpoint as ckpt
from soilnet.train.deepspeed_config import adamw, deepspeed_config
from soilnet.train.export import shard_statistics
from soilnet.train.gradcache import RunningStats, grad_cache
from soilnet.train.optim import build_client_optimizer, check_optimizer, param_groups
from soilnet.train.schedule import lr_at, scaled_lr
from soilnet.train.signals import StopFlag, ignore_stop_signals, stop_on_signals, stop_signals_blocked

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


def restore_buffers(module: nn.Module, ref: ckpt.CheckpointRef) -> None:
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
    import subprocess

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


def micro_batch_size(cfg: PretrainConfig, world: int, resume: ckpt.CheckpointRef | None) -> int:
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


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (and optionally ``samples.jsonl``); on resume, lines after the resumed step are
    dropped so a rerun reproduces the file of an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def plot_loss(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["samples"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("samples seen")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("pretraining loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(cfg: PretrainConfig) -> dict:
    """Pretrain as configured; returns ``{"steps", "samples", "output_dir", "checkpoint", "stopped_early"}``.

    SIGUSR2/SIGTERM are caught from the start (a signal during start-up stops the run after its first step).
    """
    with stop_on_signals(StopFlag()) as flag:
        try:
            result = _run(cfg, flag)
        except RuntimeError as err:  # gloo and nccl report a dead peer (a crashed rank, a lost node) this way
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                last = ckpt.latest(Path(cfg.output_dir) / "checkpoints")
                where = f"step {last.meta['step']} in {last.path}" if last else "none yet"
                log.error("rank %d failed: %s. If another rank or its node was lost, resubmit the same command: it "
                          "resumes from the last complete checkpoint (%s).", torch.distributed.get_rank(),
                          str(err).splitlines()[0][:300], where)  # fmt: skip
            raise
    if result["stopped_early"]:
        ignore_stop_signals()  # srun may SIGTERM this rank while it exits (see ignore_stop_signals)
    return result


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
    engine, root: Path, start: ckpt.StepStart, meta: dict, info: DistInfo, ranks: int, loss, ids, cfg
) -> NonFiniteLossError:
    """Every rank, when ``ranks`` > 0 ranks met a non-finite loss in the step after ``meta["step"]``: put back the
    buffers (BatchNorm statistics) of before that step, save that state with its RNG states (the step's forward
    and backward ran, the optimizer did not), and return the error to raise. ``ids``: this rank's global sample ids
    of the step, logged when its own loss is the non-finite one (a bad sample is then among them)."""
    step = int(meta["step"])
    value = float(loss.detach().float().sum())
    if not torch.isfinite(loss.detach()).all():
        shown = ids.tolist()[:64]
        log.error("rank %d: the loss of step %d is %s; this rank's batch held global sample ids %s%s", info.rank,
                  step + 1, value, shown, " ..." if len(ids) > len(shown) else "")  # fmt: skip
    start.restore_buffers(engine.module)
    path = ckpt.save(engine, root, step, meta, info.rank, cfg.checkpoint.keep_last, rng=start.rng)
    return NonFiniteLossError(
        f"step {step + 1}: the loss is not finite on {ranks} of {info.world_size} rank(s); the optimizer did not take "
        f"that step. The state before it is saved as {path} (step {step}). Rerun unchanged, it resumes there and meets "
        "the same step: lower train.lr, warm up longer (train.warmup_samples) or go back to an earlier checkpoint "
        "(remove the newer step folders), and check the shards with `soilnet verify --shards DIR`"
    )


def loader_spec(cfg: PretrainConfig, rank: int, world: int, image_dtype: torch.dtype = torch.float32) -> LoaderSpec:
    """What ``rank`` of ``world`` reads under ``cfg``: the data section's order, augmentation and threads."""
    d = cfg.data
    aug = AugmentSpec(d.augment, d.pad, d.flips, d.rotate, d.spectral_jitter, d.climate_jitter)
    return LoaderSpec(d.seed, cfg.train.global_batch_size, rank, world, aug, cfg.loss.simclr_weight > 0,
                      d.num_workers, d.loader_threads, image_dtype)  # fmt: skip


def _run(cfg: PretrainConfig, flag: StopFlag) -> dict:
    import deepspeed

    from soilnet.models import build_contrastive_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    info = init_distributed(cfg.distributed.backend)
    out = Path(cfg.output_dir)
    root = out / "checkpoints"
    shards = open_shards(cfg.data.shards, cfg.data.schema_)
    t = cfg.train
    steps_per_epoch(shards.samples, t.global_batch_size)
    stage = zero_stage(cfg)
    check_optimizer(t.optimizer, stage)
    resume = ckpt.latest(root)
    micro = micro_batch_size(cfg, info.world_size, resume)
    acc = accumulation_steps(t.global_batch_size, micro, info.world_size, resume.path if resume else None)
    b = micro * acc  # this rank's samples per step
    if acc > 1 and stage >= 3:
        raise ConfigError(
            f"{acc} micro-batches of train.micro_batch_size={micro} per process go through GradCache, which needs "
            f"whole parameters (ZeRO stage <= 2); under stage 3 run on {t.global_batch_size // micro} processes"
        )
    prec = precision(cfg, info)
    peak = scaled_lr(t.lr, t.global_batch_size, t.base_batch_size, t.lr_scaling)

    load_tag, universal = None, False
    if resume is not None:
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
            ckpt.prune(root, cfg.checkpoint.keep_last)
        load_tag = ckpt.ensure_universal(resume, info.rank) if universal else resume.tag

    torch.manual_seed(t.seed)
    model = build_contrastive_model(cfg.model, shards.schema)
    loss_fn = ContrastiveLoss(cfg.loss.temperature, cfg.loss.learnable_temperature, cfg.loss.simclr_weight)
    module = PretrainModule(model, loss_fn)
    groups = param_groups(module, t.weight_decay)
    client_opt = build_client_optimizer(t.optimizer, groups, peak, t.betas, t.weight_decay)
    ds_cfg = engine_config(cfg, info.world_size, prec, peak, universal, micro)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups if client_opt is None else None,
        optimizer=client_opt,
        config=ds_cfg,
    )
    step = samples = 0
    if resume is not None:
        path, client = engine.load_checkpoint(str(root), tag=load_tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {root / load_tag}")
        if universal:
            restore_buffers(engine.module, resume)
        meta = (client or {}).get("soilnet", resume.meta)
        step, samples = int(meta["step"]), int(meta["samples"])
        if resume.meta.get("world_size") == info.world_size:
            ckpt.load_rng(ckpt.CheckpointRef(root, load_tag, resume.meta), info.rank)
        else:
            torch.manual_seed(t.seed + step * 1000 + info.rank)
        if info.rank == 0:
            log.info("resumed from %s at step %d (%d samples)", root / load_tag, step, samples)

    if info.rank == 0:
        save_resolved(cfg, out)
    metrics = MetricsLog(out / "metrics.jsonl", step) if info.rank == 0 else None
    sample_log = MetricsLog(out / "samples.jsonl", step) if info.rank == 0 and cfg.data.log_sample_ids else None
    tb = None
    if info.rank == 0 and t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))
    bar = None
    if info.rank == 0 and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    d, dtype = cfg.data, torch.bfloat16 if prec == "bf16" else torch.float32
    # the loader hands images over in the compute dtype: half the bytes to write and to copy to the GPU in bf16
    spec = loader_spec(cfg, info.rank, info.world_size, image_dtype=dtype)
    with stop_signals_blocked():  # workers start here
        loader = iter(build_loader(shards, spec, start_step=step))
    if resume is not None and resume.meta.get("world_size") == info.world_size:
        # once more now: building the loader draws from the RNGs (the DataLoader's base seed), which the run that
        # saved them did before its first step, so a resumed run continues from exactly the states it saved
        ckpt.load_rng(ckpt.CheckpointRef(root, load_tag, resume.meta), info.rank)
    base = {"world_size": info.world_size, "global_batch_size": t.global_batch_size, "micro_batch_size": micro,
            "zero_stage": stage}  # fmt: skip
    running = RunningStats(engine.module)  # BatchNorm statistics, made the same on every rank after each step
    corrupt = torch.zeros(2)  # [corrupt samples, samples read] on this rank since start
    stopped = False
    window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
    while step < t.steps:
        start = ckpt.StepStart.take(engine.module)  # to save this state if the step's loss is not finite
        t0 = time.perf_counter()
        batch = next(loader)
        window_wait += time.perf_counter() - t0
        assert batch["step"] == step, (batch["step"], step)
        corrupt += torch.tensor([len(batch["corrupt"]), b], dtype=torch.float32)
        for msg in batch["corrupt"]:
            log.warning("rank %d: skipped a corrupt sample: %s", info.rank, msg)
        # the LR of the samples this step brings the count to: step 1 already learns, the last step hits the floor
        total = t.steps * t.global_batch_size
        lr = lr_at(samples + t.global_batch_size, peak, t.warmup_samples, total, t.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        image = batch["image"].to(info.device, dtype)
        climate = batch["climate"].to(info.device, dtype)
        keys = batch["climate_key"].to(info.device) if cfg.loss.mask_identical_climate else None
        image2 = batch["image2"].to(info.device, dtype) if "image2" in batch else None
        if acc > 1:
            loss, z_img, z_clim, cm = grad_cache_step(engine, micro, image, climate, keys, image2, info.world_size)
        else:
            loss, z_img, z_clim, cm = engine(image, climate, keys, image2)
            engine.backward(loss)
            if running and info.world_size > 1:  # every rank holds the mean over the global batch's micro-batches
                running.set_mean(running.flat(), 1, info.world_size)
        # one small all-reduce per step, before the update: stop flag, corrupt counts, loss, retrieval metrics, and
        # the number of ranks whose loss is not finite (then every rank stops before the optimizer takes the step)
        m = retrieval_metrics(cm, z_img, z_clim)
        vec = torch.stack(
            [
                torch.tensor(float(flag.raised)),
                *corrupt,
                loss.detach().float().cpu(),
                *(v.cpu() for v in m.values()),
                torch.tensor(float(not bool(torch.isfinite(loss.detach()).all()))),
            ]
        ).to(info.device if info.backend == "nccl" else "cpu")
        tot = all_reduce_sum(vec).cpu()
        if tot[-1] > 0:
            meta = checkpoint_meta(cfg, base, step, samples, shards)
            raise stop_on_nonfinite(engine, root, start, meta, info, int(tot[-1]), loss, batch["ids"], cfg)
        engine.step()
        step += 1
        samples += t.global_batch_size
        if cfg.debug.sigkill_after_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        window_steps += 1
        stop_now = bool(tot[0] > 0)
        n_corrupt, n_read = float(tot[1]), float(tot[2])
        if n_corrupt > d.max_corrupt_fraction * n_read:
            raise DataError(
                f"{n_corrupt:.0f} of {n_read:.0f} samples read were corrupt, above data.max_corrupt_fraction="
                f"{d.max_corrupt_fraction} (see the warnings above for which samples and shards)"
            )
        if cfg.data.log_sample_ids:
            ids = gather_no_grad(batch["ids"].to(info.device if info.backend == "nccl" else "cpu"))
            if sample_log is not None:
                sample_log.write({"step": step, "ids": ids.cpu().tolist()})
        if info.rank == 0 and (step % t.log_every_steps == 0 or step == t.steps or stop_now):
            count = float(tot[4])
            elapsed = time.perf_counter() - window_t
            sps = window_steps * t.global_batch_size / max(elapsed, 1e-9)
            rec = {
                "step": step,
                "samples": samples,
                "epoch": samples // (steps_per_epoch(shards.samples, t.global_batch_size) * t.global_batch_size),
                "loss": float(tot[3]) / info.world_size,
                "lr": lr,
                "temperature": float(loss_fn.temperature.detach().float().cpu()),
                "top1": float(tot[5]) / count,
                "top5": float(tot[6]) / count,
                "mean_positive_rank": float(tot[7]) / count,
                "embedding_std": float(tot[8]) / count,
                "samples_per_s": sps,
                "samples_per_s_per_device": sps / info.world_size,
                "data_wait_fraction": window_wait / max(elapsed, 1e-9),
                "corrupt_samples": int(n_corrupt),
            }
            metrics.write(rec)
            if tb is not None:
                for k, v in rec.items():
                    if k not in ("step", "samples"):
                        tb.add_scalar(f"pretrain/{k}", v, samples)
            if bar is None:
                log.info(
                    "step %d/%d loss %.4f lr %.3g samples/s %.1f (%.1f per device) data wait %.0f%% top1 %.2f",
                    step, t.steps, rec["loss"], lr, sps, sps / info.world_size,
                    100 * rec["data_wait_fraction"], rec["top1"],
                )  # fmt: skip
            else:
                wait = rec["data_wait_fraction"]
                bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_per_s=f"{sps:.1f}", data_wait=f"{wait:.2f}")
            window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
        if bar is not None:
            bar.update(1)
        if step % cfg.checkpoint.every_steps == 0 or step == t.steps or stop_now:
            meta = checkpoint_meta(cfg, base, step, samples, shards)
            ckpt.save(engine, root, step, meta, info.rank, cfg.checkpoint.keep_last)
        if stop_now and step < t.steps:
            stopped = True
            # every rank says where it stopped: the ranks' logs show that they agreed
            log.warning("rank %d: stopped on a signal at step %d after saving; run again to resume", info.rank, step)
            break
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
        if t.plot:
            plot_loss(out / "metrics.jsonl", out / "loss.png")
    if sample_log is not None:
        sample_log.close()
    if tb is not None:
        tb.close()
    latest = ckpt.latest(root)
    return {
        "steps": step,
        "samples": samples,
        "output_dir": str(out),
        "checkpoint": str(latest.path) if latest else None,
        "stopped_early": stopped,
    }
