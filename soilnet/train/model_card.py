"""``MODEL_CARD.md`` beside a model's weights: what the model is, what it was trained on and how well it does,
what it is for and where it stops being valid, generated from what the run knows.

Written by ``soilnet export`` (:mod:`soilnet.train.export`, beside ``encoders.safetensors``) and by every
fine-tuning output that saves ``model.safetensors`` (:mod:`soilnet.jobs.evaluate`, after ``metrics.json``).
Plain functions: a gatherer collects the facts of one kind of run (:func:`finetune_card`, :func:`export_card`)
into sections, :func:`render` turns them into markdown and :func:`write_card` writes it atomically. The headings
are fixed (:data:`HEADINGS`), so cards of different runs compare line by line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

import soilnet
from soilnet.atomic import write_text
from soilnet.config.base import to_plain
from soilnet.config.model import ModelConfig
from soilnet.data.labelled import LabelledData
from soilnet.data.manifest import read_manifest
from soilnet.train.regressor import apply_export_model

CARD_FILE = "MODEL_CARD.md"
HEADINGS = (
    "Model",
    "Schema",
    "Data",
    "Metrics",
    "Prediction intervals",
    "Intended use",
    "Limits",
    "Code version",
    "Config",
)
SYNTHETIC = "synthetic"
Sections = dict[str, list[str]]


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool | int | np.integer):
        return str(v)
    f = float(v)
    return f"{f:.4g}" if math.isfinite(f) else "n/a"


# ---------------------------------------------------------------------------------------------- facts


def manifest_facts(shards: str | Path | None) -> dict:
    """What a shard folder's manifest says of the data: ``shards`` (the folder), ``samples``, ``kind`` (the
    source: ``synthetic``, ``rasters``, ``earthengine``, ...), ``versions`` and ``region`` (the pack config's
    region or point file, or the synthetic world's bbox). Unknown fields are None (a missing manifest too)."""
    facts: dict = {"shards": None if shards is None else str(shards), "samples": None, "kind": None}
    facts.update(versions={}, region=None, bbox=None)
    if shards is None:
        return facts
    try:
        manifest, folder = read_manifest(shards)
    except (OSError, ValueError):
        return facts
    sources = manifest.get("sources") or {}
    config = manifest.get("config") or {}
    sampling, source = config.get("sampling") or {}, config.get("source") or {}
    facts.update(shards=str(folder), samples=manifest.get("samples"), kind=sources.get("kind"))
    facts["versions"] = sources.get("versions") or {}
    facts["region"] = sampling.get("region") or sampling.get("points")
    if facts["kind"] == SYNTHETIC and not facts["region"] and source.get("bbox"):
        facts["bbox"] = tuple(float(v) for v in source["bbox"])
    return facts


def points_bbox(lon: np.ndarray, lat: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(west, south, east, north)`` degrees of the points with coordinates, or None when none has any."""
    ok = np.isfinite(lon) & np.isfinite(lat)
    if not ok.any():
        return None
    return float(lon[ok].min()), float(lat[ok].min()), float(lon[ok].max()), float(lat[ok].max())


def _bbox_text(bbox) -> str:
    w, s, e, n = bbox
    return f"lon {w:.4f} to {e:.4f}, lat {s:.4f} to {n:.4f} (degrees, WGS84)"


# -------------------------------------------------------------------------------------------- sections


def schema_lines(schema: dict) -> list[str]:
    """The schema a model takes: channels, climate variables, months, patch size and resolution."""
    months = list(schema.get("months") or [])
    span = f"{months[0]} to {months[-1]} ({len(months)} months)" if months else "none"
    return [
        f"- Image channels ({len(schema.get('channels', []))}): {', '.join(schema.get('channels', []))}",
        f"- Climate variables ({len(schema.get('climate_variables', []))}): "
        + ", ".join(schema.get("climate_variables", [])),
        f"- Months: {span}",
        f"- Patch size: {schema.get('patch_size')} x {schema.get('patch_size')} pixels",
        f"- Resolution: {_num(schema.get('pixel_size_m'))} m per pixel",
    ]


def data_lines(facts: dict, role: str) -> list[str]:
    """A shard set (:func:`manifest_facts`) as card lines; ``role``: what the run did with it."""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(facts["versions"].items())) or "not recorded"
    lines = [
        f"- {role}: `{facts['shards']}`",
        f"- Samples in the shards: {_num(facts['samples'])}",
        f"- Source: {facts['kind'] or 'not recorded'}",
        f"- Source versions: {versions}",
    ]
    if facts["region"]:
        lines.append(f"- Region: `{facts['region']}`")
    elif facts["bbox"]:
        lines.append(f"- Region: the synthetic world's bbox, {_bbox_text(facts['bbox'])}")
    return lines


def metric_table(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown table of pooled metrics (RMSE, MAE, R², ... in the target's unit), one row per model."""
    keys = [
        k for k in ("rmse", "mae", "r2", "bias", "rpiq", "ccc", "log_rmse", "log_r2", "n") if rows and k in rows[0][1]
    ]
    out = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    return out + [f"| {name} | " + " | ".join(_num(m.get(k)) for k in keys) + " |" for name, m in rows]


def components(model: dict, roles: tuple[str, ...] = ("image_encoder", "climate_encoder", "regressor")) -> str:
    """The registry names of the model config's parts ``roles`` (those it sets)."""
    parts = [f"{role.replace('_', ' ')} `{(model.get(role) or {}).get('name')}`" for role in roles if model.get(role)]
    return "; ".join(parts) or "not recorded"


def config_lines(config: dict) -> list[str]:
    return ["The resolved config of the run:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]


def version_lines(extra: list[str]) -> list[str]:
    return [f"- soilnet {soilnet.__version__} wrote this card", *extra]


def synthetic_limits(pretraining: dict | None, data: dict | None) -> list[str]:
    """The synthetic-world limits: pretraining shards (``pretraining``) or training data (``data``) of it."""
    out = []
    if pretraining and pretraining.get("kind") == SYNTHETIC:
        out.append(
            "- **Pretrained on the synthetic world** (docs/synthetic-world.md): the encoders learned a generated "
            "landscape, not Landsat and TerraClimate; use them to test the pipeline, not for real soils."
        )
    if data and data.get("kind") == SYNTHETIC:
        out.append(
            "- **Trained on the synthetic world** (docs/synthetic-world.md): its SOC is generated; the metrics "
            "and predictions say nothing about real soils."
        )
    return out


def render(title: str, summary: str, sections: Sections) -> str:
    """The card: ``# title``, the summary, then each of :data:`HEADINGS` in order (missing ones say so)."""
    out = [f"# {title}", "", summary]
    for heading in HEADINGS:
        out += ["", f"## {heading}", "", *(sections.get(heading) or ["Not applicable to this model."])]
    return "\n".join(out) + "\n"


def write_card(weights: str | Path, text: str) -> Path:
    """``MODEL_CARD.md`` in the folder of ``weights``, atomically."""
    path = Path(weights).parent / CARD_FILE
    write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------- fine-tuning


def _finetune_metrics(metrics: dict) -> list[str]:
    split = metrics.get("split") or {}
    rows = [(name, metrics[key]) for name, key in (("model", "model"), ("random forest", "baseline_rf"))]
    out = [
        f"Cross-validated ({split.get('kind', 'unknown')} split, {split.get('folds', '?')} folds), pooled over "
        f"every test prediction, in {(metrics.get('target') or {}).get('unit', '')}:",
        "",
        *metric_table([(n, m) for n, m in rows if m]),
    ]
    if split.get("note"):
        out += ["", f"Split: {split['note']}."]
    return out


def _dropped(counts: dict) -> str:
    reasons = ("missing", "nan", "negative", "no_ground_truth")
    return ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in reasons if counts.get(k)) or "none"


def _finetune_intervals(metrics: dict, unit: str) -> list[str]:
    cv, final = metrics.get("conformal") or {}, (metrics.get("final_model") or {}).get("conformal") or {}
    level = final.get("level", cv.get("level"))
    return [
        f"- Conformal level: {_num(level)} (split-conformal, absolute residuals in {final.get('space', 'original')} "
        "space)",
        f"- Coverage measured in cross-validation: {_num(cv.get('coverage'))} (mean width {_num(cv.get('mean_width'))}"
        f" {unit}, n={_num(cv.get('n'))})",
        f"- The saved model's half-width: {_num(final.get('half_width'))}, calibrated on "
        f"{_num(final.get('n_calibration'))} held-out points",
    ]


def trained_model(model: dict, export_meta: dict | None, modalities: tuple[str, ...]) -> dict:
    """The model config as trained: the config's, with the pretrained export's encoders where it replaced them
    (:func:`soilnet.train.regressor.apply_export_model`)."""
    if not export_meta:
        return model
    return to_plain(apply_export_model(ModelConfig.model_validate(model), export_meta, modalities))


def finetune_card(metrics: dict, config: dict, data: LabelledData, export_meta: dict | None) -> str:
    """The card of a fine-tuning output_dir: ``metrics`` (its metrics.json, with ``final_model``), ``config``
    (the resolved config), ``data`` (the labelled points read) and the pretrained export's metadata or None."""
    target = metrics.get("target") or {}
    unit, name = target.get("unit") or data.unit, target.get("name") or data.target
    shards = manifest_facts((config.get("data") or {}).get("shards"))
    stats = (export_meta or {}).get("normalisation")
    pretraining = manifest_facts(json.loads(stats).get("source")) if stats else None
    bbox = points_bbox(data.lon, data.lat)
    mods = ", ".join(metrics.get("modalities") or [])
    model = trained_model(config.get("model") or {}, export_meta, tuple(metrics.get("modalities") or ()))
    sections: Sections = {
        "Model": [
            f"- Fine-tuned SoilNet regressor of `{name}` ({unit}) from {mods}; weights `model.safetensors`",
            f"- {components(model)}",
            f"- Pretrained export: `{config.get('pretrained')}`"
            if config.get("pretrained")
            else "- Trained from scratch",
        ],
        "Schema": schema_lines(data.schema.to_dict()),
        "Data": [
            *data_lines(shards, "Labelled shards"),
            f"- Labelled points used: {len(data)}; left out: " + _dropped(data.counts),
            *(data_lines(pretraining, "Pretraining shards") if pretraining else []),
        ],
        "Metrics": _finetune_metrics(metrics),
        "Prediction intervals": _finetune_intervals(metrics, unit),
        "Intended use": [
            f"Predicting `{name}` in {unit} with a {_num((metrics.get('conformal') or {}).get('level'))} "
            "prediction interval at points or map cells like the training points, built the way the shards were "
            "(`soilnet predict-map`, or `soilnet.load_model` in a notebook: docs/api.md)."
        ],
        "Limits": _finetune_limits(bbox, unit, name, pretraining, shards),
        "Code version": version_lines([]),
        "Config": config_lines(config),
    }
    return render(
        f"Model card: {name} regressor", f"Fine-tuned SoilNet model in `{config.get('output_dir')}`.", sections
    )


def _finetune_limits(bbox, unit: str, name: str, pretraining: dict | None, shards: dict) -> list[str]:
    area = _bbox_text(bbox) if bbox else "unknown (the training points have no coordinates)"
    return [
        f"- Area of applicability: the bounding box of the training points, {area}. Outside it (and in land "
        "covers or climates the points do not sample) the model extrapolates and the interval coverage is not "
        "guaranteed.",
        f"- Target units: predictions and bounds are `{name}` in {unit}; inputs must be in the schema's units "
        "(docs/data-format.md), for the schema's months.",
        "- The coverage is marginal: on average over points like the calibration points, not for each point.",
        *synthetic_limits(pretraining, shards),
    ]


# -------------------------------------------------------------------------------------------- export


def export_card(out: Path, meta: dict, stats: dict | None, shards: str | Path | None = None) -> str:
    """The card of a ``soilnet export`` file ``out``: ``meta`` (the checkpoint's soilnet.json), ``stats`` (the
    normalisation exported, or None) and ``shards`` (the pretraining shards, default: the run's ``data.shards``)."""
    config = meta.get("config") or {}
    where = shards if shards is not None else (config.get("data") or {}).get("shards")
    facts = manifest_facts(where)
    model = meta.get("model") or {}
    sections: Sections = {
        "Model": [
            f"- Pretrained SoilNet encoders (cross-modal contrastive pretraining); weights `{out.name}`",
            f"- {components(model, ('image_encoder', 'climate_encoder'))}",
        ],
        "Schema": schema_lines(meta.get("schema") or {}),
        "Data": [
            *data_lines(facts, "Pretraining shards"),
            f"- Pretraining: {meta.get('step')} steps, {_num(meta.get('samples'))} samples seen",
            "- Normalisation statistics: " + ("recorded in the export" if stats else "not recorded"),
        ],
        "Metrics": [
            f"Encoders are not scored on a target; fine-tuning (`soilnet finetune`, with `pretrained: {out}`) "
            "reports cross-validated metrics and the split used. Pretraining logs its contrastive loss and "
            "retrieval accuracy (docs/pretraining.md)."
        ],
        "Prediction intervals": ["None: fine-tuning calibrates split-conformal intervals for a target."],
        "Intended use": [
            "Initialising the encoders of `soilnet finetune`, or as feature extractors in a notebook "
            "(`soilnet.load_encoders`, docs/api.md). Not a predictor of SOC by itself."
        ],
        "Limits": _export_limits(facts),
        "Code version": version_lines([f"- Pretrained with soilnet {meta.get('code_version') or 'unknown'}"]),
        "Config": config_lines(config),
    }
    return render("Model card: pretrained encoders", f"`soilnet export` of step {meta.get('step')}.", sections)


def _export_limits(facts: dict) -> list[str]:
    region = f"`{facts['region']}`" if facts["region"] else _bbox_text(facts["bbox"]) if facts["bbox"] else "unknown"
    return [
        f"- Area of applicability: the pretraining region, {region}. Elsewhere the features are extrapolated.",
        "- Target units: none (no target); inputs in the schema's units (docs/data-format.md).",
        *synthetic_limits(facts, None),
    ]
