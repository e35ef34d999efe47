"""Typed configs: the loader (:mod:`.base`) and one module per job's config tree."""

from soilnet.config.base import ConfigError, Section, load_config, save_resolved, to_plain
from soilnet.config.schema import SchemaConfig

__all__ = ["ConfigError", "SchemaConfig", "Section", "load_config", "save_resolved", "to_plain"]
