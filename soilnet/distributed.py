"""Process-group set-up from whatever launched us (torchrun, srun, submitit, or nothing), and gather with grad.

The training code never asks which scheduler started it: :func:`init_distributed` reads the torch.distributed
``env://`` variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) as torchrun and
``launch/`` set them, falls back to Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` under a bare
``srun``, and otherwise runs as a single process.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soilnet.rendezvous import head_address


class DistributedError(RuntimeError):
    """A distributed set-up that cannot work (e.g. nccl without GPUs)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    """The ``env://`` variables for this process: from torchrun/launch, from Slurm, or a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE") if k in env}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or head_address() or "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port()),
    }


def resolve_backend(backend: str) -> str:
    """``auto`` is nccl when CUDA is available, else gloo; nccl without a GPU is an error."""
    cuda = torch.cuda.is_available()
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise DistributedError(
            "distributed.backend is 'nccl' but no CUDA GPU is visible; use 'gloo' or 'auto' on CPU machines"
        )
    return backend


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise the default process group through DeepSpeed (idempotent) and return this process's place."""
    import deepspeed

    backend = resolve_backend(backend)
    os.environ.update(environment())
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # as torchrun does: several ranks on one node's CPUs must not each start a thread per core
        per_node = re.match(r"\d+", os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "")
        local_world = int(per_node.group()) if per_node else world
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_world, 1)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradients over ranks and keeps this rank's rows.

    Every rank's loss depends on every rank's embeddings; summing in backward makes the gradient on a local
    embedding the derivative of the *sum* of all ranks' losses (the data-parallel average then divides by the
    world size, exactly as one process holding the whole batch would).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``: (B, ...) on each rank -> (world * B, ...) in rank order; differentiable. Identity when alone."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``: (B, ...) -> (world * B, ...) in rank order, without gradient (labels, keys)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor)."""
    x = x.clone()
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_initialized():
        dist.barrier()


# ------------------------------------------------------------------ data-parallel jobs (fine-tuning, evaluation)


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_JOINED: dict[str, DistInfo] = {}


def _join(backend: str) -> DistInfo:
    # once per process: init_distributed also sets the CPU thread count, which the job's own setting must override
    if backend not in _JOINED:
        _JOINED[backend] = init_distributed(backend)
    return _JOINED[backend]


def join_process_group(device: str = "auto") -> DistInfo | None:
    """Join the process group when this process is one of several (``WORLD_SIZE`` > 1 from torchrun or
    ``launch/``, or ``SLURM_NTASKS`` > 1 under ``srun``) and return its place; None when alone. Joins once per
    process: later calls return the same place."""
    if int(environment()["WORLD_SIZE"]) <= 1:
        return None
    return _join("nccl" if pick_device(device).type == "cuda" else "gloo")


def leave_process_group() -> None:
    """Leave the group :func:`join_process_group` joined, before the process exits: left to interpreter shutdown,
    gloo's threads are torn down unjoined and the process can abort ("terminate called without an active
    exception") after an orderly stop."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _JOINED.clear()


def rank_rows(n: int, world: int, rank: int) -> tuple[slice, list[int]]:
    """This rank's contiguous share of a global batch of ``n`` rows, and every rank's share size (they differ
    by at most one row; rank order is batch order)."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), sizes


def gather_batch(pred: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's predictions ``(sizes[rank],)`` -> the global batch's ``(sum(sizes),)`` in batch order.

    Differentiable: with the same loss on every rank, backward leaves on each rank the gradient of the global
    loss through its own rows times the world size, which DeepSpeed's averaging over ranks cancels. all_gather
    needs equal shapes, so each rank pads its share to the largest one.
    """
    m = max(sizes)
    full = gather_with_grad(torch.nn.functional.pad(pred, (0, m - pred.shape[0])))
    keep = torch.cat([torch.arange(r * m, r * m + s) for r, s in enumerate(sizes)]).to(full.device)
    return full[keep]


def average_batchnorm_statistics(model: torch.nn.Module, world: int) -> None:
    """Average the running statistics of per-rank batch norms over ranks (SyncBatchNorm's agree already), so
    every rank evaluates the same model."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)


def from_rank0(values: list[float], info: DistInfo) -> list[float]:
    """Rank 0's ``values`` on every rank, so that every rank takes the same decision (e.g. early stopping)."""
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo | None) -> bool:
    """Whether ``flag`` is true on any rank (alone: ``flag``). Every rank must call it at the same point."""
    if info is None:
        return flag
    t = torch.tensor([float(flag)], device=info.device if info.backend == "nccl" else "cpu")
    return bool(all_reduce_sum(t).item() > 0)
