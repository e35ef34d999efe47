"""Helpers and fixtures of the fine-tuning and evaluation tests (a uniquely named module: every test folder has
its own conftest; tests/evaluate, tests/jobs and tests/train import the fixtures from here).

Tiny labelled shards in the documented format (docs/data-format.md), written with webdataset's ShardWriter.

Their SOC is a known function of the image and climate (see :func:`known_soc`) so a model can learn it. Three
samples carry bad targets (missing, NaN, negative) that loading must drop and count.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import webdataset as wds
import yaml

from soilnet.cli import main
from soilnet.config import load_config
from soilnet.config.pack import PackConfig
from soilnet.schema import SampleSchema, month_range

SCHEMA = SampleSchema(months=month_range("2014-01", "2014-12"), patch_size=8)


def known_soc(image: np.ndarray, climate: np.ndarray) -> np.ndarray:
    """SOC (g/kg) of images ``(N, C, H, W)`` and climate ``(N, T, F)``."""
    ndvi = image[:, SCHEMA.channels.index("NDVI")].mean(axis=(1, 2))
    elev = image[:, SCHEMA.channels.index("elevation")].mean(axis=(1, 2))
    pr = climate[:, :, SCHEMA.climate_variables.index("pr")].mean(axis=1)
    return 8.0 + 30.0 * ndvi + 0.01 * elev + 0.1 * pr


def make_samples(n: int, seed: int = 0, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    c, h, w = SCHEMA.image_shape
    t, f = SCHEMA.climate_shape
    lon, lat = rng.uniform(5, 15, n), rng.uniform(45, 52, n)
    level = rng.uniform(0, 1, (n, c, 1, 1))
    image = (level + 0.05 * rng.standard_normal((n, c, h, w))).astype(np.float32)
    elev_i = SCHEMA.channels.index("elevation")
    image[:, elev_i] *= 1000.0
    climate = (rng.uniform(0, 100, (n, 1, f)) + 5 * rng.standard_normal((n, t, f))).astype(np.float32)
    soc = known_soc(image, climate) + noise * rng.standard_normal(n)
    return lon, lat, image.astype(np.float16), climate, soc


def _stats(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)].astype(np.float64)
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def write_shards(
    out: Path,
    n: int = 300,
    seed: int = 0,
    bad_targets: bool = True,
    modalities=("image", "climate"),
    with_coords: bool = True,
    max_samples: int = 100,
) -> Path:
    """Write ``n`` labelled samples (plus 3 with bad targets) and a manifest; return the folder."""
    out.mkdir(parents=True, exist_ok=True)
    lon, lat, image, climate, soc = make_samples(n, seed)
    targets: list = [{"soc": float(v)} for v in soc]
    if bad_targets:
        extra = make_samples(3, seed + 1)
        lon, lat = np.r_[lon, extra[0]], np.r_[lat, extra[1]]
        image, climate = np.concatenate([image, extra[2]]), np.concatenate([climate, extra[3]])
        targets += [{}, {"soc": float("nan")}, {"soc": -3.0}]
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_samples, verbose=0) as sink:
        for i in range(len(targets)):
            meta = {"id": f"p{i:06d}", "source": "test", "qa": {}, "targets": targets[i]}
            if with_coords:
                meta.update(lon=float(lon[i]), lat=float(lat[i]))
            sample = {"__key__": f"p{i:06d}", "meta.json": meta}
            if "image" in modalities:
                sample["image.npy"] = image[i]
            if "climate" in modalities:
                sample["climate.npy"] = climate[i]
            sink.write(sample)
    tars = sorted(out.glob("shard-*.tar"))
    counts = [min(max_samples, len(targets) - k * max_samples) for k in range(len(tars))]
    manifest = {
        "format": "soilnet-shards/1",
        "schema": SCHEMA.to_dict(),
        "modalities": list(modalities),
        "image_encoding": {"dtype": "float16"},
        "targets": ["soc"],
        "shards": [{"name": p.name, "samples": c, "sha256": ""} for p, c in zip(tars, counts, strict=True)],
        "samples": len(targets),
        "stats": {
            "image": {ch: _stats(image[:, k].astype(np.float32)) for k, ch in enumerate(SCHEMA.channels)},
            "climate": {v: _stats(climate[:, :, k]) for k, v in enumerate(SCHEMA.climate_variables)},
        },
        "sources": {"kind": "test"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("labelled") / "shards")


def field_acquire(lon: np.ndarray, lat: np.ndarray):
    """Deterministic samples at lon/lat (degrees): channel levels and climate vary smoothly in space.

    Returns image ``(N, C, H, W)`` float16, climate ``(N, T, F)`` float32 and an ok mask ``(N,)`` (cells south of
    45.2 deg N fail, as a source's nodata would).
    """
    n = len(lon)
    c, h, w = SCHEMA.image_shape
    t, f = SCHEMA.climate_shape
    phase = np.sin(np.radians(lon) * 40)[:, None, None, None] * 0.5 + 0.5
    level = (
        phase * np.linspace(0.2, 1.0, c)[None, :, None, None] + 0.1 * np.cos(np.radians(lat) * 30)[:, None, None, None]
    )
    image = np.broadcast_to(level, (n, c, h, w)).astype(np.float32).copy()
    image[:, SCHEMA.channels.index("elevation")] *= 1000.0
    climate = np.broadcast_to((lat - 40)[:, None, None] * 10, (n, t, f)).astype(np.float32).copy()
    return image.astype(np.float16), climate, lat > 45.2


@pytest.fixture(scope="session")
def finetuned_dir(labelled_shards, tmp_path_factory) -> Path:
    """A fine-tuning output_dir (cross-validated, with a saved final model) on :func:`labelled_shards`."""
    out = tmp_path_factory.mktemp("ft")
    argv = [
        "finetune",
        "--config",
        str(write_yaml(out / "cfg.yaml")),
        f"data.shards={labelled_shards}",
        f"output_dir={out}",
        *FAST,
    ]
    assert main(argv) == 0
    return out


FAST = [
    "train.threads=1",
    "train.epochs=8",
    "train.batch_size=32",
    "train.lr=3e-3",
    "eval.split.folds=3",
    "eval.split.block_km=150",
    "eval.split.buffer_km=20",
    "eval.baseline.n_estimators=30",
]


def write_yaml(path: Path) -> Path:

    path.write_text(yaml.safe_dump({"modalities": "both", "data": {"target": "soc"}}))
    return path


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (pytest's importlib mode cannot import conftest by name)."""

    return SimpleNamespace(
        SCHEMA=SCHEMA,
        FAST=FAST,
        write_shards=write_shards,
        write_yaml=write_yaml,
        field_acquire=field_acquire,
        known_soc=known_soc,
        make_samples=make_samples,
    )


def run_packed_from(finetuned: Path, pack_config: Path, overrides: list[str], out: Path) -> Path:
    """The fine-tuning run ``finetuned`` (its files linked into ``out``), with shards whose manifest says they were
    packed by ``pack_config`` with ``overrides`` (in the model's schema, as its shards were: predict-map checks they
    agree), so that predict-map makes its source from that pack config, as for real shards."""
    run, shards = out / "run", out / "shards"
    run.mkdir(parents=True)
    shards.mkdir()
    for item in finetuned.iterdir():
        if item.name != "config.yaml":
            (run / item.name).symlink_to(item)
    config = yaml.safe_load((finetuned / "config.yaml").read_text())
    manifest = json.loads((Path(config["data"]["shards"]) / "manifest.json").read_text())
    manifest["config"] = load_config(PackConfig, pack_config, [f"output_dir={shards}", *overrides]).model_dump(
        mode="json"
    )
    s = manifest["schema"]
    manifest["config"].pop("schema_", None)
    manifest["config"]["schema"] = {
        "channels": s["channels"],
        "climate_variables": s["climate_variables"],
        "first_month": s["months"][0],
        "last_month": s["months"][-1],
        "patch_size": s["patch_size"],
        "pixel_size_m": s["pixel_size_m"],
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    config["data"]["shards"] = str(shards)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run
