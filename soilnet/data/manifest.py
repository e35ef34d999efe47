"""A shard folder's ``manifest.json``: finding and reading it, the schema a run takes from it, and its statistics.

Pretraining (:mod:`soilnet.data.shards`) and labelled reading (:mod:`soilnet.data.labelled`) both start here, so
both report the same errors, naming the manifest and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from soilnet.config.base import ConfigError
from soilnet.config.schema import SchemaConfig
from soilnet.schema import SampleSchema, SchemaError, month_range


class DataError(ConfigError):
    """Shards or labelled data that cannot be used; the message names the file, key, shard or sample.

    A :class:`ConfigError` (so a ``ValueError``), so ``soilnet`` reports it as one line instead of a traceback."""


def manifest_path(shards: str | Path) -> Path:
    """``shards`` may be the folder or its manifest.json."""
    p = Path(shards)
    p = p / "manifest.json" if p.is_dir() or p.suffix != ".json" else p
    if not p.is_file():
        raise FileNotFoundError(f"shard manifest not found: {p} (pack or import labelled shards first)")
    return p


def read_manifest(shards: str | Path) -> tuple[dict, Path]:
    """The manifest dict and the folder that holds its shards."""
    path = manifest_path(shards)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    for key in ("schema", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: missing key '{key}' (see docs/data-format.md)")
    return manifest, path.parent


def select_schema(requested: SchemaConfig, available: SampleSchema) -> SampleSchema:
    """The schema a run uses: what ``requested`` names, defaulting to everything the data holds.

    Fields the config leaves unset follow the data; names the data lacks are an error naming them.
    """
    given = requested.model_fields_set
    channels = tuple(requested.channels) if requested.channels is not None else available.channels
    variables = (
        tuple(requested.climate_variables) if requested.climate_variables is not None else available.climate_variables
    )
    if "first_month" in given or "last_month" in given:
        months = month_range(requested.first_month, requested.last_month)
    else:
        months = available.months
    chosen = SampleSchema(
        channels=channels,
        climate_variables=variables,
        months=months,
        patch_size=requested.patch_size if "patch_size" in given else available.patch_size,
        pixel_size_m=requested.pixel_size_m if "pixel_size_m" in given else available.pixel_size_m,
    )
    if not chosen.subset_of(available):
        raise SchemaError(
            "the requested schema is not available in the shards: " + "; ".join(chosen.differences(available))
        )
    return chosen


def statistics(manifest: dict, kind: str, names: tuple[str, ...], where: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)``, each ``(len(names),)`` float32, of ``stats.<kind>`` (``image`` or ``climate``) in the units
    of the shard members; a zero or non-finite std becomes 1. None when the manifest has no such table; a table
    that lacks one of ``names`` is a :class:`DataError` naming them."""
    table = (manifest.get("stats") or {}).get(kind)
    if not table:
        return None
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{where}: stats.{kind} lacks {missing}")
    mean = np.array([table[n]["mean"] for n in names], dtype=np.float32)
    std = np.array([table[n]["std"] for n in names], dtype=np.float32)
    return mean, np.where(np.isfinite(std) & (std > 0), std, 1.0).astype(np.float32)


def required_statistics(
    manifest: dict, kind: str, names: tuple[str, ...], where: Path
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`statistics`, for a run that normalises with them: a missing table is a :class:`DataError`."""
    found = statistics(manifest, kind, names, where)
    if found is None:
        raise DataError(f"{where}: no stats.{kind}; pretraining normalises with the manifest's statistics")
    return found


def all_finite(manifest: dict, kind: str, names: tuple[str, ...], values: int) -> bool:
    """Whether stats.<kind> counts ``values`` finite values (statistics count finite values only) for each name."""
    table = manifest["stats"][kind]
    return all(int(table[n].get("count", -1)) == values for n in names)
