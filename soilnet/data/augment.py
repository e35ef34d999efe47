"""Normalisation and augmentation: the draws, a per-sample reference, and the batched form that training applies.

**Draws.** Every random number of a sample's augmentation is a counter-based function of ``(seed, epoch, global
sample id)`` and of what it is for (which view, which field, which channel or climate cell): a 32-bit hash
(:func:`mix32`) of those numbers, computed for a whole batch at once by integer tensor operations on the device
where the ids are (:func:`draw`). Seeding by the sample's identity (not by a worker's RNG stream) makes the
augmented batch independent of the number of ranks, workers and threads, which exact resume on a changed world
size needs; being exact integer arithmetic (no product exceeds 2**49), the bits are the same on every device.

**Application.** :func:`augment_image` is the definition, one sample at a time in numpy: reflect ``pad`` pixels,
flip along W, flip along H, quarter turns, crop back to the patch size, add the spectral jitter.
:func:`augment_images` applies the same views to a whole batch with index operations on the batch's device (after
the host-to-device copy): one gather on a GPU, one pass of a C kernel on a CPU (:func:`_native_views`).

Fine-tuning draws its views differently (three flip bits per sample of a global batch from one generator, see
:func:`draw_flips`) but applies them as the same :class:`View`: the dihedral part of one, without padding or crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soilnet.data import native
from soilnet.data.pool import TensorPool


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


_MASK32 = 0xFFFFFFFF
_SALT = 0x9E3779B9  # 2**32 / golden ratio: keeps 0 (mix32's fixed point) out of the inputs


def _mul32(x, c: int):
    """``x * c mod 2**32`` for x in [0, 2**32) (int64 tensor or int), c < 2**32, in two 16-bit halves of ``c``: no
    intermediate reaches 2**49, so int64 arithmetic is exact on every device."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """A bijective 32-bit hash (Wellons' lowbias32) of x in [0, 2**32): int64 tensor or int, elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, ids: torch.Tensor) -> torch.Tensor:
    """ids: (B,) int64 global sample ids (>= 0) -> (B,) int64 32-bit keys of (seed, epoch, id), on ids' device."""
    s = mix32(mix32(mix32(_SALT ^ seed & _MASK32) ^ ((seed >> 32) & _MASK32)) ^ (epoch & _MASK32))
    return mix32(mix32(s ^ (ids & _MASK32)) ^ ((ids >> 32) & _MASK32))


# what a draw is for: the j-th number of stream ``s`` is counter ``s << 24 | j``; stream v holds the geometry of
# view v (field j: flip W, flip H, turns, top, left), 64 + v its spectral jitter, 96 the climate jitter
_FLIP_W, _FLIP_H, _TURNS, _TOP, _LEFT = range(5)
_SPECTRAL, _CLIMATE = 64, 96


def _bits(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B,) keys -> (B, n) int64 32-bit hashes of (key, stream, 0..n-1)."""
    counters = mix32((torch.arange(n, device=keys.device, dtype=torch.int64) | (stream << 24)) ^ _SALT)
    return mix32(keys[:, None] ^ counters[None, :])


def _below(h: torch.Tensor, n) -> torch.Tensor:
    """32-bit hashes -> integers in [0, n) (n < 2**31, int or tensor), each with probability 1/n up to n/2**32."""
    return (h * n) >> 32


def _normal(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B,) keys -> (B, n) float32 standard normal (Box-Muller on two 24-bit uniforms per value)."""
    h = _bits(keys, stream, 2 * n)
    u1 = ((h[:, 0::2] >> 8) + 1).to(torch.float32) * 2.0**-24  # (0, 1]
    u2 = (h[:, 1::2] >> 8).to(torch.float32) * 2.0**-24  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * np.pi) * u2)


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


@dataclass(frozen=True)
class Draws:
    """A batch's draws, ``V`` views of ``B`` samples, on the device of the ids they were drawn for: ``flip_w``,
    ``flip_h`` (V, B) bool; ``turns`` (V, B) int64 in [0, 4); ``top``, ``left`` (V, B) int64, the crop's corner in
    the padded and turned patch; ``spectral`` (V, B, C) float32 or None; ``climate`` (B, T, F) float32 or None
    (both in normalised units, already scaled by their standard deviation)."""

    flip_w: torch.Tensor
    flip_h: torch.Tensor
    turns: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    spectral: torch.Tensor | None
    climate: torch.Tensor | None

    def view(self, v: int, b: int) -> View:
        """View ``v`` of sample ``b``, for :func:`augment_image`."""
        jitter = None if self.spectral is None else self.spectral[v, b].cpu().numpy()
        parts = (self.flip_w, self.flip_h, self.turns, self.top, self.left)
        fw, fh, turns, top, left = (int(t[v, b]) for t in parts)
        return View(bool(fw), bool(fh), turns, top, left, jitter)


def draw(
    spec: AugmentSpec,
    seed: int,
    epoch: int,
    ids: torch.Tensor,
    views: int,
    image_shape: tuple[int, int, int],
    climate_shape: tuple[int, int],
) -> Draws:
    """The draws of ``views`` views of each sample ``ids`` (B,) int64 of ``epoch``, for images (C, H, W) and
    climate (T, F); computed on ids' device. The crop corner is uniform over the positions where the patch fits
    in the padded and turned patch: ``rows + 2 pad - H + 1`` tops, with ``rows`` H after an even number of turns
    and W after an odd one (likewise for the left edge)."""
    c, h, w = image_shape
    keys = sample_keys(seed, epoch, ids)
    fw, fh, turns, top, left = [], [], [], [], []
    for v in range(views):
        bits = _bits(keys, v, 5)  # (B, 5)
        fw.append((bits[:, _FLIP_W] >> 31 == 1) & spec.flips)
        fh.append((bits[:, _FLIP_H] >> 31 == 1) & spec.flips)
        t = bits[:, _TURNS] >> 30 if spec.rotate else torch.zeros_like(keys)
        rows, cols = torch.where(t % 2 == 0, h, w), torch.where(t % 2 == 0, w, h)
        turns.append(t)
        top.append(_below(bits[:, _TOP], rows + 2 * spec.pad - h + 1))
        left.append(_below(bits[:, _LEFT], cols + 2 * spec.pad - w + 1))
    spectral = None
    if spec.spectral_jitter > 0:
        spectral = torch.stack([_normal(keys, _SPECTRAL + v, c) for v in range(views)]) * spec.spectral_jitter
    climate = None
    if spec.climate_jitter > 0:
        t_, f_ = climate_shape
        climate = (_normal(keys, _CLIMATE, t_ * f_) * spec.climate_jitter).view(-1, t_, f_)
    stack = torch.stack
    return Draws(stack(fw), stack(fh), stack(turns), stack(top), stack(left), spectral, climate)


def augment_image(image: np.ndarray, spec: AugmentSpec, view: View) -> np.ndarray:
    """image: (C, H, W) float normalised -> (C, H, W) float32, ``view`` of it: the definition, one sample at a
    time (:func:`augment_images` is the batched form)."""
    if not spec.enabled:
        return image
    _, h, w = image.shape
    x = np.pad(image, ((0, 0), (spec.pad, spec.pad), (spec.pad, spec.pad)), mode="reflect") if spec.pad else image
    x = x[:, :: -1 if view.flip_h else 1, :: -1 if view.flip_w else 1]
    x = np.rot90(x, k=view.turns, axes=(1, 2))
    x = x[:, view.top : view.top + h, view.left : view.left + w]
    if view.jitter is not None:
        x = x + view.jitter[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def reflect_index(n: int, pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n + 2 pad,) int64: the position in an axis of ``n`` of each position of it reflect-padded by ``pad``, as
    ``np.pad(mode="reflect")`` pads (reflections of reflections when pad >= n)."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    m = i.remainder(2 * (n - 1))
    return torch.where(m < n, m, 2 * (n - 1) - m)


def _window(d: Draws, v: int, h: int, w: int, pad: int) -> tuple[torch.Tensor, ...]:
    """View ``v`` of each sample as a window of the padded, unturned patch (Hp, Wp) followed by a dihedral map.

    The flips then ``k`` quarter turns read padded pixel (rho(a), gamma(b)) at (a, b) of the turned patch (or
    (rho(b), gamma(a)) after an odd k), with rho reversing the rows when ``flip_h`` xor k >= 2 and gamma the
    columns when ``flip_w`` xor k in {1, 2}. Returns (B,) each: ``odd`` (the window is transposed), ``rev_r``,
    ``rev_c`` (reversed rows, columns) and the window's first padded row and column before reversal."""
    turns = d.turns[v]
    odd = turns % 2 == 1
    rev_r = d.flip_h[v] ^ (turns >= 2)
    rev_c = d.flip_w[v] ^ ((turns == 1) | (turns == 2))
    first_row = torch.where(odd, d.left[v], d.top[v])  # of the padded rows the window reads
    first_col = torch.where(odd, d.top[v], d.left[v])
    return odd, rev_r, rev_c, first_row, first_col


def _gathered(x: torch.Tensor, d: Draws, v: int, pad: int) -> torch.Tensor:
    """:func:`augment_images`'s geometry as one gather: every output pixel's source pixel, any patch shape."""
    b, c, h, w = x.shape
    odd, rev_r, rev_c, r0, c0 = (t[:, None, None] for t in _window(d, v, h, w, pad))
    i = torch.arange(h, device=x.device)[None, :, None]
    j = torch.arange(w, device=x.device)[None, None, :]
    a = r0 + torch.where(odd, j, i)  # (B, H, W) padded row, before reversal
    bb = c0 + torch.where(odd, i, j)
    rows = reflect_index(h, pad, x.device)[torch.where(rev_r, h + 2 * pad - 1 - a, a)]
    cols = reflect_index(w, pad, x.device)[torch.where(rev_c, w + 2 * pad - 1 - bb, bb)]
    index = (rows * w + cols).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


_WORK = TensorPool()  # the CPU form's outputs, reused: a fresh 20 MB array per batch costs its page faults


def _axes(d: Draws, v: int, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View ``v``'s geometry for square (n, n) patches as two index vectors: ``row``, ``col`` (B, n) int32, the
    source row and column of each output row and column (the crop, reversal and reflection of :func:`_window`),
    and ``transpose`` (B,) bool: out[i, j] = x[row[i], col[j]], or x[row[j], col[i]] when transposed."""
    odd, rev_r, rev_c, r0, c0 = _window(d, v, n, n, pad)
    t = torch.arange(n, device=r0.device)
    reflect, last = reflect_index(n, pad, r0.device), n + 2 * pad - 1
    a, bb = r0[:, None] + t, c0[:, None] + t
    row = reflect[torch.where(rev_r[:, None], last - a, a)]
    col = reflect[torch.where(rev_c[:, None], last - bb, bb)]
    return row.to(torch.int32).contiguous(), col.to(torch.int32).contiguous(), odd.contiguous()


def _native_views(x: torch.Tensor, d: Draws, v: int, pad: int) -> torch.Tensor:
    """:func:`augment_images` on a CPU for float32 square patches, the spectral jitter included: one pass of the C
    kernel (:func:`soilnet.data.native.views`), about one copy of the batch, without the GIL."""
    b, c, n, _ = x.shape
    row, col, transpose = _axes(d, v, n, pad)
    out = _WORK.tensor((b, c, n, n), torch.float32)
    jitter = None if d.spectral is None else d.spectral[v]
    native.views(x.contiguous(), out, row, col, transpose, jitter)
    return out


def augment_images(
    x: torch.Tensor, spec: AugmentSpec, d: Draws, v: int = 0, gather: bool | None = None
) -> torch.Tensor:
    """x: (B, C, H, W) normalised, float32 or bfloat16, on any device -> (B, C, H, W) of the same dtype: view ``v``
    of each sample, as :func:`augment_image` makes it from the same draws (the geometry moves values exactly; the
    jitter is added in float32 and rounded once). ``gather``: one gather (the default on a GPU, and where the C
    kernel cannot serve) or the one-pass C kernel (:func:`_native_views`, the default on a CPU for float32 square
    patches when the extension is built)."""
    if not spec.enabled:
        return x
    b, c, h, w = x.shape
    if gather is None:
        gather = x.device.type != "cpu"
    if not gather and native.available() and x.device.type == "cpu" and x.dtype == torch.float32 and h == w:
        return _native_views(x, d, v, spec.pad)
    out = _gathered(x, d, v, spec.pad)
    if d.spectral is not None:
        out = (
            out.add_(d.spectral[v].view(b, c, 1, 1))
            if out.dtype == torch.float32
            else ((out.float() + d.spectral[v].view(b, c, 1, 1)).to(out.dtype))
        )
    return out


def draw_flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` bool: horizontal flip, vertical flip, transpose, per sample (fine-tuning's draw)."""
    return torch.rand(n, 3, generator=gen) < 0.5


def dihedral_view(flip_w: bool, flip_h: bool, transpose: bool) -> View:
    """The :class:`View` (no padding, no crop) of flipping along W, then H, then transposing H and W: a
    transpose is a W flip followed by a quarter turn."""
    return View(flip_w != transpose, flip_h, int(transpose), 0, 0, None)


def _turn(x: np.ndarray, view: View) -> np.ndarray:
    """The flips then the quarter turns of ``view``, as a view of x (C, H, W)."""
    return np.rot90(x[:, :: -1 if view.flip_h else 1, :: -1 if view.flip_w else 1], view.turns, axes=(1, 2))


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
