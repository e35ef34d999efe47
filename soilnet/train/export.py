"""``soilnet export --checkpoint DIR --out encoders.safetensors``: the encoders of a pretraining checkpoint as
plain weights that fine-tuning loads without DeepSpeed.

Tensors are named ``image_encoder.*`` and ``climate_encoder.*`` (the encoders' own state-dict keys under those
prefixes); the safetensors metadata holds ``schema`` (JSON of the sample schema dict) and ``model`` (JSON of the
model config), plus ``step`` and ``code_version``. Under ZeRO stages 1-3 the weights come from DeepSpeed's
``zero_to_fp32`` helper, which consolidates the partitions into one fp32 state dict without a process group;
under stage 0 the model file is read with ``torch.load(weights_only=True)``.

``normalisation`` (JSON, :func:`shard_statistics`) holds the per-channel and per-climate-variable mean and std the
encoders were pretrained with, keyed by name, so that fine-tuning can scale its inputs the same way. They come
from the checkpoint's soilnet.json (pretraining records them) or, for checkpoints written before it did, from the
pretraining manifest (the run's recorded ``data.shards``, or ``--shards``). Without either, the export has no
``normalisation`` and a warning says so; fine-tuning then falls back to its data's statistics.

``MODEL_CARD.md`` (:mod:`soilnet.train.model_card`) is written beside the export.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save

from soilnet.atomic import write_bytes
from soilnet.config.schema import SchemaConfig
from soilnet.data.shards import ShardSet, open_shards
from soilnet.train.checkpoint import resolve
from soilnet.train.model_card import export_card, write_card

log = logging.getLogger("soilnet.export")

PREFIXES = ("image_encoder.", "climate_encoder.")
MODEL_PREFIX = "model."  # the contrastive model sits at PretrainModule.model


def encoder_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(``image_encoder.*``/``climate_encoder.*`` fp32 tensors, the checkpoint's soilnet.json)."""
    # heavy (DeepSpeed's op builders); only a ZeRO-partitioned checkpoint needs it
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


def shard_statistics(shards: ShardSet) -> dict:
    """The normalisation of a pretraining :class:`~soilnet.data.shards.ShardSet`, by name.

    ``{"source": manifest path, "schema": the run's schema dict, "image": {channel: {"mean", "std"}},
    "climate": {variable: {"mean", "std"}}}`` in the shard members' units; std as pretraining divides by it
    (a zero or non-finite std of the manifest is 1)."""

    def table(names, mean, std) -> dict:
        return {n: {"mean": float(m), "std": float(s)} for n, m, s in zip(names, mean, std, strict=True)}

    return {
        "source": str(shards.manifest_file),
        "schema": shards.schema.to_dict(),
        "image": table(shards.schema.channels, shards.image_mean, shards.image_std),
        "climate": table(shards.schema.climate_variables, shards.climate_mean, shards.climate_std),
    }


def pretraining_statistics(meta: dict, shards: str | Path | None = None) -> dict | None:
    """The normalisation a checkpoint was pretrained with (:func:`shard_statistics`), or None with a warning.

    ``meta``: the checkpoint's soilnet.json. Its ``normalisation`` when recorded; else read from ``shards`` or
    the run's recorded ``data.shards`` manifest, for the checkpoint's schema (its channels and variables by name)."""
    if meta.get("normalisation") and shards is None:
        return meta["normalisation"]
    where = shards if shards is not None else ((meta.get("config") or {}).get("data") or {}).get("shards")
    if not where:
        log.warning("the checkpoint records neither normalisation statistics nor its shards: exporting without them")
        return None
    s = meta["schema"]
    wanted = SchemaConfig(
        channels=s["channels"],
        climate_variables=s["climate_variables"],
        first_month=s["months"][0],
        last_month=s["months"][-1],
        patch_size=s["patch_size"],
        pixel_size_m=s["pixel_size_m"],
    )
    try:
        opened = open_shards(where, wanted)
    except (OSError, ValueError) as err:
        log.warning("exporting without normalisation statistics: the pretraining manifest is unusable: %s", err)
        return None
    return shard_statistics(opened)


def export(checkpoint: str | Path, out: str | Path, shards: str | Path | None = None) -> Path:
    """Write the encoders of ``checkpoint`` (an output_dir or one checkpoint folder) to ``out`` atomically.

    ``shards``: the pretraining shard folder, to read the statistics from when the checkpoint does not record
    them (:func:`pretraining_statistics`)."""
    state, meta = encoder_state(checkpoint)
    stats = pretraining_statistics(meta, shards)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "schema": json.dumps(meta["schema"]),
        "model": json.dumps(meta["model"]),
        "step": str(meta.get("step")),
        "code_version": str(meta.get("code_version", "")),
        "format": "soilnet-encoders/1",
    }
    if stats is not None:
        metadata["normalisation"] = json.dumps(stats)
    write_bytes(out, save(state, metadata=metadata))
    write_card(out, export_card(out, meta, stats, shards))
    return out


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="soilnet export: %(message)s")
    path = export(args.checkpoint, args.out, getattr(args, "shards", None))
    print(f"soilnet export: wrote {path}")
    return 0
