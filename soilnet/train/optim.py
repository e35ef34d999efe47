"""Parameter groups and the layer-wise optimisers for large batches (LARS, LAMB).

LARS and LAMB scale each layer's update by a trust ratio ``||w|| / ||update||``, so they need every parameter
as its own tensor. ZeRO stages >= 1 flatten parameters into partitions owned by different ranks, where a
"layer" no longer exists; they are therefore allowed only with ZeRO stage 0 (:func:`check_optimizer`).
Biases and normalisation parameters (every 1-D tensor) get no weight decay and no trust ratio.

Fine-tuning passes :func:`param_groups` the named groups of layer-wise LR decay
(:func:`soilnet.models.layer_decay.lr_groups`), each with its LR scale; pretraining passes none.
"""

from __future__ import annotations

import torch
from torch import nn

from soilnet.config.base import ConfigError
from soilnet.models.layer_decay import LrGroup


class OptimizerConfigError(ConfigError):
    """An optimiser that the configured ZeRO stage cannot run."""


def param_groups(
    module: nn.Module, weight_decay: float, lr: float | None = None, groups: list[LrGroup] | None = None
) -> list[dict]:
    """Optimiser groups. Each of ``groups`` (default: all of ``module`` at scale 1) splits in two: matrices and
    kernels with ``weight_decay``; biases, norms and scalars (``ndim <= 1``) without, marked
    ``layer_adaptation=False``. With ``lr``, a group's ``lr`` is ``lr * lr_scale``. A group at scale 0 is frozen:
    its parameters stop requiring gradients and it is left out."""
    out = []
    for g in groups if groups is not None else [LrGroup("", list(module.parameters()), 1.0)]:
        if g.lr_scale == 0:
            for p in g.params:
                p.requires_grad_(False)
            continue
        decay: list[nn.Parameter] = []
        plain: list[nn.Parameter] = []
        for p in g.params:
            if p.requires_grad:
                (plain if p.ndim <= 1 else decay).append(p)
        extra = {} if groups is None else {"name": g.name, "lr_scale": g.lr_scale}
        if lr is not None:
            extra["lr"] = lr * g.lr_scale
        if decay or groups is None:
            out.append({"params": decay, "weight_decay": weight_decay, "layer_adaptation": True, **extra})
        if plain:
            out.append({"params": plain, "weight_decay": 0.0, "layer_adaptation": False, **extra})
    return out


def check_optimizer(name: str, zero_stage: int) -> None:
    """LARS/LAMB need per-layer tensors, which only ZeRO stage 0 keeps."""
    if name in ("lars", "lamb") and zero_stage != 0:
        raise OptimizerConfigError(
            f"train.optimizer={name} computes per-layer trust ratios, but ZeRO stage {zero_stage} flattens layers "
            "into partitions: set deepspeed.zero_optimization.stage=0, or use train.optimizer=adamw"
        )


def _trust(p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    w, u = p.norm(), update.norm()
    return torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as in SimCLR/BYOL's large-batch runs."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g.get("layer_adaptation", True):
                    d.mul_(g["eta"] * _trust(p, d))
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam moments with layer-wise trust ratios (You et al. 2019)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(())
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["step"])
                v_hat = st["v"] / (1 - b2 ** st["step"])
                update = m_hat / (v_hat.sqrt() + g["eps"])
                if g["weight_decay"]:
                    update.add_(p, alpha=g["weight_decay"])
                ratio = _trust(p, update) if g.get("layer_adaptation", True) else 1.0
                p.add_(update * ratio, alpha=-g["lr"])
        return loss


def build_client_optimizer(name: str, groups: list[dict], lr: float, betas, weight_decay: float):
    """The LARS/LAMB instance handed to ``deepspeed.initialize(optimizer=...)``; None for adamw (DeepSpeed
    builds torch's AdamW from its config)."""
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return None
