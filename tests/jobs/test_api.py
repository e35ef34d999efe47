"""The notebook API (soilnet/api.py, docs/api.md): the documented example runs as written, on a fine-tuned model,
its labelled shards and an export placed at the example's paths; ``import soilnet`` stays light; no DeepSpeed."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from export_kit import write_export

import soilnet
from soilnet.api import Prediction, load_encoders, load_model, open_shards
from soilnet.schema import SchemaError

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "api.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.fixture(scope="module")
def demo_tree(finetuned_dir, labelled_shards, tmp_path_factory) -> Path:
    """A folder holding outputs/demo/{finetune, shards, encoders.safetensors}, the paths docs/api.md uses."""
    root = tmp_path_factory.mktemp("notebook")
    demo = root / "outputs" / "demo"
    demo.mkdir(parents=True)
    (demo / "finetune").symlink_to(finetuned_dir, target_is_directory=True)
    (demo / "shards").symlink_to(labelled_shards, target_is_directory=True)
    write_export(finetuned_dir, labelled_shards, demo / "encoders.safetensors")
    return root


def test_docs_example_runs_as_written(demo_tree, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert blocks, "docs/api.md has no python example"
    monkeypatch.chdir(demo_tree)
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "soilnet.Model(" in printed and "g/kg" in printed and "90% interval" in printed
    assert "(8, " in printed  # the encoders' features, one row per sample


def test_predict_bounds_units_and_inputs(finetuned_dir, labelled_shards):
    model = load_model(finetuned_dir)
    shards = open_shards(labelled_shards, schema=model.schema)
    samples = [s for s, _ in zip(shards, range(5), strict=False)]
    image, climate = np.stack([s.image for s in samples]), np.stack([s.climate for s in samples])
    p = model.predict(image, climate)
    assert isinstance(p, Prediction) and p.unit == "g/kg" and p.level == 0.9 and p.target == "soc"
    assert p.prediction.shape == p.lower.shape == p.upper.shape == (5,)
    assert np.all(p.lower <= p.prediction) and np.all(p.prediction <= p.upper)
    # the same prediction the saved model (and predict-map) gives
    np.testing.assert_allclose(p.prediction, model.finetuned.predict(image, climate))
    # torch tensors, and one sample without its batch axis
    t = model.predict(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(climate))
    np.testing.assert_allclose(t.prediction, p.prediction, rtol=1e-5)
    one = model.predict(image[0], climate[0])
    np.testing.assert_allclose(one.prediction, p.prediction[:1], rtol=1e-5)
    with pytest.raises(ValueError, match="climate="):
        model.predict(image, None)
    with pytest.raises(SchemaError, match="shape"):
        model.predict(image[:, :3], climate)


def test_open_shards_meta_and_selection(labelled_shards):
    shards = open_shards(labelled_shards)
    assert len(shards) == 303
    first = next(iter(shards))
    assert first.image.shape == shards.schema.image_shape and first.climate.shape == shards.schema.climate_shape
    assert first.meta["id"] == first.key and "lon" in first.meta and "soc" in first.meta["targets"]
    pair = ("NDVI", "elevation")
    picked = open_shards(labelled_shards, schema=dataclasses.replace(shards.schema, channels=pair))
    rows = [shards.schema.channels.index(c) for c in pair]
    np.testing.assert_array_equal(next(iter(picked)).image, first.image[rows])


def test_load_encoders_matches_the_model(demo_tree, finetuned_dir):
    enc = load_encoders(demo_tree / "outputs/demo/encoders.safetensors")
    model = load_model(finetuned_dir).finetuned.model
    for name in ("image", "climate"):
        mine, theirs = getattr(enc, name).state_dict(), getattr(model, f"{name}_encoder").state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k].cpu()) for k in mine)
    assert enc.normalisation and set(enc.normalisation["image"]) == set(enc.schema.channels)
    assert enc.metadata["format"] == "soilnet-encoders/1"


def test_import_soilnet_is_light_and_the_api_needs_no_deepspeed(demo_tree):
    code = (
        "import sys, soilnet\n"
        "assert 'torch' not in sys.modules, 'import soilnet imported torch'\n"
        "assert 'soilnet.api' not in sys.modules\n"
        "assert {'load_model', 'open_shards', 'load_encoders'} <= set(dir(soilnet))\n"
        "m = soilnet.load_model('outputs/demo/finetune')\n"
        "s = next(iter(soilnet.open_shards('outputs/demo/shards', schema=m.schema)))\n"
        "m.predict(s.image, s.climate)\n"
        "soilnet.load_encoders('outputs/demo/encoders.safetensors')\n"
        "assert 'deepspeed' not in sys.modules, 'the API imported DeepSpeed'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=demo_tree, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert soilnet.__version__
    with pytest.raises(AttributeError, match="no attribute"):
        soilnet.not_there  # noqa: B018
