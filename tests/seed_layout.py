"""Files in the seed's exact published layout (moienr/SoilNet), for tests and benchmarks.

Climate CSVs, as the seed's Earth Engine export wrote them (see ``../shared/data/README.md``): one file per
TerraClimate variable; the 61 ``YYYYMMDD`` columns 20100101..20150101 in no particular order, then
``system:index`` (20 characters, zero-padded hex), then, in the RaCA files, ``SOCstock100`` (empty where a site
has no value), then the ID column last. Values are stored integers written as floats (``83.0``), and ``-999.0``
wherever Earth Engine returned 0 or nothing. No coordinates. A duplicated site is listed twice, each row with its
own ``system:index``.

Patches: ``{PointID}_{YYMMDD}.tif``, 12 float64 bands named ``SR_B1..SR_B7, clayIndex, ferrousIndex,
carbonateIndex, rockOutcropIndex, NDVI``, EPSG:3857, 103 x 103 px of 30 m centred on the point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from soilnet import schema

SEED_DATES = [f"{y}{m:02d}01" for y in range(2010, 2015) for m in range(1, 13)] + ["20150101"]
SEED_BANDS = (
    "SR_B1",
    "SR_B2",
    "SR_B3",
    "SR_B4",
    "SR_B5",
    "SR_B6",
    "SR_B7",
    "clayIndex",
    "ferrousIndex",
    "carbonateIndex",
    "rockOutcropIndex",
    "NDVI",
)
RACA_VARIABLES = ("aet", "def", "pdsi", "pet", "pr", "ro", "soil", "srad", "swe", "tmmn", "tmmx", "vap", "vpd")


def seed_date_order(seed: int = 0) -> list[str]:
    """The 61 date columns in a shuffled order (the seed's files list them in no particular order)."""
    return [SEED_DATES[k] for k in np.random.default_rng(seed).permutation(len(SEED_DATES))]


def write_climate_csv(
    path: Path,
    ids: list[str],
    stored: np.ndarray,
    id_col: str = "rcasiteid",
    targets: list[float | None] | None = None,
    order_seed: int = 0,
) -> Path:
    """One variable's CSV. ``stored``: ``(len(ids), 61)`` in Earth Engine's stored units, month order of
    ``SEED_DATES``; a 0 is written as -999 as the seed did. ``targets``: ``SOCstock100`` per row (None: empty)."""
    stored = np.where(stored == 0, -999.0, stored).astype(np.float64)
    table = pd.DataFrame(stored, columns=SEED_DATES)[seed_date_order(order_seed)]
    table["system:index"] = [f"{k:020x}" for k in range(len(ids))]
    if targets is not None:
        table["SOCstock100"] = [np.nan if t is None else t for t in targets]
    table[id_col] = ids
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.12g", na_rep="")
    return path


def raca_physical(lon: np.ndarray, lat: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """A plausible climate per site and month (physical units) and a log-normal SOC stock that depends on it."""
    n = len(lon)
    m = np.array([int(d[4:6]) for d in SEED_DATES])
    season = np.cos(2 * np.pi * (m - 7) / 12)[None, :]  # +1 in July
    tmean = 22.0 - 0.8 * (lat[:, None] - 25.0) + 10.0 * season + rng.normal(0, 1.5, (n, len(m)))
    wet = np.clip((lon[:, None] + 124.0) / 57.0, 0, 1)  # dry west, wet east
    pr = np.clip(rng.gamma(2.0, 10.0 + 60.0 * wet, (n, len(m))), 0, None)
    pet = np.clip(40.0 + 5.0 * tmean, 0, None)
    aet = np.minimum(pet, pr + 20.0)
    physical = {
        "aet": aet,
        "def": pet - aet,
        "pdsi": np.clip((pr - pet) / 30.0, -8, 8),
        "pet": pet,
        "pr": pr,
        "ro": np.clip(pr - aet, 0, None) * 0.3,
        "soil": np.clip(50.0 + pr - aet, 0, None),
        "srad": 200.0 + 80.0 * season - 2.0 * (lat[:, None] - 25.0),
        "swe": np.clip(-10.0 * tmean, 0, None),
        "tmmn": tmean - 6.0,
        "tmmx": tmean + 6.0,
        "vap": 0.6 + 0.05 * np.clip(tmean, 0, None) * (0.5 + wet),
        "vpd": np.clip(0.1 + 0.06 * tmean * (1.2 - wet), 0, None),
    }
    assert set(physical) <= set(schema.CLIMATE_BY_NAME)
    log_soc = 4.8 + 0.6 * (pr.mean(1) / 60.0 - 1.0) - 0.03 * (tmean.mean(1) - 12.0) + 0.3 * np.sin(lon / 3.0)
    return physical, np.round(np.exp(log_soc + rng.normal(0, 0.3, n)), 6)


def write_raca(
    folder: Path,
    sites: int,
    seed: int = 0,
    empty_target_share: float = 0.044,
    all_missing: int = 2,
    duplicated: int = 2,
) -> dict:
    """The seed's 13 ``RaCA_<var>.csv`` files under ``folder`` for ``sites`` synthetic sites.

    Like the real files: about 4.4 % of the targets empty, ``all_missing`` sites at -999 in every variable and
    month, ``duplicated`` sites listed twice (a second row with other values), snow-free sites at -999 in
    ``swe`` all year. Returns the truth: ``ids`` (unique, file order), ``soc``, ``stored`` (var -> ``(N, 61)``),
    ``duplicated``, ``all_missing`` IDs and ``empty_target`` IDs.
    """
    rng = np.random.default_rng(seed)
    ids = [f"{'ABC'[i % 3]}{i:04d}{'PWRX'[i // 3 % 4]}{7 * i % 97:02d}" for i in range(sites)]  # like A0108P92
    n = len(ids)
    lon, lat = rng.uniform(-124.0, -67.0, n), rng.uniform(25.0, 49.0, n)
    physical, soc = raca_physical(lon, lat, rng)
    empty = rng.random(n) < empty_target_share
    missing = rng.choice(n, all_missing, replace=False) if all_missing else np.array([], dtype=int)
    dup = rng.choice(np.setdiff1d(np.arange(n), missing), duplicated, replace=False)
    row_ids = ids + [ids[i] for i in dup]
    targets = [None if e else float(s) for e, s in zip(empty, soc, strict=True)] + [float(soc[i]) for i in dup]
    stored_all = {}
    for var, values in physical.items():
        stored = np.round(values / schema.CLIMATE_BY_NAME[var].scale)
        stored[missing] = 0.0  # written as -999 everywhere: a missing record
        stored_all[var] = stored
        rows = np.concatenate([stored, stored[dup] + 7.0])  # the duplicate's second row differs
        write_climate_csv(folder / f"RaCA_{var}.csv", row_ids, rows, "rcasiteid", targets)
    return {
        "ids": ids,
        "soc": soc,
        "stored": stored_all,
        "duplicated": [ids[i] for i in dup],
        "all_missing": [ids[i] for i in missing],
        "empty_target": [ids[i] for i in np.flatnonzero(empty)],
        "lon": lon,
        "lat": lat,
    }


def write_seed_patch(path: Path, lon: float, lat: float, seed: int = 0, size: int = 103) -> Path:
    """A ``{PointID}_{YYMMDD}.tif`` patch as the seed exported it: 12 float64 bands, EPSG:3857, 30 m, centred
    on (lon, lat). Reflectance in 0.02..0.4; bands 8..11 are the seed's ratios (recomputed on import)."""

    rng = np.random.default_rng(seed)
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(lon, lat)
    res = 30.0 / np.cos(np.radians(lat))  # Web-Mercator metres at this latitude for 30 ground metres
    transform = from_origin(x - size * res / 2, y + size * res / 2, res, res)
    yy, xx = np.mgrid[0:size, 0:size] / size
    refl = np.stack([0.05 + 0.04 * b + 0.1 * xx + 0.05 * yy + rng.normal(0, 0.005, (size, size)) for b in range(7)])
    ratios = np.stack(
        [
            refl[5] / refl[6],
            refl[2] / refl[4],
            refl[3] / refl[2],
            refl[1] / refl[3],
            (refl[4] - refl[3]) / (refl[4] + refl[3]),
        ]
    )
    data = np.concatenate([refl, ratios]).astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=12,
        dtype="float64",
        crs="EPSG:3857",
        transform=transform,
    ) as dst:
        dst.write(data)
        for k, name in enumerate(SEED_BANDS, start=1):
            dst.set_band_description(k, name)
    return path


def raca_import_argv(climate: Path, out: Path) -> list[str]:
    """``soilnet import-soilnet``'s arguments for a folder :func:`write_raca` wrote."""
    columns = ["--id-column", "rcasiteid", "--target-column", "SOCstock100"]
    return ["import-soilnet", "--climate", str(climate), *columns, "--out", str(out)]
