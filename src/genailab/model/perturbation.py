"""The tensor model: a basal latent plus learned drug and covariate shifts (after CPA).

For a cell with expression x, drugs d_1..d_K at doses s_1..s_K and covariates k_1..k_J:

    q(z_basal | x) = N(mu(x), sigma^2(x))                 encoder of an unconditional VAE
    z = z_basal + sum_i f_{d_i}(s_i) e_{d_i} + sum_j e_{k_j}
    p(x | z)                                               decoder head: 'nb', 'zinb' or 'gaussian'

with learned drug embeddings e_d, covariate embeddings e_k and a Hill-type dose response f_d
(:class:`DoseResponse`, monotone in dose by construction). Combinations add their drugs' terms.
An adversary on z_basal (owned by the trainer, labels = drug label) keeps drug information out of
the basal latent, so that a counterfactual swaps only the drug part of z (Lotfollahi et al., Mol.
Syst. Biol. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from genailab.errors import ConfigError, InputDataError
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE, LossOutput, gaussian_kl
from genailab.likelihood.sparse_counts import SparseCounts

_TINY_DOSE = 1e-12  # doses are clamped here before the log; dose 0 itself is handled exactly


@dataclass(frozen=True)
class PerturbationConfig:
    """Architecture of a :class:`PerturbationVAE`; plain data that round-trips through JSON."""

    vae: ModelConfig  # encoder, decoder and likelihood; unconditional (condition_dim=0)
    n_drugs: int  # size of the drug vocabulary, control excluded
    max_drugs: int = 2  # drug slots per cell: combinations of up to this many drugs
    covariate_sizes: tuple[int, ...] = ()  # categories of each covariate (cell type first)
    dose_scale: float = 1.0  # s_0 of the dose response: b_d = 0 puts a drug's half-maximal dose at s_0

    def __post_init__(self) -> None:
        object.__setattr__(self, "covariate_sizes", tuple(int(k) for k in self.covariate_sizes))
        if self.vae.condition_dim != 0:
            raise ConfigError("The perturbation model's VAE is unconditional: drugs and covariates enter through z.")
        if self.n_drugs < 1 or self.max_drugs < 1:
            raise ConfigError(f"n_drugs ({self.n_drugs}) and max_drugs ({self.max_drugs}) must be at least 1.")
        if not self.dose_scale > 0:
            raise ConfigError(f"dose_scale must be positive, got {self.dose_scale}.")
        if any(k < 1 for k in self.covariate_sizes):
            raise ConfigError(f"covariate_sizes must be positive, got {self.covariate_sizes}.")

    @property
    def condition_dim(self) -> int:
        """Width of c: K drug codes, K doses, J covariate codes."""
        return 2 * self.max_drugs + len(self.covariate_sizes)

    def to_dict(self) -> dict:
        return {
            "vae": self.vae.to_dict(),
            "n_drugs": self.n_drugs,
            "max_drugs": self.max_drugs,
            "covariate_sizes": list(self.covariate_sizes),
            "dose_scale": self.dose_scale,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PerturbationConfig:
        data = dict(data)
        return cls(vae=ModelConfig.from_dict(data.pop("vae")), **data)


class DoseResponse(nn.Module):
    """f_d(s) = sigmoid(softplus(a_d) * log(s / s_0) + b_d) for s > 0, and f_d(0) = 0.

    A Hill curve in dose with Hill coefficient softplus(a_d) > 0 and half-maximal dose
    s_0 exp(-b_d / softplus(a_d)): non-decreasing in s for every value of the parameters.
    ``forward(drugs, doses)`` maps (B, K) codes and doses to (B, K) levels in [0, 1).
    """

    def __init__(self, n_drugs: int, dose_scale: float):
        super().__init__()
        self.slope_logit = nn.Parameter(torch.full((n_drugs,), math.log(math.e - 1)))  # softplus -> 1 at start
        self.shift = nn.Parameter(torch.zeros(n_drugs))
        self.dose_scale = dose_scale

    def forward(self, drugs: torch.Tensor, doses: torch.Tensor) -> torch.Tensor:
        log_dose = torch.log(doses.clamp_min(_TINY_DOSE) / self.dose_scale)
        level = torch.sigmoid(F.softplus(self.slope_logit[drugs]) * log_dose + self.shift[drugs])
        return torch.where(doses > 0, level, torch.zeros_like(level))


class PerturbationVAE(nn.Module):
    """Basal encoder, drug/dose/covariate shifts in latent space, likelihood decoder.

    ``c`` is (B, 2 K + J) float: K drug codes (-1 for an empty slot), K doses, J covariate codes;
    see :mod:`genailab.data.perturbation_schema`.
    """

    def __init__(self, config: PerturbationConfig):
        super().__init__()
        self.config = config
        latent = config.vae.latent_dim
        self.vae = ConditionalVAE(config.vae)
        self.drug_embedding = nn.Embedding(config.n_drugs, latent)
        self.dose_response = DoseResponse(config.n_drugs, config.dose_scale)
        self.covariate_embeddings = nn.ModuleList(nn.Embedding(k, latent) for k in config.covariate_sizes)

    def split_conditions(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drug codes (B, K) long, doses (B, K), covariate codes (B, J) long."""
        k = self.config.max_drugs
        if c is None or c.dim() != 2 or c.shape[1] != self.config.condition_dim:
            shape = None if c is None else tuple(c.shape)
            raise InputDataError(f"c has shape {shape}; expected (n_cells, {self.config.condition_dim}).")
        return c[:, :k].long(), c[:, k : 2 * k], c[:, 2 * k :].long()

    def perturbation_shift(self, c: torch.Tensor) -> torch.Tensor:
        """sum_i f_{d_i}(s_i) e_{d_i} + sum_j e_{k_j}: (B, 2K + J) -> (B, L)."""
        drugs, doses, covariates = self.split_conditions(c)
        present = drugs >= 0
        safe = drugs.clamp_min(0)  # empty slots read drug 0, then get weight 0
        weight = self.dose_response(safe, doses) * present  # (B, K)
        shift = (weight.unsqueeze(-1) * self.drug_embedding(safe)).sum(1)  # (B, L)
        for j, embedding in enumerate(self.covariate_embeddings):
            shift = shift + embedding(covariates[:, j])
        return shift

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_basal | x): (mean, variance), each (B, L). The encoder never sees the drug."""
        return self.vae.encode(x)

    def decode(self, z_basal: torch.Tensor, c: torch.Tensor, library: torch.Tensor | None = None) -> Distribution:
        """p(x | z_basal + shift(c)) with batch shape (B, G); ``library`` (B, 1) scales count means."""
        return self.vae.decode(z_basal + self.perturbation_shift(c), None, library)

    def loss(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        library: torch.Tensor | None = None,
        *,
        kl_weight: float = 1.0,
        x_sparse: SparseCounts | None = None,
    ) -> LossOutput:
        """Negative ELBO; ``z`` of the output is the basal sample, which the trainer's adversary sees.
        ``x_sparse`` as in :meth:`ConditionalVAE.loss`."""
        qz_mean, qz_var = self.encode(x)
        z_basal = ConditionalVAE.reparameterize(qz_mean, qz_var)
        if library is None and self.config.vae.is_count_model:
            library = x.sum(dim=1, keepdim=True)
        reconstruction = self.vae.reconstruction_nll(x, z_basal + self.perturbation_shift(c), None, library, x_sparse=x_sparse)
        kl = gaussian_kl(qz_mean, qz_var)
        loss = torch.mean(reconstruction + (kl_weight * self.config.vae.beta) * kl)
        return LossOutput(loss=loss, reconstruction=reconstruction, kl=kl, z=z_basal)
