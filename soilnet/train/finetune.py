"""Fine-tuning: regress a soil property from image patches and/or climate series, from scratch or from a
pretrained encoder export, then evaluate honestly (:mod:`soilnet.evaluate`).

Fine-tuning sets hold thousands of points, so every labelled sample sits in memory
(:mod:`soilnet.data.labelled`) and the job trains each cross-validation fold in turn. Early stopping and the
choice of epoch use the validation points only; test points are touched once, for the final predictions.

One process trains with plain PyTorch. When launched as one of several processes (``WORLD_SIZE`` > 1 from
torchrun, ``launch/`` or ``srun``), every rank runs the same job and :func:`fit` trains data-parallel through a
DeepSpeed engine (ZeRO stage 0): every rank draws the same global batches from the shared seed, takes its own
contiguous slice, and the loss is taken over the gathered predictions of the whole global batch, so the update
equals the single process's (up to float rounding) for models without batch statistics. Only rank 0 writes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from soilnet import schema as S
from soilnet.config.base import to_plain
from soilnet.config.finetune import FinetuneConfig, FinetuneTrainConfig
from soilnet.config.model import ModelConfig
from soilnet.data.labelled import LabelledData
from soilnet.distributed import DistInfo, all_reduce_sum, barrier, environment, gather_with_grad, init_distributed
from soilnet.models.layer_decay import lr_groups, lr_table
from soilnet.train.checkpoint import rng_state, set_rng_state
from soilnet.train.deepspeed_config import adamw, deepspeed_config
from soilnet.train.optim import param_groups
from soilnet.train.resume import ResumeStore
from soilnet.train.signals import StopFlag, StoppedEarly
from soilnet.train.targets import TargetTransform

log = logging.getLogger("soilnet.finetune")

MODEL_FILE = "model.safetensors"
FORMAT = "soilnet-finetuned/1"


class PretrainedMismatch(ValueError):
    """A pretrained export that does not fit the fine-tuning data or model."""


def modalities_of(name: str) -> tuple[str, ...]:
    """``both`` -> ``("image", "climate")``; ``image`` / ``climate`` -> a 1-tuple."""
    return ("image", "climate") if name == "both" else (name,)


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


# ------------------------------------------------------------------------------------------ normalising


@dataclass
class Normaliser:
    """Per-channel / per-variable ``(x - mean) / std``; missing values (NaN) become 0 after normalising.

    image_mean, image_std: ``(C,)``; climate_mean, climate_std: ``(F,)``; in the schema's units.
    """

    image_mean: np.ndarray | None
    image_std: np.ndarray | None
    climate_mean: np.ndarray | None
    climate_std: np.ndarray | None

    @classmethod
    def of(cls, data: LabelledData) -> Normaliser:
        return cls(data.image_mean, data.image_std, data.climate_mean, data.climate_std)

    def image(self, x: np.ndarray) -> torch.Tensor:
        """x: ``(B, C, H, W)`` -> ``(B, C, H, W)`` float32, normalised."""
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        t = (t - torch.from_numpy(self.image_mean)[:, None, None]) / torch.from_numpy(self.image_std)[:, None, None]
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def climate(self, x: np.ndarray) -> torch.Tensor:
        """x: ``(B, T, F)`` -> ``(B, T, F)`` float32, normalised."""
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        t = (t - torch.from_numpy(self.climate_mean)) / torch.from_numpy(self.climate_std)
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def to_dict(self) -> dict:
        def lst(a):
            return None if a is None else [float(v) for v in a]

        return {k: lst(getattr(self, k)) for k in ("image_mean", "image_std", "climate_mean", "climate_std")}

    @classmethod
    def from_dict(cls, d: dict) -> Normaliser:
        def arr(v):
            return None if v is None else np.asarray(v, dtype=np.float32)

        return cls(*(arr(d.get(k)) for k in ("image_mean", "image_std", "climate_mean", "climate_std")))


def choose_normalisation(data: LabelledData, export_meta: dict | None, mode: str, where: str) -> dict:
    """Put the statistics ``data.normalisation`` mode ``mode`` asks for into ``data`` and return what was used.

    ``mode`` ``pretrained`` with an export that records ``normalisation`` (:mod:`soilnet.train.export`): the
    pretraining shards' mean/std replace the data's, looked up by channel and variable name (the fine-tuning schema
    may order or select them differently). An export without them leaves the data's, with a ``warning``. ``data``,
    or no export: the data's own. Returns ``data.normalisation``: ``used`` (``pretrained``/``data``),
    ``requested`` and the source of each modality's statistics."""
    info = {**data.normalisation, "requested": mode if export_meta is not None else "data (no pretrained export)"}
    stats = json.loads(export_meta["normalisation"]) if export_meta and export_meta.get("normalisation") else None
    if export_meta is not None and mode == "pretrained" and stats is None:
        info["warning"] = (
            f"{where} records no pretraining normalisation statistics (exported before they were recorded): the "
            "inputs are normalised with the fine-tuning data's statistics, not as the encoders saw them in "
            "pretraining; re-export the checkpoint to fix this"
        )
        log.warning(info["warning"])
    if export_meta is None or mode != "pretrained" or stats is None:
        data.normalisation = info
        return info
    picked = {}
    for kind, names in (("image", data.schema.channels), ("climate", data.schema.climate_variables)):
        if getattr(data, f"{kind}_mean") is None:
            continue  # the run does not use this modality
        table = stats.get(kind) or {}
        missing = [n for n in names if n not in table]
        if missing:
            raise PretrainedMismatch(f"{where}: its normalisation statistics lack {kind} {missing}")
        picked[kind] = (
            np.array([table[n]["mean"] for n in names], dtype=np.float32),
            np.array([table[n]["std"] for n in names], dtype=np.float32),
        )
    for kind, (mean, std) in picked.items():
        setattr(data, f"{kind}_mean", mean)
        setattr(data, f"{kind}_std", np.where(np.isfinite(std) & (std > 0), std, 1.0).astype(np.float32))
        info[kind] = f"pretraining statistics of {stats.get('source', '?')} (from {where})"
    info["used"] = "pretrained"
    data.normalisation = info
    return info


def draw_flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` bool: horizontal flip, vertical flip, transpose, per sample."""
    return torch.rand(n, 3, generator=gen) < 0.5


def augment_image(x: torch.Tensor, gen: torch.Generator, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random element of the dihedral group per sample (flips and 90-degree turns keep soil physics intact).

    x: ``(B, C, H, W)``; the transpose applies only when H == W. flips: ``(B, 3)`` bool from :func:`draw_flips`
    (a data-parallel rank passes its rows of the global batch's draw), or None to draw them from ``gen``.
    """
    flips = draw_flips(x.shape[0], gen) if flips is None else flips
    x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
    return x


# ----------------------------------------------------------------------------------------------- models


def build_model(model_cfg: ModelConfig, schema: S.SampleSchema, modalities: tuple[str, ...]) -> nn.Module:
    """The regression model of :mod:`soilnet.models`: ``forward(image, climate) -> (B, 1)``."""
    from soilnet.models import build_regression_model

    return build_regression_model(model_cfg, schema, modalities)


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata (``schema``, ``model`` parsed from JSON) of a ``soilnet export`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained export not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "schema" not in meta:
        raise PretrainedMismatch(f"{path}: metadata has no 'schema'; is it a `soilnet export` file?")
    parsed = dict(meta)
    for key in ("schema", "model"):
        if key in meta:
            parsed[key] = json.loads(meta[key])
    return load_file(str(path)), parsed


def check_export_schema(
    export_schema: S.SampleSchema, data_schema: S.SampleSchema, modalities: tuple[str, ...], where: str
) -> None:
    """Raise before training when the export was pretrained on other channels, variables or months."""
    problems = []
    if "image" in modalities and export_schema.channels != data_schema.channels:
        problems.append(f"channels: export {list(export_schema.channels)} != data {list(data_schema.channels)}")
    if "climate" in modalities:
        if export_schema.climate_variables != data_schema.climate_variables:
            problems.append(
                f"climate variables: export {list(export_schema.climate_variables)} "
                f"!= data {list(data_schema.climate_variables)}"
            )
        if export_schema.months != data_schema.months:
            problems.append(
                f"months: export {export_schema.months[0]}..{export_schema.months[-1]} ({len(export_schema.months)})"
                f" != data {data_schema.months[0]}..{data_schema.months[-1]} ({len(data_schema.months)})"
            )
    if problems:
        raise PretrainedMismatch(
            f"{where}: the pretrained schema differs from the fine-tuning data: " + "; ".join(problems)
        )


def apply_export_model(model_cfg: ModelConfig, export_meta: dict, modalities: tuple[str, ...]) -> ModelConfig:
    """The model config with the export's encoder choices (the weights only fit the encoders they came from)."""
    exported = export_meta.get("model")
    if not exported:
        return model_cfg
    exp = ModelConfig.model_validate(exported)
    cfg = model_cfg.model_copy(deep=True)
    if "image" in modalities and exp.image_encoder is not None:
        cfg.image_encoder = exp.image_encoder
    if "climate" in modalities and exp.climate_encoder is not None:
        cfg.climate_encoder = exp.climate_encoder
    return cfg


def load_encoders(model: nn.Module, tensors: dict[str, torch.Tensor], modalities: tuple[str, ...], where: str) -> None:
    """Copy ``image_encoder.*`` / ``climate_encoder.*`` weights into the model's encoders (strict)."""
    for name in ("image_encoder", "climate_encoder"):
        if name.split("_")[0] not in modalities:
            continue
        module = getattr(model, name, None)
        prefix = name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if module is None:
            continue
        if not state:
            raise PretrainedMismatch(f"{where}: no '{prefix}*' weights for the {name.split('_')[0]} modality")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise PretrainedMismatch(f"{where}: {name} weights do not fit the model: {err}") from err


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


# ------------------------------------------------------------------------------------------------ batches


def _inputs(
    data: LabelledData | dict,
    idx: np.ndarray,
    norm: Normaliser,
    modalities: tuple[str, ...],
    device: torch.device = torch.device("cpu"),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Normalised model inputs for rows ``idx``: image ``(B, C, H, W)`` and climate ``(B, T, F)`` (or None)."""
    image = data["image"] if isinstance(data, dict) else data.image
    climate = data["climate"] if isinstance(data, dict) else data.climate
    im = norm.image(image[idx]).to(device) if "image" in modalities else None
    cl = norm.climate(climate[idx]).to(device) if "climate" in modalities else None
    return im, cl


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict_scaled(
    model: nn.Module,
    data: LabelledData | dict,
    idx: np.ndarray,
    norm: Normaliser,
    modalities: tuple[str, ...],
    batch_size: int = 256,
) -> np.ndarray:
    """Model outputs on the training scale for rows ``idx``: ``(len(idx),)`` float64."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(idx), batch_size):
        im, cl = _inputs(data, idx[start : start + batch_size], norm, modalities, device)
        out.append(model(im, cl).reshape(-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class FitResult:
    """A trained model, its best epoch (chosen on validation) and the per-epoch curves."""

    model: nn.Module
    transform: TargetTransform
    best_epoch: int
    history: dict[str, list[float]]
    lr_groups: list[dict] = field(default_factory=list)  # optim.lr_table: name, parameters, lr_scale


# ------------------------------------------------------------------------------------------- data parallel


@functools.cache
def _join(backend: str) -> DistInfo:
    # once per process: init_distributed also sets the CPU thread count, which the job's own setting must override
    return init_distributed(backend)


def distributed_context(device: str = "auto") -> DistInfo | None:
    """This process's place when it is one of several (``WORLD_SIZE`` > 1 from torchrun or ``launch/``, or
    ``SLURM_NTASKS`` > 1 under ``srun``), joining the process group on first call; None when alone."""
    if int(environment()["WORLD_SIZE"]) <= 1:
        return None
    return _join("nccl" if pick_device(device).type == "cuda" else "gloo")


def rank_rows(n: int, world: int, rank: int) -> tuple[slice, list[int]]:
    """This rank's contiguous share of a global batch of ``n`` rows, and every rank's share size (they differ
    by at most one row; rank order is batch order)."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), sizes


def gather_batch(pred: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's predictions ``(sizes[rank],)`` -> the global batch's ``(sum(sizes),)`` in batch order.

    Differentiable: with the same loss on every rank, backward leaves on each rank the gradient of the global
    loss through its own rows times the world size, which DeepSpeed's averaging over ranks cancels. all_gather
    needs equal shapes, so each rank pads its share to the largest one.
    """
    m = max(sizes)
    full = gather_with_grad(F.pad(pred, (0, m - pred.shape[0])))
    keep = torch.cat([torch.arange(r * m, r * m + s) for r, s in enumerate(sizes)]).to(full.device)
    return full[keep]


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


def average_batchnorm_statistics(model: nn.Module, world: int) -> None:
    """Average the running statistics of per-rank batch norms over ranks (SyncBatchNorm's agree already), so
    every rank evaluates the same model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)


def from_rank0(values: list[float], info: DistInfo) -> list[float]:
    """Rank 0's ``values`` on every rank, so that every rank takes the same early-stopping decision."""
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return t.tolist()


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
    if info is None:
        return stop.raised
    flag = torch.tensor([float(stop.raised)], device=info.device if info.backend == "nccl" else "cpu")
    return bool(all_reduce_sum(flag).item() > 0)


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
    ranks = [mine]
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
) -> FitResult:
    """Train on ``train_idx``; keep the weights of the epoch with the lowest validation RMSE (original units).

    Stops early after ``train.patience`` epochs without improvement. ``export``: (tensors, metadata) of a
    pretrained export, already checked against the data's schema.

    Alone, this is plain PyTorch. As one of several processes (:func:`distributed_context`), every rank calls it
    with the same arguments: the model trains in a DeepSpeed engine, every rank draws the same permutation and
    augmentation from ``seed`` and takes its share of each global batch (:func:`rank_rows`); the loss is
    computed on the gathered predictions of the whole global batch, so the update equals the single process's
    up to float rounding (per-rank batch-norm statistics on CPUs are the exception, see :func:`build_engine`).
    A global batch with fewer rows than ranks is skipped. Validation runs on every rank (each holds all data)
    and rank 0's score decides, so all ranks stop at the same epoch.

    ``slot``: (store, key) to checkpoint into after every epoch and to resume from (:mod:`soilnet.train.resume`);
    a saved state that has finished training returns at once. ``stop``: after every step the ranks agree whether
    it was raised; if so, the state is saved and :class:`StoppedEarly` raised (a resumption continues exactly
    where this left off: same weights, optimizer, early-stopping state, batch order and RNG states).
    """
    tc = cfg.train
    mods = modalities_of(cfg.modalities)
    info = distributed_context(tc.device)
    world, rank = (info.world_size, info.rank) if info else (1, 0)
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
    t_all = torch.from_numpy(transform.forward(data.y).astype(np.float32)).to(device)
    norm = Normaliser.of(data)
    engine, opt = None, None
    if info:
        engine = build_engine(model, tc, info)
        model = engine.module
    else:
        opt = torch.optim.AdamW(optimizer_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay)
    criterion = loss_fn(tc.loss, tc.huber_delta)
    p = Progress({"train_loss": [], "val_loss": [], "val_rmse": []}, finished=tc.epochs <= 0)
    saved = slot[0].load(slot[1]) if slot else None
    if saved is not None:
        p = restore_training(saved, model, opt if engine is None else engine.optimizer, rng, gen, world, rank)
        log.info("%s: resumed at epoch %d, row %d (%s)", label, p.epoch, p.start, slot[0].path(slot[1]))

    def save(done: Progress) -> None:
        if slot:
            state = training_state(done, model, opt if engine is None else engine.optimizer, rng, gen, info)
            slot[0].save(slot[1], state)

    while not p.finished:
        model.train()
        if tc.encoders == "frozen":
            for enc in _encoders(model):
                enc.eval()
        if p.order is None:
            p.order, p.start, p.total, p.count = rng.permutation(train_idx), 0, 0.0, 0
        order = p.order
        while p.start < len(order):
            start = p.start
            p.start += tc.batch_size
            idx = order[start : start + tc.batch_size]
            if world > 1 and len(idx) < world:
                continue  # some rank would get no row; the samples come back next epoch
            if len(idx) < 2 and len(order) > 1:
                continue  # a batch of one breaks batch-norm; the sample comes back next epoch
            rows, sizes = rank_rows(len(idx), world, rank)
            flips = draw_flips(len(idx), gen) if "image" in mods and tc.augment else None
            im, cl = _inputs(data, idx[rows], norm, mods)
            if im is not None and flips is not None:
                im = augment_image(im, gen, flips[rows])
            im = im.to(device) if im is not None else None
            cl = cl.to(device) if cl is not None else None
            if engine is None:
                pred = model(im, cl).reshape(-1)
                loss = criterion(pred, t_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                pred = engine(im, cl).reshape(-1)
                loss = criterion(gather_batch(pred, sizes), t_all[idx])
                engine.backward(loss)
                engine.step()
            p.total += float(loss.detach()) * len(idx)
            p.count += len(idx)
            if stop is not None and stop_agreed(stop, info):
                save(p)
                barrier()  # rank 0 has written before any rank exits (srun ends the step on the first exit)
                where = f"{label} epoch {p.epoch}, row {min(p.start, len(order))} of {len(order)}"
                log.warning("rank %d: stopped on a signal at %s after saving; run again to resume", rank, where)
                raise StoppedEarly(f"stopped on a signal at {where}")
        if info:
            average_batchnorm_statistics(model, world)
        val_scaled = predict_scaled(model, data, val_idx, norm, mods)
        val_loss = float(criterion(torch.from_numpy(val_scaled).float().to(device), t_all[val_idx]))
        val_rmse = float(np.sqrt(np.mean((transform.inverse(val_scaled) - data.y[val_idx]) ** 2)))
        if info:
            val_loss, val_rmse = from_rank0([val_loss, val_rmse], info)
        train_loss = p.total / max(p.count, 1)
        p.history["train_loss"].append(train_loss)
        p.history["val_loss"].append(val_loss)
        p.history["val_rmse"].append(val_rmse)
        log.info("%s epoch %d: train %.4f  val %.4f  val RMSE %.3f", label, p.epoch, train_loss, val_loss, val_rmse)
        score = val_loss if tc.early_stopping == "val_loss" else val_rmse
        if score < p.best_val:
            p.best_val, p.best_epoch, p.stale = score, p.epoch, 0
            p.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            p.stale += 1
        p.epoch, p.order = p.epoch + 1, None
        p.finished = p.stale >= tc.patience or p.epoch >= tc.epochs
        save(p)
    if p.best_state is not None:
        model.load_state_dict(p.best_state)
    model.eval()
    if cfg.target.bias_correction == "smearing":  # Duan's factor from the chosen weights' training residuals
        transform = transform.with_smearing(predict_scaled(model, data, train_idx, norm, mods), data.y[train_idx])
    return FitResult(model, transform, p.best_epoch, p.history, lr_info)


def predict(
    fitted: FitResult, data: LabelledData, idx: np.ndarray, modalities: tuple[str, ...], corrected: bool = True
) -> np.ndarray:
    """Predictions in original units for rows ``idx``: ``(len(idx),)``; ``corrected=False``: without the
    back-transform's bias correction (``target.bias_correction``)."""
    scaled = predict_scaled(fitted.model, data, idx, Normaliser.of(data), modalities)
    return fitted.transform.inverse(scaled, corrected)


# ------------------------------------------------------------------------------------------ checkpoint


def save_model(
    directory: Path, fitted: FitResult, cfg: FinetuneConfig, data: LabelledData, model_cfg: ModelConfig, conformal: dict
) -> Path:
    """``directory/model.safetensors``: weights plus everything prediction needs, as JSON metadata."""
    target = S.TARGETS_BY_NAME.get(data.target)
    meta = {
        "format": FORMAT,
        "schema": json.dumps(data.schema.to_dict()),
        "model": json.dumps(to_plain(model_cfg)),
        "modalities": json.dumps(list(modalities_of(cfg.modalities))),
        "target": json.dumps(
            {"name": data.target, "unit": target.unit if target else "", **fitted.transform.to_dict()}
        ),
        "normaliser": json.dumps(Normaliser.of(data).to_dict()),
        "conformal": json.dumps(conformal),
    }
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / MODEL_FILE
    tmp = directory / (MODEL_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in fitted.model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


@dataclass
class Finetuned:
    """A loaded fine-tuned model and what prediction needs (see :func:`save_model`)."""

    model: nn.Module
    schema: S.SampleSchema
    modalities: tuple[str, ...]
    transform: TargetTransform
    normaliser: Normaliser
    conformal: dict
    target: dict

    def predict(self, image: np.ndarray | None, climate: np.ndarray | None, batch_size: int = 256) -> np.ndarray:
        """image ``(N, C, H, W)`` / climate ``(N, T, F)`` in schema units -> prediction ``(N,)`` in target units."""
        n = len(image) if image is not None else len(climate)
        arrays = {"image": image, "climate": climate}
        scaled = predict_scaled(self.model, arrays, np.arange(n), self.normaliser, self.modalities, batch_size)
        return self.transform.inverse(scaled)


def load_model(path: str | Path, device: str = "auto") -> Finetuned:
    """Load a fine-tuning ``output_dir`` (or its model.safetensors) onto ``device`` (``auto``: GPU if visible)."""
    path = Path(path)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuned model not found: {path} (run `soilnet finetune` with final_model=true)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fine-tuned SoilNet model (format {meta.get('format')!r})")
    schema = S.SampleSchema.from_dict(json.loads(meta["schema"]))
    mods = tuple(json.loads(meta["modalities"]))
    model = build_model(ModelConfig.model_validate(json.loads(meta["model"])), schema, mods)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.to(pick_device(device)).eval()
    target = json.loads(meta["target"])
    transform = TargetTransform.from_dict(target)
    return Finetuned(
        model,
        schema,
        mods,
        transform,
        Normaliser.from_dict(json.loads(meta["normaliser"])),
        json.loads(meta["conformal"]),
        target,
    )


# ------------------------------------------------------------------------------------------------- job


def run(cfg: FinetuneConfig) -> int | dict:
    """``soilnet finetune``: cross-validated evaluation (with the baseline and intervals), then a final model
    on every labelled point for mapping. Writes metrics.json, report.md, plots and model.safetensors.

    Launched as several processes, every rank trains data-parallel and only rank 0 writes and reports.
    Checkpoints every fold and epoch under ``output_dir/checkpoints`` (:mod:`soilnet.train.resume`) and resumes
    from them; on SIGUSR2/SIGTERM it saves and returns ``{"stopped_early": True}`` (``soilnet finetune`` exits
    with 75)."""
    from soilnet.evaluate.run import evaluate_resumably, writes_outputs

    start = time.time()
    out = Path(cfg.output_dir)
    writes = writes_outputs(cfg)
    # the other ranks compute what rank 0 logs; they only warn
    logging.basicConfig(level=logging.INFO if writes else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    metrics = evaluate_resumably(cfg, out, final_model=cfg.final_model)
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
