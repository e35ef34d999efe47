"""``soilnet import-soilnet``: the seed's published layout (GeoTIFF patches and/or climate CSVs) packed into shards.

Inputs (the layout of moienr/SoilNet); any of the three shapes works: climate only, images only, or both.

- ``--climate``: one CSV per TerraClimate variable, named after it (``aet.csv``, ``RaCA_aet.csv``,
  ``_aet_filled.csv``): an ID column, ``YYYYMMDD`` columns in any order, and whatever else the seed's Earth Engine
  export wrote (``system:index``, the RaCA target ``SOCstock100``). Values are Earth Engine's stored integers and
  the schema's TerraClimate scale factors are applied (``--climate-units physical``: used as is). The months are
  those present in every file; the variables are those present (the manifest's schema says which).
- ``--images``: ``{PointID}_{YYMMDD}.tif`` patches (12 or 14 bands named by their band descriptions, EPSG:3857,
  about 103 px, float64). Each is warped (bilinear) onto the schema grid: ``patch_size x patch_size`` pixels of
  ``pixel_size_m`` metres in the point's local UTM zone, centred on the point. The spectral indices are recomputed
  from the reflectance bands with the schema's definitions, because older seed exports store some as ratios.
  ``YYMMDD`` becomes the scene date. With several files for one point the latest scene is used.
- ``--points``: a ground-truth CSV (UTF-8 BOM allowed) with the ID and, optionally, lon/lat and the target
  (LUCAS 2015: ``Point_ID``, ``long``, ``lat``, ``OC``). With ``--points`` the data set is its IDs, in its order.

Coordinates come from ``--points``, else from the centre of each point's image, else there are none: the
manifest's ``import.coordinates`` says which (``points``, ``images``, ``none``), and fine-tuning then refuses
spatial folds with that reason.

Targets come from ``--target-column`` in the climate CSVs or in ``--points`` (without it, a climate CSV's
``SOCstock100`` is used). A missing, NaN or negative target leaves the sample unlabelled (kept for
pretraining, counted); ``--require-target`` drops it into the ledger (``no_target``) instead.

``-999`` means "zero or missing": the seed wrote it where Earth Engine returned 0 or nothing. One variable at
``-999`` all year is a true zero almost always (snow water at a snow-free site), so it is imported as 0.0 and
counted (``qa.climate_minus999``, ``import.counts.variable_all_minus999``). A point at ``-999`` in every variable
and every month is a missing record, not a climate of 0 degC without rain: it goes to the ledger as
``climate_missing``.

Duplicated IDs keep their first row; they are listed on stderr and in ``import.duplicates``. The climate tables
are read once and stacked into one ``(N, T, F)`` array (one reindex per variable), so a climate-only import costs
no pandas lookup per point. Shards, part records, statistics, ledger and manifest are the packer's own
(:func:`shards.pack.pack_shard`): a rerun skips the shards already recorded and refuses changed arguments.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer
from scipy.ndimage import distance_transform_edt

from shards.pack import (
    PARTS,
    _atomic_json,
    acquire_in_order,
    build_sample,
    pack_shard,
    shard_points,
    write_manifest,
)
from shards.sources.base import Patch, Rejected
from shards.sources.rasters import patch_vrt, utm_crs
from soilnet import __version__
from soilnet.config.pack import PackConfig
from soilnet.progress import Progress
from soilnet.schema import (
    CHANNELS,
    CHANNELS_BY_NAME,
    CLIMATE_BY_NAME,
    CLIMATE_VARIABLES,
    TARGETS_BY_NAME,
    SampleSchema,
    compute_indices,
)

DATE_COLUMN = re.compile(r"^\d{8}$")
IMAGE_NAME = re.compile(r"^(?P<id>[^_]+)_(?P<date>\d{6})\.tif$")
MISSING = -999.0
MAX_EDGE_FILL = 0.05  # largest share of footprint pixels outside a seed patch that is filled instead of rejected
KNOWN_TARGETS = {"OC": "soc", "SOCstock100": "soc_stock"}  # the seed's target columns -> schema targets
LON_COLUMNS, LAT_COLUMNS = ("long", "lon", "longitude", "x"), ("lat", "latitude", "y")


def variable_of(path: Path) -> str:
    """The TerraClimate variable a CSV holds, from its name (``aet.csv``, ``RaCA_aet.csv``, ``_aet_filled.csv``)."""
    found = [t for t in re.split(r"[_\-.\s]+", path.stem) if t in CLIMATE_BY_NAME]
    if len(found) != 1:
        raise ValueError(
            f"{path}: cannot tell the climate variable from the file name (known: {', '.join(CLIMATE_BY_NAME)})"
        )
    return found[0]


def _dedupe(table: pd.DataFrame, id_col: str, where: str, duplicates: dict) -> pd.DataFrame:
    """``table`` with the first row of each ID; the duplicated IDs are recorded in ``duplicates[where]``."""
    dup = table[id_col].duplicated(keep="first")
    if dup.any():
        duplicates[where] = sorted(set(table.loc[dup, id_col]))
    return table[~dup]


def _report_duplicates(duplicates: dict) -> None:
    by_ids: dict[tuple, list[str]] = {}
    for where, ids in duplicates.items():
        by_ids.setdefault(tuple(ids), []).append(where)
    for ids, files in by_ids.items():
        print(
            f"import-soilnet: duplicated ID(s) {list(ids[:5])}{' ...' if len(ids) > 5 else ''} in "
            f"{', '.join(files)}: the first row of each is used",
            file=sys.stderr,
        )


def _read_table(path: Path, id_col: str) -> pd.DataFrame:
    table = pd.read_csv(path, encoding="utf-8-sig", dtype={id_col: str})
    if id_col not in table.columns:
        raise ValueError(f"{path}: no ID column {id_col!r}; columns: {list(table.columns)[:8]}")
    missing_id = table[id_col].isna()
    if missing_id.any():
        raise ValueError(f"{path}: {int(missing_id.sum())} row(s) without an ID in column {id_col!r}")
    return table


@dataclass
class ClimateTables:
    """The climate CSVs: ``tables[var]`` holds stored values indexed by ID with ``YYYY-MM`` columns; ``ids`` every
    ID in first-seen order; ``columns`` the other columns (e.g. a target), first file that has them wins."""

    variables: tuple[str, ...]
    months: tuple[str, ...]
    tables: dict[str, pd.DataFrame]
    ids: list[str]
    columns: dict[str, pd.Series] = field(default_factory=dict)


def read_climate(folder: Path, id_col: str, duplicates: dict) -> ClimateTables:
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise ValueError(f"{folder}: no climate CSV files")
    tables: dict[str, pd.DataFrame] = {}
    columns: dict[str, pd.Series] = {}
    months: set[str] | None = None
    ids: dict[str, None] = {}
    for path in files:
        var = variable_of(path)
        if var in tables:
            raise ValueError(f"{path}: a second file for climate variable {var!r}")
        t = _dedupe(_read_table(path, id_col), id_col, path.name, duplicates).set_index(id_col)
        dates = [c for c in t.columns if DATE_COLUMN.match(str(c))]
        if not dates:
            raise ValueError(f"{path}: no YYYYMMDD date columns")
        by_month = {f"{c[:4]}-{c[4:6]}": c for c in dates}
        months = set(by_month) if months is None else months & set(by_month)
        for c in t.columns:
            if c not in dates and c not in columns:
                columns[c] = t[c]
        tables[var] = t[list(by_month.values())].rename(columns={v: k for k, v in by_month.items()})
        ids.update(dict.fromkeys(t.index))
    if not months:
        raise ValueError(f"{folder}: the climate files share no month")
    variables = tuple(v.name for v in CLIMATE_VARIABLES if v.name in tables)
    return ClimateTables(variables, tuple(sorted(months)), tables, list(ids), columns)


@dataclass
class StackedClimate:
    """``values``: ``(N, T, F)`` float32 in schema units, -999 as 0; ``present``: ``(N,)`` a row in every file;
    ``all_missing``: ``(N,)`` -999 in every variable and month; ``minus999``: ``(N,)`` count of -999 values;
    ``variable_all_minus999``: ``(N, F)`` that variable -999 all year."""

    values: np.ndarray
    present: np.ndarray
    all_missing: np.ndarray
    minus999: np.ndarray
    variable_all_minus999: np.ndarray


def stack_climate(climate: ClimateTables, ids: list[str], stored_units: bool) -> StackedClimate:
    """Every point's series at once: one join per variable, no lookup per point (rows absent from a file are
    marked in ``present`` and their values are meaningless)."""
    n, t, f = len(ids), len(climate.months), len(climate.variables)
    raw = np.empty((n, t, f), dtype=np.float64)
    present = np.ones(n, dtype=bool)
    wanted = pd.Index(ids)
    for k, var in enumerate(climate.variables):
        table = climate.tables[var]
        rows = table.index.get_indexer(wanted)  # one hash join per variable; -1: the point is not in this file
        present &= rows >= 0
        raw[:, :, k] = table[list(climate.months)].to_numpy(dtype=np.float64)[np.maximum(rows, 0)]
    minus = raw == MISSING
    scale = np.array([CLIMATE_BY_NAME[v].scale if stored_units else 1.0 for v in climate.variables])
    values = (np.where(minus, 0.0, raw) * scale).astype(np.float32)
    return StackedClimate(values, present, minus.all(axis=(1, 2)) & (f > 0), minus.sum(axis=(1, 2)), minus.all(axis=1))


def read_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """{point id: (latest file, scene date YYYY-MM-DD)}."""
    out: dict[str, tuple[Path, str]] = {}
    for path in sorted(folder.glob("*.tif")):
        m = IMAGE_NAME.match(path.name)
        if not m:
            continue
        d = m["date"]
        date = f"20{d[:2]}-{d[2:4]}-{d[4:6]}"
        if m["id"] not in out or date > out[m["id"]][1]:
            out[m["id"]] = (path, date)
    if not out:
        raise ValueError(f"{folder}: no {{PointID}}_{{YYMMDD}}.tif patches")
    return out


def image_channels(path: Path) -> tuple[str, ...]:
    with rasterio.open(path) as src:
        names = tuple(d or "" for d in src.descriptions)
        count = src.count
    if all(n in CHANNELS_BY_NAME for n in names):
        return names
    default = tuple(c.name for c in CHANNELS)
    if count in (12, 14):
        return default[:count]
    raise ValueError(f"{path}: {count} bands without channel descriptions (expected 12 or 14)")


def image_centre(path: Path) -> tuple[float, float]:
    """(lon, lat) in degrees of a patch's centre: the seed exported each patch centred on its point."""
    with rasterio.open(path) as src:
        b = src.bounds
        crs = src.crs
    if crs is None:
        raise Rejected("no_coordinates", f"{path.name} has no CRS")
    x, y = (b.left + b.right) / 2.0, (b.bottom + b.top) / 2.0
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return float(lon), float(lat)


def warp_patch(path: Path, date: str, names: tuple[str, ...], lon: float, lat: float, schema: SampleSchema) -> Patch:
    """image: ``(C, H, W)`` float32 on the schema grid (local UTM around lon/lat), indices recomputed."""
    crs = utm_crs(lon, lat)
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    with rasterio.open(path) as src:
        src_nodata = src.nodata if src.nodata is not None else np.nan
        with patch_vrt(src, crs, x, y, schema, src_nodata=src_nodata, nodata=np.nan) as vrt:
            data = vrt.read().astype(np.float32)
    layers = dict(zip(names, data, strict=True))
    layers.update(
        compute_indices(layers, tuple(c for c in schema.channels if c in layers or CHANNELS_BY_NAME[c].kind == "index"))
    )
    missing = [c for c in schema.channels if c not in layers]
    if missing:
        raise Rejected("nodata", f"{path.name} lacks channels {missing}")
    image = np.stack([layers[c] for c in schema.channels])
    gap = np.isnan(image).any(axis=0)
    if gap.mean() > MAX_EDGE_FILL:
        raise Rejected("outside", f"{path.name} leaves {gap.mean():.0%} of the {schema.patch_size} px footprint empty")
    if gap.any():
        # The seed's ~103 px Web-Mercator export just misses the corners of the rotated UTM footprint at high
        # latitude; those few pixels take their nearest covered neighbour's value (counted in qa).
        _, (iy, ix) = distance_transform_edt(gap, return_indices=True)
        image = image[:, iy, ix]
    return Patch(image, date, {"file": path.name, "edge_filled_pixels": int(gap.sum())})


def clean_targets(values: pd.Series) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(N,)`` float64 targets with NaN for unusable ones, and ``(N,)`` masks of each kind: ``labelled``,
    ``missing`` (empty cell), ``nan`` (NaN, inf or not a number), ``negative``. Never raises."""
    numeric = pd.to_numeric(values, errors="coerce")
    missing = values.isna().to_numpy()
    y = numeric.to_numpy(dtype=np.float64)
    negative = np.nan_to_num(y, nan=0.0) < 0
    nan = (numeric.isna().to_numpy() & ~missing) | np.isinf(y)
    y = np.where(negative | nan, np.nan, y)
    return y, {"labelled": np.isfinite(y), "missing": missing, "nan": nan, "negative": negative}


@dataclass
class ImportPlan:
    """Everything a sample needs, one row per point: ``ids``; ``lon``/``lat`` (NaN: none); ``y`` (NaN: unlabelled);
    ``climate`` (None: image-only); ``images`` (None: climate-only)."""

    schema: SampleSchema
    ids: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    y: np.ndarray
    target: str | None
    climate: StackedClimate | None
    images: dict[str, tuple[Path, str]] | None
    image_names: tuple[str, ...] = ()
    require_target: bool = False

    name = "import-soilnet"

    @property
    def modalities(self) -> list[str]:
        return (["image"] if self.images is not None else []) + (["climate"] if self.climate is not None else [])

    def versions(self) -> dict[str, str]:
        return {"import_soilnet": __version__, "rasterio": rasterio.__version__, "pandas": pd.__version__}

    def sample(self, i: int, on_nonfinite: str) -> dict:
        """Point ``i`` as a shard sample, or its ledger record (``id``, ``reason``, ``detail``)."""
        pid = str(self.ids[i])
        try:
            lon, lat = self._coords(i)
            return build_sample(
                self.schema,
                pid,
                lon,
                lat,
                *self._arrays(i, lon, lat),
                self._targets(i),
                on_nonfinite,
                self.name,
                self._qa(i),
            )
        except Rejected as err:
            return {"id": pid, "reason": err.reason, "detail": err.detail}
        except Exception as err:  # one broken file must not stop the import; it is recorded
            return {"id": pid, "reason": "error", "detail": f"{type(err).__name__}: {err}"}

    def _coords(self, i: int) -> tuple[float | None, float | None]:
        if np.isfinite(self.lon[i]) and np.isfinite(self.lat[i]):
            return float(self.lon[i]), float(self.lat[i])
        if self.images is not None and str(self.ids[i]) in self.images:
            return image_centre(self.images[str(self.ids[i])][0])
        return None, None

    def _arrays(self, i: int, lon: float | None, lat: float | None) -> tuple[Patch | None, np.ndarray | None]:
        pid = str(self.ids[i])
        climate = None
        if self.climate is not None:
            if not self.climate.present[i]:
                raise Rejected("no_climate", f"{pid} is not in every climate file")
            if self.climate.all_missing[i]:
                raise Rejected("climate_missing", f"{pid} is -999 in every variable and month (a missing record)")
            climate = self.climate.values[i]
        patch = None
        if self.images is not None:
            if pid not in self.images:
                raise Rejected("no_scene", f"no {pid}_YYMMDD.tif")
            # an imaged point always has coordinates: from --points, else its image's centre (see _coords)
            assert lon is not None and lat is not None
            patch = warp_patch(*self.images[pid], self.image_names, lon, lat, self.schema)
        return patch, climate

    def _targets(self, i: int) -> dict[str, float]:
        if self.target is None or not np.isfinite(self.y[i]):
            if self.require_target:
                raise Rejected("no_target", f"{self.ids[i]} has no usable {self.target or 'target'}")
            return {}
        return {self.target: float(self.y[i])}

    def _qa(self, i: int) -> dict:
        if self.climate is None:
            return {}
        return {"climate_minus999": int(self.climate.minus999[i])}


def _find_column(columns, options, given, what, path, required) -> str | None:
    if given:
        if given not in columns:
            raise ValueError(f"{path}: no {what} column {given!r}; columns: {list(columns)[:12]}")
        return given
    found = next((o for o in options if o in columns), None)
    if found is None and required:
        raise ValueError(f"{path}: no {what} column (tried {options}); pass --{what}-column")
    return found


def _target_name(column: str, given: str | None) -> str:
    name = given or KNOWN_TARGETS.get(column, "soc")
    if name not in TARGETS_BY_NAME:
        raise ValueError(f"--target-name {name!r} is not a schema target ({list(TARGETS_BY_NAME)})")
    return name


def _target_column(args, climate: ClimateTables | None, points: pd.DataFrame | None) -> tuple[pd.Series | None, str]:
    """(target by ID, where it came from); a --target-column is looked up in the climate CSVs, then --points."""
    column = args.target_column
    in_climate = climate.columns if climate is not None else {}
    if column is None:
        column = next((c for c in KNOWN_TARGETS if c in in_climate), None)
        if column is None:
            return None, "none"
    if column in in_climate:
        return in_climate[column], "climate CSVs"
    if points is not None and column in points.columns:
        return points.set_index(args.id_column)[column], args.points
    where = [str(args.climate)] * (climate is not None) + [str(args.points)] * (points is not None)
    raise ValueError(f"no target column {column!r} in {' or '.join(where) or 'the inputs'}")


@dataclass
class PointTable:
    """The points to import, in order, with their coordinates (NaN: none) and where those came from."""

    ids: list[str]
    lon: np.ndarray
    lat: np.ndarray
    coordinates: str  # "points", "images" or "none"
    points: pd.DataFrame | None  # the --points table
    not_in_points: int  # points with data that --points does not list


def read_points(args, ids: list[str], images: dict | None, duplicates: dict) -> PointTable:
    """``ids`` (the data's points), or those --points lists in its order, with coordinates from --points or images."""
    if not args.points:
        lon = np.full(len(ids), np.nan)
        return PointTable(_check_ids(ids), lon, lon, "none" if images is None else "images", None, 0)
    path = Path(args.points)
    points = _dedupe(_read_table(path, args.id_column), args.id_column, path.name, duplicates)
    lon_col = _find_column(points.columns, LON_COLUMNS, args.lon_column, "lon", path, bool(args.lat_column))
    lat_col = _find_column(points.columns, LAT_COLUMNS, args.lat_column, "lat", path, bool(lon_col))
    have = set(ids)
    listed = _check_ids([p for p in points[args.id_column] if p in have])
    if lon_col is None or lat_col is None:
        lon = np.full(len(listed), np.nan)
        return PointTable(listed, lon, lon, "none" if images is None else "images", points, len(ids) - len(listed))
    table = points.set_index(args.id_column).reindex(listed)
    lon, lat = table[lon_col].to_numpy(np.float64), table[lat_col].to_numpy(np.float64)
    return PointTable(listed, lon, lat, "points", points, len(ids) - len(listed))


def _check_ids(ids: list[str]) -> list[str]:
    bad = [i for i in ids if "." in i]
    if bad:
        raise ValueError(f"point ids may not contain dots (WebDataset keys), e.g. {bad[:3]}")
    return ids


def _targets_of(series: pd.Series | None, ids: list[str], stacked: StackedClimate | None) -> tuple[np.ndarray, dict]:
    """``(N,)`` targets (NaN: unlabelled) and the counts of each kind among the points kept."""
    if series is None:
        return np.full(len(ids), np.nan), {}
    y, kinds = clean_targets(series.reindex(ids))
    kept = np.ones(len(ids), bool) if stacked is None else stacked.present & ~stacked.all_missing
    return y, {kind: int((mask & kept).sum()) for kind, mask in kinds.items()}


def _schema_of(images: dict | None, image_names: tuple[str, ...], climate: ClimateTables | None) -> SampleSchema:
    """A schema names at least one channel and variable: a modality the data lacks keeps the defaults, and the
    manifest's ``modalities`` says which arrays the samples hold."""
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["channels"] = tuple(c.name for c in CHANNELS if c.name in image_names)
    if climate:
        kwargs.update(climate_variables=climate.variables, months=climate.months)
    return SampleSchema(**kwargs)


def _climate_counts(stacked: StackedClimate, variables: tuple[str, ...]) -> dict:
    per_var = (stacked.variable_all_minus999 & ~stacked.all_missing[:, None] & stacked.present[:, None]).sum(0)
    return {
        "climate_missing": int((stacked.all_missing & stacked.present).sum()),
        "variable_all_minus999": {v: int(c) for v, c in zip(variables, per_var, strict=True) if c},
    }


def plan_import(args, duplicates: dict) -> tuple[ImportPlan, dict]:
    """The data set to import, and a summary of how it was assembled (counts, sources)."""
    if not args.climate and not args.images:
        raise ValueError("import-soilnet: give --climate (per-variable CSVs), --images (patches), or both")
    if (args.climate or args.points) and not args.id_column:
        raise ValueError("import-soilnet: --id-column is required with --climate or --points (e.g. Point_ID)")
    climate = read_climate(Path(args.climate), args.id_column, duplicates) if args.climate else None
    images = read_images(Path(args.images)) if args.images else None
    table = read_points(args, list(climate.ids) if climate is not None else sorted(images or {}), images, duplicates)
    ids = table.ids
    series, target_from = _target_column(args, climate, table.points)
    target = None if series is None else _target_name(str(series.name), args.target_name)
    stacked = stack_climate(climate, ids, args.climate_units == "stored") if climate is not None else None
    y, target_counts = _targets_of(series, ids, stacked)
    image_names = _channel_names(images)
    schema = _schema_of(images, image_names, climate)
    plan = ImportPlan(
        schema,
        np.array(ids, dtype=object),
        table.lon,
        table.lat,
        y,
        target,
        stacked,
        images,
        image_names,
        args.require_target,
    )
    counts = {"points": len(ids), "not_in_points": table.not_in_points, "targets": target_counts}
    if stacked is not None and climate is not None:
        counts.update(_climate_counts(stacked, climate.variables))
    summary = {
        "coordinates": table.coordinates,
        "target": target,
        "target_from": target_from,
        "counts": counts,
        "variables": list(climate.variables) if climate else [],
        "months": [climate.months[0], climate.months[-1]] if climate else [],
        "images": images is not None,
        "climate_units": args.climate_units if climate else None,
        "duplicates": duplicates,
    }
    return plan, summary


def _channel_names(images: dict | None) -> tuple[str, ...]:
    """The first readable patch names the channels; broken ones are recorded per point later."""
    for path, _ in (images or {}).values():
        try:
            return image_channels(path)
        except (rasterio.errors.RasterioIOError, ValueError) as err:
            print(f"import-soilnet: {err}", file=sys.stderr)
    return tuple(c.name for c in CHANNELS[:12]) if images else ()


def _arguments(args) -> dict:
    keys = (
        "images",
        "climate",
        "points",
        "id_column",
        "target_column",
        "target_name",
        "lon_column",
        "lat_column",
        "max_samples",
        "climate_units",
        "require_target",
    )
    return {k: getattr(args, k, None) for k in keys}


def _check_rerun(out: Path, arguments: dict) -> None:
    """A rerun must import the same thing as the run whose shards it completes."""
    record = out / PARTS / "import-arguments.json"
    if record.exists():
        before = json.loads(record.read_text())
        changed = [k for k in arguments if before.get(k) != arguments[k]]
        if changed:
            raise ValueError(
                f"{out}: the shards there were imported with other arguments ({', '.join(changed)}: "
                f"{[before.get(k) for k in changed]} then, {[arguments[k] for k in changed]} now); "
                "use a new --out or the same arguments"
            )
    else:
        _atomic_json(record, arguments)


def run_cli(args) -> int:
    out = Path(args.out)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    _check_rerun(out, _arguments(args))
    duplicates: dict[str, list[str]] = {}
    plan, summary = plan_import(args, duplicates)
    _report_duplicates(duplicates)
    if not len(plan.ids):
        raise ValueError("import-soilnet: no point to import (check --id-column and that --points lists the IDs)")
    s = plan.schema
    cfg = PackConfig.model_validate(
        {
            "output_dir": str(out),
            "schema": {
                "channels": list(s.channels),
                "climate_variables": list(s.climate_variables),
                "first_month": s.months[0],
                "last_month": s.months[-1],
            },
            "shard": {"max_samples": args.max_samples, "on_nonfinite": "reject"},
        }
    )
    n, size = len(plan.ids), cfg.shard.max_samples
    n_shards = max(1, -(-n // size))
    todo = [k for k in range(n_shards) if not (out / PARTS / f"shard-{k:06d}.tar.json").exists()]
    threads = 2 if plan.images is not None else 1  # GDAL warps release the GIL; the climate path is numpy
    indices = (i for k in todo for i in shard_points(k, n, size))
    results = acquire_in_order(lambda i: plan.sample(i, cfg.shard.on_nonfinite), indices, threads)
    start = time.time()
    with Progress("import-soilnet", sum(len(shard_points(k, n, size)) for k in todo), "sample") as progress:
        for k in todo:
            pack_shard(k, results, len(shard_points(k, n, size)), cfg, s, out, progress)
    rate = n / max(time.time() - start, 1e-9)
    manifest = write_manifest(cfg, out, s, n_shards, plan)
    assert manifest is not None  # this one process wrote every shard's part record
    if not plan.images:
        manifest["stats"]["image"] = {}
    manifest["import"] = summary
    _atomic_json(out / "manifest.json", manifest)
    if todo:
        print(f"import-soilnet: {len(todo)} shard(s) written at {rate:.0f} samples/s", file=sys.stderr)
    print(describe(manifest, out))
    return 0


def describe(manifest: dict, out: Path) -> str:
    """The import's one-paragraph summary: what was packed, labelled, rejected, and with which coordinates."""
    info = manifest["import"]
    counts = info["counts"]
    reasons: dict[str, int] = {}
    for line in (out / "ledger.jsonl").read_text().splitlines():
        r = json.loads(line)["reason"]
        reasons[r] = reasons.get(r, 0) + 1
    t = counts["targets"]
    labelled = (
        (
            f"{t['labelled']} labelled ({info['target']} from {info['target_from']}); unlabelled: "
            f"{t['missing']} missing, {t['nan']} NaN, {t['negative']} negative"
        )
        if t
        else "no target"
    )
    lines = [
        f"imported {manifest['samples']} of {counts['points']} points ({', '.join(manifest['modalities'])}) into "
        f"{len(manifest['shards'])} shard(s); manifest: {out / 'manifest.json'}",
        f"targets: {labelled}",
        f"rejected: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'} (ledger.jsonl)",
        f"coordinates: {info['coordinates']}"
        + ("; spatial folds are impossible, random folds only" if info["coordinates"] == "none" else ""),
    ]
    if "climate_missing" in counts:
        lines.append(
            f"climate: {counts['climate_missing']} point(s) -999 in every variable and month (rejected); "
            f"a variable -999 all year, kept as 0: {counts['variable_all_minus999'] or 'none'}"
        )
    if counts["not_in_points"]:
        lines.append(f"{counts['not_in_points']} point(s) with data but not listed in --points were left out")
    return "\n".join(lines)
