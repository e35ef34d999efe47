"""The pretraining loader: global sample order, per-rank slices, exact resume, world-size changes, bad input.

No DeepSpeed here: these run in a second or two.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from soilnet.config.schema import SchemaConfig
from soilnet.data import (
    BatchSizeError,
    DataError,
    LoaderSpec,
    PretrainBatches,
    build_loader,
    micro_batch,
    native,
    open_shards,
)
from soilnet.data.augment import AugmentSpec
from soilnet.data.device import augment_batch
from soilnet.data.loader import climate_key, climate_keys
from soilnet.data.order import batch_ids, epoch_permutation
from soilnet.data.pool import TensorPool
from soilnet.data.tarindex import ShardIndexError, index_shard, index_shard_tarfile

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
    two = spec(two_views=True)
    loaded = next(iter(PretrainBatches(s, two)))
    assert torch.equal(loaded["image"], b["image"]) and "image2" not in loaded  # the loader does not augment
    aug = augment_batch(loaded, two)
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
    key, members = index_shard(str(shard))[position]
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
    plain = augment_batch(next(iter(PretrainBatches(s, spec()))), spec())
    jitter = AugmentSpec(spectral_jitter=0.1, climate_jitter=0.1)
    sp = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=jitter)
    jittered = augment_batch(next(iter(PretrainBatches(s, sp))), sp)
    assert torch.equal(plain["ids"], jittered["ids"])
    assert not torch.equal(plain["climate"], jittered["climate"])
    assert 0 < float((plain["climate"] - jittered["climate"]).std()) < 0.2


def _members(url: str, position: int) -> dict[str, bytes]:
    """The members of sample ``position`` of shard ``url``, as bytes."""
    _, members = index_shard(url)[position]
    with open(url, "rb") as f:
        return {suffix: os.pread(f.fileno(), size, offset) for suffix, (offset, size) in members.items()}


def test_batched_decode_equals_np_load_then_normalise(shards):
    s = open_shards(shards, SchemaConfig(channels=["NDVI", "SR_B4", "elevation"], climate_variables=["pr", "tmmx"]))
    plain = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=AugmentSpec(enabled=False))
    b = next(iter(PretrainBatches(s, plain)))
    for row, gid in enumerate(b["ids"].tolist()):
        shard, pos = s.locate(gid)
        members = _members(s.urls[shard], pos)
        image = np.load(io.BytesIO(members["image.npy"])).astype(np.float32)[list(s.channel_index)]
        climate = np.load(io.BytesIO(members["climate.npy"]))[np.ix_(list(s.month_index), list(s.variable_index))]
        want_image = (image - s.image_mean[:, None, None]) / s.image_std[:, None, None]
        want_climate = (climate - s.climate_mean) / s.climate_std
        np.testing.assert_allclose(b["image"][row].numpy(), want_image, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["climate"][row].numpy(), want_climate, rtol=1e-5, atol=1e-5)
        assert int(b["climate_key"][row]) == climate_key(climate)


def test_threaded_reading_gives_the_batches_of_a_plain_loop_without_sharing_memory(shards):
    s = open_shards(shards, SchemaConfig())
    pb = PretrainBatches(s, spec(two_views=True))
    it = iter(pb)
    threaded = [next(it) for _ in range(5)]  # held together: no batch may alias another's memory
    stage = pb.new_stage()
    for step, b in enumerate(threaded):
        direct = pb.batch(step, stage)
        assert b["step"] == step
        for name in ("image", "climate", "ids", "climate_key"):
            assert torch.equal(b[name], direct[name]), name


def test_climate_keys_equal_for_equal_series_whatever_the_batch():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(5, 61, 14)).astype(np.float32)
    batch = series[[0, 1, 2, 0, 3, 4, 1]]
    keys = climate_keys(batch)
    assert keys.dtype == np.int64 and (keys >= 0).all()
    assert keys[0] == keys[3] and keys[1] == keys[6]
    assert len(set(keys[[0, 1, 2, 4, 5]].tolist())) == 5
    assert climate_key(series[2]) == keys[2]  # alone or in a batch, at any position
    nudged = series[2].copy()
    nudged[30, 7] = np.nextafter(nudged[30, 7], np.float32(np.inf))
    assert climate_key(nudged) != keys[2]  # one ulp in one month of one variable is another series


def _npy_header(member: bytes) -> int:
    """Bytes before the array data of a .npy member."""
    f = io.BytesIO(member)
    version = np.lib.format.read_magic(f)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    return f.tell()


def test_non_finite_pixels_become_zero_unless_the_manifest_proves_every_pixel_finite(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    key, members = index_shard(str(folder / "shard-000000.tar"))[5]
    offset, size = members["image.npy"]
    with open(folder / "shard-000000.tar", "rb") as f:
        f.seek(offset)
        header = _npy_header(f.read(size))
    with open(folder / "shard-000000.tar", "r+b") as f:  # channel 0, pixel (2, 3) := NaN; channel 1, (0, 0) := inf
        f.seek(offset + header + 2 * (2 * 64 + 3))
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
        f.seek(offset + header + 2 * 64 * 64)
        f.write(np.array([np.inf], dtype=np.float16).tobytes())
    plain = LoaderSpec(seed=3, global_batch=64, rank=0, world=1, augment=AugmentSpec(enabled=False))

    def row_of_sample_5(s):
        b = next(iter(PretrainBatches(s, plain)))
        return b["image"][b["ids"].tolist().index(5)]

    assert open_shards(folder, SchemaConfig()).image_finite  # the copied manifest still claims every pixel finite
    m = json.loads((folder / "manifest.json").read_text())
    m["stats"]["image"]["SR_B1"]["count"] -= 1
    m["stats"]["image"]["SR_B2"]["count"] -= 1
    (folder / "manifest.json").write_text(json.dumps(m))
    s = open_shards(folder, SchemaConfig())
    assert not s.image_finite
    image = row_of_sample_5(s)
    assert bool(torch.isfinite(image).all())
    assert float(image[0, 2, 3]) == 0.0 and float(image[1, 0, 0]) == 0.0


def test_a_member_declaring_another_dtype_is_a_corrupt_sample_named(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    shard = folder / "shard-000003.tar"
    key, members = index_shard(str(shard))[7]
    offset, size = members["image.npy"]
    with open(shard, "r+b") as f:  # same byte count, another dtype: the header says int16
        f.seek(offset)
        member = f.read(size)
        head = member[: _npy_header(member)]
        assert b"'<f2'" in head
        f.seek(offset)
        f.write(head.replace(b"'<f2'", b"'<i2'"))
    s = open_shards(folder, SchemaConfig())
    reports = [m for b in take(s, spec(), 0, 4) for m in b["corrupt"]]
    assert len(reports) == 1 and key in reports[0] and "shard-000003.tar" in reports[0] and "int16" in reports[0]


def _tar(path: Path, fmt: int, names: list[str]) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("a-folder/sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            data = bytes([i % 251]) * (100 + 700 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5 if fmt == tarfile.PAX_FORMAT else 1
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        tar.addfile(link)
    return path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_tar_index_equals_tarfile(shards, tmp_path, fmt):
    for shard in sorted(shards.glob("shard-*.tar")):
        assert index_shard(str(shard)) == index_shard_tarfile(str(shard))
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: prefix field; others: long names
    names = ["s1.image.npy", "s1.climate.npy", f"{long_dir}/s2.image.npy", f"{long_dir}/s2.meta.json", "s3.x.y.z"]
    url = str(_tar(tmp_path / "t.tar", fmt, names))
    got = index_shard(url)
    assert got == index_shard_tarfile(url)
    assert [k for k, _ in got] == ["s1", f"{long_dir}/s2", "s3"] and set(got[2][1]) == {"x.y.z"}


def test_damaged_tar_headers_are_judged_by_tarfile(shards, tmp_path):
    shard = tmp_path / "shard.tar"
    shutil.copy(next(iter(sorted(shards.glob("shard-*.tar")))), shard)
    _, members = index_shard_tarfile(str(shard))[2]
    offset = members["image.npy"][0] - 512  # that member's ustar header: damage its name, not its checksum
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"X")
    try:
        want = index_shard_tarfile(str(shard))
    except ShardIndexError:
        with pytest.raises(ShardIndexError, match="shard.tar"):
            index_shard(str(shard))
    else:
        assert index_shard(str(shard)) == want
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ShardIndexError, match="garbage.tar"):
        index_shard(str(tmp_path / "garbage.tar"))


def _batches(s, image_dtype=torch.float32, steps=4) -> list[dict]:
    """The first ``steps`` batches of the loader (which does not augment)."""
    sp = LoaderSpec(seed=3, global_batch=32, rank=0, world=1, augment=AugmentSpec(), image_dtype=image_dtype)
    pb = PretrainBatches(s, sp)
    stage = pb.new_stage()
    return [pb.batch(step, stage) for step in range(steps)]


def test_the_c_extension_gives_the_batches_of_python_reads_and_torch(shards, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    key, members = index_shard(str(folder / "shard-000000.tar"))[5]
    offset, size = members["image.npy"]
    with open(folder / "shard-000000.tar", "r+b") as f:  # channel 0, pixel (2, 3) := NaN
        f.seek(offset)
        f.seek(offset + _npy_header(f.read(size)) + 2 * (2 * 64 + 3))
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    m = json.loads((folder / "manifest.json").read_text())
    m["stats"]["image"]["SR_B1"]["count"] -= 1
    (folder / "manifest.json").write_text(json.dumps(m))
    s = open_shards(folder, SchemaConfig(channels=["SR_B1", "SR_B4", "NDVI"]))
    assert native.available(), "the C extension is not built: run make setup (pip install -e .)"
    fast = {dtype: _batches(s, dtype) for dtype in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(native, "LIB", None)
    plain = {dtype: _batches(s, dtype) for dtype in (torch.float32, torch.bfloat16)}
    for dtype in fast:
        for a, b in zip(fast[dtype], plain[dtype], strict=True):
            # the same float32 operations, the same rounding to bfloat16
            assert a["image"].dtype == dtype and torch.equal(a["image"], b["image"]), dtype
            for name in ("climate", "ids", "climate_key"):
                assert torch.equal(a[name], b[name]), name
            assert bool(torch.isfinite(a["image"]).all())
    for f32, bf16 in zip(fast[torch.float32], fast[torch.bfloat16], strict=True):
        assert torch.equal(f32["image"].to(torch.bfloat16), bf16["image"])  # handing over bf16 = casting later
    assert any(5 in b["ids"].tolist() for b in fast[torch.float32])  # the NaN sample was read
    for b in fast[torch.float32]:  # not augmented: the NaN pixel is the mean, where it was
        if 5 in b["ids"].tolist():
            assert float(b["image"][b["ids"].tolist().index(5), 0, 2, 3]) == 0.0


@pytest.mark.parametrize("path", ["c", "python"])
def test_a_shard_cut_short_after_indexing_gives_truncated_samples_named(shards, tmp_path, monkeypatch, path):
    if path == "python":
        monkeypatch.setattr(native, "LIB", None)
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    s = open_shards(folder, SchemaConfig())
    pb = PretrainBatches(s, spec())
    pb.decoder.index.ensure(list(range(len(s.urls))))  # every shard indexed, as in a run that has read from each
    shard = folder / "shard-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    stage = pb.new_stage()
    reports = [m for step in range(4) for m in pb.batch(step, stage)["corrupt"]]
    assert reports and all("shard-000001.tar" in m and "truncated" in m for m in reports)
    assert len(reports) >= 6  # about half of that shard's 16 samples


def test_a_process_left_holding_a_loader_mid_epoch_exits_cleanly(shards, repo_root):
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from soilnet.config.schema import SchemaConfig\n"
        "from soilnet.data import build_loader, open_shards\n"
        "from soilnet.data.loader import LoaderSpec\n"
        "from soilnet.data.augment import AugmentSpec\n"
        "spec = LoaderSpec(seed=3, global_batch=16, rank=0, world=1, augment=AugmentSpec())\n"
        "it = iter(build_loader(open_shards(sys.argv[1], SchemaConfig()), spec))\n"
        "batches = [next(it) for _ in range(3)]\n"  # the reader thread is busy with the next batches at exit
    )
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", script, str(shards), str(repo_root)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr


def test_pooled_batch_memory_returns_only_after_its_last_view_is_freed():
    pool = TensorPool()
    a = pool.tensor((4, 3), torch.bfloat16)
    view, storage = a[1:], a.untyped_storage()
    del a
    assert pool.pooled() == 0  # a view and a storage still hold the memory
    b = pool.tensor((4, 3), torch.bfloat16)
    assert b.data_ptr() != view.data_ptr() - view.storage_offset() * view.element_size()
    del view, storage
    assert pool.pooled() == 1
    c = pool.tensor((4, 3), torch.bfloat16)  # the freed array again, not a new one
    assert pool.pooled() == 0 and c.dtype == torch.bfloat16 and c.shape == (4, 3)
    assert pool.tensor((2, 3), torch.float32).shape == (2, 3)  # another shape or dtype: its own arrays


@pytest.mark.parametrize("isa", list(native.ISAS))
@pytest.mark.parametrize("raw_dtype", [np.float16, np.int16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_c_conversion_is_torchs_arithmetic_for_each_input_and_output_type(raw_dtype, out_dtype, isa, monkeypatch):
    assert native.available(), "the C extension is not built: run make setup (pip install -e .)"
    monkeypatch.setattr(native, "MAX_ISA", native.ISAS[isa])  # a CPU without that ISA runs a narrower kernel
    rng = np.random.default_rng(0)
    k, c, h, w = 3, 4, 7, 9  # 63 pixels a plane: the vector loops and their scalar tails both run
    if raw_dtype == np.int16:
        raw = rng.integers(-30000, 30000, size=(k, c, h, w)).astype(np.int16)
    else:
        raw = (rng.normal(size=(k, c, h, w)) * 100).astype(np.float16)
        raw[0, 1, 2, 3], raw[1, 0, 0, 0], raw[2, 3, 6, 8] = np.nan, np.inf, 6e-8  # missing, overflow, subnormal
    channel = np.array([2, 0, 3])
    scale = rng.uniform(0.001, 2, size=3).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    jitter = rng.normal(size=(k, 3)).astype(np.float32)
    out = torch.empty((k, 3, h, w), dtype=out_dtype)
    native.affine_rows(native.affine(raw, channel, scale, bias, out, jitter), k)
    y = torch.from_numpy(raw[:, channel].astype(np.float32))
    y = y * torch.from_numpy(scale).view(1, 3, 1, 1) + torch.from_numpy(bias).view(1, 3, 1, 1)
    y = torch.where(torch.isfinite(y), y, 0.0) + torch.from_numpy(jitter).view(k, 3, 1, 1)
    assert torch.equal(out, y.to(out_dtype))
