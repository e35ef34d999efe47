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
import webdataset as wds

from soilnet import schema as S
from soilnet.config.finetune import FinetuneDataConfig, GroundTruthConfig
from soilnet.data.manifest import DataError, manifest_path, read_manifest, select_schema, statistics


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
    schema: S.SampleSchema
    target: str
    image_mean: np.ndarray | None = None  # (C,) from the manifest statistics
    image_std: np.ndarray | None = None
    climate_mean: np.ndarray | None = None  # (F,)
    climate_std: np.ndarray | None = None
    counts: dict = field(default_factory=dict)
    missing_ids: list[str] = field(default_factory=list)
    coordinates: str = "samples"  # where lon/lat came from; "none": the data set has none (manifest import)
    # which statistics image_mean..climate_std are: "used" ("data" here; "pretrained" once
    # soilnet.train.finetune.choose_normalisation has put an export's in), and where each modality's came from
    normalisation: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def unit(self) -> str:
        t = S.TARGETS_BY_NAME.get(self.target)
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


def _decode_image(raw: np.ndarray, encoding: dict) -> np.ndarray:
    if encoding.get("dtype") == "int16":
        return raw.astype(np.float32) * float(encoding.get("scale", 1.0)) + float(encoding.get("offset", 0.0))
    return raw


def _finite(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def load_labelled(
    data_cfg: FinetuneDataConfig, modalities: tuple[str, ...], out_dir: Path | None = None
) -> LabelledData:
    """Read every sample of ``data_cfg.shards`` that has a usable target.

    Missing, NaN and negative targets are dropped and counted in ``counts``. With ``data_cfg.ground_truth``, the
    targets come from that CSV by point ID; its IDs that no shard holds are counted and, with ``out_dir``,
    written to ``out_dir/ground_truth_ids_not_in_shards.txt``.
    """
    manifest, folder = read_manifest(data_cfg.shards)
    mpath = manifest_path(data_cfg.shards)
    available = S.SampleSchema.from_dict(manifest["schema"])
    schema = select_schema(data_cfg.schema_, available)
    have = set(manifest.get("modalities", ["image", "climate"]))
    lacking = [m for m in modalities if m not in have]
    if lacking:
        raise DataError(f"{mpath}: the shards have modalities {sorted(have)}, the run needs {list(modalities)}")

    gt = read_ground_truth(data_cfg.ground_truth) if data_cfg.ground_truth else None
    gt_by_id = None
    if gt is not None:
        dup = gt["id"][gt["id"].duplicated()].unique()
        gt = gt.drop_duplicates("id", keep="first")
        gt_by_id = gt.set_index("id")
    else:
        dup = []
        targets = manifest.get("targets")
        if targets is not None and data_cfg.target not in targets:
            raise DataError(
                f"{mpath}: target '{data_cfg.target}' not in the shards; the targets are {list(targets)} "
                "(set data.target, or data.ground_truth for a CSV)"
            )

    ch_idx = available.channel_indices(schema.channels) if "image" in modalities else None
    var_idx = available.climate_indices(schema.climate_variables) if "climate" in modalities else None
    month_idx = available.month_indices(schema.months) if "climate" in modalities else None
    encoding = manifest.get("image_encoding", {"dtype": "float16"})

    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    for u in urls:
        if not Path(u).is_file():
            raise FileNotFoundError(f"{mpath} lists {u}, which does not exist")
    counts = {"samples_in_shards": 0, "missing": 0, "nan": 0, "negative": 0, "no_ground_truth": 0}
    seen_targets: set[str] = set()
    ids, lons, lats, images, climates, ys = [], [], [], [], [], []
    all_keys: set[str] = set()
    # every process reads every shard: data-parallel fine-tuning keeps the whole labelled set on each rank
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None).decode()
    for sample in dataset:
        counts["samples_in_shards"] += 1
        key = sample["__key__"]
        all_keys.add(key)
        where = f"sample '{key}' in {sample.get('__url__', folder)}"
        meta = sample.get("meta.json") or {}
        lon, lat = _finite(meta.get("lon")), _finite(meta.get("lat"))
        if gt_by_id is not None:
            if key not in gt_by_id.index:
                counts["no_ground_truth"] += 1
                continue
            row = gt_by_id.loc[key]
            y = float(row["target"])
            if "lon" in gt_by_id.columns and not math.isfinite(lon):
                lon, lat = float(row["lon"]), float(row["lat"])
        else:
            tmap = meta.get("targets") or {}
            seen_targets.update(tmap)
            if data_cfg.target not in tmap or tmap[data_cfg.target] is None:
                counts["missing"] += 1
                continue
            y = _finite(tmap[data_cfg.target])
        if math.isnan(y):
            counts["nan" if gt_by_id is None or not pd.isna(y) else "missing"] += 1
            continue
        if y < 0 or not math.isfinite(y):
            counts["negative" if y < 0 else "nan"] += 1
            continue
        if ch_idx is not None:
            if "image.npy" not in sample:
                raise DataError(f"{where}: no image.npy, but the manifest lists the image modality")
            img = _decode_image(sample["image.npy"], encoding)
            available.check_image(img, where)
            images.append(np.asarray(img[ch_idx], dtype=np.float16))
        if var_idx is not None:
            if "climate.npy" not in sample:
                raise DataError(f"{where}: no climate.npy, but the manifest lists the climate modality")
            clim = np.asarray(sample["climate.npy"], dtype=np.float32)
            available.check_climate(clim, where)
            climates.append(clim[np.ix_(month_idx, var_idx)])
        ids.append(key)
        lons.append(lon)
        lats.append(lat)
        ys.append(y)

    if gt_by_id is None and counts["samples_in_shards"] and counts["missing"] == counts["samples_in_shards"]:
        raise DataError(
            f"{mpath}: no sample has target '{data_cfg.target}'; the samples' targets are {sorted(seen_targets)}"
        )
    missing_ids: list[str] = []
    if gt is not None:
        missing_ids = sorted(set(gt["id"]) - all_keys)
        counts["ground_truth_ids_not_in_shards"] = len(missing_ids)
        counts["ground_truth_duplicate_ids"] = len(dup)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_lines(out_dir / "ground_truth_ids_not_in_shards.txt", missing_ids)
    if not ys:
        raise DataError(f"{mpath}: no usable labelled samples (counts: {counts})")
    counts["labelled"] = len(ys)
    counts["dropped"] = counts["missing"] + counts["nan"] + counts["negative"]

    im_stats = statistics(manifest, "image", schema.channels, mpath) if ch_idx is not None else None
    cl_stats = statistics(manifest, "climate", schema.climate_variables, mpath) if var_idx is not None else None
    image = np.stack(images) if ch_idx is not None else None
    climate = np.stack(climates) if var_idx is not None else None
    normalisation = {"used": "data"}
    for kind, stats, arr in (("image", im_stats, image), ("climate", cl_stats, climate)):
        if arr is not None:
            normalisation[kind] = f"{mpath} stats" if stats is not None else f"computed from {len(ys)} labelled samples"
    if im_stats is None and image is not None:
        flat = image.astype(np.float32).transpose(1, 0, 2, 3).reshape(image.shape[1], -1)
        im_stats = (np.nanmean(flat, axis=1), np.maximum(np.nanstd(flat, axis=1), 1e-6))
    if cl_stats is None and climate is not None:
        flat = climate.reshape(-1, climate.shape[2])
        cl_stats = (np.nan_to_num(np.nanmean(flat, axis=0)), np.maximum(np.nan_to_num(np.nanstd(flat, axis=0)), 1e-6))
    lon_a, lat_a = np.array(lons, dtype=np.float64), np.array(lats, dtype=np.float64)
    if not data_cfg.use_coordinates:
        lon_a[:], lat_a[:] = np.nan, np.nan
    return LabelledData(
        ids=np.array(ids),
        lon=lon_a,
        lat=lat_a,
        image=image,
        climate=climate,
        y=np.array(ys, dtype=np.float64),
        schema=schema,
        target=data_cfg.target,
        image_mean=None if im_stats is None else im_stats[0],
        image_std=None if im_stats is None else im_stats[1],
        climate_mean=None if cl_stats is None else cl_stats[0],
        climate_std=None if cl_stats is None else cl_stats[1],
        counts=counts,
        missing_ids=missing_ids,
        coordinates=manifest.get("import", {}).get("coordinates", "samples"),
        normalisation=normalisation,
    )


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{x}\n" for x in lines))
    tmp.replace(path)
