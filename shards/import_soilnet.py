"""``soilnet import-soilnet``: the seed's GeoTIFF + climate-CSV layout packed into the shard format.

Inputs (the layout of moienr/SoilNet):

- ``--images``: ``{PointID}_{YYMMDD}.tif`` patches (12 or 14 bands named by their band descriptions, EPSG:3857,
  about 103 px, float64). Each is warped (bilinear) onto the schema grid: ``patch_size x patch_size`` pixels of
  ``pixel_size_m`` metres in the point's local UTM zone, centred on the point. The spectral indices are recomputed
  from the reflectance bands with the schema's definitions, because older seed exports store some as ratios.
  ``YYMMDD`` becomes the scene date. With several files for one point the latest scene is used.
- ``--climate``: one CSV per TerraClimate variable, named after it (``aet.csv``, ``RaCA_aet.csv``,
  ``_aet_filled.csv``): the ID column and ``YYYYMMDD`` columns in any order. Values are Earth Engine's stored
  integers and the schema's TerraClimate scale factors are applied (``--climate-units physical``: used as is).
  ``-999`` means "zero or missing": the seed wrote it where Earth Engine returned 0 (or nothing), and a true 0 is
  by far the common case (snow water, runoff, dry-month precipitation), so it is imported as 0.0 and counted in
  the sample's ``qa.climate_minus999``.
  The months are those present in every file; the variables are those present (the manifest's schema says which).
  A RaCA file's ``SOCstock100`` column becomes the target ``soc_stock``.
- ``--points``: a ground-truth CSV (UTF-8 BOM allowed) with the ID, lon/lat, and the target column
  (LUCAS 2015: ``Point_ID``, ``long``, ``lat``, ``OC`` -> target ``soc``).

Duplicated IDs keep their first row; they are listed on stderr and in the manifest's ``import.duplicates``.
Points are packed by :func:`shards.pack.pack_shards` through :class:`ImportedTables` (a Source), so the shards,
part records, statistics, ledger and manifest are the packer's own. Without ``--images`` the data set is
climate-only: ``modalities`` is ``["climate"]`` and samples have no ``image.npy``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT

from shards.sources.base import Patch, Rejected
from shards.sources.rasters import utm_crs
from soilnet import __version__
from soilnet import schema as S

DATE_COLUMN = re.compile(r"^\d{8}$")
IMAGE_NAME = re.compile(r"^(?P<id>[^_]+)_(?P<date>\d{6})\.tif$")
MISSING = -999.0
MAX_EDGE_FILL = 0.05  # largest share of footprint pixels outside a seed patch that is filled instead of rejected


def variable_of(path: Path) -> str:
    """The TerraClimate variable a CSV holds, from its name (``aet.csv``, ``RaCA_aet.csv``, ``_aet_filled.csv``)."""
    found = [t for t in re.split(r"[_\-.\s]+", path.stem) if t in S.CLIMATE_BY_NAME]
    if len(found) != 1:
        raise ValueError(f"{path}: cannot tell the climate variable from the file name (known: "
                         f"{', '.join(S.CLIMATE_BY_NAME)})")  # fmt: skip
    return found[0]


def _dedupe(table: pd.DataFrame, id_col: str, where: str, duplicates: dict) -> pd.DataFrame:
    dup = table[id_col].duplicated(keep="first")
    if dup.any():
        ids = sorted(set(table.loc[dup, id_col]))
        duplicates[where] = ids
        print(f"import-soilnet: {where}: {int(dup.sum())} duplicated ID row(s) ignored, e.g. {ids[:5]}",
              file=sys.stderr)  # fmt: skip
    return table[~dup]


def read_climate(folder: Path, id_col: str, duplicates: dict):
    """-> (variables, months, {variable: DataFrame indexed by id with month columns}, extra target table)."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise ValueError(f"{folder}: no climate CSV files")
    tables: dict[str, pd.DataFrame] = {}
    targets = None
    months = None
    for path in files:
        var = variable_of(path)
        if var in tables:
            raise ValueError(f"{path}: a second file for climate variable {var!r}")
        t = pd.read_csv(path, encoding="utf-8-sig", dtype={id_col: str})
        if id_col not in t.columns:
            raise ValueError(f"{path}: no ID column {id_col!r}; columns: {list(t.columns)[:8]}")
        t = _dedupe(t, id_col, path.name, duplicates)
        dates = [c for c in t.columns if DATE_COLUMN.match(str(c))]
        if not dates:
            raise ValueError(f"{path}: no YYYYMMDD date columns")
        by_month = {f"{c[:4]}-{c[4:6]}": c for c in dates}
        months = set(by_month) if months is None else months & set(by_month)
        if "SOCstock100" in t.columns and targets is None:
            targets = t.set_index(id_col)[["SOCstock100"]].rename(columns={"SOCstock100": "soc_stock"})
        tables[var] = t.set_index(id_col)[list(by_month.values())].rename(columns={v: k for k, v in by_month.items()})
    if not months:
        raise ValueError(f"{folder}: the climate files share no month")
    variables = tuple(v.name for v in S.CLIMATE_VARIABLES if v.name in tables)
    return variables, tuple(sorted(months)), tables, targets


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
    if all(n in S.CHANNELS_BY_NAME for n in names):
        return names
    default = tuple(c.name for c in S.CHANNELS)
    if count in (12, 14):
        return default[:count]
    raise ValueError(f"{path}: {count} bands without channel descriptions (expected 12 or 14)")


class ImportedTables:
    """The imported tables as a Source; rows are found by the point's (lon, lat), unique after import."""

    name = "import-soilnet"

    def __init__(self, schema: S.SampleSchema, rows: dict, images: dict | None, climate: dict | None, targets):
        self.schema = schema
        self.rows = rows  # (lon, lat) -> id
        self.images = images
        self.climate_tables = climate
        self.target_table = targets
        self.modalities = (["image"] if images is not None else []) + ["climate"]
        self.stored_units = True  # climate CSVs hold Earth Engine's stored integers

    def _id(self, lon: float, lat: float) -> str:
        return self.rows[(float(lon), float(lat))]

    def patch(self, lon: float, lat: float) -> Patch:
        """image: ``(C, H, W)`` float32 on the schema grid (local UTM), indices recomputed from reflectance."""
        s = self.schema
        pid = self._id(lon, lat)
        qa = {"climate_minus999": self.minus999(pid)}
        if self.images is None:  # climate-only: the packer drops the image (``modalities``)
            return Patch(np.zeros(s.image_shape, dtype=np.float32), None, qa)
        if pid not in self.images:
            raise Rejected("no_scene", f"no {pid}_YYMMDD.tif")
        path, date = self.images[pid]
        names = image_channels(path)
        crs = utm_crs(lon, lat)
        from pyproj import Transformer

        x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
        half = s.patch_size * s.pixel_size_m / 2.0
        grid = from_origin(x - half, y + half, s.pixel_size_m, s.pixel_size_m)
        with rasterio.open(path) as src, WarpedVRT(src, crs=crs, transform=grid, width=s.patch_size,
                                                   height=s.patch_size, resampling=Resampling.bilinear,
                                                   src_nodata=src.nodata if src.nodata is not None else np.nan,
                                                   nodata=np.nan) as vrt:  # fmt: skip
            data = vrt.read().astype(np.float32)
        layers = dict(zip(names, data, strict=True))
        layers.update(S.compute_indices(layers, tuple(c for c in s.channels if c in layers or
                                                      S.CHANNELS_BY_NAME[c].kind == "index")))  # fmt: skip
        missing = [c for c in s.channels if c not in layers]
        if missing:
            raise Rejected("nodata", f"{path.name} lacks channels {missing}")
        image = np.stack([layers[c] for c in s.channels])
        gap = np.isnan(image).any(axis=0)
        if gap.mean() > MAX_EDGE_FILL:
            raise Rejected("outside", f"{path.name} leaves {gap.mean():.0%} of the {s.patch_size} px footprint empty")
        if gap.any():
            # The seed's ~103 px Web-Mercator export just misses the corners of the rotated UTM footprint at high
            # latitude; those few pixels take their nearest covered neighbour's value (counted in qa).
            from scipy.ndimage import distance_transform_edt

            _, (iy, ix) = distance_transform_edt(gap, return_indices=True)
            image = image[:, iy, ix]
        return Patch(image, date, {**qa, "file": path.name, "edge_filled_pixels": int(gap.sum())})

    def climate(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` float32 in physical units; ``-999`` -> 0.0 (see the module docstring)."""
        s = self.schema
        pid = self._id(lon, lat)
        out = np.empty(s.climate_shape, dtype=np.float32)
        for f, var in enumerate(s.climate_variables):
            table = self.climate_tables[var]
            if pid not in table.index:
                raise Rejected("no_climate", f"{pid} not in the {var} table")
            raw = table.loc[pid, list(s.months)].to_numpy(dtype=float)
            raw = np.where(raw == MISSING, 0.0, raw)
            out[:, f] = raw * (S.CLIMATE_BY_NAME[var].scale if self.stored_units else 1.0)
        return out

    def minus999(self, pid: str) -> int:
        return int(sum((t.loc[pid, list(self.schema.months)] == MISSING).sum() for t in self.climate_tables.values()
                       if pid in t.index))  # fmt: skip

    def targets(self, lon: float, lat: float, patch: Patch, climate: np.ndarray) -> dict[str, float]:
        pid = self._id(lon, lat)
        if self.target_table is None or pid not in self.target_table.index:
            return {}
        row = self.target_table.loc[pid]
        return {k: float(v) for k, v in row.items() if pd.notna(v)}

    def versions(self) -> dict[str, str]:
        return {"import_soilnet": __version__, "rasterio": rasterio.__version__}


def _guess(columns, options, given, what, path):
    if given:
        if given not in columns:
            raise ValueError(f"{path}: no {what} column {given!r}")
        return given
    for o in options:
        if o in columns:
            return o
    raise ValueError(f"{path}: no {what} column (tried {options}); pass --{what}-column")


def run_cli(args) -> int:
    from shards.pack import PARTS, Points, _atomic_json, pack_shards, write_manifest
    from soilnet.config.pack import PackConfig

    if not args.climate:
        raise ValueError("import-soilnet: --climate (folder of per-variable CSVs) is required")
    if not args.points:
        raise ValueError("import-soilnet: --points (CSV with ID and lon/lat) is required for the coordinates")
    duplicates: dict[str, list[str]] = {}
    variables, months, tables, csv_targets = read_climate(Path(args.climate), args.id_column, duplicates)
    pts_path = Path(args.points)
    pts = pd.read_csv(pts_path, encoding="utf-8-sig", dtype={args.id_column: str})
    if args.id_column not in pts.columns:
        raise ValueError(f"{pts_path}: no ID column {args.id_column!r}; columns: {list(pts.columns)[:8]}")
    lon_col = _guess(pts.columns, ["long", "lon", "longitude", "x"], args.lon_column, "lon", pts_path)
    lat_col = _guess(pts.columns, ["lat", "latitude", "y"], args.lat_column, "lat", pts_path)
    pts = _dedupe(pts, args.id_column, pts_path.name, duplicates)
    with_climate = set().union(*(t.index for t in tables.values()))
    pts = pts[pts[args.id_column].astype(str).isin(with_climate)]  # the data set: points with climate rows
    pts = pts[pts[[lon_col, lat_col]].notna().all(axis=1)]
    same_place = pts.duplicated(subset=[lon_col, lat_col], keep="first")
    if same_place.any():
        duplicates[f"{pts_path.name} (same coordinates)"] = sorted(pts.loc[same_place, args.id_column])
        pts = pts[~same_place]
    targets = csv_targets
    if args.target_column:
        if args.target_column not in pts.columns:
            raise ValueError(f"{pts_path}: no target column {args.target_column!r}")
        name = args.target_name or "soc"
        if name not in S.TARGETS_BY_NAME:
            raise ValueError(f"--target-name {name!r} is not a schema target ({list(S.TARGETS_BY_NAME)})")
        t = pts.set_index(args.id_column)[[args.target_column]].rename(columns={args.target_column: name})
        targets = t if targets is None else targets.join(t, how="outer")
    images = read_images(Path(args.images)) if args.images else None
    channels = tuple(c.name for c in S.CHANNELS)
    for path, _ in (images or {}).values():  # the first readable patch names the channels; broken ones fail later
        try:
            channels = image_channels(path)
            break
        except (rasterio.errors.RasterioIOError, ValueError) as err:
            print(f"import-soilnet: {err}", file=sys.stderr)
    channels = tuple(c.name for c in S.CHANNELS if c.name in channels)
    schema = S.SampleSchema(channels=channels, climate_variables=variables, months=months)
    ids = pts[args.id_column].astype(str).to_numpy()
    lon, lat = pts[lon_col].to_numpy(float), pts[lat_col].to_numpy(float)
    bad = [i for i in ids if "." in i]
    if bad:
        raise ValueError(f"{pts_path}: point ids may not contain dots (WebDataset keys), e.g. {bad[:3]}")
    source = ImportedTables(schema, {(float(a), float(b)): i for i, a, b in zip(ids, lon, lat, strict=True)},
                            images, tables, targets)  # fmt: skip
    source.stored_units = getattr(args, "climate_units", "stored") == "stored"
    out = Path(args.out)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    cfg = PackConfig.model_validate({
        "output_dir": str(out),
        "schema": {"channels": list(channels), "climate_variables": list(variables), "first_month": months[0],
                   "last_month": months[-1]},
        "shard": {"max_samples": args.max_samples, "on_nonfinite": "reject"},
    })  # fmt: skip
    points = Points(ids, lon, lat)
    n_shards = max(1, -(-len(points) // cfg.shard.max_samples))
    from tqdm import tqdm

    with tqdm(total=len(points), unit="sample", desc="import", file=sys.stderr, disable=None) as progress:
        todo = [k for k in range(n_shards) if not (out / PARTS / f"shard-{k:06d}.tar.json").exists()]
        for _ in pack_shards(todo, points, source, cfg, out, progress):
            pass
    manifest = write_manifest(cfg, out, schema, n_shards, source)
    manifest["modalities"] = source.modalities
    if images is None:
        manifest["stats"]["image"] = {}
    manifest["import"] = {"variables": list(variables), "months": [months[0], months[-1]], "images": bool(images),
                          "climate_units": "stored" if source.stored_units else "physical",
                          "duplicates": duplicates}  # fmt: skip
    _atomic_json(out / "manifest.json", manifest)
    print(f"imported {manifest['samples']} samples ({', '.join(source.modalities)}) into {len(manifest['shards'])} "
          f"shard(s); {len(variables)} climate variables; manifest: {out / 'manifest.json'}")  # fmt: skip
    return 0
