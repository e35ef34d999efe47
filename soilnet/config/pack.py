"""Config of ``soilnet pack``: where points come from, which source acquires them, and how shards are cut."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from soilnet.config.base import Section
from soilnet.config.schema import SchemaConfig


class SamplingConfig(Section):
    """Random locations inside ``region`` (a GeoJSON file), or a ready point list in ``points``."""

    region: str | None = None
    points: str | None = None
    n: int = 1000
    seed: int = 0


class SourceConfig(Section):
    """Which acquisition backend fills a sample: ``synthetic``, ``rasters`` or ``earthengine``."""

    kind: Literal["synthetic", "rasters", "earthengine"] = "synthetic"
    seed: int = 0


class ShardConfig(Section):
    max_samples: int = 1000
    image_dtype: Literal["float16", "int16"] = "float16"


class PackConfig(Section):
    output_dir: str = "outputs/shards"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    sampling: SamplingConfig = SamplingConfig()
    source: SourceConfig = SourceConfig()
    shard: ShardConfig = ShardConfig()
