"""A map's tiles as the unit of work, spread over tasks, resumable, assembled once.

The tasks are :mod:`shards.parallel`'s workers, as for ``soilnet pack``: MPI ranks, Slurm array tasks (any evenly
spaced ``--array``, ``0-30:2`` included) or ``--tasks N --task-id K``. Task ``k`` of ``n`` takes the tiles whose
position in the row-major list is ``k`` modulo ``n``, so tasks never write the same tile.

- Each finished tile is a GeoTIFF written atomically by the ``compute_tile`` callable to
  ``<parts>/r{row:04d}_c{col:04d}.tif`` (:func:`soilnet.evaluate.maps.write_tile`).
- On a rerun a tile file that reads back whole (rasterio) is kept; a corrupt or truncated one is logged and
  recomputed.
- ``<parts>/grid.json`` records the grid, model and band set (:func:`soilnet.evaluate.maps.fingerprint`), and so
  does the map's tag ``soilnet_map``; tiles or a map of another grid or model are refused, naming each key that
  differs.
- The task that finds every tile done after writing its own assembles the map. MPI ranks wait for each other and
  rank 0 does; array tasks cannot wait, so every one that sees all tiles done tries to create
  ``<parts>/assemble.claim`` exclusively (:func:`soilnet.atomic.create_exclusive`, safe between hosts on a shared
  filesystem) and the one that creates it assembles. The claim stays, so the map is assembled once however late
  the others look; a task that has tiles to write removes it before writing them (a rerun that recomputes a
  corrupt tile assembles again). An assembler killed while assembling leaves its claim: a rerun without task
  options (one process) ignores the claim.
- One process (no task options) computes every missing tile, then assembles.

The driver knows nothing of how a tile is computed or how the map is assembled: both are callables
(:func:`soilnet.evaluate.maps.tile_writer` computes and writes a tile). It is the one loop over a map's tiles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError, RasterioIOError

from shards.parallel import Workers
from soilnet.atomic import create_exclusive
from soilnet.evaluate import maps
from soilnet.evaluate.maps import ComputeTile, MapError
from soilnet.progress import Progress

log = logging.getLogger("soilnet.map_tasks")

FINGERPRINT = "grid.json"
CLAIM = "assemble.claim"
TAG = "soilnet_map"  # the COG tag that records the fingerprint of the grid and model it maps

Tile = tuple[int, int]
# () -> what assembling the map reports (merged into the summary)
Assemble = Callable[[], dict]


def tile_path(parts: Path, tile: Tile) -> Path:
    """The finished tile's GeoTIFF (:func:`soilnet.evaluate.maps.tile_path`)."""
    return maps.tile_path(parts, *tile)


def read_tile(path: Path) -> np.ndarray:
    """A finished tile's bands; ``ValueError`` (or ``OSError``) naming the file when it is corrupt or truncated."""
    try:
        with rasterio.open(path) as src:
            return src.read()
    except RasterioError as err:
        raise ValueError(f"{path}: {type(err).__name__}: {err}") from err


def _tile_problem(path: Path) -> str | None:
    """Why the tile at ``path`` must be computed (missing, or unreadable), or None when it is whole."""
    if not path.exists():
        return "missing"
    try:
        read_tile(path)
    except (OSError, ValueError) as err:
        return f"corrupt or truncated ({err})"
    return None


def tiles_to_do(parts: Path, tiles: Sequence[Tile]) -> tuple[list[Tile], int]:
    """The tiles of ``tiles`` to compute, and how many of them are there but corrupt (each logged)."""
    todo, corrupt = [], 0
    for tile in tiles:
        problem = _tile_problem(tile_path(parts, tile))
        if problem is None:
            continue
        if problem != "missing":
            corrupt += 1
            log.warning("tile %s: %s is %s; recomputing it", tile, tile_path(parts, tile).name, problem)
        todo.append(tile)
    return todo, corrupt


def differences(old: object, new: object, key: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees, each with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [f"{key.lstrip('.')}: {old!r} there, {new!r} now"]


def claim_parts(parts: Path, fingerprint: dict) -> None:
    """Make ``parts`` the tile folder of this ``fingerprint`` (grid, model), or check that it is; safe when many
    tasks start at once. Tiles of another grid or model are refused with each key that differs."""
    parts.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fingerprint, indent=2, sort_keys=True)
    if create_exclusive(parts / FINGERPRINT, text.encode()):
        return
    found = differences(json.loads((parts / FINGERPRINT).read_text()), json.loads(text))
    if found:
        raise MapError(
            f"{parts} holds tiles of another grid or model ({'; '.join(found)}); it is never mixed in: delete it "
            "or choose another --out"
        )


def check_output(out: Path, fingerprint: dict) -> None:
    """Refuse an existing map at ``out`` of another grid or model (naming each key that differs), or one that does
    not record which (its tag :data:`TAG`); it is never overwritten."""
    if not out.exists():
        return
    try:
        with rasterio.open(out) as src:
            recorded = src.tags().get(TAG)
    except RasterioIOError:
        recorded = None
    if recorded is None:
        raise MapError(
            f"{out} exists and is not a map that records its grid and model: delete it or choose another --out"
        )
    found = differences(json.loads(recorded), json.loads(json.dumps(fingerprint)))
    if found:
        raise MapError(
            f"{out} is a map of another grid or model ({'; '.join(found)}); it is never overwritten: delete it or "
            "choose another --out"
        )


def compute_tiles(todo: Sequence[Tile], compute_tile: ComputeTile, label: str) -> dict:
    """Compute (and so write) each tile of ``todo``; report tiles, their ETA and cells/s (:mod:`soilnet.progress`)."""
    cells = failed = 0
    with Progress(label, len(todo), "tile") as progress:
        for tile in todo:
            n_cells, n_failed = compute_tile(*tile)
            cells += n_cells
            failed += n_failed
            log.info("%s: tile %s, %d cells", label, tile, n_cells)
            rate = cells / max(progress.clock() - progress.start, 1e-9)
            progress.postfix["cells"] = f"{cells} ({rate:.1f} cells/s)"
            progress.update(1)
    return {"new": len(todo), "cells": cells, "failed": failed}


def _assemble_once(parts: Path, tiles: Sequence[Tile], compute_tile: ComputeTile, assemble: Assemble, label: str):
    """Assemble after checking every tile (any corrupt one is recomputed first); the summary's update."""
    todo, corrupt = tiles_to_do(parts, tiles)
    extra = compute_tiles(todo, compute_tile, label) if todo else {"new": 0, "cells": 0, "failed": 0}
    return {"recomputed_at_assembly": corrupt, **{f"{k}_at_assembly": v for k, v in extra.items()}, **assemble()}


def _wins_assembly(parts: Path, workers: Workers) -> bool:
    if workers.world == 1 and not workers.is_array:
        return True  # one process: a rerun without task options; a claim left by a killed assembler is ignored
    if not workers.is_array:
        return workers.rank == 0  # MPI ranks have waited for each other
    return create_exclusive(parts / CLAIM, f"task {workers.rank} of {workers.world}\n".encode())


def run_tiles(
    tiles: Sequence[Tile],
    compute_tile: ComputeTile,
    assemble: Assemble,
    parts: Path,
    workers: Workers,
    max_tiles: int | None = None,
    name: str = "predict-map",
) -> dict:
    """This worker's unfinished tiles, then the assembly if it is the one to do it; returns a summary.

    ``complete``: every tile is done; ``assembled``: this worker assembled the map (then ``assemble``'s report is
    merged in); ``mine_done``: this worker's own tiles are all done (False only when ``max_tiles`` stopped it).
    """
    label = f"{name}[{workers.rank}/{workers.world}]"
    mine = [t for k, t in enumerate(tiles) if k % workers.world == workers.rank]
    todo, corrupt = tiles_to_do(parts, mine)
    limit = len(todo) if max_tiles is None else min(len(todo), max_tiles)
    summary = {"tiles": len(tiles), "mine": len(mine), "reused": len(mine) - len(todo), "recomputed": corrupt}
    if todo[:limit]:
        (parts / CLAIM).unlink(missing_ok=True)  # the map assembled before (if any) lacks these tiles
    summary.update(compute_tiles(todo[:limit], compute_tile, label))
    summary["mine_done"] = limit == len(todo)
    workers.barrier()
    summary["finished"] = sum(tile_path(parts, t).exists() for t in tiles)
    summary["complete"] = summary["finished"] == len(tiles)
    summary["assembled"] = False
    if not summary["complete"] or not _wins_assembly(parts, workers):
        return summary
    try:
        summary.update(_assemble_once(parts, tiles, compute_tile, assemble, label), assembled=True)
    except BaseException:
        if workers.is_array:
            (parts / CLAIM).unlink(missing_ok=True)  # failed: a rerun of any task may try again
        raise
    log.info("%s: assembled the map from %d tiles", label, len(tiles))
    return summary
