"""Landsat 8 Collection 2 Level 2 as every source reads it: bands, scale and offset, the QA rule, the scene choice
and the decoding of raw DN into the schema's channels (Earth Engine and STAC serve the same product)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

from shards.sources.base import Rejected
from soilnet.schema import LANDSAT_BANDS, SampleSchema, compute_indices

SR_BANDS = tuple(LANDSAT_BANDS)
SR_SCALE, SR_OFFSET = 2.75e-5, -0.2
QA_BANDS = ("QA_PIXEL", "QA_RADSAT")
TOPOGRAPHY = ("elevation", "slope")  # the band names the DEM and its slope get in the pixel requests
# QA_PIXEL bits: 0 fill, 1 dilated cloud, 3 cloud, 4 cloud shadow, 5 snow (Landsat 8 C2 L2 product guide).
QA_NOT_CLEAR = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5)


def choose_scene(scenes: list[dict], winter_months: list[int], min_clear: float) -> tuple[dict, str]:
    """The clearest winter scene, else the lowest-NDVI scene, among those at least ``min_clear`` clear.

    ``scenes``: dicts with ``id``, ``date`` (``YYYY-MM-DD``), ``clear`` (0..1) and ``ndvi`` (may be None).
    Returns the scene and the rule that chose it (``winter`` or ``lowest_ndvi``).
    """
    if not scenes:
        raise Rejected("no_scene", "no Landsat 8 scene covers the point in the acquisition year")
    clear = [s for s in scenes if (s.get("clear") or 0.0) >= min_clear]
    if not clear:
        best = max(s.get("clear") or 0.0 for s in scenes)
        raise Rejected("cloud", f"none of {len(scenes)} scenes is {min_clear:.0%} clear (best {best:.0%})")
    winter = [s for s in clear if int(s["date"][5:7]) in winter_months]
    if winter:
        return min(winter, key=lambda s: (-s["clear"], s["date"])), "winter"
    bare = [s for s in clear if s.get("ndvi") is not None]
    if not bare:
        raise Rejected("cloud", "no clear scene has an NDVI over the footprint")
    return min(bare, key=lambda s: (s["ndvi"], s["date"])), "lowest_ndvi"


def channels_from_dn(dn: np.ndarray, clear: np.ndarray, pixels: np.ndarray, schema: SampleSchema) -> np.ndarray:
    """``(C, H, W)`` float32 in the schema's channels from ``SR_B*`` DN ``(7, H, W)``: reflectance (NaN where
    not ``clear``), the indices (:func:`soilnet.schema.compute_indices`) and the topography bands of ``pixels``."""
    reflectance = dn * SR_SCALE + SR_OFFSET
    reflectance[:, ~clear] = np.nan
    layers = {b: reflectance[k] for k, b in enumerate(SR_BANDS)}
    layers.update(compute_indices(layers, schema.channels))
    layers.update({name: pixels[name].astype(np.float32) for name in TOPOGRAPHY})
    return np.stack([layers[c] for c in schema.channels]).astype(np.float32)


def decode_pixels(
    pixels: np.ndarray, schema: SampleSchema, scene_id: str, min_clear: float
) -> tuple[np.ndarray, float]:
    """``(C, H, W)`` float32 in the schema's channels from a ``computePixels`` structured array, and the clear
    fraction; raises :class:`Rejected` (``nodata`` or ``cloud``)."""
    dn = np.stack([pixels[b] for b in SR_BANDS]).astype(np.float32)
    qa, radsat = pixels["QA_PIXEL"].astype(np.int64), pixels["QA_RADSAT"].astype(np.int64)
    covered = (dn > 0).all(axis=0)  # SR fill is 0, and computePixels returns 0 where the scene is masked
    if not covered.any():
        raise Rejected("nodata", f"scene {scene_id} has no data over the footprint")
    clear = covered & ((qa & QA_NOT_CLEAR) == 0) & (radsat == 0)
    fraction = float(clear.mean())
    if fraction < min_clear:
        raise Rejected("cloud", f"{fraction:.0%} of the patch is clear in scene {scene_id}")
    return channels_from_dn(dn, clear, pixels, schema), fraction


def winter_composite(scenes: Iterable[tuple[np.ndarray, np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Earth Engine's tile composite (``EarthEngineSource.winter_composite``) in numpy, scene by scene.

    ``scenes`` yields ``(dn, clear, winter)``: ``SR_B1..7`` DN ``(7, H, W)`` float32 on the window's grid, its
    clear pixels ``(H, W)`` bool, and whether it was acquired in a winter month. Per pixel: the median of the
    clear winter scenes' DN (``ImageCollection.median``; numpy's median, the mean of the middle two of an even
    count), else the DN of the clear scene with the lowest NDVI (``qualityMosaic`` of minus NDVI; the earlier
    scene on a tie), rounded half up to a whole DN (``round``). Returns the DN ``(7, H, W)`` float32 (0 where no
    scene is clear) and ``has`` ``(H, W)`` bool: some scene was clear there."""
    winter: list[np.ndarray] = []
    barest = bareness = None
    for dn, clear, in_winter in scenes:
        if barest is None or bareness is None:
            barest, bareness = np.zeros_like(dn), np.full(clear.shape, -np.inf, dtype=np.float32)
        reflectance = {b: dn[SR_BANDS.index(b)] * SR_SCALE + SR_OFFSET for b in ("SR_B4", "SR_B5")}
        bare = -compute_indices(reflectance, ("NDVI",))["NDVI"]
        better = clear & (bare > bareness)
        barest[:, better], bareness[better] = dn[:, better], bare[better]
        if in_winter:
            winter.append(np.where(clear, dn, np.nan))
    if barest is None or bareness is None:
        raise ValueError("winter_composite: no scene")
    out, has = barest, np.isfinite(bareness)
    if winter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no clear winter scene there
            median = np.nanmedian(np.stack(winter), axis=0)
        out = np.where(np.isnan(median), out, median)
        has |= ~np.isnan(median[0])
    return np.floor(out + 0.5).astype(np.float32), has
