"""DeepSpeed checkpoints of a pretraining run: save together, mark complete, keep the last K, resume on any
world size.

Layout under ``<output_dir>/checkpoints/``::

    step_00000010/            DeepSpeed's files (mp_rank_*, zero_pp_rank_* ...), plus
      rng_rank<r>.pt          each rank's torch / numpy / python RNG states
      soilnet.json            step, samples seen, loader state, world size, ZeRO stage, resolved config, version,
                              and ``files``: every file of the checkpoint with its size in bytes
    step_00000010.universal/  a universal checkpoint converted from it when the world size changed
    latest                    the tag of the newest complete checkpoint, replaced atomically after it is complete

**Complete** means: ``soilnet.json`` exists and every file it lists has the listed size. Rank 0 writes it last,
after every rank has written (and fsynced) its files and passed a barrier, so it is the completion marker; the run
resumes from the newest complete checkpoint, whatever ``latest`` says. A save cut short (kill -9, a lost node, a
full disk) leaves a folder without a valid ``soilnet.json``: it is never loaded, it is removed by the next save of
that step or by pruning, and pruning only ever runs after a newer checkpoint is complete. DeepSpeed's own
``latest`` file is not written (``save_latest=False``).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from soilnet.atomic import fsync_path, write_text
from soilnet.distributed import barrier

log = logging.getLogger("soilnet.pretrain")

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


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (a full disk, a quota, an I/O error); the message names the file, the
    free space and the checkpoint still in charge. An ``OSError``, so ``soilnet`` reports it as one line."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def write_error(path: Path, root: Path, err: BaseException) -> CheckpointWriteError:
    """The error for a failed write of ``path`` (a file of a checkpoint under ``root``)."""
    try:
        usage = shutil.disk_usage(root)
        space = f"{_human(usage.free)} free of {_human(usage.total)} on the file system of {root}"
    except OSError as e:
        space = f"free space of {root} unknown ({e})"
    ref = latest(root)
    kept = f"the checkpoint in charge is still {ref.path} (step {ref.meta.get('step')})" if ref else "none is complete"
    return CheckpointWriteError(
        f"could not write checkpoint file {path}: {err}; {space}. Nothing of this save is used ({kept}): free "
        "space, or set output_dir elsewhere, and run again to resume"
    )


def _atomic_write(path: Path, text: str, root: Path) -> None:
    """:func:`soilnet.atomic.write_text`, a failure named as a checkpoint's (:func:`write_error`)."""
    try:
        write_text(path, text)
    except OSError as err:
        raise write_error(path, root, err) from err


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


def complete(folder: Path) -> dict | None:
    """``folder``'s ``soilnet.json`` if the checkpoint is complete (every file it lists is there with its size),
    else None. Checkpoints written before ``files`` was recorded count as complete by ``soilnet.json`` alone."""
    try:
        meta = json.loads((folder / META).read_text())
        files = meta.get("files") or {}
        if all((folder / name).stat().st_size == size for name, size in files.items()):
            return meta
    except (OSError, ValueError):
        pass
    return None


def _step_folders(root: Path) -> list[Path]:
    """``step_XXXXXXXX`` folders under ``root`` (universal conversions and temporary folders excluded), newest
    first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and d.name == _canonical(d.name)]
    return sorted(found, key=lambda d: step_of(d.name), reverse=True)


def _canonical(name: str) -> str | None:
    try:
        return tag_for(step_of(name))
    except ValueError:
        return None


def latest(root: str | Path) -> CheckpointRef | None:
    """The newest complete checkpoint under ``root``, or None when there is none yet.

    ``root/latest`` normally names it; when it does not (a kill between the completion marker and the pointer, or
    a pointer naming a folder that is gone or incomplete), the scan wins and the difference is logged.
    """
    root = Path(root)
    for folder in _step_folders(root):
        meta = complete(folder)
        if meta is None:
            continue
        pointer = root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named != folder.name:
            log.warning("%s names %s; the newest complete checkpoint is %s, which is used", pointer, named, folder.name)
        return CheckpointRef(root, folder.name, meta)
    return None


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


@dataclass
class StepStart:
    """What a step changes besides the parameters and the optimizer: this rank's RNG states and the module's
    buffers (BatchNorm statistics), taken before the step, so a step that must not count (a non-finite loss) can
    be undone before saving. The copies are small next to a step: no parameters, no optimizer state."""

    rng: dict
    buffers: dict[str, torch.Tensor]

    @classmethod
    def take(cls, module: torch.nn.Module) -> StepStart:
        return cls(rng_state(), {n: b.detach().clone() for n, b in module.named_buffers()})

    def restore_buffers(self, module: torch.nn.Module) -> None:
        for name, buf in module.named_buffers():
            buf.copy_(self.buffers[name])


@contextmanager
def _tracked_writes(engine, root: Path, written: list[Path]):
    """Record the files DeepSpeed writes through its checkpoint engine (to fsync them) and turn a failed write into
    a :class:`CheckpointWriteError` naming the file: torch's own message for a full disk is ``unexpected pos``."""
    writer = engine.checkpoint_engine
    original = writer.save

    def save(state_dict, path):
        try:
            result = original(state_dict, path)
        except (OSError, RuntimeError) as err:
            raise write_error(Path(path), root, err) from err
        written.append(Path(path))
        return result

    own = "save" in vars(writer)  # an engine may set its own on the instance: put back exactly what was there
    writer.save = save  # on the instance, for this save only
    try:
        yield
    finally:
        if own:
            writer.save = original
        else:
            del writer.save


def save(engine, root: Path, step: int, meta: dict, rank: int, keep_last: int, rng: dict | None = None) -> Path:
    """Every rank: write the DeepSpeed checkpoint and its RNG state (``rng``, else the current one) and fsync them;
    after a barrier rank 0 lists the files in ``soilnet.json`` (the completion marker), points ``latest`` at it and
    prunes. ``meta`` (JSON-able) goes to ``soilnet.json`` and into DeepSpeed's client state.

    A leftover folder of this step (an earlier save cut short) is removed first. A failed write raises
    :class:`CheckpointWriteError` on the rank that met it; the other ranks then fail on the lost peer. Either way
    the previous complete checkpoint stays in charge.
    """
    # heavy (DeepSpeed's op builders); only a training process saves, and it has DeepSpeed loaded already
    # DeepSpeed internals: constraints.txt pins deepspeed exactly (0.19.8); recheck these names when it moves
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = tag_for(step)
    folder = root / tag
    if complete(folder) is not None:  # resumed at this step: the same state is already saved
        return folder
    if rank == 0 and folder.exists():
        # a save of this step cut short before; its files must not mix with this one's (e.g. another world size's)
        log.warning("%s: removing an incomplete earlier save of this step", folder)
        _remove(folder)
    barrier()
    # a plain data-parallel model has no tensor-parallel layout to describe; the version alone makes it
    # convertible by ds_to_universal (as Megatron-DeepSpeed declares it)
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client = {"soilnet": meta, UNIVERSAL_CHECKPOINT_INFO: info}
    written: list[Path] = []
    try:
        with _tracked_writes(engine, root, written):
            engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    except CheckpointWriteError:
        raise
    except OSError as err:  # DeepSpeed's own copies (zero_to_fp32.py)
        raise write_error(folder, root, err) from err
    rng_file = folder / f"rng_rank{rank}.pt"
    try:
        torch.save(rng if rng is not None else rng_state(), rng_file)
        for f in [*written, rng_file]:  # this rank's files reach the disk before the checkpoint is marked complete
            fsync_path(f)
    except (OSError, RuntimeError) as err:
        raise write_error(rng_file, root, err) from err
    barrier()
    if rank == 0:
        files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
        _atomic_write(folder / META, json.dumps({**meta, "files": files}, indent=1, default=str), root)
        _atomic_write(root / LATEST, tag, root)
        prune(root, keep_last)
    barrier()
    return folder


def _remove(folder: Path) -> None:
    """Remove a checkpoint folder, its completion marker first: a removal cut short leaves no complete-looking
    checkpoint behind."""
    (folder / META).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and their universal conversions); remove every other
    ``step_*`` folder, incomplete ones included. Does nothing until one checkpoint is complete, so the last
    complete checkpoint is never removed before a newer one is."""
    kept = [d.name for d in _step_folders(root) if complete(d) is not None][:keep_last]
    if not kept:
        return
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step_") and d.name.split(".")[0] not in kept:
            _remove(d)


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
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        cmd += ["--input_folder", str(ref.path), "--output_folder", str(tmp)]
        cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
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
