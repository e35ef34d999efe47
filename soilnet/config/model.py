"""Config of a model: encoders and heads chosen by registry name, with their keyword arguments."""

from __future__ import annotations

from typing import Any

from soilnet.config.base import Section


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


def lift_model_file_schema(tree: Any) -> Any:
    """A config tree with a top-level ``schema`` (as in configs/model/*.yaml, which job configs may
    ``include:``) moved to ``data.schema``; it must not contradict an explicit ``data.schema``."""
    if not (isinstance(tree, dict) and "schema" in tree):
        return tree
    tree = dict(tree)
    top = tree.pop("schema")
    data = dict(tree.get("data") or {})
    if "schema" in data and data["schema"] != top:
        raise ValueError(f"'schema' ({top}) and 'data.schema' ({data['schema']}) disagree; keep one")
    data["schema"] = top
    tree["data"] = data
    return tree
