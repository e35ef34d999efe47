"""GradCache over accumulation micro-batches: the contrastive loss sees the whole global batch of negatives while
each device embeds ``micro`` samples at a time, with BatchNorm statistics and dropout masks as in one pass.

A step's global batch of ``G`` samples is cut into ``G / micro`` micro-batches; rank ``r`` of ``W`` holds the
``A = G / (W * micro)`` micro-batches ``r*A ... r*A + A - 1`` of it, so every micro-batch is the same set of
samples whatever ``W`` is. GradCache (Gao et al. 2021) embeds each micro-batch without graphs, takes the loss and
its gradient w.r.t. the embeddings over the global batch, then replays each micro-batch with graphs and
back-propagates the cached gradient. Each replay starts from the RNG states (CPU and accelerator) that its first
pass started from, so dropout draws the same masks and the forward outputs agree. BatchNorm normalises each
micro-batch with its own statistics in both passes (training mode); its running statistics count each
micro-batch once (:class:`RunningStats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from soilnet.distributed import all_reduce_sum
from soilnet.losses import ContrastiveLoss, ContrastiveOutput


class RunningStats:
    """The running statistics of a module's normalisation layers (BatchNorm's ``running_mean``, ``running_var``,
    ``num_batches_tracked``), made a function of the global batch rather than of how it is split.

    Every micro-batch of a step updates them from the step's starting values, once; the step's result is the mean
    of those updates over all micro-batches of the global batch, on every rank (one all-reduce). The update is
    affine in the micro-batch statistics, so this equals one update with the mean of the micro-batches' batch
    statistics; 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches give the same buffers, and all ranks hold
    them (the checkpoint's copy, rank 0's, stands for every rank). Sums are taken in float64, so the result does
    not depend on the order of the micro-batches either.
    """

    def __init__(self, module: nn.Module):
        self.buffers = [
            buf
            for m in module.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def snapshot(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.buffers]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for b, s in zip(self.buffers, saved, strict=True):
            b.copy_(s)

    def flat(self) -> torch.Tensor:
        """(total elements,) float64: the buffers' current values, concatenated."""
        return torch.cat([b.detach().double().flatten() for b in self.buffers])

    def set_mean(self, local_sum: torch.Tensor, local_count: int, world: int) -> None:
        """Set the buffers to the mean over all ranks' micro-batches: ``local_sum`` (from :meth:`flat`, summed over
        this rank's ``local_count`` micro-batches) is all-reduced and divided by ``local_count * world``."""
        mean = all_reduce_sum(local_sum) / (local_count * world)
        at = 0
        for b in self.buffers:
            b.copy_(mean[at : at + b.numel()].view_as(b).to(b.dtype))
            at += b.numel()


def accelerator_devices(*tensors: torch.Tensor | None) -> list[torch.device]:
    """The non-CPU devices of ``tensors``, each once."""
    return list(dict.fromkeys(t.device for t in tensors if t is not None and t.device.type != "cpu"))


def rng_states(devices: list[torch.device]) -> list[torch.Tensor]:
    """The CPU generator's state, then each device's (as torch.utils.checkpoint saves them for recomputation)."""
    return [torch.get_rng_state()] + [torch.get_device_module(d.type).get_rng_state(d) for d in devices]


def set_rng_states(devices: list[torch.device], states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    for d, s in zip(devices, states[1:], strict=True):
        torch.get_device_module(d.type).set_rng_state(s, d)


@dataclass
class Embedded:
    """The first pass over a step's micro-batches: each one's RNG states at its start, and the embeddings of the
    whole batch as leaves for the loss (``z_img2`` with a second view)."""

    rng: list[list[torch.Tensor]]
    z_img: torch.Tensor
    z_clim: torch.Tensor
    z_img2: torch.Tensor | None

    def leaves(self) -> list[torch.Tensor]:
        return [self.z_img, self.z_clim] + ([self.z_img2] if self.z_img2 is not None else [])


def embed(
    model: nn.Module,
    parts: list[slice],
    image: torch.Tensor,
    climate: torch.Tensor,
    image2: torch.Tensor | None,
    devices: list[torch.device],
    stats: RunningStats,
) -> Embedded:
    """Embed each micro-batch without graphs, from the step's running statistics each time (the replay updates
    them), recording the RNG states each one starts from."""
    start = stats.snapshot()
    rng, zi, zc, zi2 = [], [], [], []
    with torch.no_grad():
        for s in parts:
            rng.append(rng_states(devices))
            a, c = model(image[s], climate[s])
            zi.append(a)
            zc.append(c)
            if image2 is not None:
                zi2.append(model(image2[s], climate[s])[0])
            stats.restore(start)  # this pass only embeds; the replay updates the statistics
    z_img2 = torch.cat(zi2).detach().requires_grad_() if image2 is not None else None
    return Embedded(rng, torch.cat(zi).detach().requires_grad_(), torch.cat(zc).detach().requires_grad_(), z_img2)


def replay(
    model: nn.Module,
    loss_fn: ContrastiveLoss,
    parts: list[slice],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    first: Embedded,
    grads: tuple[torch.Tensor, ...],
    backward: Callable[[torch.Tensor, bool], None],
    devices: list[torch.device],
    stats: RunningStats,
) -> torch.Tensor | None:
    """Replay each micro-batch with graphs from its first pass's RNG states (the same dropout masks) and
    back-propagate the cached gradients ``grads`` (of the leaves, then of the log-temperature when learnable)
    through it; returns the sum of the micro-batches' updated running statistics (None without any)."""
    image, climate, image2 = batch
    start = stats.snapshot()
    learnable = loss_fn.log_temperature.requires_grad
    total = None
    for k, s in enumerate(parts):
        set_rng_states(devices, first.rng[k])  # the first pass's dropout masks
        a, c = model(image[s], climate[s])
        surrogate = (a * grads[0][s].to(a.dtype)).sum() + (c * grads[1][s].to(c.dtype)).sum()
        if image2 is not None:
            a2 = model(image2[s], climate[s])[0]
            surrogate = surrogate + (a2 * grads[2][s].to(a2.dtype)).sum()
        last = k == len(parts) - 1
        if last and learnable:
            surrogate = surrogate + loss_fn.log_temperature * grads[-1]
        backward(surrogate, last)
        if stats:  # after backward: BatchNorm's backward reads the running buffers it was given
            total = stats.flat() if total is None else total + stats.flat()
            stats.restore(start)
    return total


def grad_cache(
    model: nn.Module,
    loss_fn: ContrastiveLoss,
    micro: int,
    image: torch.Tensor,
    climate: torch.Tensor,
    keys: torch.Tensor | None,
    image2: torch.Tensor | None,
    backward: Callable[[torch.Tensor, bool], None],
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ContrastiveOutput]:
    """One GradCache step over this rank's micro-batches of ``micro`` samples.

    model: ``(image, climate) -> (z_img (b, D), z_clim (b, D))``; loss_fn: a ``ContrastiveLoss`` (gathers the
    embeddings of every rank). image: (b, C, H, W); climate: (b, T, F); keys: (b,) int64 or None; image2:
    (b, C, H, W) or None; ``b`` a multiple of ``micro``. ``backward(surrogate, last)`` back-propagates one
    micro-batch's surrogate (whose parameter gradients are that micro-batch's share of the full-batch gradient;
    ``last``: the step's final one). ``world``: ranks taking part (for the running statistics' mean).
    Returns ``(loss (), z_img, z_clim, cross-modal output)`` as ``PretrainModule.forward`` does, detached; the
    parameter gradients summed over the micro-batches equal the full-batch step's.
    """
    if image.shape[0] % micro:
        raise ValueError(f"a batch of {image.shape[0]} does not split into micro-batches of {micro}")
    parts = [slice(i, i + micro) for i in range(0, image.shape[0], micro)]
    devices = accelerator_devices(image, climate, image2)
    stats = RunningStats(model)
    first = embed(model, parts, image, climate, image2, devices, stats)
    after = rng_states(devices)
    loss, out = loss_fn(first.z_img, first.z_clim, keys, first.z_img2)
    learnable = loss_fn.log_temperature.requires_grad
    grads = torch.autograd.grad(loss, first.leaves() + ([loss_fn.log_temperature] if learnable else []))
    total = replay(model, loss_fn, parts, (image, climate, image2), first, grads, backward, devices, stats)
    if total is not None:
        stats.set_mean(total, len(parts), world)
    set_rng_states(devices, after)
    return loss.detach(), first.z_img.detach(), first.z_clim.detach(), out
