"""Network parts: a configurable MLP and the condition embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genailab.likelihood.sparse_counts import SparseCounts

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
        self._gene_rows: tuple[torch.Tensor, tuple, torch.Tensor] | None = None  # forward_sparse's (weight, its state, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_sparse(self, x: SparseCounts, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(cat([x dense, extra], 1))`` with the first linear map taken over x's stored
        entries only: a sparse-dense product (``embedding_bag`` summing the weight rows of each
        cell's entries, scaled by their values), for count matrices whose zeros are most of the
        work of a dense product. Equal to the dense forward to float32 rounding (the sums run in
        another order).

        x holds a (B, G) matrix's entries, G the first layer's input width less extra's; ``extra``
        (B, E) dense columns after x's (e.g. conditions), or None. Returns (B, hidden_dims[-1]).
        """
        first = self.layers[0]
        n_sparse = first.in_features - (0 if extra is None else extra.shape[1])
        weight = first.weight  # (H, G + E)
        rows = self._rows_of_genes(n_sparse)  # (G, H)
        offsets = x.row_starts.to(x.genes.dtype)  # the same index type as the genes (int32 is faster)
        pre = F.embedding_bag(x.genes, rows, offsets, mode="sum", per_sample_weights=x.counts.to(rows.dtype),
                              include_last_offset=True)  # (B, H) fmt: skip
        if extra is not None:
            pre = torch.addmm(pre, extra.to(weight.dtype), weight[:, n_sparse:].t())
        return self.layers[1:](pre.add_(first.bias))

    def _rows_of_genes(self, n_sparse: int) -> torch.Tensor:
        """The first layer's weight over the genes, transposed to (G, H) rows (the row of each gene).

        Without gradients the copy is kept while the weight is the same tensor, at the same version
        (an optimiser step or a load writes it in place, which bumps the version) and storage (a
        device move swaps it): inference calls this once per batch, and copying a 2,000 x 128
        weight each time took ~1 ms of a 1,024-cell batch's ~5 ms of latent.
        """
        weight = self.layers[0].weight
        if torch.is_grad_enabled():
            return weight[:, :n_sparse].t().contiguous()
        state = (weight._version, weight.data_ptr(), weight.device, weight.dtype, n_sparse)
        cached = self._gene_rows
        if cached is None or cached[0] is not weight or cached[1] != state:
            cached = self._gene_rows = (weight, state, weight[:, :n_sparse].t().contiguous())
        return cached[2]


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
