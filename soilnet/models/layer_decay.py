"""Layer-wise learning-rate decay: a model's parameters in named groups, each with its LR scale.

Depth is counted in each encoder's own blocks, as BEiT and MAE do, not in every module that holds a weight:
an encoder lists its levels, input first, with an ``lr_blocks()`` method (a ViT's embedding, transformer blocks,
final norm and output Linear; a CNN's stem, stages and fc; a recurrent encoder's layers and fc). The head (the
regressor) keeps the full rate; the encoder level k steps below it gets ``layer_decay ** k``.
:func:`soilnet.train.optim.param_groups` turns the groups into optimiser groups; ``soilnet model-summary``
prints them as :func:`lr_table`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ENCODERS = ("image_encoder", "climate_encoder")
MODES = ("frozen", "full", "lrd")


def lr_blocks(encoder: nn.Module, where: str = "encoder") -> list[tuple[str, list[nn.Parameter]]]:
    """The encoder's depth levels for layer-wise LR decay, input first, from its own ``lr_blocks()``: each a
    ``(name, parameters)``, every parameter in exactly one. ``where`` names the encoder in errors."""
    listing = getattr(encoder, "lr_blocks", None)
    if not callable(listing):
        raise ValueError(
            f"{where} ({type(encoder).__name__}) cannot list its blocks for layer-wise LR decay "
            "(train.encoders=lrd): give it an lr_blocks() method, or use train.encoders=full or frozen"
        )
    blocks = listing()
    listed = [id(p) for _, params in blocks for p in params]
    if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in encoder.parameters()}:
        raise ValueError(f"{where} ({type(encoder).__name__}).lr_blocks() must list each of its parameters once")
    return blocks


@dataclass(frozen=True)
class LrGroup:
    """Parameters that share one learning rate, ``lr * lr_scale``; scale 0 means frozen."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float


def lr_groups(model: nn.Module, encoders: str = "full", layer_decay: float = 1.0) -> list[LrGroup]:
    """The model's parameters in named groups, input side first, the head last.

    The encoders are the model's ``image_encoder`` and ``climate_encoder`` (either may be None); every other
    parameter is the ``head`` (the regressor), at scale 1. ``encoders``: ``frozen`` (each encoder one group at
    scale 0), ``full`` (one group at scale 1), or ``lrd``: each of an encoder's n blocks
    (:func:`lr_blocks`, input first), block i at ``layer_decay ** (n - i)``, so its top block is
    one step below the head. Names: ``image_encoder.<block>``, ``climate_encoder.<block>``, ``head``.
    """
    if encoders not in MODES:
        raise ValueError(f"train.encoders must be frozen, full or lrd, got {encoders!r}")
    groups, in_encoders = [], set()
    for where in ENCODERS:
        enc = getattr(model, where, None)
        if enc is None:
            continue
        in_encoders |= {id(p) for p in enc.parameters()}
        if encoders == "lrd":
            blocks = lr_blocks(enc, f"model.{where}")
            n = len(blocks)
            groups += [
                LrGroup(f"{where}.{name}", params, layer_decay ** (n - i)) for i, (name, params) in enumerate(blocks)
            ]
        else:
            groups.append(LrGroup(where, list(enc.parameters()), 0.0 if encoders == "frozen" else 1.0))
    head = [p for p in model.parameters() if id(p) not in in_encoders]
    return [*groups, LrGroup("head", head, 1.0)]


def lr_table(groups: list[LrGroup]) -> list[dict]:
    """``[{"name", "parameters", "lr_scale"}]``: what :func:`lr_groups` made, for logs and reports; the
    parameter counts sum to the model's."""
    return [{"name": g.name, "parameters": sum(p.numel() for p in g.params), "lr_scale": g.lr_scale} for g in groups]
