"""A stand-in training entry point for launcher tests: records the distributed environment it was given."""

import json
import os
from pathlib import Path


def record(cfg) -> dict:
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in keys}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env['RANK']}.json").write_text(json.dumps({**env, "steps": cfg.train.steps}))
    return {"stopped_early": False}
