"""Count likelihoods as ``torch.distributions``: negative binomial and zero inflation.

The NB is parameterised by its mean ``mu`` and inverse dispersion ``theta``
(variance ``mu + mu**2 / theta``), as in scVI. Log-probabilities are computed in log space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Gamma, Poisson, constraints

FLOAT64_FROM = 1000.0  # counts above which log_nb runs in float64 on the CPU
_STIRLING_FROM = 100.0  # theta above which lgamma(x + theta) - lgamma(theta) comes from Stirling's series


def log_nb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, *, eps: float = 1e-8, include_constant: bool = True
) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta).

    Parameters
    ----------
    x, mu, theta
        Counts, means (>= 0) and inverse dispersions (> 0), broadcastable to one shape, e.g. (B, G)
        with ``theta`` per gene (G,): left unexpanded, terms in theta alone are computed once.
    eps
        Added inside ``log(mu + eps)`` so that ``mu = 0`` stays finite.
    include_constant
        Subtract ``lgamma(x + 1)``; it does not depend on the parameters, so a loss may skip it.

    Returns
    -------
    Log-probabilities of the broadcast shape.
    """
    x = x.to(torch.result_type(mu, theta))  # integer counts would give lgamma in float32
    if x.dtype == torch.float32 and x.device.type == "cpu" and bool((x > FLOAT64_FROM).any()):
        # bulk-sized counts: x log mu and the lgamma terms are large and cancel, so float32 lost
        # 0.3-5 nats at x = 1e6-1e7 and went positive at 1e8 (accelerators keep float32: no host sync)
        exact = log_nb(x.double(), mu.double(), theta.double(), eps=eps, include_constant=include_constant)
        return exact.to(torch.float32)
    # -(theta + x) log1p(mu / theta) + x log mu + [lgamma(x + theta) - lgamma(theta) - x log theta]:
    # no two large numbers are subtracted, so float32 stays accurate up to the Poisson limit.
    log1p_ratio = torch.log1p(mu / theta)  # log((theta + mu) / theta)
    log_nb_zero = -theta * log1p_ratio  # log NB(0; mu, theta)
    return log_nb_zero + x * (torch.log(mu + eps) - log1p_ratio) + count_terms(x, theta, include_constant)


def log_zinb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    *,
    eps: float = 1e-8,
    include_constant: bool = True,
) -> torch.Tensor:
    """Elementwise log ZINB(x; mu, theta, pi = sigmoid(zi_logits)), arguments as in :func:`log_nb`:
    :func:`log_zero_inflated` around :func:`log_nb`. ``zi_logits`` is broadcastable with ``x``."""
    log_base = log_nb(x, mu, theta, eps=eps, include_constant=include_constant)
    return log_zero_inflated(x.to(log_base.dtype), log_base, zi_logits)


def log_zero_inflated(x: torch.Tensor, log_base: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """The zero-inflation formula of the package: log of ``pi 1[x = 0] + (1 - pi) p_base(x)``.

    ``log_base`` is the base distribution's log-probability at ``x`` and ``pi = sigmoid(gate_logits)``.
    Zeros: log(pi + (1 - pi) p_base(0)) = logaddexp(log pi, log(1 - pi) + log p_base(0)); positive
    counts: log(1 - pi) + log p_base(x); log pi and log(1 - pi) via softplus, exact at any logit.
    (The fused training path, :func:`genailab.likelihood.fused_nll.count_nll`, evaluates the same
    expression in place together with its derivatives.)
    """
    log_keep = -F.softplus(gate_logits)  # log(1 - pi)
    log_gate = -F.softplus(-gate_logits)  # log(pi)
    return torch.where(x == 0, torch.logaddexp(log_gate, log_keep + log_base), log_keep + log_base)


def _log_rising(x: torch.Tensor, theta: torch.Tensor, lgamma_theta: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) - x log(theta); Stirling's series above theta = 100, where
    the lgamma difference would cancel in float32."""
    exact = torch.lgamma(x + theta) - lgamma_theta - x * log_theta
    if theta.device.type == "cpu" and not bool((theta > _STIRLING_FROM).any()):  # no sync on accelerators
        return exact
    stirling = (theta + x - 0.5) * torch.log1p(x / theta) - x - x / (12.0 * theta * (x + theta))
    return torch.where(theta > _STIRLING_FROM, stirling, exact)


def count_terms(
    x: torch.Tensor, theta: torch.Tensor, include_constant: bool, *, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) - x log(theta) [- lgamma(x + 1)], broadcast over x and theta.

    Every term is exactly 0 where x == 0, and single-cell counts are mostly zeros, so on the CPU,
    for x of the full shape and theta per gene (G,) or full, only the non-zero counts are evaluated,
    with a hand-written gradient (lgamma and its digamma gradient otherwise dominate a training
    step); ``nonzero`` (nnz,), the row-major positions of x's non-zero counts, saves finding
    them (explicitly stored zeros among them add exactly 0). Elsewhere the dense form is used;
    it is faster on accelerators.
    """
    shape = torch.broadcast_shapes(x.shape, theta.shape)
    n_genes = shape[-1] if shape else 1
    sparse_ok = x.device.type == "cpu" and x.shape == shape and theta.shape in (shape, (n_genes,), (1, n_genes))
    if not sparse_ok:
        terms = _log_rising(x, theta, torch.lgamma(theta), torch.log(theta))
        return terms - torch.lgamma(x + 1) if include_constant else terms
    return _SparseCountTerms.apply(x, theta, include_constant, nonzero)


class _SparseCountTerms(torch.autograd.Function):
    """:func:`count_terms` on the non-zero counts only; gradient in theta (x is data)."""

    @staticmethod
    def forward(ctx, x, theta, include_constant, nonzero):
        shape, n_genes = x.shape, x.shape[-1]
        flat_x = x.reshape(-1)
        index = flat_x.nonzero().squeeze(1) if nonzero is None else nonzero  # positions of the non-zero counts
        x_nz = flat_x.index_select(0, index)
        theta_flat = theta.reshape(-1)
        genes = None
        if theta.shape == shape:
            theta_nz = theta_flat.index_select(0, index)
            lgamma_theta_nz, log_theta_nz = torch.lgamma(theta_nz), torch.log(theta_nz)
        else:  # per gene: lgamma(theta) and log(theta) once per gene, then gathered
            genes = index % n_genes
            theta_nz = theta_flat.index_select(0, genes)
            lgamma_theta_nz = torch.lgamma(theta_flat).index_select(0, genes)
            log_theta_nz = torch.log(theta_flat).index_select(0, genes)
        terms = _log_rising(x_nz, theta_nz, lgamma_theta_nz, log_theta_nz)
        if include_constant:
            terms = terms - torch.lgamma(x_nz + 1)
        ctx.save_for_backward(index, genes, x_nz, theta_nz)
        ctx.shapes = shape, theta.shape
        return terms.new_zeros(flat_x.shape).index_copy_(0, index, terms).view(shape)

    @staticmethod
    def backward(ctx, grad):
        index, genes, x_nz, theta_nz = ctx.saved_tensors
        shape, theta_shape = ctx.shapes
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        g_nz = grad.reshape(-1).index_select(0, index) * _d_log_rising(x_nz, theta_nz)
        g_theta = grad.new_zeros(shape.numel()).index_copy_(0, index, g_nz).view(shape)
        if genes is not None:
            g_theta = g_theta.sum(0)
        return None, g_theta.view(theta_shape), None, None


def _d_log_rising(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """d/dtheta of :func:`_log_rising`: digamma(x + theta) - digamma(theta) - x / theta, and the
    derivative of the Stirling form above theta = 100."""
    exact = _digamma(x + theta) - _digamma(theta) - x / theta
    large = theta > _STIRLING_FROM
    if not bool(large.any()):
        return exact
    y = x + theta
    stirling = torch.log1p(x / theta) - (y - 0.5) * x / (theta * y) + x * (theta + y) / (12.0 * (theta * y) ** 2)
    return torch.where(large, stirling, exact)


def _digamma(y: torch.Tensor) -> torch.Tensor:
    """digamma for y > 0: recurrence up to y + 6, then the asymptotic series (|error| < 1e-9).
    Vectorised elementwise arithmetic, several times faster than ``torch.digamma`` on the CPU."""
    shifted = y + 6.0
    inverse = shifted.reciprocal()
    inverse2 = inverse * inverse
    series = inverse2 * (1.0 / 12 - inverse2 * (1.0 / 120 - inverse2 * (1.0 / 252 - inverse2 * (1.0 / 240))))
    result = torch.log(shifted) - 0.5 * inverse - series
    for step in range(6):
        result -= (y + float(step)).reciprocal()
    return result


class NegativeBinomial(Distribution):
    """NB with mean ``mu`` and inverse dispersion ``theta``; batch shape from broadcasting."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = None):
        # Kept unexpanded so a per-gene theta (G,) costs G, not B x G, in the log-probability.
        self.mu, self.theta = _as_tensors(mu, theta)
        super().__init__(torch.broadcast_shapes(self.mu.shape, self.theta.shape), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: NegativeBinomial | None = None) -> NegativeBinomial:
        new = self._get_checked_instance(NegativeBinomial, _instance)
        new.mu, new.theta = self.mu.expand(batch_shape), self.theta  # theta stays per gene if it was
        super(NegativeBinomial, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self.mu + self.mu.pow(2) / self.theta).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_nb(value, self.mu, self.theta)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Gamma-Poisson mixture: lambda ~ Gamma(theta, theta / mu), x ~ Poisson(lambda)."""
        theta = self.theta.expand(self.batch_shape)
        lam = Gamma(theta, theta / self.mu.clamp_min(1e-12)).sample(sample_shape)
        return Poisson(lam.clamp(max=1e18)).sample()  # torch.poisson overflows int64 past ~9.2e18


class ZeroInflatedDistribution(Distribution):
    """Zero inflation around any count distribution: 0 with probability pi, else a base draw."""

    support = constraints.nonnegative_integer
    arg_constraints = {"gate_logits": constraints.real}

    def __init__(self, base: Distribution, *, gate_logits: torch.Tensor, validate_args: bool | None = None):
        batch_shape = torch.broadcast_shapes(base.batch_shape, gate_logits.shape)
        self.base = base.expand(batch_shape) if base.batch_shape != batch_shape else base
        self.gate_logits = gate_logits.expand(batch_shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.gate_logits) * self.base.mean  # sigmoid(-l), not 1 - pi: exact as pi -> 1

    @property
    def variance(self) -> torch.Tensor:
        # (1 - pi) (var + mean^2) - mean_zi^2, rearranged so that nothing cancels
        return torch.sigmoid(-self.gate_logits) * (self.base.variance + self.gate * self.base.mean.pow(2))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_zero_inflated(value, self.base.log_prob(value), self.gate_logits)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        draws = self.base.sample(sample_shape)
        zero = torch.bernoulli(self.gate.expand(draws.shape)).bool()
        return draws.masked_fill(zero, 0.0)


class ZeroInflatedNegativeBinomial(ZeroInflatedDistribution):
    """ZINB with NB mean ``mu``, inverse dispersion ``theta`` and dropout logits ``zi_logits``."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive, "zi_logits": constraints.real}

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, validate_args: bool | None = None):
        self.mu, self.theta, self.zi_logits = _as_tensors(mu, theta, zi_logits)
        base = NegativeBinomial(self.mu, self.theta, validate_args=False)
        gate_logits = self.zi_logits.expand(torch.broadcast_shapes(base.batch_shape, self.zi_logits.shape))
        super().__init__(base, gate_logits=gate_logits, validate_args=validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        return self.gate

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb(value, self.mu, self.theta, self.zi_logits)


def _as_tensors(*values) -> tuple[torch.Tensor, ...]:
    """Python numbers become tensors of the first tensor's dtype and device; shapes stay as given."""
    like = next((v for v in values if isinstance(v, torch.Tensor)), None)
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return tuple(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=device) for v in values)
