"""The global sample order: a pure function of (seed, epoch, number of samples), sliced per step, rank and worker.

Step ``k`` of a run with global batch ``G`` consumes positions ``[k*G, (k+1)*G)`` of the concatenated epoch
orders; each epoch uses ``floor(samples / G) * G`` positions of its permutation (the remainder, fewer than one
global batch, is left out so that every batch has the same shape). Rank ``r`` of ``W`` takes the ``r``-th
``G/W`` of each global batch. Nothing depends on ``W``: a run resumed on another world size continues the same
global sequence, and its loader state is just the number of samples consumed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from soilnet.config.base import ConfigError


class BatchSizeError(ConfigError):
    """A global batch that the world size does not divide, or that exceeds the data."""


def micro_batch(global_batch: int, world: int) -> int:
    """Per-rank batch; raises saying which numbers to change when ``world`` does not divide ``global_batch``."""
    if global_batch % world:
        lo = global_batch // world * world
        hi = lo + world
        raise BatchSizeError(
            f"train.global_batch_size={global_batch} does not divide by the world size {world}: set "
            f"train.global_batch_size to a multiple of {world} (e.g. {lo or hi} or {hi}), or run on a number of "
            f"processes that divides {global_batch}"
        )
    return global_batch // world


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, samples: int) -> np.ndarray:
    """(samples,) int64: the order in which epoch ``epoch`` visits the global sample ids."""
    return np.random.default_rng([seed, epoch]).permutation(samples).astype(np.int64)


def steps_per_epoch(samples: int, global_batch: int) -> int:
    n = samples // global_batch
    if n == 0:
        raise BatchSizeError(
            f"train.global_batch_size={global_batch} exceeds the {samples} samples of the shards: lower it"
        )
    return n


def batch_ids(seed: int, samples: int, global_batch: int, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """(G/W,) int64 global sample ids that ``rank`` reads at ``step``; (epoch of the step) via :func:`step_epoch`."""
    spe = steps_per_epoch(samples, global_batch)
    epoch, k = divmod(step, spe)
    b = micro_batch(global_batch, world)
    start = k * global_batch + rank * b
    return epoch_permutation(seed, epoch, samples)[start : start + b]


def step_epoch(samples: int, global_batch: int, step: int) -> int:
    return step // steps_per_epoch(samples, global_batch)
