"""Conditional VAEs: q(z|x,c) = N(mu, sigma^2), p(z) = N(0, I), p(x|z,c) by likelihood.

ELBO(x) = E_q[log p(x|z,c)] - beta * KL(q(z|x,c) || p(z)), estimated with one reparameterised
(pathwise) sample z = mu + sigma * eps. ``CVAE``, ``CVAE_NB`` and ``CVAE_ZINB`` are named defaults
over one implementation, :class:`ConditionalVAE`; they differ only in the decoder's likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution

from genailab.errors import ConfigError, InputDataError
from genailab.model.config import ModelConfig
from genailab.model.heads import HEADS
from genailab.model.layers import MLP, ConditionEmbedding
from genailab.likelihood.sparse_counts import SparseCounts

_VARIANCE_FLOOR = 1e-4  # added to the posterior variance, as in scVI, so log-variance cannot run away
# Densest input whose encoder first layer runs on the stored entries: above half, the dense product
# is faster (1,024 cells x 2,000 genes, one thread: 1.9 / 5.2 / 9.5 ms sparse at 10% / 37% / 60%
# stored, 7.6 dense).
_SPARSE_ENCODER_DENSITY = 0.5


@dataclass
class VAEOutput:
    """What one forward pass produces, for a minibatch of B cells."""

    px: Distribution  # p(x|z,c), batch shape (B, G)
    qz_mean: torch.Tensor  # (B, L)
    qz_var: torch.Tensor  # (B, L)
    z: torch.Tensor  # (B, L) one reparameterised sample


@dataclass
class LossOutput:
    """Negative ELBO and its per-cell terms."""

    loss: torch.Tensor  # scalar: mean over cells of reconstruction + kl_weight * beta * kl
    reconstruction: torch.Tensor  # (B,) -log p(x|z,c), summed over genes
    kl: torch.Tensor  # (B,) KL(q(z|x,c) || N(0, I)), summed over latent dimensions
    z: torch.Tensor  # (B, L) the reparameterised sample the reconstruction used


def gaussian_kl(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, var) || N(0, I)) summed over the last axis: (B, L) -> (B,)."""
    return 0.5 * (mean.pow(2) + var - 1.0 - var.log()).sum(-1)


class ConditionalVAE(nn.Module):
    """A conditional VAE over G genes with a Gaussian, NB or ZINB decoder.

    Parameters
    ----------
    config
        The architecture; see :class:`~genailab.model.config.ModelConfig`.

    Notes
    -----
    Count models (``nb``, ``zinb``) take raw counts x (B, G): the encoder sees ``log1p(x)`` and the
    decoder mean is ``softmax(...) * library`` with the observed library size ``x.sum(1)`` unless
    another is given. Conditions c are (B, condition_dim) floats, or, with
    ``config.categorical_sizes``, (B, n_categorical + n_continuous) with integer codes first.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c_dim = config.condition_dim
        self.condition_embedding = (
            ConditionEmbedding(config.categorical_sizes, config.embedding_dim) if config.categorical_sizes else None
        )
        enc_c = c_dim if config.inject_condition in ("both", "encoder") else 0
        dec_c = c_dim if config.inject_condition in ("both", "decoder") else 0
        options = dict(norm=config.norm, activation=config.activation, dropout=config.dropout)
        self.encoder = MLP(config.input_dim + enc_c, config.hidden_dims, **options)
        self.z_mean = nn.Linear(config.hidden_dims[-1], config.latent_dim)
        self.z_logvar = nn.Linear(config.hidden_dims[-1], config.latent_dim)
        decoder_dims = tuple(reversed(config.hidden_dims))
        self.decoder = MLP(config.latent_dim + dec_c, decoder_dims, **options)
        self.head = HEADS[config.likelihood](decoder_dims[-1], config)
        # Library size used when none is observed (sampling from the prior); set from training data.
        self.register_buffer("default_library", torch.tensor(1e4))
        self._encoder_sees_c = enc_c > 0
        self._decoder_sees_c = dec_c > 0

    @classmethod
    def from_config(cls, config: ModelConfig) -> ConditionalVAE:
        """Build the named class (``CVAE``, ``CVAE_NB`` or ``CVAE_ZINB``) for ``config``."""
        named = _BY_LIKELIHOOD[config.likelihood]
        options = config.to_dict()
        del options["likelihood"]
        return named(**options)

    # -- conditions and inputs -------------------------------------------------------------
    def _condition(self, c: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Check c and embed categorical codes: (B, raw_condition_dim) -> (B, condition_dim)."""
        expected = self.config.raw_condition_dim
        if expected == 0:
            if c is not None and c.shape[-1] != 0:
                raise InputDataError(
                    f"This model was built without conditions (condition_dim=0) but got c of shape "
                    f"{tuple(c.shape)}; pass c=None or rebuild with condition_dim={c.shape[-1]}."
                )
            return None
        if c is None:
            raise InputDataError(f"This model is conditional: pass c of shape ({n}, {expected}).")
        if c.dim() != 2 or c.shape != (n, expected):
            raise InputDataError(f"c has shape {tuple(c.shape)}; expected ({n}, {expected}).")
        c = c.to(dtype=self.z_mean.weight.dtype)
        return self.condition_embedding(c) if self.condition_embedding is not None else c

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x) if self.config.is_count_model else x

    # -- the three steps: encode, sample, decode --------------------------------------------
    def encode(
        self, x: torch.Tensor | None, c: torch.Tensor | None = None, *, x_sparse: SparseCounts | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x,c): returns (mean, variance), each (B, L).

        ``x_sparse``, optional: the stored entries of x (the loaders provide them from a sparse
        matrix); when at most half of x is stored, the encoder's first layer runs over them only
        (a sparse-dense product, for inference: equal to the dense encoder to float32 rounding)
        and x is not read. With ``x_sparse``, x may be None (it is then built from the entries
        only if the dense encoder is the faster one).
        """
        if x is None and x_sparse is None:
            raise InputDataError("encode needs x (B, G) or its stored entries x_sparse.")
        n_cells = x.shape[0] if x is not None else x_sparse.n_rows
        c = self._condition(c, n_cells)
        if x_sparse is None or x_sparse.genes.numel() > _SPARSE_ENCODER_DENSITY * n_cells * self.config.input_dim:
            return self._encode(x if x is not None else x_sparse.to_dense(self.config.input_dim), c)
        values = SparseCounts(x_sparse.row_starts, x_sparse.genes, self._encoder_input(x_sparse.counts))  # maps 0 to 0
        h = self.encoder.forward_sparse(values, c if self._encoder_sees_c else None)
        return self._posterior(h)

    def _encode(self, x: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.config.input_dim:
            raise InputDataError(f"x has shape {tuple(x.shape)}; this model reads (cells, {self.config.input_dim}) "
                                 f"(input_dim={self.config.input_dim}), one column per gene.")
        if x.dtype != self.z_mean.weight.dtype:
            raise InputDataError(f"x is {x.dtype} but the model's weights are {self.z_mean.weight.dtype}; pass "
                                 "x.float() (or convert the model, e.g. model.double()).")
        h = self._encoder_input(x)
        if self._encoder_sees_c:
            h = torch.cat([h, c], dim=1)
        return self._posterior(self.encoder(h))

    def _posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of q(z|x,c), each (B, L), from the encoder's last hidden layer (B, H)."""
        return self.z_mean(h), torch.exp(self.z_logvar(h)) + _VARIANCE_FLOOR

    @staticmethod
    def reparameterize(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Pathwise sample z = mean + sqrt(var) * eps, eps ~ N(0, I): gradients flow to mean, var."""
        return mean + var.sqrt() * torch.randn_like(mean)

    def decode(
        self, z: torch.Tensor, c: torch.Tensor | None = None, library: torch.Tensor | None = None
    ) -> Distribution:
        """Likelihood p(x|z,c) with batch shape (B, G); ``library`` (B, 1) scales count means."""
        return self._decode(z, self._condition(c, z.shape[0]), library)

    def _decoder_hidden(
        self, z: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden layer (B, H) for z (and c), and the library (B, 1), defaulted."""
        h = torch.cat([z, c], dim=1) if self._decoder_sees_c else z
        if library is None:
            library = self.default_library.expand(z.shape[0], 1)
        return self.decoder(h), library

    def _decode(self, z: torch.Tensor, c: torch.Tensor | None, library: torch.Tensor | None) -> Distribution:
        hidden, library = self._decoder_hidden(z, c, library)
        return self.head(hidden, c, library)

    def reconstruction_nll(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        *,
        x_sparse: SparseCounts | None = None,
    ) -> torch.Tensor:
        """-log p(x|z,c) per cell, (B,): ``-decode(z, c, library).log_prob(x).sum(-1)`` without
        building the distribution (for count models, a fused kernel with analytic gradients);
        ``x_sparse`` as in :meth:`loss`."""
        return self._reconstruction_nll(x, z, self._condition(c, z.shape[0]), library, x_sparse)

    def _reconstruction_nll(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor | None,
        library: torch.Tensor | None,
        x_sparse: SparseCounts | None = None,
    ) -> torch.Tensor:
        hidden, library = self._decoder_hidden(z, c, library)
        return self.head.nll(hidden, c, library, x, x_sparse=x_sparse)

    def expected_expression(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        *,
        include_dropout: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[x | z, c], (B, G): the decoded mean, cheaper than ``decode(...).mean`` (no dispersion,
        and for ZINB no dropout head unless ``include_dropout``); written into ``out`` (B, G), e.g. a
        view of the caller's result array, when given."""
        c = self._condition(c, z.shape[0])
        hidden, library = self._decoder_hidden(z, c, library)
        return self.head.expected_value(hidden, c, library, include_dropout=include_dropout, out=out)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, library: torch.Tensor | None = None
    ) -> VAEOutput:
        """Encode x (B, G), draw one z, decode; the library defaults to the observed x.sum(1)."""
        c = self._condition(c, x.shape[0])
        qz_mean, qz_var = self._encode(x, c)
        z = self.reparameterize(qz_mean, qz_var)
        if library is None and self.config.is_count_model:
            library = x.sum(dim=1, keepdim=True)
        return VAEOutput(px=self._decode(z, c, library), qz_mean=qz_mean, qz_var=qz_var, z=z)

    # -- objective --------------------------------------------------------------------------
    def loss(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        *,
        kl_weight: float = 1.0,
        x_sparse: SparseCounts | None = None,
    ) -> LossOutput:
        """Negative ELBO: mean over cells of reconstruction + kl_weight * beta * KL.

        ``x_sparse``, optional: the stored entries of x (the loaders provide them from the sparse
        matrix), so the count likelihood need not search x for its non-zero counts.
        """
        c = self._condition(c, x.shape[0])
        qz_mean, qz_var = self._encode(x, c)
        z = self.reparameterize(qz_mean, qz_var)
        if library is None and self.config.is_count_model:
            library = x.sum(dim=1, keepdim=True)
        reconstruction = self._reconstruction_nll(x, z, c, library, x_sparse)
        kl = gaussian_kl(qz_mean, qz_var)
        loss = torch.mean(reconstruction + (kl_weight * self.config.beta) * kl)
        return LossOutput(loss=loss, reconstruction=reconstruction, kl=kl, z=z)

    @torch.no_grad()
    def marginal_log_likelihood(
        self,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        *,
        n_samples: int = 100,
    ) -> torch.Tensor:
        """Importance-sampled log p(x|c) per cell (the IWAE bound with K = ``n_samples``), (B,).

        log p(x) >= log (1/K) sum_k p(x|z_k,c) p(z_k) / q(z_k|x,c), z_k ~ q(z|x,c); the bound
        tightens as K grows and equals the ELBO for K = 1.
        """
        if n_samples < 1:
            raise ConfigError(f"n_samples must be positive, got {n_samples}.")
        c = self._condition(c, x.shape[0])
        mean, var = self._encode(x, c)
        if library is None and self.config.is_count_model:
            library = x.sum(dim=1, keepdim=True)
        std = var.sqrt()
        log_weights = []
        for _ in range(n_samples):
            eps = torch.randn_like(mean)
            z = mean + std * eps
            log_px = self._decode(z, c, library).log_prob(x).sum(-1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
            log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + var.log()).sum(-1)
            log_weights.append(log_px + log_pz - log_qz)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(n_samples)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        condition: torch.Tensor | None = None,
        *,
        library: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Generate n cells: z ~ p(z), then x ~ p(x|z,c). Returns (n, G).

        ``condition`` is one condition row (raw_condition_dim,) shared by all cells or (n, ...).
        ``library`` is the total count for count models (default: the training median).
        """
        if n < 1:
            raise ConfigError(f"n must be a positive number of cells, got {n}.")
        if condition is not None and condition.dim() == 1:
            condition = condition.expand(n, -1)
        z = torch.randn(n, self.config.latent_dim, device=self.z_mean.weight.device)
        if isinstance(library, (int, float)):
            library = torch.full((n, 1), float(library), device=z.device)
        return self.decode(z, condition, library).sample()


class CVAE(ConditionalVAE):
    """Conditional VAE with a Gaussian decoder, for log-normalised expression."""

    likelihood = "gaussian"

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = ModelConfig.latent_dim,
        condition_dim: int = ModelConfig.condition_dim,
        hidden_dims: tuple[int, ...] | list[int] = ModelConfig.hidden_dims,
        **options,
    ):
        if "likelihood" in options:
            raise ConfigError(
                f"{type(self).__name__} fixes likelihood={self.likelihood!r}; use CVAE, CVAE_NB or CVAE_ZINB."
            )
        config = ModelConfig(
            input_dim=input_dim,
            latent_dim=latent_dim,
            condition_dim=condition_dim,
            hidden_dims=tuple(hidden_dims),
            likelihood=self.likelihood,
            **options,
        )
        super().__init__(config)


class CVAE_NB(CVAE):
    """Conditional VAE with a negative binomial decoder (mean mu and dispersion theta), for raw counts."""

    likelihood = "nb"


class CVAE_ZINB(CVAE):
    """Conditional VAE with a zero-inflated NB decoder (mu, theta and dropout pi), for raw counts."""

    likelihood = "zinb"


_BY_LIKELIHOOD: dict[str, type[CVAE]] = {"gaussian": CVAE, "nb": CVAE_NB, "zinb": CVAE_ZINB}
