"""DeepSpeed checkpoints of a pretraining run: save together, atomic ``latest``, keep the last K, resume on any
world size.

Layout under ``<output_dir>/checkpoints/``::

    step_00000010/            DeepSpeed's files (mp_rank_*, zero_pp_rank_* ...), plus
      rng_rank<r>.pt          each rank's torch / numpy / python RNG states
      soilnet.json            step, samples seen, loader state, world size, ZeRO stage, resolved config, version
    step_00000010.universal/  a universal checkpoint converted from it when the world size changed
    latest                    the tag of the newest complete checkpoint, replaced atomically after every rank
                              has finished writing; anything newer than it is an interrupted save

DeepSpeed's own ``latest`` file is not written (``save_latest=False``): ours is only replaced once the
checkpoint is complete, so a kill -9 during a save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from soilnet.distributed import barrier

LATEST = "latest"
META = "soilnet.json"
UNIVERSAL_SUFFIX = ".universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1].split(".")[0])


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its folder (``root / tag``) and its ``soilnet.json``."""

    root: Path
    tag: str
    meta: dict

    @property
    def path(self) -> Path:
        return self.root / self.tag


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def resolve(path: str | Path) -> CheckpointRef:
    """A checkpoint from an ``output_dir`` (its latest), its ``checkpoints`` folder, or one checkpoint folder."""
    p = Path(path)
    if (p / META).is_file():
        return CheckpointRef(p.parent, p.name, json.loads((p / META).read_text()))
    for root in (p / "checkpoints", p):
        ref = latest(root)
        if ref is not None:
            return ref
    raise FileNotFoundError(f"no complete pretraining checkpoint in {p} (expected checkpoints/latest or {META})")


def latest(root: str | Path) -> CheckpointRef | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    root = Path(root)
    f = root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    meta = root / tag / META
    if not meta.is_file():
        raise FileNotFoundError(f"{f} names {tag}, but {meta} is missing")
    return CheckpointRef(root, tag, json.loads(meta.read_text()))


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_gauss": [int(np_state["has_gauss"]), float(np_state["gauss"])],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": state["numpy_gauss"][0],
            "gauss": state["numpy_gauss"][1],
        }
    )
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, meta: dict, rank: int, keep_last: int) -> Path:
    """Every rank: write the DeepSpeed checkpoint and its RNG state; rank 0 then commits ``latest`` and prunes.

    ``meta`` (JSON-able) goes to ``soilnet.json`` and into DeepSpeed's client state.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = tag_for(step)
    # a plain data-parallel model has no tensor-parallel layout to describe; the version alone makes it
    # convertible by ds_to_universal (as Megatron-DeepSpeed declares it)
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client = {"soilnet": meta, UNIVERSAL_CHECKPOINT_INFO: info}
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        _atomic_write(root / tag / META, json.dumps(meta, indent=1, default=str))
        _atomic_write(root / LATEST, tag)
        prune(root, keep_last)
    barrier()
    return root / tag


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints, and any interrupted save newer than latest."""
    ref = latest(root)
    if ref is None:
        return
    current = step_of(ref.tag)
    complete = sorted(
        (d for d in root.iterdir() if d.is_dir() and d.name == tag_for(step_of(d.name)) and (d / META).is_file()),
        key=lambda d: step_of(d.name),
    )
    keep = {d.name for d in [c for c in complete if step_of(c.name) <= current][-keep_last:]}
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith("step_"):
            continue
        base = d.name.split(".")[0]
        if base not in keep or step_of(d.name) > current:
            shutil.rmtree(d, ignore_errors=True)


def load_rng(ref: CheckpointRef, rank: int) -> bool:
    """Restore this rank's RNG states if the checkpoint has them (same world size); returns whether it did."""
    f = ref.path / f"rng_rank{rank}.pt"
    if not f.is_file() or ref.meta.get("world_size") is None:
        return False
    set_rng_state(torch.load(f, weights_only=True))
    return True


def ensure_universal(ref: CheckpointRef, rank: int) -> str:
    """The tag of ``ref`` converted to a universal checkpoint (rank 0 converts once; everyone waits).

    Uses DeepSpeed's own converter, ``python -m deepspeed.checkpoint.ds_to_universal``, into a temporary folder
    renamed into place, so an interrupted conversion is redone rather than trusted.
    """
    tag = ref.tag + UNIVERSAL_SUFFIX
    target = ref.root / tag
    if rank == 0 and not (target / META).is_file():
        tmp = ref.root / (tag + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ref.path), "--output_folder", str(tmp),
            "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ref.path} to a universal checkpoint failed:\n{proc.stderr[-4000:]}")
        for f in ref.path.glob("rng_rank*.pt"):
            shutil.copy2(f, tmp / f.name)
        shutil.copy2(ref.path / META, tmp / META)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    barrier()
    return tag
