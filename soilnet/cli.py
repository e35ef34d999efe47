"""The ``soilnet`` console script: parses arguments and dispatches; the work lives in the modules it names.

Config-driven commands share one loader: ``--config PATH`` plus ``key=value`` overrides. Each command's
implementation is imported only when that command runs, so ``--help`` stays fast and a preprocessing node
need not import the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from soilnet.config.base import ConfigError, load_config

# EX_TEMPFAIL: a job stopped on SIGUSR2/SIGTERM after every rank saved a checkpoint; run it again to resume.
EXIT_STOPPED_EARLY = 75


@dataclass(frozen=True)
class ConfigCommand:
    """A command whose whole input is one config tree; ``run(cfg)`` does the work."""

    help: str
    config_class: str  # "module:Class"
    run: str  # "module:function"


CONFIG_COMMANDS: dict[str, ConfigCommand] = {
    "pack": ConfigCommand(
        "sample or read points, acquire patches and climate, and pack them into WebDataset shards",
        "soilnet.config.pack:PackConfig",
        "shards.pack:run",
    ),
    "pretrain": ConfigCommand(
        "cross-modal contrastive pretraining with DeepSpeed (torchrun, srun or a single process)",
        "soilnet.config.pretrain:PretrainConfig",
        "soilnet.train.pretrain:run",
    ),
    "finetune": ConfigCommand(
        "fine-tune a SOC regressor on labelled shards, then evaluate it",
        "soilnet.config.finetune:FinetuneConfig",
        "soilnet.train.finetune:run",
    ),
    "evaluate": ConfigCommand(
        "cross-validated evaluation with a random-forest baseline and prediction intervals",
        "soilnet.config.finetune:EvaluateConfig",
        "soilnet.evaluate.run:run",
    ),
    "model-summary": ConfigCommand(
        "print one JSON object with the parameter count of each model component and the learning-rate groups "
        "of a fine-tuning config (or a model file)",
        "soilnet.config.finetune:FinetuneConfig",
        "soilnet.models.summary:run",
    ),
}


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soilnet",
        description="SoilNet at scale: pack shards, pretrain, fine-tune, evaluate and map soil organic carbon.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, cmd in CONFIG_COMMANDS.items():
        _add_config_args(sub.add_parser(name, help=cmd.help, description=cmd.help))

    p = sub.add_parser(
        "sample",
        help="random points uniform by area inside a region",
        description="random points uniform by area on the sphere inside the (multi)polygons of a GeoJSON file",
    )
    p.add_argument("--region", required=True, help="GeoJSON file of (multi)polygons")
    p.add_argument("--n", type=int, required=True, help="number of points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .parquet (or .csv) with columns id, lon, lat")
    p.add_argument("--exclude-raster", help="land-cover raster whose classes may exclude a point")
    p.add_argument("--exclude-classes", type=int, nargs="*", default=[], help="excluded class values")
    p.add_argument("--max-excluded-fraction", type=float, default=0.2, help="drop a point above this fraction")
    p.add_argument("--min-spacing-m", type=float, default=0.0, help="minimum distance between points (metres)")
    p.add_argument("--one-per-climate-cell", action="store_true", help="keep at most one point per TerraClimate cell")

    p = sub.add_parser("import-soilnet", help="pack the seed's layout (patches and/or climate CSVs) into shards")
    p.add_argument("--images", help="folder of {PointID}_{YYMMDD}.tif patches")
    p.add_argument("--climate", help="folder of per-variable climate CSVs")
    p.add_argument("--points", help="CSV with the ID and, optionally, lon/lat and the target (e.g. LUCAS)")
    p.add_argument("--id-column", help="the point-ID column of the climate CSVs and --points (e.g. Point_ID, "
                   "rcasiteid); patches are named by their ID")  # fmt: skip
    p.add_argument("--target-column", help="target column in the climate CSVs or --points (default: SOCstock100 "
                   "when the climate CSVs have it)")  # fmt: skip
    p.add_argument(
        "--target-name",
        default=None,
        help="schema target the column holds (default: OC -> soc, SOCstock100 -> soc_stock, else soc)",
    )
    p.add_argument(
        "--require-target",
        action="store_true",
        help="drop points without a usable target (default: keep them unlabelled)",
    )
    p.add_argument("--lon-column", default=None)
    p.add_argument("--lat-column", default=None)
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--climate-units",
        choices=["stored", "physical"],
        default="stored",
        help="climate CSVs hold Earth Engine's stored integers (scaled on import) or physical values",
    )

    p = sub.add_parser("export", help="write a pretraining checkpoint's encoders as plain safetensors")
    p.add_argument("--checkpoint", required=True, help="a run's output_dir (latest checkpoint) or one checkpoint")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument(
        "--shards",
        default=None,
        help="pretraining shards to read the normalisation statistics from, "
        "when the checkpoint predates recording them and its data.shards has moved",
    )

    p = sub.add_parser(
        "verify",
        help="check every shard of a manifest against its recorded sha256",
        description="check every shard listed in manifest.json against its recorded sha256; names each bad or "
        "missing shard and exits 1 if there is one, else prints a one-line summary",
    )
    p.add_argument("--shards", required=True, help="shard folder or its manifest.json")
    p.add_argument("--workers", type=int, default=4, help="shards hashed at once")

    p = sub.add_parser("predict-map", help="predict SOC over a grid and write a Cloud-Optimized GeoTIFF")
    p.add_argument("--checkpoint", required=True, help="a fine-tuning output_dir")
    p.add_argument("--region", required=True, help="GeoJSON file")
    p.add_argument("--resolution", type=float, required=True, help="grid spacing in metres")
    p.add_argument("--out", required=True, help="output .tif")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tile-size", type=int, default=256, help="tile edge in grid cells (unit of resumption)")
    p.add_argument("--max-tiles", type=int, default=None, help="stop after this many new tiles (rerun resumes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the source config")
    return parser


OTHER_COMMANDS = {
    "sample": "shards.sample:run_cli",
    "import-soilnet": "shards.import_soilnet:run_cli",
    "export": "soilnet.train.export:run_cli",
    "verify": "soilnet.data.verify:run_cli",
    "predict-map": "soilnet.evaluate.maps:run_cli",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may stand between options (`--config c.yaml a=1 --flag b=2`); argparse leaves the later ones over
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in CONFIG_COMMANDS:
            cmd = CONFIG_COMMANDS[args.command]
            cfg = load_config(_resolve(cmd.config_class), args.config, args.overrides)
            result = _resolve(cmd.run)(cfg)
        else:
            result = _resolve(OTHER_COMMANDS[args.command])(args)
    except (ConfigError, ValueError, OSError) as err:
        # bad input (a config, a path, a manifest, a schema mismatch): the message names it; a traceback would
        # only bury it. SOILNET_DEBUG=1 shows the traceback for a bug report.
        if os.environ.get("SOILNET_DEBUG"):
            raise
        print(f"soilnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and result.get("stopped_early"):
        return EXIT_STOPPED_EARLY
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
