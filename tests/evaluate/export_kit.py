"""A ``soilnet export`` file without a pretraining run: the encoders of a fine-tuned model (tests/evaluate/
labelled_kit.py's ``finetuned_dir``) written by the real :func:`soilnet.train.export.export`, with only the
DeepSpeed checkpoint reading (``encoder_state``) replaced by a stand-in that returns those weights and a
checkpoint's ``soilnet.json``. (A uniquely named module: tests/jobs and tests/train import it.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from soilnet.train import export as export_module
from soilnet.train.regressor import MODEL_FILE


def checkpoint_meta(finetuned: Path, shards: Path) -> dict:
    """What a pretraining checkpoint's soilnet.json holds for export, for the fine-tuned model's encoders
    pretrained on ``shards`` (the export reads the normalisation statistics from their manifest)."""
    with safe_open(str(finetuned / MODEL_FILE), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return {
        "step": 2,
        "samples": 32,
        "schema": json.loads(meta["schema"]),
        "model": json.loads(meta["model"]),
        "code_version": "0.0.test",
        "config": {"output_dir": "outputs/pretrain", "data": {"shards": str(shards)}},
    }


def write_export(finetuned: Path, shards: Path, out: Path) -> Path:
    """``out`` (encoders.safetensors) and its MODEL_CARD.md, through :func:`soilnet.train.export.export`."""
    tensors = load_file(str(finetuned / MODEL_FILE))
    state = {k: v for k, v in tensors.items() if k.startswith(export_module.PREFIXES)}
    meta = checkpoint_meta(finetuned, shards)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "encoder_state", lambda checkpoint: (state, meta))
        return export_module.export("stand-in checkpoint", out)
