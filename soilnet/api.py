"""The Python API for notebooks: a fine-tuned model, a shard folder and a pretrained export, in three calls.

``import soilnet`` then ``soilnet.load_model``, ``soilnet.open_shards`` and ``soilnet.load_encoders`` (exposed
lazily by ``soilnet/__init__.py``, so that ``import soilnet`` imports neither torch nor this module). Nothing here
imports DeepSpeed. Each call is a thin layer over what the jobs use:

- :func:`load_model`: :func:`soilnet.train.regressor.load_model` (what ``soilnet predict-map`` loads) and the
  split-conformal half-width the fine-tuning run saved with it, applied by
  :func:`soilnet.evaluate.conformal.intervals` as ``predict-map`` does;
- :func:`open_shards`: the manifest (:func:`soilnet.data.manifest.read_manifest`) and every sample, read by
  :func:`soilnet.data.decode.read_samples` and decoded by :func:`soilnet.data.decode.decode_image`;
- :func:`load_encoders`: :func:`soilnet.train.regressor.read_export`, the encoders built from the export's model
  config and schema, and their weights loaded strictly (:func:`soilnet.train.regressor.load_encoders`).

Shapes and units (see docs/api.md and docs/data-format.md): an image is ``(N, C, H, W)`` or one ``(C, H, W)`` in
the schema's units (reflectance, index values, metres of elevation: what a shard's ``image.npy`` holds after
decoding); a climate series is ``(N, T, F)`` or one ``(T, F)`` in physical units (TerraClimate's, as in a shard's
``climate.npy``; NaN marks a missing month). Numpy arrays or torch tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from soilnet.config.model import ModelConfig
from soilnet.data.decode import decode_image, read_samples
from soilnet.data.manifest import read_manifest
from soilnet.evaluate.conformal import intervals
from soilnet.schema import SampleSchema, SchemaError
from soilnet.train import regressor
from soilnet.train.regressor import Finetuned, Normaliser, modalities_of, read_export

__all__ = ["Encoders", "Model", "Prediction", "Sample", "Shards", "load_encoders", "load_model", "open_shards"]


# --------------------------------------------------------------------------------------------- inputs


def _rows(x, sample_shape: tuple[int, ...], name: str) -> np.ndarray:
    """``x`` (numpy or torch) as ``(N, *sample_shape)`` float32; one sample ``sample_shape`` becomes ``N = 1``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.shape == sample_shape:
        a = a[None]
    if a.shape[1:] != sample_shape:
        raise SchemaError(
            f"{name}: shape {a.shape} is neither (N, {', '.join(map(str, sample_shape))}) nor one sample "
            f"{sample_shape}, as the model's schema asks"
        )
    return a


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Prediction:
    """Predictions and their split-conformal bounds, each ``(N,)`` float64 in ``unit`` (the target's unit).

    ``level``: the intervals' nominal coverage (e.g. 0.9); bounds are NaN where the run saved no half-width."""

    prediction: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    unit: str
    level: float | None
    target: str

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{"prediction", "lower", "upper"}``, e.g. for ``pandas.DataFrame(p.as_dict())``."""
        return {"prediction": self.prediction, "lower": self.lower, "upper": self.upper}


class Model:
    """A fine-tuned SoilNet model (:func:`load_model`): ``schema``, ``modalities``, ``target`` (name, unit and
    back-transform) and ``conformal`` (level, space, half-width) as the run saved them."""

    def __init__(self, finetuned: Finetuned, path: Path):
        self.finetuned = finetuned
        self.path = path
        self.schema: SampleSchema = finetuned.schema
        self.modalities: tuple[str, ...] = finetuned.modalities
        self.target: dict = finetuned.target
        self.conformal: dict = finetuned.conformal

    @property
    def unit(self) -> str:
        return str(self.target.get("unit", ""))

    def __repr__(self) -> str:
        return (
            f"soilnet.Model({str(self.path)!r}, target={self.target.get('name')!r} ({self.unit}), "
            f"modalities={list(self.modalities)}, level={self.conformal.get('level')})"
        )

    def predict(self, image=None, climate=None, batch_size: int = 256) -> Prediction:
        """Predict ``N`` points; see the module docstring for the shapes and units.

        ``image``: ``(N, C, H, W)`` or ``(C, H, W)``; ``climate``: ``(N, T, F)`` or ``(T, F)``; None for a
        modality the model does not use (one it does use is required; one it does not use is ignored)."""
        arrays: dict[str, np.ndarray | None] = {"image": None, "climate": None}
        given = (("image", image, self.schema.image_shape), ("climate", climate, self.schema.climate_shape))
        for name, x, shape in given:
            if name not in self.modalities:
                continue
            if x is None:
                raise ValueError(f"the model uses {list(self.modalities)}: pass {name}=")
            arrays[name] = _rows(x, shape, name)
        im, cl = arrays["image"], arrays["climate"]
        if im is not None and cl is not None and len(im) != len(cl):
            raise ValueError(f"{len(im)} images but {len(cl)} climate series")
        pred = self.finetuned.predict(im, cl, batch_size)
        half_width = float(self.conformal.get("half_width", math.nan))
        lower, upper = intervals(pred, half_width, space=self.conformal.get("space", "original"))
        return Prediction(pred, lower, upper, self.unit, self.conformal.get("level"), str(self.target.get("name")))


def load_model(path: str | Path, device: str = "cpu") -> Model:
    """A fine-tuning ``output_dir`` (or its ``model.safetensors``) as a :class:`Model`, on ``device`` (``cpu``,
    ``cuda``, or ``auto``: a GPU when one is visible)."""
    path = Path(path)
    return Model(regressor.load_model(path, device), path)


# --------------------------------------------------------------------------------------------- shards


@dataclass
class Sample:
    """One decoded sample: ``image`` ``(C, H, W)`` in the schema's units (None without the image modality),
    ``climate`` ``(T, F)`` in physical units (None without climate), ``meta`` its ``meta.json`` (``id``,
    ``lon``, ``lat``, ``targets``, ...) and ``key``/``shard`` where it came from."""

    key: str
    image: np.ndarray | None
    climate: np.ndarray | None
    meta: dict
    shard: str


class Shards:
    """A shard folder (:func:`open_shards`): ``manifest``, ``schema`` (what each :class:`Sample` holds: the shards'
    own, or the selection asked for), ``len()`` its sample count; iterating reads every sample in order."""

    def __init__(self, path: str | Path, schema: SampleSchema | None = None):
        self.manifest, self.folder = read_manifest(path)
        available = SampleSchema.from_dict(self.manifest["schema"])
        self.schema = available if schema is None else schema
        if not self.schema.subset_of(available):
            raise SchemaError(f"{self.folder}: " + "; ".join(self.schema.differences(available)))
        self.channels = available.channel_indices(self.schema.channels)
        self.months = available.month_indices(self.schema.months)
        self.variables = available.climate_indices(self.schema.climate_variables)
        self.urls = [str(self.folder / s["name"]) for s in self.manifest["shards"]]
        self.encoding = self.manifest.get("image_encoding", {"dtype": "float16"})

    def __len__(self) -> int:
        return int(self.manifest.get("samples", sum(int(s.get("samples", 0)) for s in self.manifest["shards"])))

    def __repr__(self) -> str:
        return f"soilnet.Shards({str(self.folder)!r}, {len(self)} samples, {len(self.urls)} shards)"

    def __iter__(self) -> Iterator[Sample]:
        for s in read_samples(self.urls):
            image, climate = s.get("image.npy"), s.get("climate.npy")
            if image is not None:
                image = decode_image(image, self.encoding)[self.channels]
            if climate is not None:
                climate = np.asarray(climate, dtype=np.float32)[np.ix_(self.months, self.variables)]
            meta = s.get("meta.json") or {}
            yield Sample(s["__key__"], image, climate, meta, str(s.get("__url__", "")))


def open_shards(path: str | Path, schema: SampleSchema | None = None) -> Shards:
    """A shard folder (or its ``manifest.json``); iterate it for :class:`Sample` objects. ``schema`` (e.g.
    ``model.schema``): take only its channels, climate variables and months, in its order (an error naming what
    the shards lack); default: everything the shards hold."""
    return Shards(path, schema)


# ------------------------------------------------------------------------------------------- encoders


@dataclass
class Encoders:
    """The encoders of a ``soilnet export`` file as torch modules (eval mode, CPU), None for a modality the export
    lacks. ``image`` takes normalised ``(B, C, H, W)``, ``climate`` normalised ``(B, T, F)``; ``normalisation``
    holds the pretraining mean/std by channel and variable name (None when the export records none);
    ``metadata`` the file's whole metadata (``step``, ``code_version``, ...)."""

    image: nn.Module | None
    climate: nn.Module | None
    schema: SampleSchema
    model: ModelConfig
    normalisation: dict | None
    metadata: dict

    def normaliser(self) -> Normaliser:
        """The pretraining statistics as a :class:`~soilnet.train.regressor.Normaliser` in the schema's order."""
        if not self.normalisation:
            raise ValueError("the export records no normalisation statistics: normalise the inputs yourself")
        arrays = []
        for kind, names in (("image", self.schema.channels), ("climate", self.schema.climate_variables)):
            table = self.normalisation.get(kind) or {}
            for stat in ("mean", "std"):
                arrays.append(np.array([table[n][stat] for n in names], np.float32) if table else None)
        return Normaliser(*arrays)

    @torch.no_grad()
    def embed(self, image=None, climate=None) -> dict[str, np.ndarray]:
        """Features ``(N, D)`` of each modality given (shapes and units as :meth:`Model.predict` takes them),
        normalised with the pretraining statistics: ``{"image": ..., "climate": ...}``."""
        norm, out = self.normaliser(), {}
        if image is not None and self.image is not None:
            out["image"] = self.image(norm.image(_rows(image, self.schema.image_shape, "image"))).numpy()
        if climate is not None and self.climate is not None:
            out["climate"] = self.climate(norm.climate(_rows(climate, self.schema.climate_shape, "climate"))).numpy()
        return out


def load_encoders(path: str | Path) -> Encoders:
    """Read a ``soilnet export`` file (``encoders.safetensors``) into :class:`Encoders`."""
    tensors, meta = read_export(path)
    schema = SampleSchema.from_dict(meta["schema"])
    model_cfg = ModelConfig.model_validate(meta.get("model") or {})
    present = [m for m in ("image", "climate") if any(k.startswith(f"{m}_encoder.") for k in tensors)]
    mods = tuple(present) or modalities_of("both")
    model = regressor.build_model(model_cfg, schema, mods)
    regressor.load_encoders(model, tensors, mods, str(path))
    model.eval()
    stats = meta.get("normalisation")
    return Encoders(
        getattr(model, "image_encoder", None),
        getattr(model, "climate_encoder", None),
        schema,
        model_cfg,
        None if not stats else json.loads(stats),
        meta,
    )
