"""A STAC API through pystac-client: checked once at start, searched once per group of nearby points.

Points are grouped by a ``group_deg`` x ``group_deg`` cell of longitude and latitude; the first point of a cell
searches the cell (its bounding box, widened by ``MARGIN_DEG`` so a footprint that crosses the cell's edge still
finds its items) and every later point of the cell filters that result by its own location. Results are kept as
compact :class:`Scene` records, ``CACHE_GROUPS`` cells at most (least recently used dropped). HTTP 429 and 5xx
from the API are retried by the client's urllib3 ``Retry`` with exponential backoff.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pystac_client
import shapely
import shapely.geometry
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from shards.sources.transport import RETRY_CODES, HostLimit, SharedCache, redact
from soilnet.config.base import ConfigError

MARGIN_DEG = 0.1  # > half a 64 x 30 m footprint (0.96 km) in longitude up to 80 degrees of latitude
CACHE_GROUPS = 2048


class AssetMissing(LookupError):
    """An item without an asset key the config names."""


@dataclass(frozen=True)
class Scene:
    """One STAC item: ``id``, ``date`` (``YYYY-MM-DD``), its footprint (lon/lat), properties, asset hrefs."""

    id: str
    date: str
    geometry: shapely.Geometry
    platform: str | None
    cloud_cover: float | None
    hrefs: dict[str, str]

    def href(self, key: str, setting: str) -> str:
        """The unsigned href of asset ``key``; :class:`AssetMissing` naming the key, the item and ``setting``."""
        if key not in self.hrefs:
            raise AssetMissing(f"item {self.id} has no asset {key!r} ({setting}); its assets are {sorted(self.hrefs)}")
        return self.hrefs[key]


def scene_of(item) -> Scene:
    """A pystac ``Item`` as a :class:`Scene`."""
    when = item.datetime or item.common_metadata.start_datetime
    return Scene(
        id=item.id,
        date=when.strftime("%Y-%m-%d"),
        geometry=shapely.geometry.shape(item.geometry),
        platform=item.properties.get("platform"),
        cloud_cover=item.properties.get("eo:cloud_cover"),
        hrefs={key: asset.href for key, asset in item.assets.items()},
    )


def cell_of(lon: float, lat: float, group_deg: float) -> tuple[int, int]:
    return math.floor(lon / group_deg), math.floor(lat / group_deg)


class Catalogue:
    """The API at ``url``; ``collections`` are checked to exist before any point is read."""

    def __init__(
        self, url: str, collections: Iterable[str], limit: HostLimit, max_retries: int, delay_s: float, timeout_s: float
    ):
        self.url = url
        self.limit = limit
        retry = Retry(
            total=max_retries,
            backoff_factor=delay_s,
            status_forcelist=RETRY_CODES,
            allowed_methods=None,  # the search is a POST; retrying it is safe (it only reads)
            raise_on_status=False,
        )
        collections = list(collections)
        try:
            self.client = pystac_client.Client.open(url, stac_io=StacApiIO(timeout=timeout_s, max_retries=retry))
        except Exception as err:
            raise ConfigError(
                f"source.stac: cannot reach the STAC API {redact(url)} (collection {collections[0]!r}): {_why(err)}"
            ) from None
        for collection in collections:
            try:
                found = self.client.get_collection(collection)  # pystac-client answers None for a 404
                why = "" if found is not None else "not found"
            except Exception as err:
                why = _why(err)
            if why:
                raise ConfigError(f"source.stac: the STAC API {redact(url)} has no collection {collection!r}: {why}")
        self._groups = SharedCache(limit.turn, max_items=CACHE_GROUPS)

    def search(self, collection: str, bbox: tuple[float, float, float, float], year: int, max_cloud: float):
        """Every item of ``collection`` in ``bbox`` during ``year`` with ``eo:cloud_cover <= max_cloud``."""
        query = {"eo:cloud_cover": {"lte": max_cloud}} if max_cloud < 100 else None
        when = f"{year}-01-01T00:00:00Z/{year}-12-31T23:59:59Z" if year else None
        with self.limit.slot(self.url):
            found = self.client.search(collections=[collection], bbox=list(bbox), query=query, datetime=when, limit=500)
            items = list(found.items())
        return [scene_of(item) for item in items]

    def group(self, collection: str, lon: float, lat: float, group_deg: float, year: int, max_cloud: float):
        """The scenes of the point's cell (searched once per cell; threads of one cell wait for that search)."""
        key = (collection, *cell_of(lon, lat, group_deg))
        west, south = key[1] * group_deg - MARGIN_DEG, key[2] * group_deg - MARGIN_DEG
        size = group_deg + 2 * MARGIN_DEG
        bbox = (west, south, west + size, south + size)
        return self._groups.get(key, lambda: self.search(collection, bbox, year, max_cloud))


def _why(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {redact(text)[:300]}"
