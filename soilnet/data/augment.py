"""Per-sample normalisation and augmentation, seeded by (seed, epoch, global sample id).

Seeding each sample by its identity (not by the worker's RNG stream) makes the augmented batch independent of
the number of ranks and workers, which exact resume on a changed world size needs.

Fine-tuning draws its views differently (three flip bits per sample of a global batch from one generator, see
:func:`draw_flips`) but applies them as the same :class:`View`: the dihedral part of one, without padding or crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    with np.errstate(invalid="ignore", over="ignore"):  # missing values (and corrupt rows) are not finite
        out = np.subtract(x, mean.reshape(shape), dtype=np.float32)
        out /= std.reshape(shape)
    missing = ~np.isfinite(out)
    if missing.any():
        out[missing] = 0.0
    return out


def augment_image(image: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """image: (C, H, W) float32 normalised -> (C, H, W) float32, a random view.

    The definition of a view, one sample at a time; the loader draws the same views with :func:`draw_view` and
    applies them to whole batches of raw rows with :func:`apply_view`."""
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


@dataclass(frozen=True)
class View:
    """One random view: flips, quarter turns, the crop's corner in the padded and turned patch, and the
    spectral jitter (C,) float32 in normalised units (None without jitter)."""

    flip_w: bool
    flip_h: bool
    turns: int
    top: int
    left: int
    jitter: np.ndarray | None


def draw_view(spec: AugmentSpec, rng: np.random.Generator, channels: int, h: int, w: int) -> View:
    """The view :func:`augment_image` would draw from ``rng`` for a (channels, h, w) image: same draws, same order."""
    flip_w = bool(spec.flips and rng.random() < 0.5)
    flip_h = bool(spec.flips and rng.random() < 0.5)
    turns = int(rng.integers(4)) if spec.rotate else 0
    rows, cols = (h, w) if turns % 2 == 0 else (w, h)
    top = int(rng.integers(rows + 2 * spec.pad - h + 1))
    left = int(rng.integers(cols + 2 * spec.pad - w + 1))
    jitter = None
    if spec.spectral_jitter > 0:
        jitter = rng.normal(0.0, spec.spectral_jitter, size=channels).astype(np.float32)
    return View(flip_w, flip_h, turns, top, left, jitter)


def _reflect_runs(start: int, length: int, pad: int, n: int) -> list[tuple[int, int, slice]]:
    """Positions ``start ... start + length - 1`` of an axis of ``n`` reflect-padded by ``pad`` (< n), as runs
    [(first, end) in the window, source slice]: reflected left edge, the axis itself, reflected right edge."""
    runs, end = [], start + length

    def add(j0: int, j1: int, s0: int, step: int) -> None:
        if j1 > j0:
            s1 = s0 + step * (j1 - j0)
            runs.append((j0 - start, j1 - start, slice(s0, s1 if s1 >= 0 else None, step)))

    add(start, min(end, pad), pad - start, -1)
    add(max(start, pad), min(end, pad + n), max(start, pad) - pad, 1)
    j0 = max(start, pad + n)
    add(j0, end, 2 * (n - 1) - (j0 - pad), -1)
    return runs


def _rot90(x: np.ndarray, turns: int) -> np.ndarray:
    """``np.rot90(x, turns, axes=(1, 2))`` as a view, without its argument checking."""
    turns %= 4
    if turns == 1:
        return x[:, :, ::-1].swapaxes(1, 2)
    if turns == 2:
        return x[:, ::-1, ::-1]
    if turns == 3:
        return x.swapaxes(1, 2)[:, :, ::-1]
    return x


def _turn(x: np.ndarray, view: View) -> np.ndarray:
    """The flips then the quarter turns of ``view``, as a view of x (C, H, W)."""
    return _rot90(x[:, :: -1 if view.flip_h else 1, :: -1 if view.flip_w else 1], view.turns)


def _unturn(y: np.ndarray, view: View) -> np.ndarray:
    """The view x of y with ``_turn(x, view)`` equal to y."""
    x = _rot90(y, -view.turns)
    return x[:, :: -1 if view.flip_h else 1, :: -1 if view.flip_w else 1]


def apply_view(image: np.ndarray, view: View, pad: int, out: np.ndarray) -> None:
    """The geometric part of ``view`` (not the jitter) of image (C, H, W), any dtype, into ``out`` (C, H, W).

    Flips and quarter turns map windows to windows, so the crop of the turned padded patch is the turned crop
    of one window of the padded patch; that window is copied from the image in at most nine reflected or
    straight slices straight into ``out`` seen unturned, without padding the whole patch."""
    _, h, w = image.shape
    if pad >= min(h, w):  # reflections of reflections: leave them to np.pad
        image = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        out[...] = _turn(image, view)[:, view.top : view.top + h, view.left : view.left + w]
        return
    hp, wp = h + 2 * pad, w + 2 * pad
    bottom, right = view.top + h - 1, view.left + w - 1
    turned = _turn(np.arange(hp * wp).reshape(1, hp, wp), view)[0]
    corners = turned[[view.top, view.top, bottom, bottom], [view.left, right, view.left, right]]
    r0, c0 = divmod(int(corners.min()), wp)
    window = _unturn(out, view)  # (C, rows, cols) of the padded patch, in ``out``'s memory
    for a, b, rs in _reflect_runs(r0, window.shape[1], pad, h):
        for c, d, cs in _reflect_runs(c0, window.shape[2], pad, w):
            window[:, a:b, c:d] = image[:, rs, cs]


def augment_climate(climate: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """climate: (T, F) float32 normalised -> (T, F) float32."""
    if not spec.enabled or spec.climate_jitter <= 0:
        return climate
    return (climate + rng.normal(0.0, spec.climate_jitter, size=climate.shape)).astype(np.float32)


def draw_flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` bool: horizontal flip, vertical flip, transpose, per sample (fine-tuning's draw)."""
    return torch.rand(n, 3, generator=gen) < 0.5


def dihedral_view(flip_w: bool, flip_h: bool, transpose: bool) -> View:
    """The :class:`View` (no padding, no crop) of flipping along W, then H, then transposing H and W: a
    transpose is a W flip followed by a quarter turn."""
    return View(flip_w != transpose, flip_h, int(transpose), 0, 0, None)


def flip_batch(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """A random element of the dihedral group per sample (flips and 90-degree turns keep soil physics intact).

    x: ``(B, C, H, W)`` on the CPU; flips: ``(B, 3)`` bool from :func:`draw_flips` (a data-parallel rank passes
    its rows of the global batch's draw). The transpose applies only when H == W. Returns a new tensor."""
    square = x.shape[-1] == x.shape[-2]
    rows = [
        _turn(image, dihedral_view(bool(w), bool(h), bool(t) and square))
        for image, (w, h, t) in zip(x.numpy(), flips.tolist(), strict=True)
    ]
    return torch.from_numpy(np.stack(rows)) if rows else x.clone()
