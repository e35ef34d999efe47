"""Config of ``soilnet pretrain``: data, model, loss, optimisation, checkpoints and DeepSpeed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from soilnet.config.base import Section
from soilnet.config.model import ModelConfig
from soilnet.config.schema import SchemaConfig


class DataConfig(Section):
    """``shards`` is a shard folder or its ``manifest.json``; ``schema`` picks channels and variables by name."""

    shards: str = "outputs/shards"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    num_workers: int = 0
    augment: bool = True
    seed: int = 0


class LossConfig(Section):
    temperature: float = 0.5


class TrainConfig(Section):
    steps: int = 100
    global_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0


class CheckpointConfig(Section):
    every_steps: int = 50
    keep_last: int = 2


class DistributedConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class PretrainConfig(Section):
    output_dir: str = "outputs/pretrain"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    deepspeed: dict[str, Any] = {"zero_optimization": {"stage": 0}}
