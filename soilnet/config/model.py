"""Config of a model: encoders and heads chosen by registry name, with their keyword arguments."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from soilnet.config.base import Section
from soilnet.config.schema import SchemaConfig


class ComponentConfig(Section):
    """A registry entry by ``name`` plus keyword arguments for its builder."""

    name: str
    kwargs: dict[str, Any] = {}


class ModelConfig(Section):
    """The pieces of a SoilNet model; channel and sequence sizes come from the data schema, not from here."""

    image_encoder: ComponentConfig | None = ComponentConfig(name="tiny_cnn", kwargs={"out": 64})
    climate_encoder: ComponentConfig | None = ComponentConfig(name="tiny_gru", kwargs={"out": 64})
    projection_dim: int | None = 32
    regressor: ComponentConfig = ComponentConfig(name="regressor_v1")


class ModelSummaryConfig(Section):
    """``soilnet model-summary``: a model and the data schema that sizes its inputs."""

    model: ModelConfig = ModelConfig()
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
