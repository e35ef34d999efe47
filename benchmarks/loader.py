"""Loader throughput: the training input pipeline against the I/O limit and against the seed's approach.

All three read the same samples, in the same run:

- ``raw_tar``: a sequential read of the shard bytes (the I/O limit; no decoding);
- ``pipeline``: :func:`soilnet.data.build_loader` from the shards (decode, normalise, batch, both modalities)
  then :class:`soilnet.data.device.DeviceBatches` (the copy to ``--device``, pinned and prefetched on CUDA, and
  the batched augmentation there), as pretraining consumes it, by number of workers and builder threads, with
  and without augmentation, in steady state: the first batch (worker start, shard indexing) is timed apart as
  ``first_batch_s_*``;
- ``seed``: the seed's layout of the same samples, one GeoTIFF per point read with rasterio plus a per-sample
  pandas filter in each per-variable climate CSV.

    .venv/bin/python benchmarks/loader.py [--samples 1024] [--reads 4096] [--repeats 3] [--workers 0 1 2]
                                          [--threads 2] [--dtypes float32] [--device cpu]

Raw reads and pipelines cover ``--reads`` samples each (repeating epochs); every pipeline run is paired with a
raw read just before it, and ``--repeats`` rounds of all runs interleave. Rates are medians over the rounds, a
ratio is the median of its pairs' ratios (the raw read's own rate moves by 2x between quiet minutes). One
intra-op thread per process (``OMP_NUM_THREADS``, default 1). ``cpu_us_*``: CPU time of the reading process per
sample (with 0 workers: all the pipeline's work, all its threads, the augmentation included). The last line is
one JSON object: ``vs_seed`` is the best augmented configuration against the seed's approach, ``vs_raw_tar`` the
best configuration without augmentation against the raw read and ``vs_raw_tar_augmented`` the best augmented one
(named by ``best`` and ``best_noaug``: ``w`` workers, ``t`` builder threads); ``aug_vs_noaug`` the best augmented
rate over the best rate without augmentation (``aug_vs_noaug_<config>``: the median of the rounds' ratios for
one configuration); ``workers_<n>_vs_0``: the augmented pipeline with ``n`` workers over 0 workers (same threads
and dtype, the first of each given).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load: one intra-op thread per process

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import rasterio  # noqa: E402
import torch  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.pack import pack  # noqa: E402
from soilnet.config.base import load_config  # noqa: E402
from soilnet.config.pack import PackConfig  # noqa: E402
from soilnet.config.schema import SchemaConfig  # noqa: E402
from soilnet.data import LoaderSpec, build_loader, open_shards  # noqa: E402
from soilnet.data.augment import AugmentSpec  # noqa: E402
from soilnet.data.device import DeviceBatches  # noqa: E402
from soilnet.schema import SampleSchema  # noqa: E402


def pack_samples(out: Path, n: int) -> Path:
    cfg = load_config(PackConfig, REPO / "configs/preprocess/demo.yaml", [f"output_dir={out}", f"sampling.n={n}"])
    pack(cfg)
    return out


def read_shard_samples(shard_dir: Path) -> list[dict]:
    """Decoded samples of every shard, to write the seed's layout from the very same data."""
    samples = []
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            current: dict = {}
            for member in tf:
                key, _, ext = member.name.partition(".")
                if current.get("__key__") not in (None, key):
                    samples.append(current)
                    current = {}
                current["__key__"] = key
                data = tf.extractfile(member).read()
                if ext.endswith("npy"):
                    current[ext] = np.load(io.BytesIO(data))
                elif ext.endswith("json"):
                    current[ext] = json.loads(data)
            if current:
                samples.append(current)
    return samples


def write_seed_layout(samples: list[dict], schema, root: Path) -> tuple[Path, Path]:
    """One float64 GeoTIFF per point and one CSV per climate variable, as the seed's notebooks read them."""
    images, climate = root / "images", root / "climate"
    images.mkdir(parents=True)
    climate.mkdir(parents=True)
    for s in samples:
        img = s["image.npy"].astype(np.float64)
        profile = {"driver": "GTiff", "width": img.shape[2], "height": img.shape[1], "count": img.shape[0]}
        profile.update(dtype="float64", crs="EPSG:3857", transform=from_origin(0, 0, 30, 30))
        with rasterio.open(images / f"{s['__key__']}_150107.tif", "w", **profile) as dst:
            dst.write(img)
    dates = [m.replace("-", "") + "01" for m in schema.months]
    for j, var in enumerate(schema.climate_variables):
        rows = [[s["__key__"], *s["climate.npy"][:, j].tolist()] for s in samples]
        pd.DataFrame(rows, columns=["Point_ID", *dates]).to_csv(climate / f"{var}.csv", index=False)
    return images, climate


def bench_seed(samples: list[dict], schema, images: Path, climate: Path) -> float:
    tables = {v: pd.read_csv(climate / f"{v}.csv", dtype={"Point_ID": str}) for v in schema.climate_variables}
    dates = [m.replace("-", "") + "01" for m in schema.months]
    start = time.perf_counter()
    for s in samples:
        pid = s["__key__"]
        with rasterio.open(images / f"{pid}_150107.tif") as src:
            img = src.read().astype(np.float32)
        series = np.stack([t[t["Point_ID"] == pid][dates].to_numpy()[0] for t in tables.values()], axis=1)
        assert img.ndim == 3 and series.shape == schema.climate_shape
    return len(samples) / (time.perf_counter() - start)


def bench_raw_tar(shard_dir: Path, n: int, reads: int) -> tuple[float, float]:
    """(samples/s, CPU us/sample) of sequential 4 MiB reads of the shard files, as many passes as cover ``reads``."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(-(-reads // n)):
        for tar in sorted(shard_dir.glob("shard-*.tar")):
            with open(tar, "rb", buffering=0) as f:
                while f.read(1 << 22):
                    pass
    done = -(-reads // n) * n
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


def bench_pipeline(
    shard_dir: Path, reads: int, workers: int, augment: bool, batch_size: int, threads: int, dtype: str, device: str
) -> tuple[float, float, float]:
    """The training input pipeline as pretraining consumes it: decode, normalise, batch, both modalities, then the
    copy to ``device`` and the batched augmentation there (:class:`DeviceBatches`).

    Returns (seconds to the first batch: worker start and shard indexing, samples/s over the next ``reads``
    samples, CPU us/sample of this process over them: all its threads, not the workers); the loader is endless,
    so ``reads`` may span several epochs."""
    shards = open_shards(shard_dir, SchemaConfig())
    options: dict = {"threads": threads} if threads else {}  # 0 and "": the defaults (older loaders lack the options)
    if dtype:
        options["image_dtype"] = getattr(torch, dtype)
    augmentation = AugmentSpec(enabled=augment)
    spec = LoaderSpec(
        seed=0,
        global_batch=batch_size,
        rank=0,
        world=1,
        augment=augmentation,
        num_workers=workers,
        pin_memory=device == "cuda",
        **options,
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    it = iter(DeviceBatches(build_loader(shards, spec), spec, device))
    next(it)
    sync()
    first = time.perf_counter() - t0
    seen = 0
    start, cpu = time.perf_counter(), time.process_time()
    while seen < reads:
        seen += next(it)["image"].shape[0]
    sync()
    rate, cpu_us = seen / (time.perf_counter() - start), (time.process_time() - cpu) / seen * 1e6
    del it  # stops the workers
    return first, rate, cpu_us


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples to pack")
    parser.add_argument("--reads", type=int, default=4096, help="samples each timed read covers (epochs repeat)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of interleaved runs (medians)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="*", default=[2], help="builder threads per process")
    parser.add_argument(
        "--dtypes", nargs="*", default=None, help="images handed over as (default: float32 on cpu, bfloat16 on cuda)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where batches go and are augmented")
    args = parser.parse_args()
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if args.device == "cuda" else ["float32"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def bench_rounds(args: argparse.Namespace, shard_dir: Path, n: int) -> dict[str, dict[str, list[float]]]:
    """Every pipeline configuration ``args.repeats`` times, each paired with the raw read just before it; returns
    ``{"rates", "cpu", "firsts"}``, each a list per run name (ratios as ``ratio_<name>`` among the rates)."""
    # interleaved repeats: each pipeline run is paired with the raw read just before it, and a ratio is the
    # median of the pairs' ratios (the raw read's own rate moves by 2x between quiet moments here)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    firsts: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for w, t, dt, aug in itertools.product(args.workers, args.threads, args.dtypes, (True, False)):
            tag = f"w{w}_t{t}" + (f"_{dt}" if dt else "")
            name = f"pipeline{'' if aug else '_noaug'}_{tag}"
            raw, raw_cpu = bench_raw_tar(shard_dir, n, args.reads)
            rates.setdefault("raw_tar", []).append(raw)
            cpu.setdefault("raw_tar", []).append(raw_cpu)
            first, rate, cpu_us = bench_pipeline(shard_dir, args.reads, w, aug, args.batch_size, t, dt, args.device)
            rates.setdefault(name, []).append(rate)
            if not aug:  # the augmented run of this configuration ran just before: their ratio in the same round
                rates.setdefault(f"aug_vs_noaug_{tag}", []).append(rates[f"pipeline_{tag}"][-1] / rate)
            rates.setdefault(f"ratio_{name}", []).append(rate / raw)
            cpu.setdefault(name, []).append(cpu_us)
            firsts.setdefault(tag, []).append(first)
    return {"rates": rates, "cpu": cpu, "firsts": firsts}


def summarise(results: dict, rounds: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    """Add the rounds' medians and the best configurations to ``results``, printing a line per figure."""
    med = {k: float(np.median(v)) for k, v in rounds["rates"].items()}
    results.update({k: v for k, v in med.items() if not k.startswith("ratio_")})
    cpu = rounds["cpu"]
    results.update({f"cpu_us_{k}": float(np.median(v)) for k, v in cpu.items() if "_w0_" in k or k == "raw_tar"})
    results.update({f"first_batch_s_{k}": min(v) for k, v in rounds["firsts"].items()})
    ratios = {k.removeprefix("ratio_"): v for k, v in med.items() if k.startswith("ratio_")}
    top_name = max((k for k in ratios if "noaug" not in k), key=ratios.__getitem__)
    top_noaug_name = max((k for k in ratios if "noaug" in k), key=ratios.__getitem__)
    for k, v in results.items():
        if k.startswith(("raw", "seed", "pipeline")):
            print(f"{k:>28}: {v:12.0f} samples/s" + (f"  ({ratios[k]:.2f} of the raw read)" if k in ratios else ""))
        elif k.startswith("first_batch"):
            print(f"{k:>28}: {v:12.3f} s")
        elif k.startswith("cpu_us"):
            print(f"{k:>28}: {v:12.1f} CPU us/sample")
        elif k.startswith("aug_vs_noaug"):
            print(f"{k:>28}: {v:12.2f}")
    aug = {k: v for k, v in med.items() if k.startswith("pipeline_") and "noaug" not in k}
    noaug = {k: v for k, v in med.items() if k.startswith("pipeline_noaug")}
    results.update(
        vs_seed=med[top_name] / results["seed"],
        vs_raw_tar=ratios[top_noaug_name],
        vs_raw_tar_augmented=ratios[top_name],
        aug_vs_noaug=max(aug.values()) / max(noaug.values()),
        best=top_name,
        best_noaug=top_noaug_name,
    )
    results.update(workers_vs_0(med, args))
    for k in ("aug_vs_noaug", *(k for k in results if k.startswith("workers_"))):
        print(f"{k:>28}: {results[k]:12.2f}")


def workers_vs_0(med: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """``workers_<n>_vs_0``: the augmented pipeline with ``n`` workers over 0 workers, same threads and dtype."""
    t, dt = args.threads[0], args.dtypes[0]
    base = med.get(f"pipeline_w0_t{t}_{dt}")
    return {f"workers_{w}_vs_0": med[f"pipeline_w{w}_t{t}_{dt}"] / base for w in args.workers if w and base is not None}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard_dir = pack_samples(root / "shards", args.samples)
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        schema = SampleSchema.from_dict(manifest["schema"])
        n = manifest["samples"]
        samples = read_shard_samples(shard_dir)
        images, climate = write_seed_layout(samples, schema, root / "seed")
        results: dict = {"samples": n, "reads": args.reads, "device": args.device, "load_avg_1min": os.getloadavg()[0]}
        results["seed"] = bench_seed(samples, schema, images, climate)
        summarise(results, bench_rounds(args, shard_dir, n), args)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
