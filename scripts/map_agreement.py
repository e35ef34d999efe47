"""Tile path vs per-point path of ``soilnet predict-map`` on the synthetic world (docs/maps.md).

    python scripts/map_agreement.py OUTDIR RESOLUTION_M WEST,SOUTH,EAST,NORTH

Packs the synthetic world and fine-tunes on it as tests/evaluate/test_synthetic_world.py does (once per OUTDIR),
maps the box both ways on the default grid and prints one JSON line: cells, correlation, largest difference and
the cells/s of each path.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

from soilnet.cli import main
from soilnet.jobs.predict_map import predict_map

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "evaluate"))
from test_synthetic_world import PACK, TRAIN  # noqa: E402


def trained(root: Path) -> Path:
    if not (root / "finetune" / "model.safetensors").exists():
        cfg = REPO / "configs"
        assert (
            main(["pack", "--config", str(cfg / "preprocess/demo.yaml"), f"output_dir={root / 'shards'}", *PACK]) == 0
        )
        argv = ["finetune", "--config", str(cfg / "finetune/demo.yaml"), f"data.shards={root / 'shards'}"]
        assert main([*argv, f"output_dir={root / 'finetune'}", *TRAIN]) == 0
    return root / "finetune"


def measure(root: Path, res: float, box: list[float]) -> dict:
    model = trained(root)
    w, s, e, n = box
    region = root / f"r{res:g}.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}))
    maps, rate = {}, {}
    for per_point in (False, True):
        out = root / f"soc_{res:g}_{'point' if per_point else 'tile'}.tif"
        out.unlink(missing_ok=True)
        shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
        t0 = time.perf_counter()
        summary = predict_map(model, region, res, out, tile_size=32, per_point=per_point)
        rate[per_point] = round(summary["cells"] / (time.perf_counter() - t0), 1)
        with rasterio.open(out) as src:
            maps[per_point] = src.read(1)
    tile, point = maps[False], maps[True]
    ok = np.isfinite(point)
    diff = np.abs(tile[ok] - point[ok])
    return {
        "resolution_m": res,
        "region": box,
        "cells": int(ok.sum()),
        "same_cells": bool(np.array_equal(ok, np.isfinite(tile))),
        "correlation": round(float(np.corrcoef(tile[ok], point[ok])[0, 1]), 5),
        "max_abs_diff_g_per_kg": round(float(diff.max()), 4),
        "max_rel_diff": round(float((diff / np.abs(point[ok])).max()), 5),
        "mean_soc_g_per_kg": round(float(point[ok].mean()), 3),
        "cells_per_s_tile": rate[False],
        "cells_per_s_per_point": rate[True],
    }


if __name__ == "__main__":
    root, res, box = Path(sys.argv[1]), float(sys.argv[2]), [float(v) for v in sys.argv[3].split(",")]
    root.mkdir(parents=True, exist_ok=True)
    print(json.dumps(measure(root, res, box)))
