"""How long ``configs/finetune/raca_climate.yaml`` takes on a RaCA-shaped, climate-only data set.

Writes the seed's RaCA layout with synthetic values: one CSV per TerraClimate variable (the 13 of the seed's RaCA
files, no ``vs``), named ``RaCA_<var>.csv``, with ``rcasiteid``, one ``YYYYMMDD`` column per month of the schema's
default range in stored (scaled integer) units, and ``SOCstock100``; plus a sites CSV with ``rcasiteid``, lon/lat
(conterminous US) and ``SOCstock100``. The climate follows latitude, longitude and the season; the SOC stock is a
log-normal function of the climate plus noise, so the model has something to learn. Then, as a user would:

    soilnet import-soilnet --climate DIR --points sites.csv --id-column rcasiteid --target-column SOCstock100
    soilnet finetune --config configs/finetune/raca_climate.yaml data.shards=... output_dir=...

    .venv/bin/python benchmarks/raca_climate.py [--sites 6000] [--out outputs/benchmarks/raca_climate] [key=value ...]

The last line printed is one JSON object: ``import_s``, ``finetune_s`` (wall-clock seconds of each command), the
size of the data set, and the fine-tuning metrics (R² of the model and the random forest, epochs run per fold).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "raca_climate.yaml"


def write_raca(folder: Path, sites: int, seed: int = 0) -> tuple[Path, Path]:
    """The seed's RaCA climate CSVs and a sites CSV under ``folder``; returns (climate folder, sites CSV)."""
    from soilnet import schema as S

    rng = np.random.default_rng(seed)
    ids = [f"C{1000 + i // 8:04d}C{i % 8 + 1:02d}" for i in range(sites)]  # RaCA-like: C1609C01
    lon = rng.uniform(-124.0, -67.0, sites)
    lat = rng.uniform(25.0, 49.0, sites)
    months = S.month_range(S.DEFAULT_FIRST_MONTH, S.DEFAULT_LAST_MONTH)
    m = np.array([int(x[5:]) for x in months])
    season = np.cos(2 * np.pi * (m - 7) / 12)[None, :]  # +1 in July
    tmean = 22.0 - 0.8 * (lat[:, None] - 25.0) + 10.0 * season + rng.normal(0, 1.5, (sites, len(months)))
    wet = np.clip((lon[:, None] + 124.0) / 57.0, 0, 1)  # dry west, wet east
    pr = np.clip(rng.gamma(2.0, 10.0 + 60.0 * wet, (sites, len(months))), 0, None)
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
        "swe": np.clip(-10.0 * (tmean - 0.0), 0, None),
        "tmmn": tmean - 6.0,
        "tmmx": tmean + 6.0,
        "vap": 0.6 + 0.05 * np.clip(tmean, 0, None) * (0.5 + wet),
        "vpd": np.clip(0.1 + 0.06 * tmean * (1.2 - wet), 0, None),
    }
    log_soc = (
        4.8
        + 0.6 * (pr.mean(1) / 60.0 - 1.0)
        - 0.03 * (tmean.mean(1) - 12.0)
        + 0.3 * np.sin(lon / 3.0)
        + rng.normal(0, 0.3, sites)
    )
    soc = np.round(np.exp(log_soc), 2)
    climate = folder / "climate"
    climate.mkdir(parents=True, exist_ok=True)
    dates = [f"{x[:4]}{x[5:]}01" for x in months]
    for var, values in physical.items():
        stored = np.round(values / S.CLIMATE_BY_NAME[var].scale).astype(np.int64)
        table = pd.DataFrame(stored, columns=dates)
        table.insert(0, "rcasiteid", ids)
        table["SOCstock100"] = soc  # the seed's RaCA files carry the target beside the series
        table.to_csv(climate / f"RaCA_{var}.csv", index=False)
    points = folder / "sites.csv"
    pd.DataFrame({"rcasiteid": ids, "lon": lon, "lat": lat, "SOCstock100": soc}).to_csv(points, index=False)
    return climate, points


def timed(argv: list[str], log: Path) -> float:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "soilnet.cli", *argv], cwd=REPO, env=env, stdout=f, stderr=f)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"soilnet {argv[0]} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=6000, help="RaCA sampled about 6,000 sites")
    p.add_argument("--out", default="outputs/benchmarks/raca_climate")
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    climate, points = write_raca(out / "raw", args.sites)
    shards, run_dir = out / "shards", out / "finetune"
    import_s = timed(
        ["import-soilnet", "--climate", str(climate), "--points", str(points), "--id-column", "rcasiteid",
         "--target-column", "SOCstock100", "--out", str(shards)],
        out / "import.log",
    )  # fmt: skip
    finetune_s = timed(
        ["finetune", "--config", str(CONFIG), f"data.shards={shards}", f"output_dir={run_dir}", *args.overrides],
        out / "finetune.log",
    )
    manifest = json.loads((shards / "manifest.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "import_s": round(import_s, 1),
        "finetune_s": round(finetune_s, 1),
        "sites": manifest["samples"],
        "climate_variables": manifest["schema"]["climate_variables"],
        "months": len(manifest["schema"]["months"]),
        "r2": m["model"]["r2"],
        "r2_rf": (m.get("baseline_rf") or {}).get("r2"),
        "split": m["split"].get("kind"),
        "epochs_run": [f["epochs_run"] for f in m["folds"]],
        "final_model_best_epoch": (m.get("final_model") or {}).get("best_epoch"),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
