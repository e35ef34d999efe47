"""How much SSL pretraining helps at few labels, on the synthetic world: a paired, seeded, inductive comparison.

Points. ``--samples`` labelled points are drawn from the synthetic world (``configs/preprocess/demo.yaml``'s box)
in the black squares of a checkerboard of ``2 x eval.split.block_km`` squares, so that half of the world holds no
labelled point. Fine-tuning (``--config``, default ``configs/finetune/demo.yaml``: both modalities, spatially
blocked 3-fold cross-validation, 100 km blocks, 25 km buffer) runs on them.

Pretraining variants (``configs/pretrain/demo.yaml``, one process, ``--pretrain-steps`` steps), each with
``--pretrain-seeds`` seeds (``train.seed`` and ``data.seed``):

- ``transductive``: pretrain on the labelled points themselves (without labels), as a practitioner who pretrains
  on the area to be mapped would; pretraining has seen every test block;
- ``inductive``: pretrain on as many other points, drawn from the same world away from the test blocks: none lies
  in a cross-validation block that holds a labelled point (the blocks of :func:`soilnet.evaluate.splits.
  spatial_blocks`, every one of which is a test block in some fold) nor within ``eval.split.buffer_km`` of a
  labelled point.

Arms. ``scratch`` (random encoders) and ``ssl`` (a variant's export) fine-tune the same architecture: the scratch
arm takes the export's encoder choices too (``apply_export_model``), and the benchmark records the parameter
names and shapes of every model actually built, per arm, and fails unless they are identical. Both arms share
the folds, the label subsets (from ``eval.split.seed``) and the fine-tuning seeds (``--seeds``, ``train.seed``),
so each SSL run has a scratch partner that differs only in the starting weights (and, by default, in the input
normalisation: the SSL arm scales inputs with the pretraining shards' statistics, ``data.normalisation``).

Gains. For each variant and label fraction, the paired differences ``R²(ssl, pretraining seed p, seed s) -
R²(scratch, seed s)`` over all ``p, s`` give the mean gain and a 95 % t-interval over the pairs
(``seeds x pretrain_seeds`` of them; pairs that share a scratch run or a pretraining run are not independent,
so the interval is optimistic about the pretraining-seed spread, which only 2 seeds cannot measure well).

Fine-tuning budget (``--budget samples``, the default): epochs and patience are scaled by 1 / fraction (capped by
``--max-epochs``) so that every run sees about as many training samples.

    .venv/bin/python benchmarks/ssl_gain.py                              # the defaults: 5 x 2 seeds, 3 fractions
    .venv/bin/python benchmarks/ssl_gain.py --fractions 0.05,0.2 --pretrain-steps 200

Everything goes to ``--out``; a finished step (packed world, pretraining, fine-tuning run) found there is reused.
The last line printed is one JSON object: ``transductive`` and ``inductive``, each ``{fraction: {gain, ci_low,
ci_high, seeds, ...}}``, plus ``architecture``, ``inductive_check``, settings and timings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
VARIANTS = ("transductive", "inductive")


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


# ------------------------------------------------------------------------------------------------- points


def _laea_cells(lon: np.ndarray, lat: np.ndarray, lon0: float, lat0: float, km: float) -> np.ndarray:
    """``(N, 2)`` int64 square indices of ``km`` squares on the equal-area plane centred at (lon0, lat0), as
    :func:`soilnet.evaluate.splits.spatial_blocks` draws them (it centres on the points' mean)."""
    from pyproj import Transformer

    laea = Transformer.from_crs(
        "EPSG:4326", f"+proj=laea +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m", always_xy=True
    )
    x, y = laea.transform(lon, lat)
    return np.stack([np.floor(np.asarray(x) / (km * 1000.0)), np.floor(np.asarray(y) / (km * 1000.0))], 1).astype(
        np.int64
    )


def draw_points(bbox, n: int, seed: int, block_km: float, buffer_km: float) -> tuple[dict, dict]:
    """(labelled, inductive) point sets ``{"lon", "lat"}`` of ``n`` points each, and a check of the exclusion.

    Labelled points lie in the black squares of a ``2 block_km`` checkerboard; inductive pretraining points share
    no cross-validation block with a labelled point and lie more than ``buffer_km`` from every one."""
    from shards.sources.synthetic import sample_bbox
    from soilnet.evaluate.splits import nearest_distance_km, spatial_blocks

    lon, lat = sample_bbox(bbox, 60 * n, seed)
    centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
    board = _laea_cells(lon, lat, *centre, 2 * block_km)
    black = np.flatnonzero(board.sum(1) % 2 == 0)[:n]
    if len(black) < n:
        raise SystemExit(f"only {len(black)} candidate points in the labelled squares; fewer --samples")
    lab = {"lon": lon[black], "lat": lat[black]}
    # the cross-validation's own blocks: spatial_blocks centres its grid on the labelled points' mean
    lab_blocks = _laea_cells(lab["lon"], lab["lat"], float(np.mean(lab["lon"])), float(np.mean(lab["lat"])), block_km)
    cand_blocks = _laea_cells(lon, lat, float(np.mean(lab["lon"])), float(np.mean(lab["lat"])), block_km)
    taken = {tuple(b) for b in lab_blocks}
    in_test_block = np.array([tuple(b) in taken for b in cand_blocks])
    near = nearest_distance_km(lon, lat, lab["lon"], lab["lat"]) <= buffer_km
    free = np.flatnonzero(~in_test_block & ~near)[:n]
    if len(free) < n:
        raise SystemExit(f"only {len(free)} candidate points away from the test blocks; fewer --samples")
    ind = {"lon": lon[free], "lat": lat[free]}
    # spatial_blocks on the labelled points groups them as _laea_cells does (same grid), checked here
    same = spatial_blocks(lab["lon"], lab["lat"], block_km)
    _, mine = np.unique(lab_blocks, axis=0, return_inverse=True)
    assert np.array_equal(same, mine.reshape(-1)), "the replicated block grid differs from spatial_blocks"
    check = {
        "labelled_blocks": len(taken),
        "inductive_points_in_a_labelled_block": int(sum(tuple(b) in taken for b in cand_blocks[free])),
        "min_distance_to_a_labelled_point_km": float(
            nearest_distance_km(ind["lon"], ind["lat"], lab["lon"], lab["lat"]).min()
        ),
        "buffer_km": buffer_km,
        "block_km": block_km,
    }
    return {"labelled": lab, "inductive": ind}, check


def write_points(path: Path, prefix: str, pts: dict) -> Path:
    rows = [f"{prefix}{i:05d},{lo:.6f},{la:.6f}" for i, (lo, la) in enumerate(zip(pts["lon"], pts["lat"], strict=True))]
    path.write_text("id,lon,lat\n" + "\n".join(rows) + "\n")
    return path


# -------------------------------------------------------------------------------------------- fine-tuning


def fingerprint(model) -> dict:
    """Parameter names and shapes of a model: a sha256 of them and the parameter count."""
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {"sha256": digest, "parameters": int(sum(p.numel() for p in model.parameters())), "tensors": len(shapes)}


@contextlib.contextmanager
def recording_models(seen: list[dict]):
    """Record the fingerprint of every model fine-tuning builds (what actually trains, not what a config says)."""
    import soilnet.train.finetune

    original = soilnet.train.finetune.build_model

    def build(*a, **kw):
        model = original(*a, **kw)
        seen.append(fingerprint(model))
        return model

    soilnet.train.finetune.build_model = build
    try:
        yield
    finally:
        soilnet.train.finetune.build_model = original


def finetune(config: str, overrides: list[str], export_meta: dict) -> tuple[dict, list[dict]]:
    """One ``soilnet finetune`` in this process, with the export's encoder choices in both arms; returns its
    metrics.json and the fingerprints of the models it built (from a saved run: ``[]``)."""
    import soilnet.jobs.finetune
    from soilnet.config.base import load_config
    from soilnet.config.finetune import FinetuneConfig
    from soilnet.train.regressor import apply_export_model, modalities_of

    cfg = load_config(FinetuneConfig, REPO / config, overrides)
    # the scratch arm gets the pretrained encoders' architecture: the arms differ only in the starting weights
    cfg.model = apply_export_model(cfg.model, export_meta, modalities_of(cfg.modalities))
    done = Path(cfg.output_dir) / "metrics.json"
    seen: list[dict] = []
    if not done.is_file():
        with recording_models(seen), contextlib.redirect_stdout(io.StringIO()):
            soilnet.jobs.finetune.run(cfg)
        (Path(cfg.output_dir) / "architectures.json").write_text(json.dumps(seen))
    else:
        seen = json.loads((Path(cfg.output_dir) / "architectures.json").read_text())
    return json.loads(done.read_text()), seen


def label(frac: float) -> str:
    return f"{frac * 100:g}%"


def t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of a t-interval for the mean of ``d``; (mean, None, None) for fewer than 2 values."""
    from scipy import stats

    mean = float(np.mean(d))
    if len(d) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


class Finetunes:
    """What the fine-tuning runs gave, keyed ``(arm, variant, pretrain seed, fraction label, seed)``."""

    def __init__(self) -> None:
        self.r2: dict = {}
        self.rmse: dict = {}
        self.architectures: dict[str, set[str]] = {"scratch": set(), "ssl": set()}
        self.arch_detail: dict[str, dict] = {}
        self.normalisation: dict[str, set[str]] = {"scratch": set(), "ssl": set()}
        self.rf: dict[str, float] = {}
        self.n_train: dict[str, list[int]] = {}

    def record(self, key: tuple, m: dict, seen: list[dict]) -> None:
        """One run's metrics.json and the fingerprints of the models it built."""
        arm, frac = key[0], key[3]
        self.r2[key], self.rmse[key] = m["model"]["r2"], m["model"]["rmse"]
        for f in seen:
            self.architectures[arm].add(f["sha256"])
            self.arch_detail[f["sha256"]] = f
        self.normalisation[arm].add((m.get("normalisation") or {}).get("used", "?"))
        if m.get("baseline_rf"):
            self.rf[frac] = m["baseline_rf"]["r2"]
        self.n_train[frac] = [f["n_train"] for f in m["folds"]]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command line, and the variants it asks for."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/benchmarks/ssl_gain")
    p.add_argument("--samples", type=int, default=512, help="labelled points, and points per pretraining set")
    p.add_argument("--points-seed", type=int, default=0, help="seed of the candidate points")
    p.add_argument("--pretrain-steps", type=int, default=400, help="steps of 32 samples")
    p.add_argument("--pretrain-seeds", type=int, default=2, help="pretraining runs per variant")
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds (folds and label subsets fixed)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="transductive,inductive or one of them")
    p.add_argument("--config", default="configs/finetune/demo.yaml", help="fine-tuning config (both arms)")
    p.add_argument(
        "--fractions",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.05, 0.2, 1.0],
        help="label fractions, comma-separated (default 0.05,0.2,1)",
    )
    p.add_argument(
        "--budget",
        choices=["samples", "epochs"],
        default="samples",
        help="samples: epochs and patience scaled by 1/fraction (capped by --max-epochs), so a run on "
        "5 %% of the labels sees about as many training samples as one on 100 %%; epochs: the config's",
    )
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides, e.g. train.encoders=frozen")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    return args, variants


def pack_worlds(out: Path, points: dict, variants: list[str]) -> dict[str, Path]:
    """The labelled world, and the inductive pretraining world when that variant runs; packed ones are reused."""
    from shards.pack import pack
    from soilnet.config.base import load_config
    from soilnet.config.pack import PackConfig

    worlds = {}
    for name, prefix in (("labelled", "L"), ("inductive", "U")):
        if name == "inductive" and "inductive" not in variants:
            continue
        folder = out / f"world_{name}"
        if not (folder / "manifest.json").is_file():
            csv = write_points(out / f"points_{name}.csv", prefix, points[name])
            pack_cfg = load_config(PackConfig, PACK, [f"output_dir={folder}", f"sampling.points={csv}"])
            with contextlib.redirect_stdout(io.StringIO()):
                pack(pack_cfg)  # in this process: no start-up per world
        worlds[name] = folder
    return worlds


def pretrain_variants(
    args: argparse.Namespace, out: Path, variants: list[str], worlds: dict[str, Path]
) -> tuple[dict[str, list[Path]], dict[str, list[dict]]]:
    """Every variant's pretraining runs and exports (finished ones reused), and a summary of each run."""
    from soilnet.train.export import export

    exports: dict[str, list[Path]] = {v: [] for v in variants}
    pretrain_summary: dict[str, list[dict]] = {v: [] for v in variants}
    for v in variants:
        shards = worlds["labelled" if v == "transductive" else "inductive"]
        for ps in range(args.pretrain_seeds):
            pre = out / f"pretrain_{v}_seed{ps}_{args.pretrain_steps}"
            enc = out / f"encoders_{v}_seed{ps}_{args.pretrain_steps}.safetensors"
            if not enc.is_file():
                sh(
                    [
                        "pretrain",
                        "--config",
                        str(PRETRAIN),
                        f"output_dir={pre}",
                        f"data.shards={shards}",
                        f"train.steps={args.pretrain_steps}",
                        f"checkpoint.every_steps={args.pretrain_steps}",
                        f"train.seed={ps}",
                        f"data.seed={ps}",
                        "train.tensorboard=false",
                        "train.log_every_steps=50",
                    ],
                    out / f"pretrain_{v}_seed{ps}.log",
                )
                export(pre, enc)  # plain file reading, no process group: in this process
            rows = [json.loads(ln) for ln in (pre / "metrics.jsonl").read_text().splitlines()]
            summary = {k: rows[-1].get(k) for k in ("step", "loss", "top1", "top5", "embedding_std")}
            pretrain_summary[v].append({**summary, "first_loss": rows[0]["loss"]})
            exports[v].append(enc)
    return exports, pretrain_summary


def schedule(args: argparse.Namespace, base, frac: float) -> list[str]:
    """The fine-tuning overrides of ``--budget samples``: epochs and patience scaled by 1 / fraction."""
    if args.budget == "epochs":
        return []
    epochs = min(args.max_epochs, math.ceil(base.train.epochs / frac))
    patience = min(epochs, math.ceil(base.train.patience / frac))
    return [f"train.epochs={epochs}", f"train.patience={patience}"]


def finetune_all(
    args: argparse.Namespace,
    out: Path,
    variants: list[str],
    worlds: dict[str, Path],
    exports: dict[str, list[Path]],
    base,
) -> Finetunes:
    """Both arms at every fraction and seed, the scratch arm paired with every SSL run of the same seed."""
    from soilnet.train.regressor import read_export

    export_meta = read_export(exports[variants[0]][0])[1]
    runs = Finetunes()
    for frac in args.fractions:
        arms = [("scratch", None, None, "null")]
        arms += [("ssl", v, ps, str(exports[v][ps])) for v in variants for ps in range(args.pretrain_seeds)]
        for seed in range(args.seeds):
            for arm, v, ps, pretrained in arms:
                tag = "scratch" if arm == "scratch" else f"ssl_{v}_p{ps}"
                run_dir = out / "runs" / f"{tag}_{label(frac).rstrip('%')}pct_seed{seed}"
                m, seen = finetune(
                    args.config,
                    [
                        f"data.shards={worlds['labelled']}",
                        f"output_dir={run_dir}",
                        f"pretrained={pretrained}",
                        f"train.label_fraction={frac}",
                        f"train.seed={seed}",
                        "final_model=false",
                        "eval.plots=false",
                        # the forest sees the same folds and subsets in every run: fit it once per fraction
                        f"eval.baseline.enabled={str(arm == 'scratch' and seed == 0).lower()}",
                        *args.overrides,
                        *schedule(args, base, frac),
                    ],
                    export_meta,
                )
                key = (arm, v, ps, label(frac), seed)
                runs.record(key, m, seen)
                print(f"{label(frac):>5} {tag:20s} seed {seed}: R² {runs.r2[key]:.3f}", file=sys.stderr)
    return runs


def gain_row(args: argparse.Namespace, runs: Finetunes, v: str, f: str) -> dict:
    """The paired SSL gain of one variant at one fraction label, with its 95 % interval."""
    r2, rmse = runs.r2, runs.rmse
    pairs = np.array(
        [
            r2[("ssl", v, ps, f, s)] - r2[("scratch", None, None, f, s)]
            for ps in range(args.pretrain_seeds)
            for s in range(args.seeds)
        ]
    )
    d_rmse = np.array(
        [
            rmse[("ssl", v, ps, f, s)] - rmse[("scratch", None, None, f, s)]
            for ps in range(args.pretrain_seeds)
            for s in range(args.seeds)
        ]
    )
    gain, lo, hi = t_interval(pairs)
    return {
        "gain": gain,
        "ci_low": lo,
        "ci_high": hi,
        "seeds": {"finetune": args.seeds, "pretrain": args.pretrain_seeds, "pairs": len(pairs)},
        "r2_scratch": float(np.mean([r2[("scratch", None, None, f, s)] for s in range(args.seeds)])),
        "r2_ssl": float(
            np.mean([r2[("ssl", v, ps, f, s)] for ps in range(args.pretrain_seeds) for s in range(args.seeds)])
        ),
        "gain_by_pretrain_seed": [
            float(np.mean(pairs[k * args.seeds : (k + 1) * args.seeds])) for k in range(args.pretrain_seeds)
        ],
        "rmse_change": float(np.mean(d_rmse)),
        "rf_r2": runs.rf.get(f),
        "n_train_per_fold": runs.n_train[f],
    }


def settings(args: argparse.Namespace, base) -> dict:
    """The run's settings, as the summary records them."""
    return {
        "samples": args.samples,
        "pretrain_steps": args.pretrain_steps,
        "seeds": args.seeds,
        "pretrain_seeds": args.pretrain_seeds,
        "fractions": args.fractions,
        "budget": args.budget,
        "schedule": {label(f): schedule(args, base, f) for f in args.fractions},
        "overrides": args.overrides,
        "config": args.config,
    }


def print_table(result: dict) -> None:
    """The gains as a Markdown table."""
    print("\n| variant | labels | R² scratch | R² SSL | gain [95 % CI] | pairs | RF R² |")
    print("|---|---|---|---|---|---|---|")
    for v, rows in result.items():
        for f, r in rows.items():
            ci = "–" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            rf_r2 = "–" if r["rf_r2"] is None else f"{r['rf_r2']:.3f}"
            print(
                f"| {v} | {f} | {r['r2_scratch']:.3f} | {r['r2_ssl']:.3f} | {r['gain']:+.3f} {ci} | "
                f"{r['seeds']['pairs']} | {rf_r2} |"
            )


def main(argv: list[str] | None = None) -> dict:
    args, variants = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    from soilnet.config.base import load_config
    from soilnet.config.finetune import FinetuneConfig
    from soilnet.config.pack import PackConfig

    base = load_config(FinetuneConfig, REPO / args.config, args.overrides)
    split = base.eval.split
    buffer_km = split.block_km if split.buffer_km is None else split.buffer_km
    bbox = load_config(PackConfig, PACK, []).source.bbox
    points, inductive_check = draw_points(bbox, args.samples, args.points_seed, split.block_km, buffer_km)

    t0 = time.time()
    worlds = pack_worlds(out, points, variants)
    timings["pack_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    exports, pretrain_summary = pretrain_variants(args, out, variants, worlds)
    timings["pretrain_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    runs = finetune_all(args, out, variants, worlds, exports, base)
    timings["finetune_s"] = round(time.time() - t0, 1)
    architectures = runs.architectures
    identical = len(architectures["scratch"] | architectures["ssl"]) == 1
    if not identical:
        raise SystemExit(f"the arms trained different architectures: {architectures} ({runs.arch_detail})")

    result = {v: {label(frac): gain_row(args, runs, v, label(frac)) for frac in args.fractions} for v in variants}
    summary = {
        **result,
        "architecture": {
            "scratch": sorted(architectures["scratch"]),
            "ssl": sorted(architectures["ssl"]),
            "identical": identical,
            "model": runs.arch_detail[next(iter(architectures["ssl"]))],
        },
        "normalisation": {k: sorted(s) for k, s in runs.normalisation.items()},
        "inductive_check": inductive_check if "inductive" in variants else None,
        "pretrain": pretrain_summary,
        "settings": settings(args, base),
        "seconds": {**timings, "total_s": round(time.time() - t_start, 1)},
    }
    (out / "ssl_gain.json").write_text(json.dumps(summary, indent=1))
    print_table(result)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
