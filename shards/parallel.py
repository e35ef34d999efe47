"""Who packs what: MPI ranks (mpirun, via mpi4py), Slurm array tasks, or one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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


def workers_from_env() -> Workers:
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Workers(rank=task, world=int(os.environ["SLURM_ARRAY_TASK_COUNT"]), is_array=True)
    if any(v in os.environ for v in MPI_ENV):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.Get_size() > 1:
            return Workers(rank=comm.Get_rank(), world=comm.Get_size(), comm=comm)
    return Workers()
