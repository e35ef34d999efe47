"""Hand-over of batches to the training device (:mod:`soilnet.data.device`, :mod:`soilnet.data.pool`): the same
augmented batches whatever the number of DataLoader workers, workers' shared buffers reused rather than fresh
memory per batch, and on CUDA pinned batches prefetched on a side stream."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest
import torch

from soilnet.config.schema import SchemaConfig
from soilnet.data import LoaderSpec, build_loader, open_shards
from soilnet.data.augment import AugmentSpec
from soilnet.data.device import DeviceBatches, augment_batch

G = 16
NAMES = ("image", "image2", "climate", "ids", "climate_key")


def spec(workers: int = 0, **kw) -> LoaderSpec:
    aug = AugmentSpec(spectral_jitter=0.05, climate_jitter=0.05)
    return LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=aug, two_views=True, num_workers=workers, **kw)


def device_batches(shards, sp: LoaderSpec, start: int, n: int, device: str = "cpu") -> list[dict]:
    it = iter(DeviceBatches(build_loader(open_shards(shards, SchemaConfig()), sp, start), sp, device))
    return [next(it) for _ in range(n)]  # all held at once: no batch may reuse another's memory


def test_workers_0_1_2_give_the_same_augmented_batches(shards):
    want = device_batches(shards, spec(0), 1, 6)
    for workers in (1, 2):
        got = device_batches(shards, spec(workers), 1, 6)
        for a, b in zip(want, got, strict=True):
            assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
            for name in NAMES:
                assert torch.equal(a[name], b[name]), (workers, name)


def test_on_a_cpu_the_device_stage_only_augments(shards):
    sp = spec(0)
    plain = build_loader(open_shards(shards, SchemaConfig()), sp, 2)
    staged = device_batches(shards, sp, 2, 3)
    for host, dev in zip(iter(plain), staged, strict=False):
        want = augment_batch(host, sp)
        for name in NAMES:
            assert torch.equal(want[name], dev[name]), name


def test_worker_buffers_are_reused_not_allocated_per_batch(shards):
    workers, threads, batches = 2, 1, 60
    loader = build_loader(open_shards(shards, SchemaConfig()), spec(workers, threads=threads), 0)
    it = iter(loader)
    for k in range(batches):
        batch = next(it)
        assert batch["step"] == k
        del batch  # the training loop drops each batch before the next but one
    assert loader.adopter is not None
    # a batch is 4 tensors; per worker at most prefetch_factor (2) batches wait for the main process, which holds
    # 1, and each builder thread holds one finished and builds one: 2 + 1 + 2 * threads buffers of each tensor
    bound = workers * 4 * (2 + 1 + 2 * threads)
    assert len(loader.adopter.buffers) <= bound < 4 * batches
    del it


def test_in_process_pool_stops_allocating(shards):
    threads, batches = 2, 60
    loader = build_loader(open_shards(shards, SchemaConfig()), spec(0, threads=threads), 0)
    it = iter(loader)
    for _ in range(batches):
        next(it)  # dropped at once
    # a batch is 4 tensors; each builder thread holds one finished batch and builds one, the loop holds one
    assert loader.batches.decoder.pool.allocations <= 4 * (2 * threads + 1) < 4 * batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and a side stream")
def test_pinned_batches_prefetched_to_cuda_equal_the_cpu_ones(shards):
    sp = spec(0, pin_memory=True)
    host = iter(build_loader(open_shards(shards, SchemaConfig()), sp, 0))
    assert next(host)["image"].is_pinned()
    del host
    geometric = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=AugmentSpec(), two_views=True)
    for workers in (0, 2):
        sp = LoaderSpec(**{**geometric.__dict__, "num_workers": workers, "pin_memory": True})
        on_gpu = device_batches(shards, sp, 0, 4, "cuda")
        on_cpu = device_batches(shards, geometric, 0, 4)
        for a, b in zip(on_cpu, on_gpu, strict=True):
            for name in ("image", "image2", "climate", "climate_key"):
                assert b[name].device.type == "cuda"
                assert torch.equal(a[name], b[name].cpu()), (workers, name)  # index operations move values exactly


def test_workers_start_when_iteration_starts_not_at_the_first_batch(shards):
    """Pretraining blocks stop signals around ``iter()`` only: workers started later would die on a SIGTERM."""
    sp = spec(1)
    before = set(multiprocessing.active_children())
    it = iter(DeviceBatches(build_loader(open_shards(shards, SchemaConfig()), sp, 0), sp, "cpu"))
    assert set(multiprocessing.active_children()) - before  # the worker runs before any batch is asked for
    assert next(it)["step"] == 0
    del it


@pytest.mark.parametrize("workers", [0, 1])
def test_a_process_left_holding_device_batches_mid_epoch_exits_cleanly(shards, repo_root, workers):
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from soilnet.config.schema import SchemaConfig\n"
        "from soilnet.data import build_loader, open_shards\n"
        "from soilnet.data.loader import LoaderSpec\n"
        "from soilnet.data.augment import AugmentSpec\n"
        "from soilnet.data.device import DeviceBatches\n"
        "w = int(sys.argv[3])\n"
        "spec = LoaderSpec(seed=3, global_batch=16, rank=0, world=1, augment=AugmentSpec(), num_workers=w)\n"
        "it = iter(DeviceBatches(build_loader(open_shards(sys.argv[1], SchemaConfig()), spec), spec, 'cpu'))\n"
        "batches = [next(it) for _ in range(3)]\n"  # the augmenting and builder threads are busy at exit
    )
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script, str(shards), str(repo_root), str(workers)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr


def test_without_augmentation_the_second_view_is_the_first(shards):
    sp = LoaderSpec(seed=3, global_batch=G, rank=0, world=1, augment=AugmentSpec(enabled=False), two_views=True)
    b = device_batches(shards, sp, 0, 1)[0]
    assert b["image2"] is b["image"]
