"""Checkpoints of a fine-tuning run, so that a job stopped by Slurm (or killed) resumes where it was.

Layout under ``<output_dir>/checkpoints/``::

    config.json   the resolved config of the run that wrote them; resuming under another config is refused
    fold_0.pt     fold 0: its training state after each epoch (or after the step it stopped at) while it trains,
                  then the fold's results once it has finished (the training state is dropped then)
    final.pt      the final model's training state (kept once finished: the saved model is rebuilt from it)

One process writes (rank 0 of a data-parallel run), each file atomically (a temporary file renamed into place),
so a kill at any moment leaves the previous complete file. Files are read with ``torch.load(weights_only=True)``
by that process and handed to the other ranks by broadcast, so the other ranks need not see the files. The
folder is removed when the run has written its metrics: a finished run starts afresh when run again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from soilnet.atomic import atomic_file, write_json
from soilnet.config.base import ConfigError, Section, to_plain
from soilnet.distributed import DistInfo

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
# keys that may differ between an interrupted run and its resumption: where the files live does not change them
IGNORED_KEYS = ("output_dir",)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"key: <saved> then, <current> now"`` for each dotted key whose value differs (or exists in one only)."""
    a, b = flatten(saved), flatten(current)
    missing = "(absent)"
    return [
        f"{k}: {json.dumps(a.get(k, missing))} then, {json.dumps(b.get(k, missing))} now"
        for k in sorted(set(a) | set(b))
        if k not in IGNORED_KEYS and a.get(k, missing) != b.get(k, missing)
    ]


class ResumeStore:
    """The checkpoints of one run. ``info``: this process's place among several, or None when alone."""

    def __init__(self, out: Path, info: DistInfo | None):
        self.root = Path(out) / CHECKPOINTS
        self.info = info
        self.writes = info is None or info.is_main

    @classmethod
    def open(cls, cfg: Section, out: str | Path, info: DistInfo | None) -> ResumeStore:
        """The store of ``out``, after checking that checkpoints left there were written under ``cfg``.

        Raises ConfigError (on every rank) naming each key that differs; otherwise records ``cfg`` for a later
        resumption. A run that saved nothing yet (it failed on bad input before its first epoch) is no reason to
        refuse: its recorded config is replaced."""
        store = cls(Path(out), info)
        error = None
        if store.writes:
            current = to_plain(cfg)
            saved_file = store.root / CONFIG
            if saved_file.is_file() and any(store.root.glob("*.pt")):
                diffs = config_differences(json.loads(saved_file.read_text()), current)
                if diffs:
                    error = (
                        f"{store.root} holds the checkpoints of an interrupted run with another config: "
                        + "; ".join(diffs)
                        + f". Resume with that run's config, or remove {store.root} (or use another output_dir) "
                        "to start afresh"
                    )
            else:
                store.root.mkdir(parents=True, exist_ok=True)
                write_json(saved_file, current, indent=1)
        error = store._from_rank0(error)
        if error:
            raise ConfigError(error)
        return store

    def _from_rank0(self, obj: Any) -> Any:
        if self.info is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.info.device if self.info.backend == "nccl" else None)
        return box[0]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict | None:
        """Every rank: the state saved under ``key`` (tensors on the CPU), or None."""
        state = None
        if self.writes and self.path(key).is_file():
            state = torch.load(self.path(key), map_location="cpu", weights_only=True)
        return self._from_rank0(state)

    def save(self, key: str, state: dict) -> None:
        """Write ``state`` (tensors and plain values) under ``key``; a no-op on ranks other than 0."""
        if self.writes:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path(key)) as f:
                torch.save(state, f)

    def clear(self) -> None:
        """Remove every checkpoint (the run is complete)."""
        if self.writes:
            shutil.rmtree(self.root, ignore_errors=True)
