"""The one builder of DeepSpeed configs, for pretraining and fine-tuning alike.

Each job maps its own config onto these arguments (``soilnet.train.pretrain.engine_config``,
``soilnet.train.finetune.engine_config``); what DeepSpeed sees is always built here, so the two jobs cannot
drift apart in the keys they set.
"""

from __future__ import annotations

from soilnet.config.base import deep_merge


def adamw(lr: float, weight_decay: float, betas: tuple[float, float] | None = None) -> dict:
    """DeepSpeed's ``optimizer`` section for torch's AdamW (``torch_adam``: no fused CUDA op to compile)."""
    params: dict = {"lr": lr}
    if betas is not None:
        params["betas"] = list(betas)
    params.update(weight_decay=weight_decay, torch_adam=True)
    return {"type": "AdamW", "params": params}


def deepspeed_config(
    *,
    global_batch: int,
    micro: int,
    accumulation: int,
    grad_clip: float,
    bf16: bool = False,
    optimizer: dict | None = None,
    overrides: dict | None = None,
    load_universal: bool = False,
) -> dict:
    """A DeepSpeed config: ZeRO stage 0, no console prints, ``optimizer`` (None: the job passes its own), then the
    user's ``overrides`` merged on top. The batch sizes are set last, so no override can contradict them:
    ``global_batch = micro * accumulation * world``, in samples.
    """
    derived: dict = {
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # DeepSpeed >= 0.18 casts parameters only and keeps buffers fp32; batch norm then meets bf16 weights with
        # fp32 running statistics and refuses them. Cast buffers too, as module.bfloat16() did.
        derived["data_types"] = {"buffer_dtype": "bf16"}
    if optimizer is not None:
        derived["optimizer"] = optimizer
    out = deep_merge(derived, overrides or {})
    out["train_batch_size"] = global_batch
    out["train_micro_batch_size_per_gpu"] = micro
    out["gradient_accumulation_steps"] = accumulation
    if load_universal:
        out.setdefault("checkpoint", {})["load_universal"] = True
    return out
