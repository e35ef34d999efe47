"""The one command registry: ``soilnet <command>`` (soilnet/cli.py) and ``python -m launch.<job>`` are built from it.

Entries name their code as ``"module:function"`` strings, imported only when a command runs, so ``soilnet --help``
stays fast and a preprocessing node need not import the training stack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One command: ``run`` (``"module:function"``) gets the loaded config when ``config_class`` (``"module:Class"``)
    is set, else the parsed arguments. ``description`` defaults to ``help``."""

    help: str
    run: str
    config_class: str | None = None
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "pack": Command(
        "sample or read points, acquire patches and climate, and pack them into WebDataset shards",
        "soilnet.jobs.pack:run",
        "soilnet.config.pack:PackConfig",
    ),
    "pretrain": Command(
        "cross-modal contrastive pretraining with DeepSpeed (torchrun, srun or a single process)",
        "soilnet.jobs.pretrain:run",
        "soilnet.config.pretrain:PretrainConfig",
    ),
    "finetune": Command(
        "fine-tune a SOC regressor on labelled shards, then evaluate it",
        "soilnet.jobs.finetune:run",
        "soilnet.config.finetune:FinetuneConfig",
    ),
    "evaluate": Command(
        "cross-validated evaluation with a random-forest baseline and prediction intervals",
        "soilnet.jobs.evaluate:run",
        "soilnet.config.finetune:EvaluateConfig",
    ),
    "model-summary": Command(
        "print one JSON object with the parameter count of each model component and the learning-rate groups "
        "of a fine-tuning config (or a model file)",
        "soilnet.models.summary:run",
        "soilnet.config.finetune:FinetuneConfig",
    ),
    "sample": Command(
        "random points uniform by area inside a region",
        "shards.sample:run_cli",
        description="random points uniform by area on the sphere inside the polygons of a region file (GeoJSON, "
        "GeoPackage or Shapefile, in any CRS)",
    ),
    "import-soilnet": Command(
        "pack the seed's layout (patches and/or climate CSVs) into shards", "shards.import_soilnet:run_cli"
    ),
    "export": Command("write a pretraining checkpoint's encoders as plain safetensors", "soilnet.train.export:run_cli"),
    "verify": Command(
        "check every shard of a manifest against its recorded sha256",
        "soilnet.data.verify:run_cli",
        description="check every shard listed in manifest.json against its recorded sha256; names each bad or "
        "missing shard and exits 1 if there is one, else prints a one-line summary",
    ),
    "predict-map": Command(
        "predict SOC over a grid and write a Cloud-Optimized GeoTIFF", "soilnet.jobs.predict_map:run_cli"
    ),
    "doctor": Command(
        "check the install: torch and its CUDA, nccl, DeepSpeed and its ops, the loader's native kernels",
        "soilnet.jobs.doctor:run",
        description="print torch (version, build), CUDA (available, version, devices), nccl, DeepSpeed (version, "
        "accelerator, op compatibility) and the loader's native kernel ISA; exits 1 naming what a run needs "
        "and lacks",
    ),
}

# the jobs ``python -m launch.<name>`` submits through submitit (``-`` in a name is ``_`` in the module)
LAUNCHED = ("pretrain", "finetune", "pack", "predict-map")


def resolve(target: str) -> Any:
    """The object a ``"module:name"`` string names (the module is imported now)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
