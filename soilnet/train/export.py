"""``soilnet export --checkpoint DIR --out encoders.safetensors``: the encoders of a pretraining checkpoint as
plain weights that fine-tuning loads without DeepSpeed.

Tensors are named ``image_encoder.*`` and ``climate_encoder.*`` (the encoders' own state-dict keys under those
prefixes); the safetensors metadata holds ``schema`` (JSON of the sample schema dict) and ``model`` (JSON of the
model config), plus ``step`` and ``code_version``. Under ZeRO stages 1-3 the weights come from DeepSpeed's
``zero_to_fp32`` helper, which consolidates the partitions into one fp32 state dict without a process group;
under stage 0 the model file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from soilnet.train.checkpoint import resolve

PREFIXES = ("image_encoder.", "climate_encoder.")
MODEL_PREFIX = "model."  # the contrastive model sits at PretrainModule.model


def encoder_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(``image_encoder.*``/``climate_encoder.*`` fp32 tensors, the checkpoint's soilnet.json)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ref = resolve(checkpoint)
    if list(ref.path.glob("*zero_pp_rank_*optim_states.pt")):
        full = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    else:  # ZeRO stage 0: the model file holds the whole module, plain tensors only
        full = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    state = {}
    for k, v in full.items():
        name = k[len(MODEL_PREFIX) :] if k.startswith(MODEL_PREFIX) else k
        if name.startswith(PREFIXES):
            state[name] = v.detach().to(torch.float32).contiguous().clone()
    if not state:
        raise ValueError(f"{ref.path}: no {PREFIXES} weights in the checkpoint (keys: {list(full)[:5]}...)")
    return state, ref.meta


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the encoders of ``checkpoint`` (an output_dir or one checkpoint folder) to ``out`` atomically."""
    state, meta = encoder_state(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "schema": json.dumps(meta["schema"]),
        "model": json.dumps(meta["model"]),
        "step": str(meta.get("step")),
        "code_version": str(meta.get("code_version", "")),
        "format": "soilnet-encoders/1",
    }
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def run_cli(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out)
    print(f"soilnet export: wrote {path}")
    return 0
