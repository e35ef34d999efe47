"""The one interface every acquisition backend implements (Earth Engine, local rasters, the synthetic world)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from soilnet.schema import SampleSchema


class Rejected(Exception):
    """A point that cannot give a valid sample (``reason``: e.g. ``cloud``, ``nodata``, ``no_scene``,
    ``outside``); it is recorded in the ledger, not retried."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Patch:
    """image: ``(C, H, W)`` float32 in the schema's channel order and units; ``scene_date`` ``YYYY-MM-DD``."""

    image: np.ndarray
    scene_date: str | None = None
    qa: dict = field(default_factory=dict)


class Source(Protocol):
    """``patch(lon, lat)`` -> the schema's channels; ``climate(lon, lat)`` -> ``(T, F)`` float32 months x variables
    in the schema's units. Both raise :class:`Rejected` for a point without valid data."""

    name: str
    schema: SampleSchema

    def patch(self, lon: float, lat: float) -> Patch: ...

    def climate(self, lon: float, lat: float) -> np.ndarray: ...

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        """Ground truth at the point, if the source knows it (the synthetic world does); else ``{}``."""
        ...

    def versions(self) -> dict[str, str]: ...


class TileSource(Source, Protocol):
    """A source that also serves the map's tile path (:mod:`soilnet.evaluate.tiles`): ``read_window`` gives the
    schema's channels ``(C, H, W)`` float32 on a north-up window in any CRS (``transform``: its affine in metres)
    and a valid mask ``(H, W)``; ``climate_many`` the ``(N, T, F)`` climate of ``N`` points with one read per
    variable and an ok mask ``(N,)``. The local rasters, the synthetic world and Earth Engine implement it (Earth
    Engine with one ``computePixels`` of a cloud-masked winter composite on the window's grid, and one climate
    request for all the points: :mod:`shards.sources.earthengine`)."""

    def read_window(self, crs, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]: ...

    def climate_many(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
