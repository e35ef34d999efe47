"""Climate encoders: climate ``(B, T, F)`` (T monthly steps of F variables) -> ``(B, out)``.

The recurrent encoders (LSTM, GRU, RNN) feed the last step's hidden state to a Linear; their initial state is
zeros on the input's device (the seed built ``h0`` on a global device, which broke on CPU). The Transformer is
the seed's time-series encoder: Linear F->d times sqrt(d), fixed sinusoidal positions, post-norm layers with
BatchNorm1d (the seed) or LayerNorm, GELU, and the flattened sequence into a Linear, so it needs T from the schema.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class RecurrentEncoder(nn.Module):
    def __init__(self, cell: str, n_features: int, hidden: int = 128, layers: int = 2, out: int = 128):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](n_features, hidden, layers, batch_first=True)
        self.fc = nn.Linear(hidden, out)
        self.out_features = out

    def forward(self, climate: torch.Tensor) -> torch.Tensor:
        steps, _ = self.rnn(climate)  # zero initial state on climate's device
        return self.fc(steps[:, -1])

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: each recurrent layer (layer 0's input weights are the input
        projection), then the fc."""
        return [*recurrent_layers(self.rnn, "rnn"), ("out", list(self.fc.parameters()))]


def recurrent_layers(rnn: nn.RNNBase, prefix: str) -> list[tuple[str, list[nn.Parameter]]]:
    """``(prefix.l<k>, [weight_ih_l<k>, weight_hh_l<k>, biases])`` for each stacked layer k of ``rnn``."""
    layer_of = {name: int(re.findall(r"_l(\d+)", name)[0]) for name, _ in rnn.named_parameters()}
    return [
        (f"{prefix}.l{k}", [p for name, p in rnn.named_parameters() if layer_of[name] == k])
        for k in range(rnn.num_layers)
    ]


class SinusoidalPositions(nn.Module):
    """Adds the fixed sine/cosine encoding of Vaswani et al. to ``(B, T, d)``, then dropout."""

    pe: torch.Tensor  # (1, max_len, d) buffer

    def __init__(self, d_model: int, max_len: int, dropout: float):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, : x.shape[1]])


class BatchNormEncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer with BatchNorm1d over the model dimension (the seed's choice)."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d_model, ff), nn.Linear(ff, d_model)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.BatchNorm1d(d_model, eps=1e-5), nn.BatchNorm1d(d_model, eps=1e-5)
        self.activation = nn.GELU()

    def _norm(self, norm: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        return norm(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(self.norm1, x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self._norm(self.norm2, x + self.dropout2(ff))


class ClimateTransformer(nn.Module):
    def __init__(
        self,
        n_features: int,
        n_steps: int,
        d_model: int = 512,
        heads: int = 8,
        layers: int = 6,
        norm: Literal["batch", "layer"] = "batch",
        ff: int = 2048,
        dropout: float = 0.1,
        out: int = 128,
    ):
        super().__init__()
        if norm not in ("batch", "layer"):
            raise ValueError(f"climate transformer norm must be 'batch' or 'layer', got {norm!r}")
        self.d_model, self.out_features = d_model, out
        self.project = nn.Linear(n_features, d_model)
        self.positions = SinusoidalPositions(d_model, n_steps, dropout)
        if norm == "batch":
            self.layers = nn.ModuleList(BatchNormEncoderLayer(d_model, heads, ff, dropout) for _ in range(layers))
        else:
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, heads, ff, dropout, activation="gelu", batch_first=True)
                for _ in range(layers)
            )
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model * n_steps, out)

    def forward(self, climate: torch.Tensor) -> torch.Tensor:
        x = self.positions(self.project(climate) * math.sqrt(self.d_model))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.dropout(self.activation(x)).flatten(1))

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first: the input projection, each layer, the output Linear."""
        layers = [(f"layers.{i}", list(layer.parameters())) for i, layer in enumerate(self.layers)]
        return [("project", list(self.project.parameters())), *layers, ("out", list(self.head.parameters()))]


def _recurrent(cell: str):
    def build(schema: SampleSchema, hidden: int = 128, layers: int = 2, out: int = 128) -> RecurrentEncoder:
        return RecurrentEncoder(cell, schema.n_climate, hidden, layers, out)

    return build


for _cell in ("lstm", "gru", "rnn"):
    register("climate_encoder", _cell)(_recurrent(_cell))


@register("climate_encoder", "transformer")
def transformer(schema: SampleSchema, **kwargs) -> ClimateTransformer:
    return ClimateTransformer(schema.n_climate, schema.n_months, **kwargs)
