"""``soilnet predict-map``: a fine-tuned model's SOC over a GeoJSON region, as a Cloud-Optimized GeoTIFF and a PNG.

The grid, the tiles, their resumption and the COG are :mod:`soilnet.evaluate.maps`'s. This job joins them to the
saved model (:mod:`soilnet.train.regressor`) and to the data source: each cell is built through the shards sources
interface and the packer's own sample builder, configured like the model's training shards, so the synthetic
world, local rasters and Earth Engine share one code path and a map cell holds exactly what a shard sample would.

Bands: 1 prediction, 2 lower and 3 upper bound of the split-conformal interval saved with the model, in the
target's unit; nodata NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from shards.pack import make_sample, make_source
from shards.parallel import workers_from
from shards.sources.base import Rejected
from soilnet.config.base import ConfigError, apply_override
from soilnet.config.pack import PackConfig
from soilnet.data.manifest import read_manifest
from soilnet.evaluate.maps import Acquire, MapError, plan_grid, predict_tile, write_map
from soilnet.jobs.map_tasks import TAG, check_output, claim_parts, run_tiles
from soilnet.regions import read_region
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
    tasks: int | None = None,
    task_id: int | None = None,
) -> dict:
    """Map a fine-tuned model (a fine-tuning ``output_dir``) over a GeoJSON region; see the module docstring.

    ``acquire`` defaults to the data source the model's training shards were packed from (with ``overrides`` of
    that pack config). The tiles are spread over the workers (``tasks``/``task_id``, else an MPI rank or a Slurm
    array task; :mod:`soilnet.jobs.map_tasks`); the one that finishes the last tile assembles the map. Returns a
    summary; ``complete`` is False while tiles are missing, ``assembled`` True for the worker that wrote the map.
    """
    out = Path(out)
    workers = workers_from(tasks, task_id)
    model_file = Path(checkpoint) / MODEL_FILE if Path(checkpoint).is_dir() else Path(checkpoint)
    model = load_model(model_file)
    grid, projected = plan_grid(read_region(region_path), resolution_m, tile_size)
    if acquire is None:
        acquire = source_acquire(Path(checkpoint), model, list(overrides))
    parts = out.with_name(out.name + ".parts")
    fingerprint = {"grid": asdict(grid), "model_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()}
    check_output(out, fingerprint)
    claim_parts(parts, fingerprint)
    q = float(model.conformal.get("half_width", math.nan))
    start = time.time()
    space = model.conformal.get("space", "original")

    def compute_tile(row: int, col: int):
        return predict_tile(grid, projected, row, col, acquire, model.predict, q, space, batch_size)

    def assemble() -> dict:
        tags = {"checkpoint": str(checkpoint), "region": str(region_path), "resolution_m": resolution_m}
        tags[TAG] = json.dumps(fingerprint, sort_keys=True)
        return write_map(out, grid, parts, model.target, model.conformal, tags)

    summary = run_tiles(grid.tiles(), compute_tile, assemble, parts, workers, max_tiles)
    summary.update(out=str(out), seconds=round(time.time() - start, 1), task=workers.rank, tasks=workers.world)
    return summary


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


def source_acquire(checkpoint: Path, model, overrides: list[str]) -> Acquire:
    """Acquisition through the shards sources interface, configured like the model's training shards.

    The pack config comes from the manifest of the fine-tuning run's ``data.shards`` (``key=value`` overrides
    apply to it, e.g. ``source.kind=rasters``); each cell is built by the packer's own ``make_sample``, so a map
    cell holds exactly what a shard sample would. A point the source rejects becomes a nodata cell.
    """
    pack_cfg = _pack_config(checkpoint, overrides)
    source = make_source(pack_cfg, model.schema)
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
