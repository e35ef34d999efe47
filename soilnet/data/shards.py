"""A pretraining shard set: the manifest, validated against the run's schema, and its sample addressing.

Every sample has a global id ``g`` in ``[0, samples)``: the shards in manifest order, the samples of a shard in
tar order. ``locate(g)`` gives (shard, position in shard); :mod:`soilnet.data.tarindex` reads it by offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soilnet.config.schema import SchemaConfig
from soilnet.data.manifest import (
    DataError,
    all_finite,
    manifest_path,
    read_manifest,
    required_statistics,
    select_schema,
)
from soilnet.schema import SampleSchema, SchemaError


@dataclass(frozen=True)
class ShardSet:
    """The shards of one manifest and how the run reads them.

    ``available``: what the shards hold; ``schema``: the run's subset (by name). ``image_mean``/``image_std``:
    (C,) float32 of the run's channels; ``climate_mean``/``climate_std``: (F,) float32 of its variables, in the
    units of the shard members (reflectance unitless, elevation m, ...; climate in physical units).
    ``image_finite``: the manifest's statistics count every pixel of the run's channels as finite, so the loader
    need not look for NaN or infinity in the images.
    """

    manifest_file: Path
    urls: tuple[str, ...]
    counts: np.ndarray  # (S,) int64 samples per shard
    starts: np.ndarray  # (S,) int64 global id of each shard's first sample
    available: SampleSchema
    schema: SampleSchema
    image_encoding: dict
    image_mean: np.ndarray
    image_std: np.ndarray
    climate_mean: np.ndarray
    climate_std: np.ndarray
    channel_index: tuple[int, ...]
    variable_index: tuple[int, ...]
    month_index: tuple[int, ...]
    image_finite: bool = False

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def locate(self, gid):
        """(shard number, position in that shard) of global sample id ``gid``: ints, or (k,) int64 arrays for
        (k,) ids."""
        s = np.searchsorted(self.starts, gid, side="right") - 1
        return s, gid - self.starts[s]


def open_shards(shards: str | Path, requested: SchemaConfig) -> ShardSet:
    """Read and check the manifest of ``shards`` (a folder or its manifest.json) for a run using ``requested``.

    Errors name the manifest and what does not match: a missing manifest or shard file, an empty shard list,
    channels, variables or months the shards lack, a missing modality or statistic.
    """
    if not str(shards).strip():
        raise DataError("data.shards is empty: set it to a shard folder or its manifest.json")
    mpath = manifest_path(shards)
    try:
        manifest, folder = read_manifest(shards)
    except ValueError as err:
        raise DataError(str(err)) from err
    entries = manifest.get("shards") or []
    if not entries:
        raise DataError(f"{mpath}: the shard list is empty; nothing to pretrain on (pack shards first)")
    have = set(manifest.get("modalities", ["image", "climate"]))
    if not {"image", "climate"} <= have:
        raise DataError(f"{mpath}: pretraining needs image and climate; the shards have {sorted(have)}")
    available = SampleSchema.from_dict(manifest["schema"])
    try:
        schema = select_schema(requested, available)
    except SchemaError as err:
        raise DataError(f"{mpath}: {err}") from err
    urls = tuple(str(folder / e["name"]) for e in entries)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"{mpath} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
    counts = np.array([int(e["samples"]) for e in entries], dtype=np.int64)
    if counts.sum() <= 0:
        raise DataError(f"{mpath}: the shards hold no samples")
    im_mean, im_std = required_statistics(manifest, "image", schema.channels, mpath)
    cl_mean, cl_std = required_statistics(manifest, "climate", schema.climate_variables, mpath)
    return ShardSet(
        manifest_file=mpath,
        urls=urls,
        counts=counts,
        starts=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        available=available,
        schema=schema,
        image_encoding=dict(manifest.get("image_encoding") or {"dtype": "float16"}),
        image_mean=im_mean,
        image_std=im_std,
        climate_mean=cl_mean,
        climate_std=cl_std,
        channel_index=tuple(available.channel_indices(schema.channels)),
        variable_index=tuple(available.climate_indices(schema.climate_variables)),
        month_index=tuple(available.month_indices(schema.months)),
        image_finite=all_finite(manifest, "image", schema.channels, int(counts.sum()) * schema.patch_size**2),
    )
