"""Learning-rate scaling and schedules counted in samples, so they do not depend on the world size."""

from __future__ import annotations

import math


def scaled_lr(lr: float, global_batch: int, base_batch: int | None, rule: str) -> float:
    """``lr`` given at ``base_batch`` scaled to ``global_batch``: ``none``, ``linear`` or ``sqrt``."""
    if rule == "none" or base_batch is None:
        return lr
    ratio = global_batch / base_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def lr_at(samples: int, peak: float, warmup_samples: int, total_samples: int, min_ratio: float = 0.0) -> float:
    """Learning rate after ``samples`` samples: linear warm-up from 0 to ``peak``, then cosine to
    ``min_ratio * peak`` at ``total_samples``."""
    if warmup_samples > 0 and samples < warmup_samples:
        return peak * samples / warmup_samples
    span = max(total_samples - warmup_samples, 1)
    t = min(max(samples - warmup_samples, 0) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
