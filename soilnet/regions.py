"""The one reader of a region file (``soilnet sample``, ``sampling.region`` of ``soilnet pack``, ``predict-map``).

A region is the area of the polygons of one vector layer: GeoJSON, GeoPackage, Shapefile or any other format GDAL
reads (through pyogrio). The layer's CRS is honoured: the polygons are reprojected to lon/lat degrees on WGS84
(EPSG:4326, longitude first). GeoJSON without a ``crs`` member is WGS84 (RFC 7946); any other layer without a CRS
is an error, as are a missing or unreadable file, a file of several spatial layers, and a region with no area.
Every error names the file and is a :class:`RegionError` (a ``ConfigError``), which ``soilnet`` prints as one line.

It lives in the foundation layer because preprocessing (``shards``) and the jobs both read regions, and neither
should import the training stack to do so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import shapely
from pyogrio.errors import DataLayerError, DataSourceError
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from soilnet.config.base import ConfigError

LONLAT = CRS.from_epsg(4326)
SEGMENTS = 256  # vertices added along the longest edge before reprojecting, so straight edges bend as they should


class RegionError(ConfigError):
    """A region file that cannot be used; the message names the file."""


def _layer(path: Path) -> str | None:
    """The one spatial layer of ``path`` (None: the driver's only layer)."""
    try:
        layers = pyogrio.list_layers(path)
    except (DataSourceError, DataLayerError) as err:
        raise RegionError(f"{path}: not a readable vector file (GeoJSON, GeoPackage, Shapefile): {err}") from None
    spatial = [str(name) for name, kind in layers if kind is not None]
    if len(spatial) > 1:
        raise RegionError(f"{path}: {len(spatial)} spatial layers ({', '.join(spatial)}); a region file holds one")
    return spatial[0] if spatial else None


def _read(path: Path) -> tuple[np.ndarray, CRS]:
    """The layer's geometries (shapely, None for a feature without one) and its CRS."""
    layer = _layer(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Measured (M) geometry types are not supported"
            meta, _, wkb, _ = pyogrio.raw.read(path, layer=layer, read_geometry=True, columns=[])
    except (DataSourceError, DataLayerError) as err:
        raise RegionError(f"{path}: not a readable vector file (GeoJSON, GeoPackage, Shapefile): {err}") from None
    if meta["crs"] is None:
        raise RegionError(f"{path}: the layer has no CRS (a Shapefile needs its .prj; ogr2ogr -a_srs sets one)")
    try:
        crs = CRS.from_user_input(meta["crs"])
    except CRSError as err:
        raise RegionError(f"{path}: the layer's CRS is not understood ({err})") from None
    return shapely.from_wkb(wkb), crs


def _to_lonlat(geom: shapely.Geometry, crs: CRS) -> shapely.Geometry:
    """``geom`` (in ``crs``) in lon/lat degrees, its edges densified first so that they follow the projection."""
    if crs.equals(LONLAT, ignore_axis_order=True):
        return geom
    minx, miny, maxx, maxy = geom.bounds
    dense = shapely.segmentize(geom, max(maxx - minx, maxy - miny) / SEGMENTS)
    transformer = Transformer.from_crs(crs, LONLAT, always_xy=True)
    return shapely.transform(dense, transformer.transform, interleaved=False)


def region_polygons(path: str | Path) -> list[shapely.Polygon]:
    """The region's polygons in lon/lat degrees: multipolygons split, overlaps united, each prepared for queries."""
    path = Path(path)
    if not path.is_file():
        raise RegionError(f"region file not found: {path}")
    geometries, crs = _read(path)
    polygons = []
    for i, geom in enumerate(geometries):
        kind = None if geom is None else geom.geom_type
        if kind not in ("Polygon", "MultiPolygon"):
            continue
        if shapely.make_valid(geom).area == 0:
            raise RegionError(f"{path}: feature {i} is a {kind} with no area")
        polygons.append(shapely.make_valid(_to_lonlat(geom, crs)))
    if not polygons:
        what = "no features" if len(geometries) == 0 else "no Polygon or MultiPolygon geometry"
        raise RegionError(f"{path}: {what} (a region needs an area)")
    union = shapely.union_all(polygons)
    parts = [p for p in shapely.get_parts(union) if p.geom_type == "Polygon" and p.area > 0]
    for p in parts:
        shapely.prepare(p)
    return parts


def read_region(path: str | Path) -> shapely.Geometry:
    """The union of the region's polygons, in lon/lat degrees (WGS84)."""
    return shapely.union_all(region_polygons(path))
