"""Config of ``soilnet pretrain``: data, model, loss, optimisation, checkpoints and DeepSpeed.

Batch sizes and schedules are counted in samples of the *global* batch, so a config means the same run on any
number of processes. ``deepspeed`` is merged over the DeepSpeed config the job derives (batch sizes, precision,
optimizer, clipping); put ZeRO and communication settings there (see configs/deepspeed/).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from soilnet.config.base import Section
from soilnet.config.model import ModelConfig, lift_model_file_schema
from soilnet.config.schema import SchemaConfig


class DataConfig(Section):
    """``shards`` is a shard folder or its ``manifest.json``; ``schema`` picks channels and variables by name.

    Augmentations follow the seed: reflect ``pad`` pixels, random flips and 90-degree rotations, random crop back
    to the patch size, applied on the training device after the copy; jitters are Gaussian, in normalised units.
    ``seed`` fixes the global sample order and every sample's augmentation draws. ``loader_threads``: threads
    building batches in each process (the training process with ``num_workers: 0``, else each worker); unset: 2
    (see docs/benchmarks.md).
    ``max_corrupt_fraction``: above this fraction of corrupt samples read, the job stops.
    ``log_sample_ids``: write every global batch's sample ids to ``output_dir/samples.jsonl``.
    """

    shards: str = "outputs/shards"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    num_workers: int = Field(default=0, ge=0)
    loader_threads: int | None = Field(default=None, ge=1)
    augment: bool = True
    pad: int = Field(default=16, ge=0)
    flips: bool = True
    rotate: bool = True
    spectral_jitter: float = Field(default=0.0, ge=0)
    climate_jitter: float = Field(default=0.0, ge=0)
    seed: int = 0
    max_corrupt_fraction: float = Field(default=0.01, ge=0, le=1)
    log_sample_ids: bool = False


class LossConfig(Section):
    """Cross-modal NT-Xent. ``temperature`` (the initial value when ``learnable_temperature``);
    ``simclr_weight`` > 0 adds an image-image two-view term; ``mask_identical_climate`` drops negatives whose
    climate series equals the anchor's."""

    temperature: float = Field(default=0.5, gt=0)
    learnable_temperature: bool = False
    simclr_weight: float = Field(default=0.0, ge=0)
    mask_identical_climate: bool = False


class TrainConfig(Section):
    """Optimisation. ``lr`` is the peak learning rate at ``base_batch_size``, scaled to ``global_batch_size`` by
    ``lr_scaling`` (none, linear or sqrt). ``warmup_samples`` of linear warm-up, then cosine to
    ``min_lr_ratio * lr`` at ``steps * global_batch_size`` samples. ``grad_clip``: max global gradient L2 norm
    (0 = off). ``precision``: auto = bf16 on GPU, fp32 on CPU. ``optimizer``: adamw (torch's, inside DeepSpeed),
    or lars/lamb (per-layer trust ratios; ZeRO stage 0 only, since ZeRO flattens layers into partitions).
    ``micro_batch_size``: samples per device and forward pass; unset: ``global_batch_size / processes`` at the
    run's first start. It is recorded in the checkpoint and kept on resume, on any number of processes ``W``: each
    process accumulates ``global_batch_size / (W * micro_batch_size)`` micro-batches (``W`` must divide
    ``global_batch_size / micro_batch_size``) through GradCache, so the loss still sees the whole global batch of
    negatives and BatchNorm still sees ``micro_batch_size`` samples. Memory follows the micro-batch.
    ``grad_cache_chunk``: its former name (the GradCache chunk), read as ``micro_batch_size``.
    """

    steps: int = Field(default=100, ge=1)
    global_batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    base_batch_size: int | None = None
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    warmup_samples: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "lars", "lamb"] = "adamw"
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    micro_batch_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    log_every_steps: int = Field(default=1, ge=1)
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    @model_validator(mode="before")
    @classmethod
    def _former_name(cls, tree: Any) -> Any:
        """``grad_cache_chunk: n`` (n > 0) is ``micro_batch_size: n``; 0 meant off, now unset."""
        if isinstance(tree, dict) and "grad_cache_chunk" in tree:
            tree = dict(tree)
            chunk = tree.pop("grad_cache_chunk") or None
            if chunk is not None and tree.get("micro_batch_size") not in (None, chunk):
                raise ValueError(
                    f"grad_cache_chunk={chunk} (the former name of micro_batch_size) and micro_batch_size="
                    f"{tree['micro_batch_size']} disagree; keep micro_batch_size"
                )
            if chunk is not None:
                tree["micro_batch_size"] = chunk
        return tree


class CheckpointConfig(Section):
    """A DeepSpeed checkpoint every ``every_steps`` steps, at the end and on SIGUSR2/SIGTERM; the last
    ``keep_last`` are kept."""

    every_steps: int = Field(default=50, ge=1)
    keep_last: int = Field(default=2, ge=1)


class DistributedConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class DebugConfig(Section):
    """Fault injection for tests: every rank sends itself SIGKILL right after the optimizer update of step
    ``sigkill_after_step`` (before that step's checkpoint, if any), like a node lost mid-run."""

    sigkill_after_step: int | None = None


class PretrainConfig(Section):
    output_dir: str = "outputs/pretrain"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    deepspeed: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="before")
    @classmethod
    def _model_file_schema(cls, tree: Any) -> Any:
        """A top-level ``schema`` (as in configs/model/*.yaml, which a pretraining config may ``include:``) is
        the data schema; it must not contradict an explicit ``data.schema``."""
        return lift_model_file_schema(tree)
