"""The tensor model: a basal latent, and drugs that act on it or directly on the genes.

For a cell with expression x, drugs d_1..d_K at doses s_1..s_K and covariates k_1..k_J (cell type
first), ``q(z_basal | x)`` is the encoder of an unconditional VAE and ``p(x | .)`` a decoder head
('nb', 'zinb' or 'gaussian'). Two ways for the drugs to act (``PerturbationConfig.response``):

``"gene"`` (the default): the change from the cell's own basal state, gene by gene,

    logits = decoder(z_basal + sum_j e_{k_j}) + Delta(c),
    Delta(c)_g = sum_i f_{d_i g}(s_i) * exp(w_{k d_i}) * (a_{d_i g} + u_k . V_{d_i, :, g})

where ``logits`` are the decoder's log expression proportions (log mean for the Gaussian). Each
drug has a sparse-able per-gene effect a_d (the additive baseline's shift, learned in count space
and pooled over doses and cell types), a Hill dose response f_{dg} (monotone in dose by
construction, :class:`GeneDoseResponse`; one curve per drug shared by its genes unless
``PerturbationConfig.per_gene_dose`` gives each gene its own half-maximal dose), a sensitivity
exp(w_kd) of cell type k to drug d (one scalar per pair: how strongly the type responds along the
drug's profile) and a rank-r interaction of a cell-type embedding u_k with drug factors V_d for
gene-specific differences (both L2-penalised). Without w the interaction alone would have to learn
a type's stronger or weaker response gene by gene; at 3,000 cells it learned almost none (the
fitted per-type scale of a drug's effect varied by 2-3% where the generator's varied 0.5-1.4x) or,
unpenalised, noise.
Combinations add their drugs' terms. For a (cell type, drug) pair never seen in training the
data say nothing about that pair's interaction or sensitivity: u_k is then replaced by
ubar_d + lambda (u_k - ubar_d), with ubar_d the mean of u over the cell types that saw drug d and
lambda = ``unseen_interaction`` (0: the drug's average effect over those cell types), exp(w_kd)
by the mean of exp(w) over those types, and the pair's whole term is multiplied by a scale
``unseen_scale`` in [0, 1]. By default (None) the scale
is estimated from the fitted effects by leaving one cell type out: each seen pair's effect E_kd is
predicted by the mean of its drug's effects in the other seen types, m_kd, scaled by the one rho
that minimises the relative squared error sum_kd |E_kd - rho m_kd|^2 / |E_kd|^2 over drugs seen in
2+ types, rho = sum <E_kd, m_kd> / |E_kd|^2 / sum |m_kd|^2 / |E_kd|^2. Relative error is what the
R2 of a predicted change weighs (1 - SSE / SST): a drug that barely acts in a cell type costs a
prediction with the drug's average effect an R2 far below 0, while one that acts strongly costs
an average prediction little. When cell types differ in how strongly a drug acts, the average
effect overshoots the weakly responding ones and rho < 1 shrinks it, as ridge regression on
one-hot covariates shrinks an unseen pair's effect; when they agree, rho is close to 1.
(Feeding the encoder x * exp(-Delta) instead of x left the fitted fold changes unchanged in one
30-epoch check on simulated data, so the encoder reads x.)

An L2 penalty ``effect_l2`` sum_d mean_{k seen} |E_kd|^2 on the full-dose log fold changes as
applied, E_kd = exp(w_kd) (a_d + u_k V_d), keeps the genes that the counts barely measure near
no change: without it, on the semi-synthetic PBMC data (30 target genes of 765) the fitted
changes off the targets had a norm of 9-15 against 2.3-7.3 on them. Penalising E rather than a
leaves no way out through the sensitivities (a smaller a with a larger exp(w) costs the same).
With two seen doses a Hill curve's amplitude and shape are not identified; the penalty then
prefers the smallest full-dose effect that fits, a curve close to saturation at the highest seen
dose, which raises interpolated doses and keeps extrapolation beyond the seen doses cautious.

``"latent"`` (CPA, Lotfollahi et al., Mol. Syst. Biol. 2023; models saved before ``response``
existed): ``z = z_basal + sum_i f_{d_i}(s_i) e_{d_i} + sum_j e_{k_j}`` decoded as a whole, with
drug embeddings e_d and a per-drug Hill curve (:class:`DoseResponse`).

An adversary on z_basal (owned by the trainer, labels = drug label) keeps drug information out of
the basal latent, so that a counterfactual swaps only the drug part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from genailab.errors import ConfigError, InputDataError
from genailab.likelihood.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from genailab.likelihood.fused_nll import count_nll
from genailab.likelihood.sparse_counts import SparseCounts
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE, LossOutput, gaussian_kl

_TINY_DOSE = 1e-12  # doses are clamped here before the log; dose 0 itself is handled exactly
RESPONSES = ("gene", "latent")
_TINY_MEAN = 1e-12  # floor of an expected count in the denominator of a fold change
# The gene response is stored divided by this factor: Adam moves each parameter by about lr per
# step whatever its gradient's scale, and log fold changes of 2-3 must be reachable in a few
# hundred steps at lr 1e-3.
_RESPONSE_SCALE = 30.0


@dataclass(frozen=True)
class PerturbationConfig:
    """Architecture of a :class:`PerturbationVAE`; plain data that round-trips through JSON."""

    vae: ModelConfig  # encoder, decoder and likelihood; unconditional (condition_dim=0)
    n_drugs: int  # size of the drug vocabulary, control excluded
    max_drugs: int = 2  # drug slots per cell: combinations of up to this many drugs
    covariate_sizes: tuple[int, ...] = ()  # categories of each covariate (cell type first)
    dose_scale: float = 1.0  # s_0: b_d = 0 puts a drug's half-maximal dose here (the centre of the training doses)
    response: str = "gene"  # "gene": per-gene change from the basal state; "latent": CPA's latent shift
    interaction_rank: int = 2  # rank of the cell type x drug interaction of the gene response (0: none)
    interaction_l2: float = 1e-3  # L2 weight on its factors: unseen cell types fall back to the average
    effect_l2: float = 1e-3  # L2 on the pairs' full-dose log fold changes: barely measured genes stay at no change
    per_gene_dose: bool = False  # each gene its own half-maximal dose (else one curve per drug)
    unseen_interaction: float = 0.0  # share of u_k's deviation from the drug's seen types kept for unseen pairs
    unseen_scale: float | None = None  # factor on an unseen pair's effect; None: leave-one-type-out estimate

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
        if self.response not in RESPONSES:
            raise ConfigError(f"response={self.response!r} is not one of {RESPONSES}.")
        if self.interaction_rank < 0 or self.interaction_l2 < 0 or self.effect_l2 < 0:
            raise ConfigError("interaction_rank, interaction_l2 and effect_l2 must be >= 0.")
        if not 0.0 <= self.unseen_interaction <= 1.0:
            raise ConfigError(f"unseen_interaction must be in [0, 1], got {self.unseen_interaction}.")
        if self.unseen_scale is not None and not 0.0 <= self.unseen_scale <= 1.0:
            raise ConfigError(f"unseen_scale must be in [0, 1] or None (estimated), got {self.unseen_scale}.")

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
            "response": self.response,
            "interaction_rank": self.interaction_rank,
            "interaction_l2": self.interaction_l2,
            "effect_l2": self.effect_l2,
            "per_gene_dose": self.per_gene_dose,
            "unseen_interaction": self.unseen_interaction,
            "unseen_scale": self.unseen_scale,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PerturbationConfig:
        """Rebuild from :meth:`to_dict`; descriptions saved before ``response`` existed are CPA models,
        those saved before ``unseen_scale`` keep the drug's unscaled effect for unseen pairs (1.0),
        and those saved before ``effect_l2`` were trained without that penalty (0)."""
        data = dict(data)
        data.setdefault("response", "latent")
        data.setdefault("unseen_scale", 1.0)
        data.setdefault("effect_l2", 0.0)
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


class GeneDoseResponse(nn.Module):
    """f_{dg}(s) = sigmoid(softplus(a_d) * log(s / s_0) + b_d + b_{dg}) for s > 0, f_{dg}(0) = 0.

    The curve of :class:`DoseResponse` with a per-gene shift of the half-maximal dose (b_{dg},
    zero when ``per_gene`` is False): non-decreasing in s for every gene and parameter value.
    Parameters are stored divided by :data:`_RESPONSE_SCALE`; at the start every drug has Hill
    coefficient 1 and half-maximal dose s_0. ``forward(drugs, doses)`` maps (B, K) codes and
    doses to (B, K, G) levels in [0, 1).
    """

    def __init__(self, n_drugs: int, n_genes: int, dose_scale: float, *, per_gene: bool):
        super().__init__()
        self.slope_logit = nn.Parameter(torch.full((n_drugs,), math.log(math.e - 1) / _RESPONSE_SCALE))
        self.shift = nn.Parameter(torch.zeros(n_drugs))
        self.gene_shift = nn.Parameter(torch.zeros(n_drugs, n_genes)) if per_gene else None
        self.dose_scale = dose_scale

    def forward(self, drugs: torch.Tensor, doses: torch.Tensor) -> torch.Tensor:
        log_dose = torch.log(doses.clamp_min(_TINY_DOSE) / self.dose_scale)  # (B, K)
        slope = F.softplus(_RESPONSE_SCALE * self.slope_logit[drugs])  # (B, K)
        logit = (slope * log_dose + _RESPONSE_SCALE * self.shift[drugs]).unsqueeze(-1)  # (B, K, 1)
        if self.gene_shift is not None:
            logit = logit + _RESPONSE_SCALE * self.gene_shift[drugs]  # (B, K, G)
        level = torch.sigmoid(logit)
        return torch.where((doses > 0).unsqueeze(-1), level, torch.zeros_like(level))


class GeneResponse(nn.Module):
    """Delta(c)_g = sum_i f_{d_i g}(s_i) exp(w_{k d_i}) (a_{d_i g} + u_k . V_{d_i, :, g}): (B, K) drugs -> (B, G).

    a (n_drugs, G) starts at zero (the model starts as "no change"); w (cell types, n_drugs) the
    log sensitivities (start 0), u (cell types, r) and V (n_drugs, r, G) the low-rank cell type x
    drug interaction; w, u and V are absent when the rank is 0 or there is no cell-type covariate.
    a, w and V are stored divided by :data:`_RESPONSE_SCALE`. ``seen`` (cell types, n_drugs) bool
    buffer: which pairs the training data held (all True until :meth:`set_seen`); an unseen pair's
    u_k and exp(w_kd) are replaced by the drug's seen types' and its term multiplied by
    :meth:`unseen_scale` (module docstring).
    """

    def __init__(self, config: PerturbationConfig):
        super().__init__()
        n_genes, rank = config.vae.input_dim, config.interaction_rank
        self.effect = nn.Parameter(torch.zeros(config.n_drugs, n_genes))
        self.dose_response = GeneDoseResponse(config.n_drugs, n_genes, config.dose_scale, per_gene=config.per_gene_dose)
        has_types = rank > 0 and len(config.covariate_sizes) > 0
        n_types = config.covariate_sizes[0] if has_types else 0
        self.type_factor = nn.Parameter(0.1 * torch.randn(n_types, rank)) if has_types else None
        self.drug_factor = nn.Parameter(torch.zeros(config.n_drugs, rank, n_genes)) if has_types else None
        self.log_sensitivity = nn.Parameter(torch.zeros(n_types, config.n_drugs)) if has_types else None
        self.register_buffer("seen", torch.ones(n_types, config.n_drugs, dtype=torch.bool))
        self.unseen_interaction = config.unseen_interaction
        self.fixed_unseen_scale = config.unseen_scale

    def set_seen(self, cell_type: torch.Tensor, drugs: torch.Tensor) -> None:
        """Mark the (cell type, drug) pairs of training cells as seen: codes (N,) and (N, K), -1 empty."""
        self.seen.zero_()
        present = drugs >= 0
        self.seen[cell_type.unsqueeze(1).expand_as(drugs)[present], drugs[present]] = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "seen", torch.ones_like(self.seen))  # saved before the mask: all seen
        if self.log_sensitivity is not None:  # saved before the sensitivities: every one is 1
            state_dict.setdefault(prefix + "log_sensitivity", torch.zeros_like(self.log_sensitivity))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sensitivities(self) -> torch.Tensor:
        """exp(w) as used for seen pairs, (cell types, n_drugs)."""
        return torch.exp(_RESPONSE_SCALE * self.log_sensitivity)

    def pair_effects(self) -> torch.Tensor:
        """E_kd = exp(w_kd) (a_d + u_k V_d) of every (cell type, drug) pair as if seen, (T, D, G)."""
        interaction = torch.einsum("tr,drg->tdg", self.type_factor, self.drug_factor)  # (T, D, G)
        return _RESPONSE_SCALE * self.sensitivities().unsqueeze(-1) * (self.effect.unsqueeze(0) + interaction)

    def type_factors(self, drugs: torch.Tensor, cell_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, K, r) and exp(w) (B, K) used for each slot: the pair's own where it was seen; for an
        unseen pair u shrunk toward ubar_d and exp(w) the mean over the drug's seen types."""
        seen = self.seen.float()  # (T, D)
        n_seen = seen.sum(0).clamp_min(1.0)  # (D,)
        is_seen = self.seen[cell_type.unsqueeze(1), drugs]  # (B, K)
        u = self.type_factor[cell_type].unsqueeze(1)  # (B, 1, r)
        ubar = ((seen.T @ self.type_factor) / n_seen.unsqueeze(-1))[drugs]  # (B, K, r)
        u = torch.where(is_seen.unsqueeze(-1), u, ubar + self.unseen_interaction * (u - ubar))
        sensitivity = self.sensitivities()  # (T, D)
        average = (seen * sensitivity).sum(0) / n_seen  # (D,)
        return u, torch.where(is_seen, sensitivity[cell_type.unsqueeze(1), drugs], average[drugs])

    @torch.no_grad()
    def unseen_scale(self) -> torch.Tensor:
        """The factor rho on an unseen pair's effect, a scalar tensor in [0, 1] (not trained through).

        The configured value, else the leave-one-type-out estimate of the module docstring from
        the seen pairs' effects (:meth:`pair_effects`); 1 where no drug was seen in two cell types.
        """
        if self.fixed_unseen_scale is not None:
            return self.effect.new_tensor(self.fixed_unseen_scale)
        seen = self.seen.float()  # (T, D)
        n_seen = seen.sum(0)  # (D,)
        effect = self.pair_effects()  # (T, D, G)
        others = torch.einsum("td,tdg->dg", seen, effect).unsqueeze(0) - effect  # sum over the drug's other seen types
        others = others / (n_seen - 1).clamp_min(1.0)[:, None]  # (T, D, G): their mean
        norm = effect.square().sum(-1)  # (T, D)
        usable = self.seen & (n_seen >= 2) & (norm > 0)  # pairs with another seen type to be predicted from
        fit = ((effect * others).sum(-1)[usable] / norm[usable]).sum()
        spread = (others.square().sum(-1)[usable] / norm[usable]).sum()
        return (fit / spread).clamp(0.0, 1.0) if spread > 0 else self.effect.new_tensor(1.0)

    def forward(self, drugs: torch.Tensor, doses: torch.Tensor, cell_type: torch.Tensor | None) -> torch.Tensor:
        present = (drugs >= 0).unsqueeze(-1)  # (B, K, 1)
        safe = drugs.clamp_min(0)  # empty slots read drug 0, then get weight 0
        effect = _RESPONSE_SCALE * self.effect[safe]  # (B, K, G)
        if self.type_factor is not None and cell_type is not None:
            u, sensitivity = self.type_factors(safe, cell_type)  # (B, K, r), (B, K)
            effect = effect + _RESPONSE_SCALE * torch.einsum("bkr,bkrg->bkg", u, self.drug_factor[safe])
            unseen = ~self.seen[cell_type.unsqueeze(1), safe] & (drugs >= 0)  # (B, K)
            if unseen.any():
                sensitivity = torch.where(unseen, self.unseen_scale() * sensitivity, sensitivity)
            effect = sensitivity.unsqueeze(-1) * effect
        level = self.dose_response(safe, doses) * present  # (B, K, G)
        return (level * effect).sum(1)  # (B, G)

    def penalty(self) -> torch.Tensor:
        """Sum of squares of the log sensitivities w and the interaction factors u and V (as used),
        0 without them."""
        if self.type_factor is None:
            return self.effect.new_zeros(())
        return (
            self.type_factor.square().sum()
            + (_RESPONSE_SCALE * self.drug_factor).square().sum()
            + (_RESPONSE_SCALE * self.log_sensitivity).square().sum()
        )

    def effect_penalty(self) -> torch.Tensor:
        """Sum over drugs of the mean, over the cell types that saw the drug, of |E_kd|^2 (the
        pair's full-dose log fold changes, :meth:`pair_effects`; |a_d|^2 without cell types)."""
        if self.type_factor is None:
            return (_RESPONSE_SCALE * self.effect).square().sum()
        seen = self.seen.float()  # (T, D)
        squared = self.pair_effects().square().sum(-1)  # (T, D)
        return ((seen * squared).sum(0) / seen.sum(0).clamp_min(1.0)).sum()


class PerturbationVAE(nn.Module):
    """Basal encoder, drug/dose/covariate terms, likelihood decoder (see the module docstring).

    ``c`` is (B, 2 K + J) float: K drug codes (-1 for an empty slot), K doses, J covariate codes;
    see :mod:`genailab.data.perturbation_schema`.
    """

    def __init__(self, config: PerturbationConfig):
        super().__init__()
        self.config = config
        latent = config.vae.latent_dim
        self.vae = ConditionalVAE(config.vae)
        if config.response == "latent":
            self.drug_embedding = nn.Embedding(config.n_drugs, latent)
            self.dose_response = DoseResponse(config.n_drugs, config.dose_scale)
        else:
            self.gene_response = GeneResponse(config)
        self.covariate_embeddings = nn.ModuleList(nn.Embedding(k, latent) for k in config.covariate_sizes)

    @property
    def default_library(self) -> torch.Tensor:
        """The decoder's library size for cells without one (a buffer; set from the training data)."""
        return self.vae.default_library

    @property
    def head(self) -> nn.Module:
        """The likelihood head of the decoder (a Gaussian head starts at the data's variances)."""
        return self.vae.head

    def split_conditions(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drug codes (B, K) long, doses (B, K), covariate codes (B, J) long."""
        k = self.config.max_drugs
        if c is None or c.dim() != 2 or c.shape[1] != self.config.condition_dim:
            shape = None if c is None else tuple(c.shape)
            raise InputDataError(f"c has shape {shape}; expected (n_cells, {self.config.condition_dim}).")
        return c[:, :k].long(), c[:, k : 2 * k], c[:, 2 * k :].long()

    def perturbation_shift(self, c: torch.Tensor) -> torch.Tensor:
        """Latent shift (B, L): sum_j e_{k_j}, plus sum_i f_{d_i}(s_i) e_{d_i} for ``"latent"``."""
        drugs, doses, covariates = self.split_conditions(c)
        shift = torch.zeros(c.shape[0], self.config.vae.latent_dim, device=c.device)
        if self.config.response == "latent":
            present = drugs >= 0
            safe = drugs.clamp_min(0)  # empty slots read drug 0, then get weight 0
            weight = self.dose_response(safe, doses) * present  # (B, K)
            shift = shift + (weight.unsqueeze(-1) * self.drug_embedding(safe)).sum(1)  # (B, L)
        for j, embedding in enumerate(self.covariate_embeddings):
            shift = shift + embedding(covariates[:, j])
        return shift

    def gene_shift(self, c: torch.Tensor) -> torch.Tensor | None:
        """Delta(c) (B, G) added to the decoder's logits for ``"gene"``; None for ``"latent"``."""
        if self.config.response == "latent":
            return None
        drugs, doses, covariates = self.split_conditions(c)
        cell_type = covariates[:, 0] if covariates.shape[1] else None
        return self.gene_response(drugs, doses, cell_type)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_basal | x): (mean, variance), each (B, L). The encoder never sees the drug."""
        return self.vae.encode(x)

    def decode(self, z_basal: torch.Tensor, c: torch.Tensor, library: torch.Tensor | None = None) -> Distribution:
        """p(x | z_basal, c) with batch shape (B, G); ``library`` (B, 1) scales count means."""
        z = z_basal + self.perturbation_shift(c)
        delta = self.gene_shift(c)
        if delta is None:
            return self.vae.decode(z, None, library)
        hidden, library = self.vae._decoder_hidden(z, None, library)
        head = self.vae.head
        if not self.config.vae.is_count_model:
            return torch.distributions.Normal(head.mean(hidden) + delta, torch.exp(0.5 * head.log_variance(hidden, None)))
        rate = library * torch.softmax(head.scale(hidden) + delta, dim=-1)  # (B, G)
        theta = torch.exp(head.log_theta(hidden, None))
        zi_logits = head._zi_logits(hidden)
        if zi_logits is None:
            return NegativeBinomial(rate, theta, validate_args=False)
        return ZeroInflatedNegativeBinomial(rate, theta, zi_logits, validate_args=False)

    def without_drugs(self, c: torch.Tensor) -> torch.Tensor:
        """The same conditions with every drug slot emptied and doses 0 (covariates kept), (B, 2K + J)."""
        k = self.config.max_drugs
        control = c.clone()
        control[:, :k] = -1.0
        control[:, k : 2 * k] = 0.0
        return control

    @torch.no_grad()
    def counterfactual_counts(
        self, x: torch.Tensor, c: torch.Tensor, library: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Counts of the control cells x (B, G) moved by the model's fold change under c, (B, G).

        The fold change is E[x | z_basal, c] / E[x | z_basal, no drug] per cell and gene; the
        cell's own counts are thinned where it is below 1 and topped up with Poisson counts of
        mean (ratio - 1) E[x | z_basal, no drug] where it is above (:func:`shift_counts`). The
        model's reconstruction error cancels in the ratio and the cell keeps its real noise,
        which makes these the counts to log-normalise when predictions are compared with data.
        Count models only.
        """
        if not self.config.vae.is_count_model:
            raise ConfigError("counterfactual_counts needs a count likelihood ('nb' or 'zinb').")
        z_basal, _ = self.encode(x)
        if library is None:
            library = x.sum(dim=1, keepdim=True)
        treated = self.decode(z_basal, c, library).mean
        basal = self.decode(z_basal, self.without_drugs(c), library).mean
        return shift_counts(x, treated / basal.clamp_min(_TINY_MEAN), basal)

    def _reconstruction(self, x, z_basal, c, library, x_sparse) -> torch.Tensor:
        z = z_basal + self.perturbation_shift(c)
        delta = self.gene_shift(c)
        if delta is None:
            return self.vae.reconstruction_nll(x, z, None, library, x_sparse=x_sparse)
        if not self.config.vae.is_count_model:
            return -self.decode(z_basal, c, library).log_prob(x).sum(-1)
        hidden, library = self.vae._decoder_hidden(z, None, library)
        head = self.vae.head
        theta = torch.exp(head.log_theta(hidden, None))
        return count_nll(x, head.scale(hidden) + delta, library, theta, head._zi_logits(hidden), x_sparse=x_sparse)

    def loss(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        library: torch.Tensor | None = None,
        *,
        kl_weight: float = 1.0,
        x_sparse: SparseCounts | None = None,
    ) -> LossOutput:
        """Negative ELBO (plus the interaction's L2 term); ``z`` of the output is the basal sample,
        which the trainer's adversary sees. ``x_sparse`` as in :meth:`ConditionalVAE.loss`."""
        qz_mean, qz_var = self.encode(x)
        z_basal = ConditionalVAE.reparameterize(qz_mean, qz_var)
        if library is None and self.config.vae.is_count_model:
            library = x.sum(dim=1, keepdim=True)
        reconstruction = self._reconstruction(x, z_basal, c, library, x_sparse)
        kl = gaussian_kl(qz_mean, qz_var)
        loss = torch.mean(reconstruction + (kl_weight * self.config.vae.beta) * kl)
        if self.config.response == "gene":
            response, config = self.gene_response, self.config
            loss = loss + config.interaction_l2 * response.penalty() + config.effect_l2 * response.effect_penalty()
        return LossOutput(loss=loss, reconstruction=reconstruction, kl=kl, z=z_basal)


def shift_counts(x: torch.Tensor, ratio: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Counts whose expectation is ``ratio`` times that of the counts x, all (B, G).

    Where ``ratio <= 1``: binomial thinning, ``Binomial(x, ratio)``. Where ``ratio > 1``:
    ``x + Poisson((ratio - 1) * mean)``, with ``mean`` the expected count of x, so a gene at zero
    can rise. Thinning alone could only lower expression.
    """
    counts = torch.round(x)
    down = torch.distributions.Binomial(total_count=counts, probs=ratio.clamp(0.0, 1.0)).sample()
    up = counts + torch.poisson((ratio - 1.0).clamp_min(0.0) * mean)
    return torch.where(ratio <= 1.0, down, up)
