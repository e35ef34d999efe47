"""Labelled samples in memory: read every sample of a labelled shard folder through WebDataset into arrays.

Fine-tuning sets are small (thousands of points), so holding them as arrays is simplest and lets every fold,
the baseline and the conformal calibration index the same rows. Images stay float16 in memory (the shard's own
precision) and are normalised per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from soilnet.config.finetune import FinetuneDataConfig, GroundTruthConfig
from soilnet.data.decode import decode_image, read_samples
from soilnet.data.manifest import DataError, manifest_path, read_manifest, select_schema, statistics
from soilnet.schema import TARGETS_BY_NAME, SampleSchema


@dataclass
class LabelledData:
    """Every usable labelled point.

    ids: ``(N,)`` str. lon, lat: ``(N,)`` float64 degrees (NaN when unknown).
    image: ``(N, C, H, W)`` float16 in schema units, or None. climate: ``(N, T, F)`` float32 in physical units,
    NaN = missing month, or None. y: ``(N,)`` float64 target in its original unit.
    """

    ids: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    image: np.ndarray | None
    climate: np.ndarray | None
    y: np.ndarray
    schema: SampleSchema
    target: str
    image_mean: np.ndarray | None = None  # (C,) from the manifest statistics
    image_std: np.ndarray | None = None
    climate_mean: np.ndarray | None = None  # (F,)
    climate_std: np.ndarray | None = None
    counts: dict = field(default_factory=dict)
    missing_ids: list[str] = field(default_factory=list)
    coordinates: str = "samples"  # where lon/lat came from; "none": the data set has none (manifest import)
    # which statistics image_mean..climate_std are: "used" ("data" here; "pretrained" once
    # soilnet.train.regressor.choose_normalisation has put an export's in), and where each modality's came from
    normalisation: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def unit(self) -> str:
        t = TARGETS_BY_NAME.get(self.target)
        return t.unit if t else ""


def read_ground_truth(gt: GroundTruthConfig) -> pd.DataFrame:
    """Columns ``id`` (str), ``target`` (float, NaN where unparsable) and optional ``lon``/``lat``."""
    path = Path(gt.path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth CSV not found: {path}")
    table = pd.read_csv(path, encoding=gt.encoding, dtype={gt.id_column: str}, low_memory=False)
    wanted = {"id": gt.id_column, "target": gt.target_column, "lon": gt.lon_column, "lat": gt.lat_column}
    for role, col in wanted.items():
        if col is not None and col not in table.columns:
            raise DataError(f"{path}: {role} column '{col}' not found; the columns are {list(table.columns)}")
    out = pd.DataFrame({"id": table[gt.id_column].astype(str).str.strip()})
    out["target"] = pd.to_numeric(table[gt.target_column], errors="coerce")
    for role in ("lon", "lat"):
        if wanted[role] is not None:
            out[role] = pd.to_numeric(table[wanted[role]], errors="coerce")
    return out


MISSING_IDS_FILE = "ground_truth_ids_not_in_shards.txt"


def _finite(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


@dataclass
class Source:
    """The shards to read and what to take from each sample: the manifest, the run's schema (a selection of the
    shards' ``available`` one) and the indices of its channels, climate variables and months (None: modality
    not used)."""

    manifest: dict
    mpath: Path
    folder: Path
    urls: list[str]
    available: SampleSchema
    schema: SampleSchema
    encoding: dict
    ch_idx: list[int] | None
    var_idx: list[int] | None
    month_idx: list[int] | None


def open_source(data_cfg: FinetuneDataConfig, modalities: tuple[str, ...]) -> Source:
    """Read the manifest and check that the shards hold the run's modalities and exist."""
    manifest, folder = read_manifest(data_cfg.shards)
    mpath = manifest_path(data_cfg.shards)
    available = SampleSchema.from_dict(manifest["schema"])
    schema = select_schema(data_cfg.schema_, available)
    have = set(manifest.get("modalities", ["image", "climate"]))
    lacking = [m for m in modalities if m not in have]
    if lacking:
        raise DataError(f"{mpath}: the shards have modalities {sorted(have)}, the run needs {list(modalities)}")
    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    for u in urls:
        if not Path(u).is_file():
            raise FileNotFoundError(f"{mpath} lists {u}, which does not exist")
    climate = "climate" in modalities
    return Source(
        manifest,
        mpath,
        folder,
        urls,
        available,
        schema,
        manifest.get("image_encoding", {"dtype": "float16"}),
        available.channel_indices(schema.channels) if "image" in modalities else None,
        available.climate_indices(schema.climate_variables) if climate else None,
        available.month_indices(schema.months) if climate else None,
    )


@dataclass
class Targets:
    """Where targets come from: the ground-truth CSV by point ID (``by_id``; ``table`` its rows, ``duplicates``
    its repeated IDs) or, with ``by_id`` None, each sample's ``meta.json`` targets under ``name``."""

    name: str
    table: pd.DataFrame | None = None
    by_id: pd.DataFrame | None = None
    duplicates: np.ndarray | list = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # the target names the samples carry (without a CSV)


def choose_targets(data_cfg: FinetuneDataConfig, source: Source) -> Targets:
    """The ground-truth CSV's targets, or the shards' (an error when the manifest lists targets without it)."""
    if data_cfg.ground_truth:
        gt = read_ground_truth(data_cfg.ground_truth)
        dup = gt["id"][gt["id"].duplicated()].unique()
        gt = gt.drop_duplicates("id", keep="first")
        return Targets(data_cfg.target, gt, gt.set_index("id"), dup)
    targets = source.manifest.get("targets")
    if targets is not None and data_cfg.target not in targets:
        raise DataError(
            f"{source.mpath}: target '{data_cfg.target}' not in the shards; the targets are {list(targets)} "
            "(set data.target, or data.ground_truth for a CSV)"
        )
    return Targets(data_cfg.target)


def _target_of(sample: dict, targets: Targets, counts: dict) -> tuple[float, float, float] | None:
    """The sample's (target, lon, lat), or None (counted in ``counts``) when it has no usable target."""
    key = sample["__key__"]
    meta = sample.get("meta.json") or {}
    lon, lat = _finite(meta.get("lon")), _finite(meta.get("lat"))
    if targets.by_id is not None:
        if key not in targets.by_id.index:
            counts["no_ground_truth"] += 1
            return None
        row = targets.by_id.loc[key]
        y = float(row["target"])
        if "lon" in targets.by_id.columns and not math.isfinite(lon):
            lon, lat = float(row["lon"]), float(row["lat"])
    else:
        tmap = meta.get("targets") or {}
        targets.seen.update(tmap)
        if targets.name not in tmap or tmap[targets.name] is None:
            counts["missing"] += 1
            return None
        y = _finite(tmap[targets.name])
    if math.isnan(y):
        counts["nan" if targets.by_id is None or not pd.isna(y) else "missing"] += 1
        return None
    if y < 0 or not math.isfinite(y):
        counts["negative" if y < 0 else "nan"] += 1
        return None
    return y, lon, lat


@dataclass
class Rows:
    """The usable samples, one list entry each, and every key the shards hold."""

    ids: list[str] = field(default_factory=list)
    lons: list[float] = field(default_factory=list)
    lats: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    climates: list[np.ndarray] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    all_keys: set[str] = field(default_factory=set)


def _add_arrays(sample: dict, source: Source, rows: Rows, where: str) -> None:
    """The sample's image and climate as the run takes them (its channels; its months and variables)."""
    if source.ch_idx is not None:
        if "image.npy" not in sample:
            raise DataError(f"{where}: no image.npy, but the manifest lists the image modality")
        img = decode_image(sample["image.npy"], source.encoding)
        source.available.check_image(img, where)
        rows.images.append(np.asarray(img[source.ch_idx], dtype=np.float16))
    if source.var_idx is not None and source.month_idx is not None:
        if "climate.npy" not in sample:
            raise DataError(f"{where}: no climate.npy, but the manifest lists the climate modality")
        clim = np.asarray(sample["climate.npy"], dtype=np.float32)
        source.available.check_climate(clim, where)
        rows.climates.append(clim[np.ix_(source.month_idx, source.var_idx)])


def read_rows(source: Source, targets: Targets, counts: dict) -> Rows:
    """Every sample with a usable target; the others are counted in ``counts``."""
    rows = Rows()
    for sample in read_samples(source.urls):
        counts["samples_in_shards"] += 1
        key = sample["__key__"]
        rows.all_keys.add(key)
        got = _target_of(sample, targets, counts)
        if got is None:
            continue
        where = f"sample '{key}' in {sample.get('__url__', source.folder)}"
        _add_arrays(sample, source, rows, where)
        rows.ids.append(key)
        rows.lons.append(got[1])
        rows.lats.append(got[2])
        rows.ys.append(got[0])
    return rows


def _count_targets(source: Source, targets: Targets, rows: Rows, counts: dict) -> list[str]:
    """Check that targets were found, complete ``counts``, and return the ground-truth IDs no shard holds."""
    if targets.by_id is None and counts["samples_in_shards"] and counts["missing"] == counts["samples_in_shards"]:
        raise DataError(
            f"{source.mpath}: no sample has target '{targets.name}'; the samples' targets are {sorted(targets.seen)}"
        )
    missing_ids: list[str] = []
    if targets.table is not None:
        missing_ids = sorted(set(targets.table["id"]) - rows.all_keys)
        counts["ground_truth_ids_not_in_shards"] = len(missing_ids)
        counts["ground_truth_duplicate_ids"] = len(targets.duplicates)
    if not rows.ys:
        raise DataError(f"{source.mpath}: no usable labelled samples (counts: {counts})")
    counts["labelled"] = len(rows.ys)
    counts["dropped"] = counts["missing"] + counts["nan"] + counts["negative"]
    return missing_ids


Stats = tuple[np.ndarray, np.ndarray] | None


def _statistics(source: Source, image, climate, n: int) -> tuple[Stats, Stats, dict]:
    """Mean and std of each channel and climate variable: the manifest's, or computed from the labelled
    samples; and ``normalisation``: which they are."""
    mpath, schema, manifest = source.mpath, source.schema, source.manifest
    im_stats = statistics(manifest, "image", schema.channels, mpath) if source.ch_idx is not None else None
    cl_stats = statistics(manifest, "climate", schema.climate_variables, mpath) if source.var_idx is not None else None
    normalisation = {"used": "data"}
    for kind, stats, arr in (("image", im_stats, image), ("climate", cl_stats, climate)):
        if arr is not None:
            normalisation[kind] = f"{mpath} stats" if stats is not None else f"computed from {n} labelled samples"
    if im_stats is None and image is not None:
        flat = image.astype(np.float32).transpose(1, 0, 2, 3).reshape(image.shape[1], -1)
        im_stats = (np.nanmean(flat, axis=1), np.maximum(np.nanstd(flat, axis=1), 1e-6))
    if cl_stats is None and climate is not None:
        flat = climate.reshape(-1, climate.shape[2])
        cl_stats = (np.nan_to_num(np.nanmean(flat, axis=0)), np.maximum(np.nan_to_num(np.nanstd(flat, axis=0)), 1e-6))
    return im_stats, cl_stats, normalisation


def load_labelled(data_cfg: FinetuneDataConfig, modalities: tuple[str, ...]) -> LabelledData:
    """Read every sample of ``data_cfg.shards`` that has a usable target.

    Missing, NaN and negative targets are dropped and counted in ``counts``. With ``data_cfg.ground_truth``, the
    targets come from that CSV by point ID; its IDs that no shard holds are counted and listed in
    ``missing_ids`` (:func:`files_to_write` gives the file a job writes of them). Writes nothing.
    """
    source = open_source(data_cfg, modalities)
    targets = choose_targets(data_cfg, source)
    counts = {"samples_in_shards": 0, "missing": 0, "nan": 0, "negative": 0, "no_ground_truth": 0}
    rows = read_rows(source, targets, counts)
    missing_ids = _count_targets(source, targets, rows, counts)
    image = np.stack(rows.images) if source.ch_idx is not None else None
    climate = np.stack(rows.climates) if source.var_idx is not None else None
    im_stats, cl_stats, normalisation = _statistics(source, image, climate, len(rows.ys))
    lon_a, lat_a = np.array(rows.lons, dtype=np.float64), np.array(rows.lats, dtype=np.float64)
    if not data_cfg.use_coordinates:
        lon_a[:], lat_a[:] = np.nan, np.nan
    return LabelledData(
        ids=np.array(rows.ids),
        lon=lon_a,
        lat=lat_a,
        image=image,
        climate=climate,
        y=np.array(rows.ys, dtype=np.float64),
        schema=source.schema,
        target=data_cfg.target,
        image_mean=None if im_stats is None else im_stats[0],
        image_std=None if im_stats is None else im_stats[1],
        climate_mean=None if cl_stats is None else cl_stats[0],
        climate_std=None if cl_stats is None else cl_stats[1],
        counts=counts,
        missing_ids=missing_ids,
        coordinates=source.manifest.get("import", {}).get("coordinates", "samples"),
        normalisation=normalisation,
    )


def files_to_write(data: LabelledData) -> dict[str, str]:
    """The files reading ``data`` leaves for the job to write beside its outputs, text by file name: with a
    ground-truth CSV, :data:`MISSING_IDS_FILE` lists its IDs that no shard holds, one a line (maybe none)."""
    if "ground_truth_ids_not_in_shards" not in data.counts:
        return {}
    return {MISSING_IDS_FILE: "".join(f"{x}\n" for x in data.missing_ids)}
