"""Per-sample normalisation and augmentation, seeded by (seed, epoch, global sample id).

Seeding each sample by its identity (not by the worker's RNG stream) makes the augmented batch independent of
the number of ranks and workers, which exact resume on a changed world size needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSpec:
    """The seed's augmentations: reflect ``pad`` pixels, random h/v flips, random 90-degree rotation, random
    crop back to the patch size; optional Gaussian jitter (in normalised units) per channel / per value."""

    enabled: bool = True
    pad: int = 16
    flips: bool = True
    rotate: bool = True
    spectral_jitter: float = 0.0
    climate_jitter: float = 0.0


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray, axis: int) -> np.ndarray:
    """``(x - mean) / std`` along ``axis``; non-finite values (missing) become 0, the mean."""
    shape = [1] * x.ndim
    shape[axis] = -1
    out = (x.astype(np.float32) - mean.reshape(shape)) / std.reshape(shape)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)


def augment_image(image: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """image: (C, H, W) float32 normalised -> (C, H, W) float32, a random view."""
    if not spec.enabled:
        return image
    c, h, w = image.shape
    x = np.pad(image, ((0, 0), (spec.pad, spec.pad), (spec.pad, spec.pad)), mode="reflect") if spec.pad else image
    if spec.flips and rng.random() < 0.5:
        x = x[:, :, ::-1]
    if spec.flips and rng.random() < 0.5:
        x = x[:, ::-1, :]
    if spec.rotate:
        x = np.rot90(x, k=int(rng.integers(4)), axes=(1, 2))
    top = int(rng.integers(x.shape[1] - h + 1))
    left = int(rng.integers(x.shape[2] - w + 1))
    x = x[:, top : top + h, left : left + w]
    if spec.spectral_jitter > 0:
        x = x + rng.normal(0.0, spec.spectral_jitter, size=(c, 1, 1)).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def augment_climate(climate: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """climate: (T, F) float32 normalised -> (T, F) float32."""
    if not spec.enabled or spec.climate_jitter <= 0:
        return climate
    return (climate + rng.normal(0.0, spec.climate_jitter, size=climate.shape)).astype(np.float32)
