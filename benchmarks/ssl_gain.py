"""How much SSL pretraining helps at few labels, on the synthetic world.

Packs a synthetic world (``configs/preprocess/demo.yaml``, ``--samples`` points), pretrains on it without labels
(``configs/pretrain/demo.yaml``, one process, ``--pretrain-steps``), exports the encoders, then fine-tunes
(``configs/finetune/demo.yaml``: both modalities, spatially blocked 3-fold cross-validation) on 5 %, 20 % and
100 % of each fold's labelled training pool, from scratch and from the pretrained encoders. Both arms share the
folds, the label subsets (drawn from ``eval.split.seed``) and the training seeds, so the only difference is the
starting weights. Reports pooled held-out R² and RMSE (original units, g/kg), the mean over ``--seeds`` training
seeds, and the random-forest baseline on the same folds.

Fine-tuning budgets (``--budget samples``, the default): the demo config's 20 epochs (patience 5) are meant for all
labels; on 5 % of them an epoch is one batch, and 20 epochs would compare two barely trained networks. So epochs and
patience are scaled by 1 / fraction (capped by ``--max-epochs``): every run sees about as many training samples.

    .venv/bin/python benchmarks/ssl_gain.py                       # 3.5 minutes on the 2-core machine
    .venv/bin/python benchmarks/ssl_gain.py --pretrain-steps 1200 # longer pretraining, about 7 minutes
    .venv/bin/python benchmarks/ssl_gain.py train.encoders=frozen   # a probe of frozen features

``--shards`` / ``--encoders`` reuse an existing world / export. Trailing ``key=value`` arguments override the
fine-tuning config for both arms. Everything goes to ``--out``; the last line printed is one JSON object
(``r2_scratch``, ``r2_ssl``, ``gain`` per label fraction, ``gain_at_5pct``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "configs" / "preprocess" / "demo.yaml"
PRETRAIN = REPO / "configs" / "pretrain" / "demo.yaml"


def sh(argv: list[str], log: Path) -> None:
    """Run a ``soilnet`` command as its own process (DeepSpeed wants one), its output into ``log``."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # one process of its own, not a rank of whatever launched the benchmark
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "soilnet.cli", *argv], cwd=REPO, env=env, stdout=f, stderr=f)
    if proc.returncode != 0:
        raise SystemExit(f"soilnet {argv[0]} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")


def finetune(config: str, overrides: list[str]) -> dict:
    """One ``soilnet finetune`` in this process (no start-up per run); returns its metrics.json."""
    from soilnet.config.base import load_config
    from soilnet.config.finetune import FinetuneConfig
    from soilnet.train.finetune import run

    cfg = load_config(FinetuneConfig, REPO / config, overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    return json.loads((Path(cfg.output_dir) / "metrics.json").read_text())


def label(frac: float) -> str:
    return f"{frac * 100:g}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/benchmarks/ssl_gain")
    p.add_argument("--samples", type=int, default=512, help="points of the synthetic world")
    p.add_argument("--shards", default=None, help="labelled shards to use instead of packing a world")
    p.add_argument("--encoders", default=None, help="a `soilnet export` file instead of pretraining")
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of 32 samples")
    p.add_argument("--config", default="configs/finetune/demo.yaml", help="fine-tuning config (both arms)")
    p.add_argument("--fractions", type=lambda v: [float(x) for x in v.split(",")], default=[0.05, 0.2, 1.0],
                   help="label fractions, comma-separated (default 0.05,0.2,1)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2, help="training seeds per setting (folds and subsets fixed)")
    p.add_argument(
        "--budget",
        choices=["samples", "epochs"],
        default="samples",
        help="samples: epochs and patience scaled by 1/fraction (capped by --max-epochs), so a run on "
        "5 %% of the labels sees about as many training samples as one on 100 %%; epochs: the config's",
    )
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides, e.g. train.encoders=frozen")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings = {}

    shards = Path(args.shards).resolve() if args.shards else out / "shards"
    if not (shards / "manifest.json").is_file():
        t0 = time.time()
        sh(["pack", "--config", str(PACK), f"output_dir={shards}", f"sampling.n={args.samples}"], out / "pack.log")
        timings["pack_s"] = round(time.time() - t0, 1)

    # one folder per pretraining length: a rerun with other steps must not resume a finished shorter run
    encoders = Path(args.encoders).resolve() if args.encoders else out / f"encoders_{args.pretrain_steps}.safetensors"
    if args.encoders is None:
        t0 = time.time()
        pre = out / f"pretrain_{args.pretrain_steps}"
        sh(
            ["pretrain", "--config", str(PRETRAIN), f"output_dir={pre}", f"data.shards={shards}",
             f"train.steps={args.pretrain_steps}", f"checkpoint.every_steps={args.pretrain_steps}",
             "train.tensorboard=false", "train.log_every_steps=50"],
            out / "pretrain.log",
        )  # fmt: skip
        sh(["export", "--checkpoint", str(pre), "--out", str(encoders)], out / "export.log")
        rows = [json.loads(ln) for ln in (pre / "metrics.jsonl").read_text().splitlines()]
        timings["pretrain_s"] = round(time.time() - t0, 1)
        pre_summary = {k: rows[-1][k] for k in ("step", "loss", "top1", "top5", "embedding_std")}
        pre_summary["first_loss"] = rows[0]["loss"]
    else:
        pre_summary = None

    from soilnet.config.base import load_config
    from soilnet.config.finetune import FinetuneConfig

    base = load_config(FinetuneConfig, REPO / args.config, args.overrides).train

    def schedule(frac: float) -> list[str]:
        if args.budget == "epochs":
            return []
        epochs = min(args.max_epochs, math.ceil(base.epochs / frac))
        patience = min(epochs, math.ceil(base.patience / frac))
        return [f"train.epochs={epochs}", f"train.patience={patience}"]

    arms = {"scratch": "null", "ssl": str(encoders)}
    results: dict[str, dict[str, list[dict]]] = {arm: {} for arm in arms}
    rf: dict[str, float] = {}
    n_train: dict[str, list[int]] = {}
    t0 = time.time()
    for frac in args.fractions:
        for arm, pretrained in arms.items():
            for seed in range(args.seeds):
                run_dir = out / f"{arm}_{label(frac).rstrip('%')}pct_seed{seed}"
                m = finetune(
                    args.config,
                    [f"data.shards={shards}", f"output_dir={run_dir}", f"pretrained={pretrained}",
                     f"train.label_fraction={frac}", f"train.seed={seed}", "final_model=false",
                     "eval.plots=false",
                     # the forest sees the same folds and subsets in both arms: fit it once per fraction
                     f"eval.baseline.enabled={str(arm == 'scratch' and seed == 0).lower()}",
                     *args.overrides, *schedule(frac)],
                )  # fmt: skip
                results[arm].setdefault(label(frac), []).append(m["model"])
                if m.get("baseline_rf"):
                    rf[label(frac)] = m["baseline_rf"]["r2"]
                n_train[label(frac)] = [f["n_train"] for f in m["folds"]]
                print(f"{label(frac):>5} {arm:8s} seed {seed}: R² {m['model']['r2']:.3f}", file=sys.stderr)
    timings["finetune_s"] = round(time.time() - t0, 1)

    def mean(arm: str, key: str) -> dict[str, float]:
        return {f: float(np.mean([r[key] for r in rs])) for f, rs in results[arm].items()}

    r2_scratch, r2_ssl = mean("scratch", "r2"), mean("ssl", "r2")
    gain = {f: r2_ssl[f] - r2_scratch[f] for f in r2_scratch}
    summary = {
        "r2_scratch": r2_scratch,
        "r2_ssl": r2_ssl,
        "gain": gain,
        "gain_at_5pct": gain.get("5%"),
        "r2_sd_scratch": {f: float(np.std([r["r2"] for r in rs])) for f, rs in results["scratch"].items()},
        "r2_sd_ssl": {f: float(np.std([r["r2"] for r in rs])) for f, rs in results["ssl"].items()},
        "rmse_scratch": mean("scratch", "rmse"),
        "rmse_ssl": mean("ssl", "rmse"),
        "r2_rf": rf,
        "n_train_per_fold": n_train,
        "n_points": results["scratch"][label(args.fractions[0])][0]["n"],
        "seeds": args.seeds,
        "pretrain": pre_summary,
        "pretrain_steps": args.pretrain_steps if args.encoders is None else None,
        "overrides": args.overrides,
        "budget": args.budget,
        "schedule": {label(f): schedule(f) for f in args.fractions},
        "seconds": {**timings, "total_s": round(time.time() - t_start, 1)},
    }
    (out / "ssl_gain.json").write_text(json.dumps(summary, indent=1))
    print("\n| labels | n train / fold | R² scratch | R² SSL | gain | RF R² |\n|---|---|---|---|---|---|")
    for f in r2_scratch:
        sd_a, sd_b = summary["r2_sd_scratch"][f], summary["r2_sd_ssl"][f]
        print(
            f"| {f} | {', '.join(map(str, n_train[f]))} | {r2_scratch[f]:.3f} ± {sd_a:.3f} | "
            f"{r2_ssl[f]:.3f} ± {sd_b:.3f} | {gain[f]:+.3f} | {rf.get(f, float('nan')):.3f} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
