"""Name -> builder registry, so a config selects any model piece by name.

Builders take the data schema first (input sizes come from it, never from constants) and keyword arguments from
the config's ``kwargs``. Kinds: ``image_encoder``, ``climate_encoder``, ``regressor``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from soilnet.schema import SampleSchema

KINDS = ("image_encoder", "climate_encoder", "regressor")
_REGISTRY: dict[str, dict[str, Callable[..., nn.Module]]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown model kind {kind!r}; kinds are {KINDS}")

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice")
        _REGISTRY[kind][name] = builder
        return builder

    return add


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def build(kind: str, name: str, schema: SampleSchema, **kwargs) -> nn.Module:
    """Build the ``kind`` registered as ``name``; an unknown name lists the known ones."""
    try:
        builder = _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; known: {names(kind)}") from None
    return builder(schema, **kwargs)
