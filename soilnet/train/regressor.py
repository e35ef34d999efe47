"""The saved fine-tuned regressor: how its inputs are normalised, which model it is, how a pretrained export's
encoders go into it, and the ``model.safetensors`` format that prediction (``soilnet predict-map``) loads.

Training it is :mod:`soilnet.train.finetune`; this module holds everything a trained model needs afterwards.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from soilnet.atomic import write_bytes
from soilnet.config.base import to_plain
from soilnet.config.finetune import FinetuneConfig
from soilnet.config.model import ModelConfig
from soilnet.data.labelled import LabelledData
from soilnet.distributed import pick_device
from soilnet.models import build_regression_model
from soilnet.schema import TARGETS_BY_NAME, SampleSchema
from soilnet.train.targets import TargetTransform

log = logging.getLogger("soilnet.finetune")

MODEL_FILE = "model.safetensors"
FORMAT = "soilnet-finetuned/1"


class PretrainedMismatch(ValueError):
    """A pretrained export that does not fit the fine-tuning data or model."""


def modalities_of(name: str) -> tuple[str, ...]:
    """``both`` -> ``("image", "climate")``; ``image`` / ``climate`` -> a 1-tuple."""
    return ("image", "climate") if name == "both" else (name,)


# ------------------------------------------------------------------------------------------ normalising


@dataclass
class Normaliser:
    """Per-channel / per-variable ``(x - mean) / std``; missing values (NaN) become 0 after normalising.

    image_mean, image_std: ``(C,)``; climate_mean, climate_std: ``(F,)``; in the schema's units.
    """

    image_mean: np.ndarray | None
    image_std: np.ndarray | None
    climate_mean: np.ndarray | None
    climate_std: np.ndarray | None

    @classmethod
    def of(cls, data: LabelledData) -> Normaliser:
        return cls(data.image_mean, data.image_std, data.climate_mean, data.climate_std)

    def image(self, x: np.ndarray) -> torch.Tensor:
        """x: ``(B, C, H, W)`` -> ``(B, C, H, W)`` float32, normalised."""
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        t = (t - torch.from_numpy(self.image_mean)[:, None, None]) / torch.from_numpy(self.image_std)[:, None, None]
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def climate(self, x: np.ndarray) -> torch.Tensor:
        """x: ``(B, T, F)`` -> ``(B, T, F)`` float32, normalised."""
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        t = (t - torch.from_numpy(self.climate_mean)) / torch.from_numpy(self.climate_std)
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def to_dict(self) -> dict:
        def lst(a):
            return None if a is None else [float(v) for v in a]

        return {k: lst(getattr(self, k)) for k in ("image_mean", "image_std", "climate_mean", "climate_std")}

    @classmethod
    def from_dict(cls, d: dict) -> Normaliser:
        def arr(v):
            return None if v is None else np.asarray(v, dtype=np.float32)

        return cls(*(arr(d.get(k)) for k in ("image_mean", "image_std", "climate_mean", "climate_std")))


def choose_normalisation(data: LabelledData, export_meta: dict | None, mode: str, where: str) -> dict:
    """Put the statistics ``data.normalisation`` mode ``mode`` asks for into ``data`` and return what was used.

    ``mode`` ``pretrained`` with an export that records ``normalisation`` (:mod:`soilnet.train.export`): the
    pretraining shards' mean/std replace the data's, looked up by channel and variable name (the fine-tuning schema
    may order or select them differently). An export without them leaves the data's, with a ``warning``. ``data``,
    or no export: the data's own. Returns ``data.normalisation``: ``used`` (``pretrained``/``data``),
    ``requested`` and the source of each modality's statistics."""
    info = {**data.normalisation, "requested": mode if export_meta is not None else "data (no pretrained export)"}
    stats = json.loads(export_meta["normalisation"]) if export_meta and export_meta.get("normalisation") else None
    if export_meta is not None and mode == "pretrained" and stats is None:
        info["warning"] = (
            f"{where} records no pretraining normalisation statistics (exported before they were recorded): the "
            "inputs are normalised with the fine-tuning data's statistics, not as the encoders saw them in "
            "pretraining; re-export the checkpoint to fix this"
        )
        log.warning(info["warning"])
    if export_meta is None or mode != "pretrained" or stats is None:
        data.normalisation = info
        return info
    picked = {}
    for kind, names in (("image", data.schema.channels), ("climate", data.schema.climate_variables)):
        if getattr(data, f"{kind}_mean") is None:
            continue  # the run does not use this modality
        table = stats.get(kind) or {}
        missing = [n for n in names if n not in table]
        if missing:
            raise PretrainedMismatch(f"{where}: its normalisation statistics lack {kind} {missing}")
        picked[kind] = (
            np.array([table[n]["mean"] for n in names], dtype=np.float32),
            np.array([table[n]["std"] for n in names], dtype=np.float32),
        )
    for kind, (mean, std) in picked.items():
        setattr(data, f"{kind}_mean", mean)
        setattr(data, f"{kind}_std", np.where(np.isfinite(std) & (std > 0), std, 1.0).astype(np.float32))
        info[kind] = f"pretraining statistics of {stats.get('source', '?')} (from {where})"
    info["used"] = "pretrained"
    data.normalisation = info
    return info


# ----------------------------------------------------------------------------------------------- models


def build_model(model_cfg: ModelConfig, schema: SampleSchema, modalities: tuple[str, ...]) -> nn.Module:
    """The regression model of :mod:`soilnet.models`: ``forward(image, climate) -> (B, 1)``."""

    return build_regression_model(model_cfg, schema, modalities)


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata (``schema``, ``model`` parsed from JSON) of a ``soilnet export`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained export not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "schema" not in meta:
        raise PretrainedMismatch(f"{path}: metadata has no 'schema'; is it a `soilnet export` file?")
    parsed = dict(meta)
    for key in ("schema", "model"):
        if key in meta:
            parsed[key] = json.loads(meta[key])
    return load_file(str(path)), parsed


def check_export_schema(
    export_schema: SampleSchema, data_schema: SampleSchema, modalities: tuple[str, ...], where: str
) -> None:
    """Raise before training when the export was pretrained on other channels, variables or months."""
    problems = []
    if "image" in modalities and export_schema.channels != data_schema.channels:
        problems.append(f"channels: export {list(export_schema.channels)} != data {list(data_schema.channels)}")
    if "climate" in modalities:
        if export_schema.climate_variables != data_schema.climate_variables:
            problems.append(
                f"climate variables: export {list(export_schema.climate_variables)} "
                f"!= data {list(data_schema.climate_variables)}"
            )
        if export_schema.months != data_schema.months:
            problems.append(
                f"months: export {export_schema.months[0]}..{export_schema.months[-1]} ({len(export_schema.months)})"
                f" != data {data_schema.months[0]}..{data_schema.months[-1]} ({len(data_schema.months)})"
            )
    if problems:
        raise PretrainedMismatch(
            f"{where}: the pretrained schema differs from the fine-tuning data: " + "; ".join(problems)
        )


def apply_export_model(model_cfg: ModelConfig, export_meta: dict, modalities: tuple[str, ...]) -> ModelConfig:
    """The model config with the export's encoder choices (the weights only fit the encoders they came from)."""
    exported = export_meta.get("model")
    if not exported:
        return model_cfg
    exp = ModelConfig.model_validate(exported)
    cfg = model_cfg.model_copy(deep=True)
    if "image" in modalities and exp.image_encoder is not None:
        cfg.image_encoder = exp.image_encoder
    if "climate" in modalities and exp.climate_encoder is not None:
        cfg.climate_encoder = exp.climate_encoder
    return cfg


def load_encoders(model: nn.Module, tensors: dict[str, torch.Tensor], modalities: tuple[str, ...], where: str) -> None:
    """Copy ``image_encoder.*`` / ``climate_encoder.*`` weights into the model's encoders (strict)."""
    for name in ("image_encoder", "climate_encoder"):
        if name.split("_")[0] not in modalities:
            continue
        module = getattr(model, name, None)
        prefix = name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if module is None:
            continue
        if not state:
            raise PretrainedMismatch(f"{where}: no '{prefix}*' weights for the {name.split('_')[0]} modality")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise PretrainedMismatch(f"{where}: {name} weights do not fit the model: {err}") from err


# ------------------------------------------------------------------------------------------------ batches


def batch_inputs(
    data: LabelledData | dict,
    idx: np.ndarray,
    norm: Normaliser,
    modalities: tuple[str, ...],
    device: torch.device = torch.device("cpu"),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Normalised model inputs for rows ``idx``: image ``(B, C, H, W)`` and climate ``(B, T, F)`` (or None)."""
    image = data["image"] if isinstance(data, dict) else data.image
    climate = data["climate"] if isinstance(data, dict) else data.climate
    im = norm.image(image[idx]).to(device) if image is not None and "image" in modalities else None
    cl = norm.climate(climate[idx]).to(device) if climate is not None and "climate" in modalities else None
    return im, cl


@torch.no_grad()
def predict_scaled(
    model: nn.Module,
    data: LabelledData | dict,
    idx: np.ndarray,
    norm: Normaliser,
    modalities: tuple[str, ...],
    batch_size: int = 256,
) -> np.ndarray:
    """Model outputs on the training scale for rows ``idx``: ``(len(idx),)`` float64."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(idx), batch_size):
        im, cl = batch_inputs(data, idx[start : start + batch_size], norm, modalities, device)
        out.append(model(im, cl).reshape(-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class FitResult:
    """A trained model, its best epoch (chosen on validation) and the per-epoch curves."""

    model: nn.Module
    transform: TargetTransform
    best_epoch: int
    history: dict[str, list[float]]
    lr_groups: list[dict] = field(default_factory=list)  # optim.lr_table: name, parameters, lr_scale


def predict(
    fitted: FitResult, data: LabelledData, idx: np.ndarray, modalities: tuple[str, ...], corrected: bool = True
) -> np.ndarray:
    """Predictions in original units for rows ``idx``: ``(len(idx),)``; ``corrected=False``: without the
    back-transform's bias correction (``target.bias_correction``)."""
    scaled = predict_scaled(fitted.model, data, idx, Normaliser.of(data), modalities)
    return fitted.transform.inverse(scaled, corrected)


# ------------------------------------------------------------------------------------------ checkpoint


def save_model(
    directory: Path, fitted: FitResult, cfg: FinetuneConfig, data: LabelledData, model_cfg: ModelConfig, conformal: dict
) -> Path:
    """``directory/model.safetensors``: weights plus everything prediction needs, as JSON metadata."""
    target = TARGETS_BY_NAME.get(data.target)
    meta = {
        "format": FORMAT,
        "schema": json.dumps(data.schema.to_dict()),
        "model": json.dumps(to_plain(model_cfg)),
        "modalities": json.dumps(list(modalities_of(cfg.modalities))),
        "target": json.dumps(
            {"name": data.target, "unit": target.unit if target else "", **fitted.transform.to_dict()}
        ),
        "normaliser": json.dumps(Normaliser.of(data).to_dict()),
        "conformal": json.dumps(conformal),
    }
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / MODEL_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in fitted.model.state_dict().items()}
    write_bytes(out, save(state, metadata=meta))
    return out


@dataclass
class Finetuned:
    """A loaded fine-tuned model and what prediction needs (see :func:`save_model`)."""

    model: nn.Module
    schema: SampleSchema
    modalities: tuple[str, ...]
    transform: TargetTransform
    normaliser: Normaliser
    conformal: dict
    target: dict

    def predict(self, image: np.ndarray | None, climate: np.ndarray | None, batch_size: int = 256) -> np.ndarray:
        """image ``(N, C, H, W)`` / climate ``(N, T, F)`` in schema units -> prediction ``(N,)`` in target units."""
        rows = image if image is not None else climate
        assert rows is not None, "prediction needs an image or a climate series"
        n = len(rows)
        arrays = {"image": image, "climate": climate}
        scaled = predict_scaled(self.model, arrays, np.arange(n), self.normaliser, self.modalities, batch_size)
        return self.transform.inverse(scaled)


def load_model(path: str | Path, device: str = "auto") -> Finetuned:
    """Load a fine-tuning ``output_dir`` (or its model.safetensors) onto ``device`` (``auto``: GPU if visible)."""
    path = Path(path)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuned model not found: {path} (run `soilnet finetune` with final_model=true)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fine-tuned SoilNet model (format {meta.get('format')!r})")
    schema = SampleSchema.from_dict(json.loads(meta["schema"]))
    mods = tuple(json.loads(meta["modalities"]))
    model = build_model(ModelConfig.model_validate(json.loads(meta["model"])), schema, mods)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.to(pick_device(device)).eval()
    target = json.loads(meta["target"])
    transform = TargetTransform.from_dict(target)
    return Finetuned(
        model,
        schema,
        mods,
        transform,
        Normaliser.from_dict(json.loads(meta["normaliser"])),
        json.loads(meta["conformal"]),
        target,
    )
