"""Config of ``soilnet finetune`` and ``soilnet evaluate``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from soilnet.config.base import Section
from soilnet.config.model import ModelConfig
from soilnet.config.schema import SchemaConfig


class FinetuneDataConfig(Section):
    shards: str = "outputs/labelled"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    target: str = "soc"


class FinetuneTrainConfig(Section):
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


class FinetuneConfig(Section):
    output_dir: str = "outputs/finetune"
    pretrained: str | None = None
    modalities: Literal["image", "climate", "both"] = "both"
    data: FinetuneDataConfig = FinetuneDataConfig()
    model: ModelConfig = ModelConfig()
    train: FinetuneTrainConfig = FinetuneTrainConfig()


class EvaluateConfig(FinetuneConfig):
    """Evaluation reads the same tree as fine-tuning, so a run's resolved config re-evaluates it."""
