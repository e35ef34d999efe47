"""The pretraining loader: global sample order, per-rank slices, exact resume, world-size changes, bad input.

No DeepSpeed here: these run in a second or two.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from soilnet.config.schema import SchemaConfig
from soilnet.data import BatchSizeError, DataError, LoaderSpec, PretrainBatches, build_loader, micro_batch, open_shards
from soilnet.data.augment import AugmentSpec
from soilnet.data.order import batch_ids, epoch_permutation
from soilnet.data.tarindex import ShardReader

G = 16


def spec(rank=0, world=1, workers=0, two_views=False) -> LoaderSpec:
    return LoaderSpec(
        seed=3, global_batch=G, rank=rank, world=world, augment=AugmentSpec(), two_views=two_views, num_workers=workers
    )


def take(shards, sp, start, n):
    it = iter(build_loader(shards, sp, start_step=start))
    return [next(it) for _ in range(n)]


def test_order_is_a_pure_function_and_each_epoch_sees_every_sample_once():
    a = epoch_permutation(3, 1, 64)
    epoch_permutation.cache_clear()
    assert np.array_equal(a, epoch_permutation(3, 1, 64))
    assert not np.array_equal(epoch_permutation(3, 0, 64), epoch_permutation(3, 1, 64))
    ids = np.concatenate([batch_ids(3, 64, G, k) for k in range(4)])
    assert sorted(ids.tolist()) == list(range(64))


def test_rank_slices_of_world_two_equal_the_single_rank_batch_pixel_for_pixel(shards):
    s = open_shards(shards, SchemaConfig())
    one = take(s, spec(), 0, 3)
    r0, r1 = take(s, spec(0, 2), 0, 3), take(s, spec(1, 2), 0, 3)
    for b, b0, b1 in zip(one, r0, r1, strict=True):
        assert b["image"].shape == (G, 14, 64, 64) and b0["image"].shape == (G // 2, 14, 64, 64)
        assert torch.equal(b["ids"], torch.cat([b0["ids"], b1["ids"]]))
        assert torch.equal(b["image"], torch.cat([b0["image"], b1["image"]]))
        assert torch.equal(b["climate"], torch.cat([b0["climate"], b1["climate"]]))


def test_resume_at_step_n_gives_the_same_next_batches_and_workers_keep_step_order(shards):
    s = open_shards(shards, SchemaConfig())
    straight = take(s, spec(), 0, 6)
    resumed = take(s, spec(workers=2), 2, 4)
    for a, b in zip(straight[2:], resumed, strict=True):
        assert a["step"] == b["step"]
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_world_size_change_mid_epoch_continues_the_global_sequence(shards, before, after):
    s = open_shards(shards, SchemaConfig())
    seen = []
    for step in range(2):  # two of the epoch's four steps on `before` ranks ...
        seen += torch.cat([take(s, spec(r, before), step, 1)[0]["ids"] for r in range(before)]).tolist()
    for step in range(2, 4):  # ... the rest on `after` ranks, as a resumed run would read them
        seen += torch.cat([take(s, spec(r, after), step, 1)[0]["ids"] for r in range(after)]).tolist()
    assert seen == np.concatenate([batch_ids(3, 64, G, k) for k in range(4)]).tolist()
    assert sorted(seen) == list(range(64))


def test_normalised_with_manifest_stats_and_augmented_as_the_seed(shards):
    s = open_shards(shards, SchemaConfig())
    plain = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=AugmentSpec(enabled=False))
    b = next(iter(PretrainBatches(s, plain)))
    x = b["image"].numpy()
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.3  # (x - mean) / std with the manifest's stats
    aug = next(iter(PretrainBatches(s, spec(two_views=True))))
    assert aug["image"].shape == b["image"].shape == aug["image2"].shape
    assert not torch.equal(aug["image"], aug["image2"])  # two independent views


def test_channel_and_variable_subsets_by_name(shards):
    s = open_shards(shards, SchemaConfig(channels=["NDVI", "SR_B4"], climate_variables=["pr", "tmmx"]))
    b = next(iter(PretrainBatches(s, spec())))
    assert s.schema.channels == ("SR_B4", "NDVI")
    assert b["image"].shape[1] == 2 and b["climate"].shape[2] == 2


def test_schema_mismatch_names_what_is_missing(shards):
    with pytest.raises(DataError, match="months"):
        open_shards(shards, SchemaConfig(first_month="2000-01", last_month="2000-03"))
    with pytest.raises(DataError, match="patch_size"):
        open_shards(shards, SchemaConfig(patch_size=32))


def test_empty_or_missing_shard_list_is_a_clear_error(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        open_shards(tmp_path / "nowhere", SchemaConfig())
    copy = tmp_path / "empty"
    copy.mkdir()
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"] = []
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="shard list is empty"):
        open_shards(copy, SchemaConfig())


def test_global_batch_not_divisible_by_world_size_says_what_to_change():
    with pytest.raises(BatchSizeError, match=r"global_batch_size=10 .* world size 4.*multiple of 4 \(e.g. 8 or 12\)"):
        micro_batch(10, 4)


def _corrupt_member(shard: Path, position: int, suffix: str) -> str:
    key, members = ShardReader().index(str(shard))[position]
    offset, size = members[suffix]
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size)
    return key


def test_corrupt_sample_is_replaced_counted_and_named(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    key = _corrupt_member(folder / "shard-000001.tar", 3, "image.npy")
    s = open_shards(folder, SchemaConfig())
    reports = [m for b in take(s, spec(), 0, 4) for m in b["corrupt"]]
    assert len(reports) == 1 and key in reports[0] and "shard-000001.tar" in reports[0]


def test_unreadable_shard_counts_each_of_its_samples(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    (folder / "shard-000002.tar").write_bytes(b"not a tar file" * 10)
    s = open_shards(folder, SchemaConfig())
    batches = take(s, spec(), 0, 4)
    assert sum(len(b["corrupt"]) for b in batches) == 16
    assert all(b["image"].shape[0] == G for b in batches)  # shapes stay fixed


def test_spectral_and_climate_jitter_are_options(shards):
    s = open_shards(shards, SchemaConfig())
    plain = next(iter(PretrainBatches(s, spec())))
    jitter = AugmentSpec(spectral_jitter=0.1, climate_jitter=0.1)
    sp = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=jitter)
    jittered = next(iter(PretrainBatches(s, sp)))
    assert torch.equal(plain["ids"], jittered["ids"])
    assert not torch.equal(plain["climate"], jittered["climate"])
    assert 0 < float((plain["climate"] - jittered["climate"]).std()) < 0.2
