"""How long ``configs/finetune/raca_climate.yaml`` takes on a RaCA-shaped, climate-only data set.

Writes the seed's exact RaCA layout with synthetic values (``tests/seed_layout.py``): one CSV per TerraClimate
variable (the 13 of the seed's RaCA files, no ``vs``), named ``RaCA_<var>.csv``: 61 ``YYYYMMDD`` columns in no
particular order in stored units with -999 for 0, ``system:index``, ``SOCstock100`` (some cells empty) and
``rcasiteid``; duplicated sites, no coordinates. The climate follows latitude, longitude and the season; the SOC
stock is a log-normal function of the climate plus noise, so the model has something to learn. Then, as a user
would:

    soilnet import-soilnet --climate DIR --id-column rcasiteid --target-column SOCstock100 --out DIR
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import seed_layout  # noqa: E402

CONFIG = REPO / "configs" / "finetune" / "raca_climate.yaml"


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
    climate = out / "raw" / "climate"
    seed_layout.write_raca(climate, args.sites)
    shards, run_dir = out / "shards", out / "finetune"
    import_s = timed(seed_layout.raca_import_argv(climate, shards), out / "import.log")
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
