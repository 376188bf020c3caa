"""Decoder output heads, one per likelihood, looked up by name.

Each head maps the decoder's last hidden layer h (B, H) to the distribution p(x|z,c) over
G genes (``forward``) and to the per-cell reconstruction loss -log p(x|z,c) (``nll``, which
training uses: for counts it skips building the distribution). Count heads follow scVI:
mean = softmax proportions x library size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Normal

from genailab.likelihood.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from genailab.likelihood.fused_nll import count_nll
from genailab.model.config import ModelConfig
from genailab.likelihood.sparse_counts import SparseCounts

_LOG_CLAMP = 15.0  # exp(15) ~ 3e6: keeps dispersions and variances finite in float32


class Dispersion(nn.Module):
    """Log-dispersion (NB log theta, or Gaussian log variance) per gene, gene-condition or cell.

    ``forward(h, c)`` returns a tensor broadcastable to (B, G).
    """

    def __init__(self, hidden_dim: int, config: ModelConfig):
        super().__init__()
        self.mode = config.dispersion
        self.per_gene = nn.Parameter(torch.zeros(config.input_dim))
        if self.mode == "gene-condition":
            # Linear in c: with one-hot conditions this is one log-dispersion per gene and category.
            self.per_condition = nn.Linear(config.condition_dim, config.input_dim, bias=False)
            nn.init.zeros_(self.per_condition.weight)
        elif self.mode == "gene-cell":
            self.per_cell = nn.Linear(hidden_dim, config.input_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "gene-condition":
            log_disp = self.per_gene + self.per_condition(c)
        elif self.mode == "gene-cell":
            log_disp = self.per_cell(h)
        else:
            log_disp = self.per_gene
        return log_disp.clamp(-_LOG_CLAMP, _LOG_CLAMP)


class GaussianHead(nn.Module):
    """Normal(mean, variance) for log-normalised expression; variance from :class:`Dispersion`."""

    def __init__(self, hidden_dim: int, config: ModelConfig):
        super().__init__()
        self.mean = nn.Linear(hidden_dim, config.input_dim)
        self.log_variance = Dispersion(hidden_dim, config)

    def start_variance(self, variance: torch.Tensor) -> None:
        """Start the per-gene variance at ``variance`` (G,), e.g. each gene's variance in the data:
        from 1 (log variance 0), a few hundred steps at lr 1e-3 moved it by 0.1-0.3 in log space, so
        draws kept a variance of about 1 whatever the gene's (correlation with the data's -0.02)."""
        with torch.no_grad():
            self.log_variance.per_gene.copy_(torch.log(variance.clamp_min(1e-4)).clamp(-_LOG_CLAMP, _LOG_CLAMP))

    def expected_value(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor | None, *, include_dropout: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[x | z, c] (B, G) without building the distribution; written into ``out`` (B, G) when given."""
        if out is None:
            return self.mean(h)
        return out.copy_(self.mean(h))

    def forward(self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor | None) -> Distribution:
        mean = self.mean(h)  # (B, G)
        scale = torch.exp(0.5 * self.log_variance(h, c))
        return Normal(mean, scale, validate_args=False)

    def nll(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor | None, x: torch.Tensor, *,
        x_sparse: SparseCounts | None = None,
    ) -> torch.Tensor:
        """-log p(x|z,c) per cell, (B,); ``x_sparse`` is only used by the count heads."""
        return -self(h, c, library).log_prob(x).sum(-1)


class NegativeBinomialHead(nn.Module):
    """NB(mu = library * softmax(W h), theta) for raw counts."""

    def __init__(self, hidden_dim: int, config: ModelConfig):
        super().__init__()
        self.scale = nn.Linear(hidden_dim, config.input_dim)
        self.log_theta = Dispersion(hidden_dim, config)

    def parameters_for(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return px_rate (B, G) and px_r, (G,) per gene or (B, G)."""
        px_scale = torch.softmax(self.scale(h), dim=-1)  # (B, G) expression proportions
        px_rate = library * px_scale  # (B, G) expected counts
        px_r = torch.exp(self.log_theta(h, c))  # (G,) or (B, G) inverse dispersion, broadcast lazily
        return px_rate, px_r

    def expected_value(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor, *, include_dropout: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[x | z, c] = library * softmax(W h), (B, G); only the proportions head runs. With ``out``
        (B, G), for inference without gradients, the proportions are written there and scaled in
        place (no (B, G) temporaries)."""
        if out is None:
            return library * torch.softmax(self.scale(h), dim=-1)
        logits = self.scale(h)
        dtype = None if logits.dtype == out.dtype else out.dtype  # bfloat16 logits under autocast; else no extra copy
        return torch.softmax(logits, dim=-1, dtype=dtype, out=out).mul_(library)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor) -> Distribution:
        return NegativeBinomial(*self.parameters_for(h, c, library), validate_args=False)

    def nll(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor, x: torch.Tensor, *,
        x_sparse: SparseCounts | None = None,
    ) -> torch.Tensor:
        """-log p(x|z,c) per cell, (B,), by the fused :func:`~genailab.likelihood.fused_nll.count_nll`."""
        theta = torch.exp(self.log_theta(h, c))
        return count_nll(x, self.scale(h), library, theta, self._zi_logits(h), x_sparse=x_sparse)

    def _zi_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return None  # no zero inflation


class ZeroInflatedNegativeBinomialHead(NegativeBinomialHead):
    """ZINB: the NB head plus per-cell, per-gene dropout logits."""

    def __init__(self, hidden_dim: int, config: ModelConfig):
        super().__init__(hidden_dim, config)
        self.dropout_logits = nn.Linear(hidden_dim, config.input_dim)

    def expected_value(
        self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor, *, include_dropout: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The NB mean, times the probability of no dropout when ``include_dropout``, (B, G)."""
        mean = super().expected_value(h, c, library, include_dropout=False, out=out)
        return mean.mul_(torch.sigmoid(-self.dropout_logits(h))) if include_dropout else mean

    def forward(self, h: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor) -> Distribution:
        px_rate, px_r = self.parameters_for(h, c, library)
        return ZeroInflatedNegativeBinomial(px_rate, px_r, self.dropout_logits(h), validate_args=False)

    def _zi_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout_logits(h)  # (B, G)


HEADS: dict[str, type[nn.Module]] = {
    "gaussian": GaussianHead,
    "nb": NegativeBinomialHead,
    "zinb": ZeroInflatedNegativeBinomialHead,
}
