"""Count likelihoods as ``torch.distributions``: negative binomial and zero inflation.

The NB is parameterised by its mean ``mu`` and inverse dispersion ``theta``
(variance ``mu + mu**2 / theta``), as in scVI. Log-probabilities are computed in log space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Gamma, Poisson, constraints
from torch.distributions.utils import broadcast_all


def log_nb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, *, eps: float = 1e-8, include_constant: bool = True
) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta), broadcasting over any shape.

    ``include_constant=False`` drops ``-lgamma(x + 1)``, which does not depend on the parameters
    (a cheaper training objective with the same gradients).
    """
    log_theta_mu = torch.log(theta + mu + eps)
    res = (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
    )
    return res - torch.lgamma(x + 1) if include_constant else res


def log_zinb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    *,
    eps: float = 1e-8,
    include_constant: bool = True,
) -> torch.Tensor:
    """Elementwise log ZINB(x; mu, theta, pi = sigmoid(zi_logits)).

    Zeros: log(pi + (1 - pi) NB(0)); positives: log(1 - pi) + log NB(x); both via softplus.
    """
    minus_log_pi = F.softplus(-zi_logits)
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -zi_logits + theta * (torch.log(theta + eps) - log_theta_mu)  # log((1-pi)/pi * NB(0))
    case_zero = F.softplus(pi_theta_log) - minus_log_pi
    case_positive = -F.softplus(zi_logits) + log_nb(x, mu, theta, eps=eps, include_constant=include_constant)
    return torch.where(x < eps, case_zero, case_positive)


class NegativeBinomial(Distribution):
    """NB with mean ``mu`` and inverse dispersion ``theta``; batch shape from broadcasting."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = None):
        self.mu, self.theta = broadcast_all(mu, theta)
        super().__init__(self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu.pow(2) / self.theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_nb(value, self.mu, self.theta)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Gamma-Poisson mixture: lambda ~ Gamma(theta, theta / mu), x ~ Poisson(lambda)."""
        rate = self.theta / self.mu.clamp_min(1e-12)
        lam = Gamma(self.theta, rate).sample(sample_shape)
        return Poisson(lam.clamp(max=1e8)).sample()


class ZeroInflatedDistribution(Distribution):
    """Zero inflation around any count distribution: 0 with probability pi, else a base draw."""

    support = constraints.nonnegative_integer
    arg_constraints = {"gate_logits": constraints.real}

    def __init__(self, base: Distribution, *, gate_logits: torch.Tensor, validate_args: bool | None = None):
        self.base = base
        self.gate_logits = gate_logits.expand(base.batch_shape) if gate_logits.shape != base.batch_shape else gate_logits
        super().__init__(base.batch_shape, validate_args=validate_args)

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.gate) * self.base.mean

    @property
    def variance(self) -> torch.Tensor:
        keep = 1 - self.gate
        return keep * (self.base.variance + self.base.mean.pow(2)) - self.mean.pow(2)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_keep = -F.softplus(self.gate_logits)  # log(1 - pi)
        log_gate = -F.softplus(-self.gate_logits)  # log(pi)
        log_base = self.base.log_prob(value)
        return torch.where(value == 0, torch.logaddexp(log_gate, log_keep + log_base), log_keep + log_base)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        draws = self.base.sample(sample_shape)
        zero = torch.bernoulli(self.gate.expand(draws.shape)).bool()
        return draws.masked_fill(zero, 0.0)


class ZeroInflatedNegativeBinomial(ZeroInflatedDistribution):
    """ZINB with NB mean ``mu``, inverse dispersion ``theta`` and dropout logits ``zi_logits``."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive, "zi_logits": constraints.real}

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, validate_args: bool | None = None):
        self.mu, self.theta, self.zi_logits = broadcast_all(mu, theta, zi_logits)
        base = NegativeBinomial(self.mu, self.theta, validate_args=False)
        super().__init__(base, gate_logits=self.zi_logits, validate_args=validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        return self.gate

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb(value, self.mu, self.theta, self.zi_logits)
