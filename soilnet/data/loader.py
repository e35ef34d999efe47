"""The pretraining loader: fixed-shape batches of this rank's slice of the global order, from any step on.

``PretrainBatches`` is an ``IterableDataset`` of whole batches. With several DataLoader workers, worker ``w`` of
``n`` builds the batches of steps ``start + w, start + w + n, ...``; the DataLoader hands workers' outputs back
round-robin, so the batches arrive in step order whatever ``n`` is. A corrupt sample is replaced by the next
good sample of the same batch (the batch keeps its shape), counted, and reported in the batch; the training
loop turns the counts into a fatal error above ``data.max_corrupt_fraction``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from soilnet.data.augment import AugmentSpec, augment_climate, augment_image, normalise
from soilnet.data.order import batch_ids, micro_batch, step_epoch
from soilnet.data.shards import DataError, ShardSet
from soilnet.data.tarindex import ShardIndexError, ShardReader


@dataclass(frozen=True)
class LoaderSpec:
    """What a rank reads: ``global_batch`` split over ``world`` ranks, in the order of ``seed``."""

    seed: int
    global_batch: int
    rank: int
    world: int
    augment: AugmentSpec
    two_views: bool = False  # a second, independently augmented image view (SimCLR term)
    num_workers: int = 0


def climate_key(raw: np.ndarray) -> int:
    """A 63-bit hash of a raw climate series: equal series (the same TerraClimate cell) share a key."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(raw).tobytes(), digest_size=8).digest(), "little") >> 1


def _decode_image(raw: np.ndarray, encoding: dict) -> np.ndarray:
    if encoding.get("dtype") == "int16":
        return raw.astype(np.float32) * float(encoding.get("scale", 1.0)) + float(encoding.get("offset", 0.0))
    return raw.astype(np.float32)


class CorruptSample(ValueError):
    pass


def decode_sample(shards: ShardSet, url: str, key: str, members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Raw members -> (image (C, H, W) float32 in schema units, climate (T, F) float32 physical units), subset to
    the run's schema. Raises :class:`CorruptSample` naming the sample and shard."""
    where = f"sample '{key}' in shard {url}"
    try:
        image = np.load(io.BytesIO(members["image.npy"]), allow_pickle=False)
        climate = np.load(io.BytesIO(members["climate.npy"]), allow_pickle=False)
        shards.available.check_image(image, where)
        shards.available.check_climate(climate, where)
        if "meta.json" in members:
            json.loads(members["meta.json"])
    except KeyError as err:
        raise CorruptSample(f"{where}: member {err} is missing") from err
    except Exception as err:  # a corrupt member can fail in many ways inside numpy/json
        raise CorruptSample(f"{where}: {type(err).__name__}: {err}") from err
    image = _decode_image(image, shards.image_encoding)[list(shards.channel_index)]
    climate = climate.astype(np.float32)[np.ix_(list(shards.month_index), list(shards.variable_index))]
    return image, climate


class PretrainBatches(IterableDataset):
    """Batches of steps ``start_step, start_step + 1, ...`` (endless; the caller stops).

    Each batch: ``image`` (b, C, H, W) float32 normalised; ``image2`` the same shape when ``two_views``;
    ``climate`` (b, T, F) float32 normalised; ``ids`` (b,) int64 global sample ids; ``climate_key`` (b,) int64;
    ``step`` int; ``corrupt`` list of messages about samples replaced in this batch.
    """

    def __init__(self, shards: ShardSet, spec: LoaderSpec, start_step: int = 0):
        super().__init__()
        self.shards, self.spec, self.start_step = shards, spec, start_step
        micro_batch(spec.global_batch, spec.world)

    def _sample(self, reader: ShardReader, gid: int, epoch: int) -> tuple:
        s, pos = self.shards.locate(int(gid))
        url = self.shards.urls[s]
        try:
            key, members = reader.read(url, pos)
        except ShardIndexError as err:
            raise CorruptSample(str(err)) from err
        image, climate = decode_sample(self.shards, url, key, members)
        rng = np.random.default_rng([self.spec.seed, epoch, int(gid)])
        img = normalise(image, self.shards.image_mean, self.shards.image_std, axis=0)
        cl = normalise(climate, self.shards.climate_mean, self.shards.climate_std, axis=1)
        view1 = augment_image(img, self.spec.augment, rng)
        view2 = augment_image(img, self.spec.augment, rng) if self.spec.two_views else None
        return view1, view2, augment_climate(cl, self.spec.augment, rng), climate_key(climate)

    def batch(self, reader: ShardReader, step: int) -> dict:
        sp = self.spec
        ids = batch_ids(sp.seed, self.shards.samples, sp.global_batch, step, sp.rank, sp.world)
        epoch = step_epoch(self.shards.samples, sp.global_batch, step)
        got: list[tuple | None] = []
        corrupt: list[str] = []
        for gid in ids:
            try:
                got.append(self._sample(reader, gid, epoch))
            except CorruptSample as err:
                got.append(None)
                corrupt.append(str(err))
        if all(g is None for g in got):
            raise DataError(f"step {step}: every sample of this rank's batch is corrupt, e.g. {corrupt[0]}")
        n = len(got)
        # a corrupt sample's place is taken by the next good one (same climate key, so masking can exclude it)
        filled = [
            g if g is not None else next(got[(i + d) % n] for d in range(1, n) if got[(i + d) % n])
            for i, g in enumerate(got)
        ]
        out = {
            "image": torch.from_numpy(np.stack([f[0] for f in filled])),
            "climate": torch.from_numpy(np.stack([f[2] for f in filled])),
            "ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)),
            "climate_key": torch.tensor([f[3] for f in filled], dtype=torch.int64),
            "step": step,
            "corrupt": corrupt,
        }
        if sp.two_views:
            out["image2"] = torch.from_numpy(np.stack([f[1] for f in filled]))
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader()
        step = self.start_step + wid
        while True:
            yield self.batch(reader, step)
            step += nw


def build_loader(shards: ShardSet, spec: LoaderSpec, start_step: int = 0) -> DataLoader:
    """A DataLoader over :class:`PretrainBatches` from ``start_step`` (batches already formed by the dataset)."""
    return DataLoader(
        PretrainBatches(shards, spec, start_step),
        batch_size=None,
        num_workers=spec.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if spec.num_workers else None,
    )
