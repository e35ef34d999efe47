"""Tiny pretraining shards in the documented format (docs/data-format.md), written with webdataset's ShardWriter.

Images carry a per-sample signal that the climate series shares, so a contrastive model can learn something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from soilnet import schema as S


def tiny_schema(months: int = 6) -> S.SampleSchema:
    first = S.month_range(S.DEFAULT_FIRST_MONTH, S.DEFAULT_LAST_MONTH)
    return S.SampleSchema(months=first[:months], patch_size=S.PATCH_SIZE)


def write_shards(folder: Path, n: int = 64, per_shard: int = 16, seed: int = 0, schema: S.SampleSchema | None = None):
    """Write ``n`` samples to ``folder`` as shard-%06d.tar plus manifest.json; returns the manifest dict."""
    schema = schema or tiny_schema()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c, h, w = schema.image_shape
    t, f = schema.climate_shape
    images, climates = [], []
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            z = rng.normal(size=4)
            img = (rng.normal(size=(c, h, w)) * 0.1 + z[0] + np.linspace(0, z[1], w)).astype(np.float16)
            clim = (rng.normal(size=(t, f)) * 0.1 + z[0] * 2 + z[1]).astype(np.float32)
            meta = {"id": f"p{i:07d}", "lon": float(i), "lat": 0.0, "scene_date": "2015-06-01", "source": "test"}
            sink.write({"__key__": f"p{i:07d}", "image.npy": img, "climate.npy": clim, "meta.json": meta})
            images.append(img.astype(np.float32))
            climates.append(clim)
    names = sorted(p.name for p in folder.glob("shard-*.tar"))
    counts = [min(per_shard, n - k * per_shard) for k in range(len(names))]
    im, cl = np.stack(images), np.stack(climates)

    def describe(x):
        return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                "max": float(x.max())}  # fmt: skip

    stats = {
        "image": {ch: describe(im[:, k]) for k, ch in enumerate(schema.channels)},
        "climate": {v: describe(cl[..., k]) for k, v in enumerate(schema.climate_variables)},
    }
    manifest = {
        "format": "soilnet-shards/1",
        "schema": schema.to_dict(),
        "modalities": ["image", "climate"],
        "image_encoding": {"dtype": "float16"},
        "targets": [],
        "shards": [{"name": nm, "samples": k} for nm, k in zip(names, counts, strict=True)],
        "samples": n,
        "stats": stats,
        "config": {},
        "sources": {"kind": "test"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest
