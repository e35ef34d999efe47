"""``soilnet predict-map``: a fine-tuned model's SOC over a GeoJSON region, as a Cloud-Optimized GeoTIFF and a PNG.

The grid, the tiles, their resumption and the COG are :mod:`soilnet.evaluate.maps`'s. This job joins them to the
saved model (:mod:`soilnet.train.regressor`) and to the data source, configured like the model's training shards.
Sources that serve windows (local rasters, the synthetic world, Earth Engine) take the tile path
(:mod:`soilnet.evaluate.tiles`): one read per tile in the map's CRS, every cell's patch a view of it; on Earth
Engine that read is one ``computePixels`` of a cloud-masked winter composite on the tile's grid plus one
TerraClimate request (:mod:`shards.sources.earthengine`). ``per_point`` (``--per-point``) builds each cell through
the packer's own sample builder instead (2 requests per cell on Earth Engine; the STAC source has only this path).
docs/maps.md measures how far the two paths' predictions differ.

Bands: 1 prediction, 2 lower and 3 upper bound of the split-conformal interval saved with the model, in the
target's unit; 4 the area of applicability (1 inside, 0 outside; :mod:`soilnet.evaluate.aoa`, from the
``aoa.npz`` the fine-tuning run saved beside the model: a model without it is refused before any tile runs);
nodata NaN.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import shapely
import torch
import yaml

from shards.pack import make_sample, make_source
from shards.parallel import workers_from
from shards.sources.base import Rejected
from soilnet import __version__
from soilnet.config.base import ConfigError, apply_override
from soilnet.config.pack import PackConfig
from soilnet.data.manifest import read_manifest
from soilnet.evaluate.aoa import Reference, inputs_aoa, load_reference
from soilnet.evaluate.maps import (
    Acquire,
    Applicability,
    MapError,
    fingerprint,
    plan_grid,
    tile_writer,
    write_map,
)
from soilnet.evaluate.tiles import TileAcquire
from soilnet.jobs.map_tasks import TAG, check_output, claim_parts, run_tiles
from soilnet.regions import read_region
from soilnet.schema import SampleSchema
from soilnet.train.regressor import MODEL_FILE, load_model


def predict_map(
    checkpoint: str | Path,
    region_path: str | Path,
    resolution_m: float,
    out: str | Path,
    acquire: Acquire | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    batch_size: int = 256,
    tile_size: int = 256,
    max_tiles: int | None = None,
    crs: str | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    bf16: bool = False,
    per_point: bool = False,
    tasks: int | None = None,
    task_id: int | None = None,
) -> dict:
    """Map a fine-tuned model (a fine-tuning ``output_dir``) over a region file; see the module docstring.

    ``acquire`` defaults to the data source the model's training shards were packed from (with ``overrides`` of
    that pack config): its tile path (:func:`source_tiles`) when it has one and ``per_point`` is False, else the
    per-point path (:func:`source_acquire`). ``crs``/``origin``: the grid's (:func:`plan_grid`); ``bf16``:
    predict under bfloat16 autocast. The tiles are spread over the workers (``tasks``/``task_id``, else an MPI
    rank or a Slurm array task; :mod:`soilnet.jobs.map_tasks`); the one that finishes the last tile assembles the
    map. Returns a summary; ``complete``: no tile is missing, ``assembled``: this worker wrote the map.
    """
    out = Path(out)
    workers = workers_from(tasks, task_id)
    model_file = Path(checkpoint) / MODEL_FILE if Path(checkpoint).is_dir() else Path(checkpoint)
    model = load_model(model_file)
    area = load_reference(model_file.parent)  # aoa.npz beside model.safetensors; missing: refused before any tile
    region = read_region(region_path)
    grid, projected = plan_grid(region, resolution_m, tile_size, crs, origin)
    if acquire is None:
        acquire = source_tiles(Path(checkpoint), model, list(overrides), batch_size, per_point, region)
    parts = out.with_name(out.name + ".parts")
    fp = fingerprint(grid, model_file)
    check_output(out, fp)
    claim_parts(parts, fp)
    q, space = float(model.conformal.get("half_width", math.nan)), model.conformal.get("space", "original")
    start = time.time()
    predict = bf16_predict(model) if bf16 else model.predict
    applicability = aoa_flags(area, model)

    compute_tile = tile_writer(grid, projected, parts, acquire, predict, q, space, batch_size, applicability)
    config = {"region": str(region_path), "resolution_m": resolution_m, "overrides": list(overrides)}
    tags = map_tags(model_file, fp, config, area.threshold)

    def assemble() -> dict:
        return write_map(out, grid, parts, model.target, model.conformal, tags)

    summary = run_tiles(grid.tiles(), compute_tile, assemble, parts, workers, max_tiles)
    summary.update(out=str(out), seconds=round(time.time() - start, 3), task=workers.rank, tasks=workers.world)
    return summary


def map_tags(model_file: Path, fp: dict, config: dict, aoa_threshold: float) -> dict:
    """The COG's tags: the model file and its SHA-256, the command's ``config``, the code version, the area of
    applicability's threshold, and the fingerprint ``fp`` of grid, model and bands (:data:`TAG`, read back by
    :func:`~soilnet.jobs.map_tasks.check_output`)."""
    return {
        "model": str(model_file),
        "model_sha256": fp["model_sha256"],
        "config": json.dumps(config),
        "code_version": __version__,
        "resolution_m": config["resolution_m"],
        "aoa_threshold": aoa_threshold,
        TAG: json.dumps(fp, sort_keys=True),
    }


def _pack_config(checkpoint: Path, overrides: list[str]) -> PackConfig:
    """The pack config of the fine-tuning run's ``data.shards`` (from their manifest), with ``overrides``."""
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: --checkpoint must be a fine-tuning output_dir")
    shards = (yaml.safe_load(cfg_file.read_text()) or {}).get("data", {}).get("shards")
    manifest, _ = read_manifest(shards)
    tree = manifest.get("config")
    if not isinstance(tree, dict):
        raise MapError(f"the manifest of {shards} holds no pack config, so the data source is unknown")
    for ov in overrides:
        apply_override(tree, ov)
    try:
        return PackConfig.model_validate(tree)
    except ValueError as err:
        raise ConfigError(f"pack config of {shards} (with overrides {overrides}): {err}") from err


def bf16_predict(model):
    """``model.predict`` under bfloat16 autocast on the model's device."""
    device = next(model.model.parameters()).device.type

    def predict(image, climate):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return model.predict(image, climate)

    return predict


def aoa_flags(area: Reference, model) -> Applicability:
    """Band 4: 1 where a batch of cells' model inputs (schema units, before the model's normalisation) lie inside
    the area of applicability ``area``, 0 outside; distances on the model's device."""
    device = next(model.model.parameters()).device

    def applicability(image, climate):
        return inputs_aoa(area, image, climate, device)[1].astype(np.float32)

    return applicability


def check_overlap(region, source) -> None:
    """A :class:`MapError` naming both bounds when ``region`` (lon/lat) misses the source's rasters, if the
    source knows its bounds (``bounds_lonlat``)."""
    bounds = getattr(source, "bounds_lonlat", None)
    if region is None or bounds is None:
        return
    w, s, e, n = bounds()
    if not region.intersects(shapely.box(w, s, e, n)):
        rw, rs, re_, rn = region.bounds
        raise MapError(
            f"the region (lon {rw:.4f}..{re_:.4f}, lat {rs:.4f}..{rn:.4f}) does not overlap the rasters "
            f"(lon {w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f})"
        )


def check_schema(model, source_schema: SampleSchema, where: str) -> None:
    """A :class:`MapError` naming both sides when the data source cannot give the model its inputs: the model's
    channels (when it takes the image), climate variables and months (when it takes the climate) must be among the
    source's, and the patches' size and pixel size the same. ``source_schema``: the pack config's (``where`` says
    which). A model of a subset (a fine-tuning ``data.schema``) is served that subset."""
    m, s = model.schema, source_schema
    problems = []
    if "image" in model.modalities:
        if set(m.channels) - set(s.channels):
            problems.append(f"channels: the model's {list(m.channels)}, the source's {list(s.channels)}")
        if (m.patch_size, m.pixel_size_m) != (s.patch_size, s.pixel_size_m):
            problems.append(
                f"patches: the model's {m.patch_size} x {m.pixel_size_m:g} m pixels, the source's "
                f"{s.patch_size} x {s.pixel_size_m:g} m"
            )
    if "climate" in model.modalities:
        if set(m.climate_variables) - set(s.climate_variables):
            problems.append(
                f"climate variables: the model's {list(m.climate_variables)}, the source's {list(s.climate_variables)}"
            )
        if set(m.months) - set(s.months):
            problems.append(
                f"climate months: the model's {m.months[0]}..{m.months[-1]}, the source's {s.months[0]}..{s.months[-1]}"
            )
    if problems:
        raise MapError(f"the model's schema does not fit its data source ({where}): " + "; ".join(problems))


def source_tiles(
    checkpoint: Path, model, overrides: list[str], batch_size: int = 256, per_point: bool = False, region=None
):
    """The tile path (:class:`~soilnet.evaluate.tiles.TileAcquire`) of the model's data source when the source
    serves windows (local rasters, the synthetic world), else its per-point path (:func:`source_acquire`). Refused
    here, before any tile runs: a model the source cannot serve (:func:`check_schema`), and a ``region`` (lon/lat)
    outside the rasters (:func:`check_overlap`)."""
    pack_cfg = _pack_config(checkpoint, overrides)
    where = "the pack config of its training shards" + (f", with overrides {overrides}" if overrides else "")
    check_schema(model, pack_cfg.schema_.build(), where)
    source = make_source(pack_cfg, model.schema)
    check_overlap(region, source)
    if per_point or not hasattr(source, "read_window"):
        return source_acquire(pack_cfg, source, model)
    s = model.schema
    use_image, use_climate = "image" in model.modalities, "climate" in model.modalities
    return TileAcquire(source, s.patch_size, s.pixel_size_m, use_image, use_climate, batch_size)


def source_acquire(pack_cfg: PackConfig, source, model) -> Acquire:
    """The per-point path: each cell built by the packer's own ``make_sample`` from ``source`` (made from
    ``pack_cfg``, the model's training shards' pack config with the overrides), so a map cell holds exactly what
    a shard sample would. A point the source rejects becomes a nodata cell.
    """
    on_nonfinite = getattr(pack_cfg.shard, "on_nonfinite", "mask")
    use_image, use_climate = "image" in model.modalities, "climate" in model.modalities

    def acquire(lon: np.ndarray, lat: np.ndarray):
        images, climates, ok = [], [], np.zeros(len(lon), dtype=bool)
        c, h, w = model.schema.image_shape
        for i, (x, y) in enumerate(zip(lon, lat, strict=True)):
            try:
                sample = make_sample(source, model.schema, f"cell{i}", float(x), float(y), on_nonfinite)
                ok[i] = True
                image, climate = sample["image.npy"], sample["climate.npy"]
            except Rejected:
                image = np.zeros((c, h, w), np.float16)
                climate = np.zeros(model.schema.climate_shape, np.float32)
            images.append(image)
            climates.append(climate)
        return (np.stack(images) if use_image else None, np.stack(climates) if use_climate else None, ok)

    return acquire


def run_cli(args) -> int:
    """``soilnet predict-map`` (arguments defined in :mod:`soilnet.cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = predict_map(
        args.checkpoint,
        args.region,
        args.resolution,
        args.out,
        overrides=list(args.overrides),
        batch_size=args.batch_size,
        tile_size=getattr(args, "tile_size", 256),
        max_tiles=getattr(args, "max_tiles", None),
        crs=getattr(args, "crs", None),
        origin=tuple(getattr(args, "origin", None) or (0.0, 0.0)),
        bf16=getattr(args, "bf16", False),
        per_point=getattr(args, "per_point", False),
        tasks=getattr(args, "tasks", None),
        task_id=getattr(args, "task_id", None),
    )
    who = f"task {summary['task']} of {summary['tasks']}: " if summary["tasks"] > 1 else ""
    if summary["assembled"]:
        print(
            f"soilnet predict-map: {who}wrote {summary['out']} and {summary['preview']} "
            f"({summary['new']} new tiles, {summary['reused']} reused, {summary['recomputed']} recomputed, "
            f"{summary['failed']} cells failed)"
        )
        return 0
    if summary["mine_done"]:
        print(
            f"soilnet predict-map: {who}{summary['new']} new tiles, {summary['reused']} reused; "
            f"{summary['finished']} of {summary['tiles']} done in all. The task that finishes the last tile "
            "assembles the map; else rerun the command without --tasks/--task-id."
        )
        return 0
    print(
        f"soilnet predict-map: {who}stopped after {summary['new']} new tiles; {summary['finished']} of "
        f"{summary['tiles']} done. Rerun the same command to finish."
    )
    return 3
