"""Who packs what: MPI ranks (mpirun, via mpi4py), Slurm array tasks, or one process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from soilnet.config.base import ConfigError

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass
class Workers:
    """``rank`` of ``world`` workers. MPI ranks synchronise at the end and rank 0 writes the manifest; array
    tasks cannot wait for each other, so whichever finds every part record complete writes it."""

    rank: int = 0
    world: int = 1
    is_array: bool = False
    comm: Any = None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()


ARRAY_ENV = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
)


def array_task(env: Mapping[str, str]) -> tuple[int, int]:
    """``(rank, world)`` of this Slurm array task: its position among the array's indices, and their count.

    The indices must be evenly spaced (``--array=0-15``, ``0-30:2``, ``1,3,5``): Slurm gives each task only the
    lowest, highest and count of them, so a position is known only for an arithmetic progression, whose step is
    ``(MAX - MIN) / (COUNT - 1)``. ``SLURM_ARRAY_TASK_STEP`` is not used: Slurm sets it to 1 for a list such as
    ``1,3,5`` and to the first range's step for ``1-7:2,20``. For other index sets the task fails naming the
    variables; its siblings may pack part of the shards first, which a resubmitted regular array keeps (ranks of
    a progression never collide, so no two tasks ever write the same shard).
    """
    shown = ", ".join(f"{k}={env[k]}" for k in ARRAY_ENV if k in env)
    missing = [k for k in ARRAY_ENV[:4] if k not in env]
    if missing:
        raise ConfigError(f"a Slurm array task without {missing} ({shown}): cannot tell which shards are its own")
    task, first, last, count = (int(env[k]) for k in ARRAY_ENV[:4])
    span = last - first
    step = span // (count - 1) if count > 1 and span % (count - 1) == 0 else 0
    if count == 1 and task == first == last:
        return 0, 1
    if step <= 0 or (task - first) % step or not first <= task <= last:
        raise ConfigError(
            f"this Slurm array's indices are not evenly spaced ({shown}), so a task cannot tell which shards are its "
            f"own: submit --array=A-B or --array=A-B:STEP (e.g. --array=0-{count - 1}); shards already packed are "
            "kept"
        )
    return (task - first) // step, count


def workers_from_env() -> Workers:
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        rank, world = array_task(os.environ)
        return Workers(rank=rank, world=world, is_array=True)
    if any(v in os.environ for v in MPI_ENV):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.Get_size() > 1:
            return Workers(rank=comm.Get_rank(), world=comm.Get_size(), comm=comm)
    return Workers()


def workers_from(tasks: int | None = None, task_id: int | None = None) -> Workers:
    """Task ``task_id`` of ``tasks`` when given (``--tasks N --task-id K``: independent processes that, like array
    tasks, cannot wait for each other), else :func:`workers_from_env`'s (an MPI rank, a Slurm array task, or one
    process)."""
    if tasks is None and task_id is None:
        return workers_from_env()
    if tasks is None or task_id is None or tasks < 1 or not 0 <= task_id < tasks:
        raise ConfigError(f"--tasks {tasks} --task-id {task_id}: give both, with 0 <= task-id < tasks")
    return Workers(rank=task_id, world=tasks, is_array=True)
