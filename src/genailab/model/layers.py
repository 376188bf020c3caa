"""Network parts: a configurable MLP and the condition embedding."""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _norm_layer(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        # Momentum and eps as in scVI: running statistics settle quickly on small data.
        return nn.BatchNorm1d(width, momentum=0.01, eps=1e-3)
    if kind == "layer":
        return nn.LayerNorm(width, elementwise_affine=False)
    return nn.Identity()


class MLP(nn.Module):
    """Linear -> norm -> activation -> dropout, once per hidden width.

    ``forward(x)`` maps (B, in_dim) to (B, hidden_dims[-1]).
    """

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], *, norm: str, activation: str, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [
                nn.Linear(in_dim, width),
                _norm_layer(norm, width),
                _ACTIVATIONS[activation](),
                nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            ]
            in_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConditionEmbedding(nn.Module):
    """Learned embeddings for categorical conditions, concatenated with continuous ones.

    ``forward(c_raw)`` maps (B, n_categorical + n_continuous), integer codes first (stored as
    floats), to (B, n_categorical * embedding_dim + n_continuous).
    """

    def __init__(self, categorical_sizes: tuple[int, ...], embedding_dim: int):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(k, embedding_dim) for k in categorical_sizes)

    def forward(self, c_raw: torch.Tensor) -> torch.Tensor:
        n_cat = len(self.embeddings)
        codes = c_raw[:, :n_cat].long()
        parts = [emb(codes[:, i]) for i, emb in enumerate(self.embeddings)]
        return torch.cat(parts + [c_raw[:, n_cat:]], dim=1)
