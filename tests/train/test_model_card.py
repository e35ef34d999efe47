"""MODEL_CARD.md beside the weights (soilnet/train/model_card.py): written by a fine-tuning run after metrics.json
and by ``soilnet export``, with the schema, the data, the metrics and their split, the conformal level and the
coverage measured, the code version, the intended use and the limits (area, units, the synthetic world)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))

import labelled_kit  # noqa: E402
from export_kit import checkpoint_meta, write_export  # noqa: E402

import soilnet  # noqa: E402
from soilnet.config.finetune import FinetuneDataConfig  # noqa: E402
from soilnet.data.labelled import load_labelled  # noqa: E402
from soilnet.train.model_card import CARD_FILE, HEADINGS, export_card, finetune_card  # noqa: E402

SCHEMA = labelled_kit.SCHEMA
# the fine-tuning fixtures of tests/evaluate (pytest finds fixtures by the test module's names)
finetuned_dir, labelled_shards = labelled_kit.finetuned_dir, labelled_kit.labelled_shards
SYNTHETIC_LIMIT = "Pretrained on the synthetic world"


def sections(card: str) -> dict[str, str]:
    """The card's text under each ``## heading``, checking that the headings are HEADINGS in order."""
    parts = card.split("\n## ")
    titles = [p.split("\n", 1)[0] for p in parts[1:]]
    assert titles == list(HEADINGS), titles
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts[1:]}


def fmt(v: float) -> str:
    return f"{v:.4g}"


def test_finetune_output_card(finetuned_dir):
    card_path = finetuned_dir / CARD_FILE
    assert card_path.is_file() and (finetuned_dir / "model.safetensors").is_file()
    assert card_path.stat().st_mtime_ns >= (finetuned_dir / "metrics.json").stat().st_mtime_ns
    metrics = json.loads((finetuned_dir / "metrics.json").read_text())
    card = card_path.read_text()
    assert card.startswith("# Model card: soc regressor")
    s = sections(card)
    assert f"Image channels ({len(SCHEMA.channels)}): {', '.join(SCHEMA.channels)}" in s["Schema"]
    assert f"Climate variables ({len(SCHEMA.climate_variables)}): {', '.join(SCHEMA.climate_variables)}" in s["Schema"]
    assert "Months: 2014-01 to 2014-12 (12 months)" in s["Schema"] and "Patch size: 8 x 8" in s["Schema"]
    assert "Resolution: 30 m per pixel" in s["Schema"]
    assert "Samples in the shards: 303" in s["Data"] and "Labelled points used: 300" in s["Data"]
    assert "1 missing, 1 nan, 1 negative" in s["Data"] and "Source: test" in s["Data"]
    m, rf = metrics["model"], metrics["baseline_rf"]
    assert f"| model | {fmt(m['rmse'])} | {fmt(m['mae'])} | {fmt(m['r2'])} |" in s["Metrics"]
    assert f"| random forest | {fmt(rf['rmse'])} |" in s["Metrics"]
    assert "spatial split, 3 folds" in s["Metrics"] and metrics["split"]["note"] in s["Metrics"]
    cv = metrics["conformal"]
    assert "Conformal level: 0.9" in s["Prediction intervals"]
    assert f"Coverage measured in cross-validation: {fmt(cv['coverage'])}" in s["Prediction intervals"]
    half = metrics["final_model"]["conformal"]["half_width"]
    assert f"half-width: {fmt(half)}" in s["Prediction intervals"]
    assert f"soilnet {soilnet.__version__}" in s["Code version"]
    assert "Area of applicability: the bounding box of the training points, lon 5." in s["Limits"]
    assert "`soc` in g/kg" in s["Limits"] and "synthetic world" not in card
    assert "soilnet predict-map" in s["Intended use"]
    assert yaml.safe_load(s["Config"].split("```yaml\n")[1].split("```")[0])["train"]["epochs"] == 8


def test_export_card(finetuned_dir, labelled_shards, tmp_path):
    out = write_export(finetuned_dir, labelled_shards, tmp_path / "enc" / "encoders.safetensors")
    card = (out.parent / CARD_FILE).read_text()
    assert card.startswith("# Model card: pretrained encoders")
    s = sections(card)
    assert f"Image channels ({len(SCHEMA.channels)}): {', '.join(SCHEMA.channels)}" in s["Schema"]
    assert "weights `encoders.safetensors`" in s["Model"] and "tiny_cnn" in s["Model"]
    assert "regressor" not in s["Model"]
    assert f"Pretraining shards: `{labelled_shards}`" in s["Data"] and "Samples in the shards: 303" in s["Data"]
    assert "Pretraining: 2 steps, 32 samples seen" in s["Data"]
    assert "Normalisation statistics: recorded in the export" in s["Data"]
    assert "not scored on a target" in s["Metrics"] and "None" in s["Prediction intervals"]
    assert f"soilnet {soilnet.__version__} wrote" in s["Code version"] and "soilnet 0.0.test" in s["Code version"]
    assert "soilnet.load_encoders" in s["Intended use"] and "Area of applicability" in s["Limits"]
    assert SYNTHETIC_LIMIT not in card


def test_synthetic_world_limit(shards, finetuned_dir, labelled_shards, tmp_path):
    """Encoders pretrained on the packed synthetic world say so, in the export's card and in the card of a
    fine-tuning run that starts from them; the world's bbox is the area of applicability."""
    meta = {**checkpoint_meta(finetuned_dir, shards)}
    card = export_card(tmp_path / "encoders.safetensors", meta, None, shards)
    s = sections(card)
    assert SYNTHETIC_LIMIT in s["Limits"] and "Source: synthetic" in s["Data"]
    assert "synthetic_world" in s["Data"]  # the source's version
    assert "lon 5.0000 to 15.0000, lat 45.0000 to 55.0000" in s["Limits"]
    assert "Normalisation statistics: not recorded" in s["Data"]

    metrics = json.loads((finetuned_dir / "metrics.json").read_text())
    config = yaml.safe_load((finetuned_dir / "config.yaml").read_text())
    data = load_labelled(FinetuneDataConfig(shards=str(labelled_shards), target="soc"), ("image", "climate"))
    export_meta = {"normalisation": json.dumps({"source": str(shards / "manifest.json")})}
    card = finetune_card(metrics, {**config, "pretrained": "enc.safetensors"}, data, export_meta)
    s = sections(card)
    assert SYNTHETIC_LIMIT in s["Limits"] and "Pretraining shards: `" in s["Data"]
    assert "Pretrained export: `enc.safetensors`" in s["Model"]


def test_the_card_names_the_encoders_the_pretrained_export_put_in_place_of_the_configs(finetuned_dir):
    """Fine-tuning from an export trains the export's encoders whatever the config's model says; the card names
    those, for the modalities used."""
    metrics = json.loads((finetuned_dir / "metrics.json").read_text())
    config = yaml.safe_load((finetuned_dir / "config.yaml").read_text())
    exported = {**config["model"], "image_encoder": {"name": "resnet50"}, "climate_encoder": {"name": "transformer"}}
    data = load_labelled(FinetuneDataConfig(shards=str(config["data"]["shards"]), target="soc"), ("image", "climate"))
    card = finetune_card({**metrics, "modalities": ["image"]}, config, data, {"model": exported})
    model = sections(card)["Model"]
    assert "image encoder `resnet50`" in model  # the export's, in place of the config's tiny_cnn
    assert f"climate encoder `{config['model']['climate_encoder']['name']}`" in model  # not used: the config's
