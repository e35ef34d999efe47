"""The ``soilnet`` console script: parses arguments and dispatches; the work lives in the modules it names.

The commands, their help and their code come from one registry (:mod:`soilnet.jobs.commands`). Config-driven
commands share one loader: ``--config PATH`` plus ``key=value`` overrides. Each command's implementation is
imported only when that command runs, so ``--help`` stays fast and a preprocessing node need not import the
training stack.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from soilnet import __version__
from soilnet.buildinfo import native_isa, torch_cuda
from soilnet.config.base import ConfigError, load_config, resolved_yaml
from soilnet.jobs.commands import COMMANDS, resolve

# EX_TEMPFAIL: a job stopped on SIGUSR2/SIGTERM after every rank saved a checkpoint; run it again to resume.
EXIT_STOPPED_EARLY = 75


def git_commit() -> str:
    """The commit of this source tree (git, when it runs from a checkout), else the one in the version (an
    installed copy: setuptools-scm's ``+g<hash>``), else unknown."""
    here = Path(__file__).resolve().parent
    if "site-packages" not in here.parts:
        try:
            shown = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
            if shown.returncode == 0 and shown.stdout.strip():
                return shown.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    local = re.search(r"\+g([0-9a-f]+)", __version__)  # setuptools-scm: 0.1.dev3+g1a2b3c4[.dYYYYMMDD]
    return local.group(1) if local else "unknown"


def _installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    """``soilnet --version``: the package, its commit, torch, DeepSpeed, the CUDA version of the torch build and
    the loader's native kernel ISA, all read from metadata and files (nothing heavy imported; ``soilnet doctor``
    imports them and checks the devices)."""
    return (
        f"soilnet {__version__}\ncommit {git_commit()}\ntorch {_installed('torch')}\n"
        f"deepspeed {_installed('deepspeed')}\ncuda {torch_cuda()}\nnative-isa {native_isa()}"
    )


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked for (the git call stays out of every other invocation)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (as the run saves it) and exit"
    )


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", required=True, help="region file of polygons: GeoJSON, GeoPackage or Shapefile")
    p.add_argument("--n", type=int, required=True, help="number of points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .parquet (or .csv) with columns id, lon, lat")
    p.add_argument("--exclude-raster", help="land-cover raster whose classes may exclude a point")
    p.add_argument("--exclude-classes", type=int, nargs="*", default=[], help="excluded class values")
    p.add_argument("--max-excluded-fraction", type=float, default=0.2, help="drop a point above this fraction")
    p.add_argument("--min-spacing-m", type=float, default=0.0, help="minimum distance between points (metres)")
    p.add_argument("--one-per-climate-cell", action="store_true", help="keep at most one point per TerraClimate cell")


def _import_soilnet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder of {PointID}_{YYMMDD}.tif patches")
    p.add_argument("--climate", help="folder of per-variable climate CSVs")
    p.add_argument("--points", help="CSV with the ID and, optionally, lon/lat and the target (e.g. LUCAS)")
    p.add_argument(
        "--id-column",
        help="the point-ID column of the climate CSVs and --points (e.g. Point_ID, rcasiteid); patches are named "
        "by their ID",
    )
    p.add_argument(
        "--target-column",
        help="target column in the climate CSVs or --points (default: SOCstock100 when the climate CSVs have it)",
    )
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


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run's output_dir (latest checkpoint) or one checkpoint")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument(
        "--shards",
        default=None,
        help="pretraining shards to read the normalisation statistics from, "
        "when the checkpoint predates recording them and its data.shards has moved",
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="shard folder or its manifest.json")
    p.add_argument("--workers", type=int, default=4, help="shards hashed at once")


def _predict_map_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a fine-tuning output_dir")
    p.add_argument("--region", required=True, help="region file: GeoJSON, GeoPackage or Shapefile (its CRS honoured)")
    p.add_argument("--resolution", type=float, required=True, help="grid spacing in metres")
    p.add_argument("--out", required=True, help="output .tif")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tile-size", type=int, default=256, help="tile edge in grid cells (unit of resumption)")
    p.add_argument("--max-tiles", type=int, default=None, help="stop after this many new tiles (rerun resumes)")
    p.add_argument("--crs", default=None, help="grid CRS, e.g. EPSG:3035 (default: 3035 in Europe, else a LAEA)")
    p.add_argument("--origin", type=float, nargs=2, default=None, metavar=("X", "Y"), help="grid alignment origin")
    p.add_argument("--bf16", action="store_true", help="predict under bfloat16 autocast")
    p.add_argument("--per-point", action="store_true", help="build each cell on its own (the slow, old path)")
    p.add_argument("--tasks", type=int, default=None, help="spread the tiles over N independent tasks (with --task-id)")
    p.add_argument(
        "--task-id",
        type=int,
        default=None,
        help="this task's index, 0..N-1 (default: the MPI rank or Slurm array task, else one task does every tile)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the source config")


def _no_args(p: argparse.ArgumentParser) -> None:
    """A command that takes no arguments (``doctor``)."""


# the arguments of each command that is not config-driven
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "sample": _sample_args,
    "import-soilnet": _import_soilnet_args,
    "export": _export_args,
    "verify": _verify_args,
    "predict-map": _predict_map_args,
    "doctor": _no_args,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soilnet",
        description="SoilNet at scale: pack shards, pretrain, fine-tune, evaluate and map soil organic carbon.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version, commit, torch, DeepSpeed, CUDA and native ISA"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        (_config_args if cmd.config_class else ARGUMENTS[name])(p)
    return parser


def _dispatch(args: argparse.Namespace) -> object:
    cmd = COMMANDS[args.command]
    if cmd.config_class:
        cfg = load_config(resolve(cmd.config_class), args.config, args.overrides)
        if args.print_config:  # the job's module (and torch) is never imported
            print(resolved_yaml(cfg), end="")
            return 0
        return resolve(cmd.run)(cfg)
    return resolve(cmd.run)(args)


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
        result = _dispatch(args)
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
