"""Per-channel statistics that merge exactly across workers: count, mean, M2 (sum of squared deviations), min, max.

Each shard keeps its own partial statistics; the manifest merges them in shard order with Chan et al.'s
parallel update, so the result depends only on the shards, never on how many workers packed them.
"""

from __future__ import annotations

import math

import numpy as np


def describe(values: np.ndarray) -> dict:
    """Partial statistics of the finite entries of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0, "mean": 0.0, "m2": 0.0, "min": math.inf, "max": -math.inf}
    mean = float(v.mean())
    return {
        "count": int(v.size),
        "mean": mean,
        "m2": float(((v - mean) ** 2).sum()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def merge(a: dict, b: dict) -> dict:
    """Chan's parallel merge of two partial statistics."""
    n = a["count"] + b["count"]
    if n == 0:
        return dict(a)
    delta = b["mean"] - a["mean"]
    return {
        "count": n,
        "mean": a["mean"] + delta * b["count"] / n,
        "m2": a["m2"] + b["m2"] + delta * delta * a["count"] * b["count"] / n,
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
    }


def finalize(s: dict) -> dict:
    """The manifest form: count, mean, std (population), min, max."""
    std = math.sqrt(s["m2"] / s["count"]) if s["count"] else 0.0
    return {"count": s["count"], "mean": s["mean"], "std": std, "min": s["min"], "max": s["max"]}


def merge_tree(parts: list[dict]) -> dict:
    """Merge ``{group: {name: partial}}`` dicts in order and finalize every entry."""
    total: dict = {}
    for part in parts:
        for group, entries in part.items():
            for name, s in entries.items():
                total.setdefault(group, {})
                total[group][name] = merge(total[group][name], s) if name in total[group] else dict(s)
    return {g: {n: finalize(s) for n, s in entries.items()} for g, entries in total.items()}
