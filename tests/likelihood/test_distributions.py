"""NB and zero-inflated likelihoods against scipy (and hand-written formulas over scipy), never
against themselves. A table of cases runs through generic checks, as in Pyro's distribution tests."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from torch.distributions import Distribution, Poisson

from genailab.likelihood.distributions import (
    NegativeBinomial,
    ZeroInflatedDistribution,
    ZeroInflatedNegativeBinomial,
    log_nb,
    log_zinb,
)

EPS = 1e-8  # the default eps of log_nb: log(mu + eps) is biased by x * log1p(eps / mu)
COUNTS = np.array([0, 1, 2, 5, 10, 100, 1e3, 1e4, 1e6])
MUS = np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1e6, 1e8])


class ZeroInflatedReference:
    """Zero inflation written out over a frozen scipy distribution (scipy has none)."""

    def __init__(self, base, logits: np.ndarray):
        self.base, self.pi, self.keep = base, special.expit(logits), special.expit(-logits)  # keep = 1 - pi

    def logpmf(self, x: np.ndarray) -> np.ndarray:
        zero = np.log(self.pi + self.keep * self.base.pmf(0))
        return np.where(x == 0, zero, np.log(self.keep) + self.base.logpmf(x))

    def moment(self, k: int) -> np.ndarray:
        return self.keep * self.base.moment(k)

    def mean(self) -> np.ndarray:
        return self.keep * self.base.mean()

    def var(self) -> np.ndarray:  # law of total variance over the gate
        return self.keep * self.base.var() + self.keep * self.pi * self.base.mean() ** 2


@dataclass(frozen=True)
class Case:
    """P parameter sets: our distribution (batch shape (P,)), its reference and a tolerance."""

    name: str
    ours: Callable[[], Distribution]
    reference: object  # .logpmf(x), .mean(), .var() and .moment(k), over the P parameter sets
    rtol: float  # relative to max(1, |log-pmf|)
    mu: np.ndarray | float = np.inf  # NB mean, for the eps bias; inf where there is no eps


def _eps_bias(x, mu):
    """Most that log_nb's default eps can move the result: x log(mu + eps) - x log(mu)."""
    return x * np.log1p(EPS / mu)


def _grid(*axes) -> list[np.ndarray]:
    return [np.array(column, dtype=np.float64) for column in zip(*itertools.product(*axes))]


def _nb_case(name, mu, theta, rtol) -> Case:
    ours = partial(NegativeBinomial, torch.tensor(mu), torch.tensor(theta))
    return Case(name, ours, stats.nbinom(theta, theta / (theta + mu)), rtol, mu)


def _zinb_case(name, mu, theta, logits, *, generic: bool) -> Case:
    mu_t, theta_t, logits_t = torch.tensor(mu), torch.tensor(theta), torch.tensor(logits)
    if generic:  # the composition: any base, gate in log space
        ours = partial(ZeroInflatedDistribution, NegativeBinomial(mu_t, theta_t), gate_logits=logits_t)
    else:  # through log_zinb
        ours = partial(ZeroInflatedNegativeBinomial, mu_t, theta_t, logits_t)
    reference = ZeroInflatedReference(stats.nbinom(theta, theta / (theta + mu)), logits)
    return Case(name, ours, reference, 1e-9, mu)


def _zip_case(name, rate, logits) -> Case:
    ours = partial(ZeroInflatedDistribution, Poisson(torch.tensor(rate)), gate_logits=torch.tensor(logits))
    return Case(name, ours, ZeroInflatedReference(stats.poisson(rate), logits), 1e-9)


THETAS = [1e-4, 1e-2, 1.0, 99.0, 101.0, 1e4]  # 99 and 101 straddle the switch to Stirling's series
LOGITS = [-30.0, -5.0, 0.0, 5.0, 30.0]  # pi from 1e-13 to 1 - 1e-13
# scipy forms 1 - p = mu / (mu + theta) by subtraction, losing ~1e-16 theta / mu: at theta = 1e6 its
# logpmf and mean are only ~1e-7 accurate (checked against 50-digit mpmath), hence that row's rtol.
EXTREME_CASES = [
    _nb_case("nb", *_grid(MUS, THETAS), rtol=1e-9),
    _nb_case("nb huge theta", *_grid(MUS, [1e5, 1e6]), rtol=1e-7),
    _zinb_case("zinb", *_grid(MUS, THETAS, LOGITS), generic=False),
    _zinb_case("zi(nb)", *_grid(MUS, THETAS, LOGITS), generic=True),
    _zip_case("zi(poisson)", *_grid([1e-3, 1.0, 10.0, 1e3, 1e6], LOGITS)),
]
MODERATE_CASES = [  # sample moments only say something where the tails are not too heavy
    _nb_case("nb", *_grid([0.5, 5.0, 50.0], [0.5, 2.0, 20.0]), rtol=1e-9),
    _zinb_case("zinb", *_grid([0.5, 5.0, 50.0], [0.5, 20.0], [-2.0, 0.0, 1.5]), generic=False),
    _zinb_case("zi(nb)", *_grid([5.0], [2.0], [-2.0, 1.5]), generic=True),
    _zip_case("zi(poisson)", *_grid([0.5, 5.0, 50.0], [-2.0, 0.0, 1.5])),
    _nb_case("nb large mean", *_grid([1e6, 1e8], [10.0, 1e8]), rtol=1e-9),
]


def by_name(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])


@by_name(EXTREME_CASES)
def test_log_prob_matches_reference(case):
    dist = case.ours()
    x = np.broadcast_to(COUNTS[:, None], (len(COUNTS), *dist.batch_shape))  # (K, P)
    ours = dist.log_prob(torch.tensor(x)).numpy()
    reference = case.reference.logpmf(x)
    tolerance = case.rtol * np.maximum(1.0, np.abs(reference)) + _eps_bias(x, case.mu)
    assert ours.shape == x.shape
    np.testing.assert_array_less(np.abs(ours - reference), tolerance)
    np.testing.assert_allclose(ours.sum(), reference.sum(), rtol=case.rtol, atol=tolerance.sum())


@by_name(EXTREME_CASES + MODERATE_CASES)
def test_mean_and_variance_match_reference(case):
    dist = case.ours()
    np.testing.assert_allclose(dist.mean.numpy(), case.reference.mean(), rtol=case.rtol)
    np.testing.assert_allclose(dist.variance.numpy(), case.reference.var(), rtol=case.rtol)


@by_name(MODERATE_CASES)
def test_sample_moments_match_mean_and_variance(case):
    """Each sample mean and variance lies within 5 standard errors (CLT, from the reference's first
    four moments) of the reference value: a fixed seed and a 5-sigma bound, so no flakiness."""
    torch.manual_seed(0)
    n = 20_000
    dist = case.ours()
    samples = dist.sample((n,)).numpy()  # (n, P)
    assert samples.shape == (n, *dist.batch_shape)
    assert (samples >= 0).all() and (samples == np.round(samples)).all()
    m1, m2, m3, m4 = (case.reference.moment(k) for k in (1, 2, 3, 4))
    variance = m2 - m1**2
    fourth_central = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
    assert (np.abs(samples.mean(0) - m1) < 5 * np.sqrt(variance / n)).all()
    assert (np.abs(samples.var(0, ddof=1) - variance) < 5 * np.sqrt((fourth_central - variance**2) / n)).all()


def test_extreme_samples_are_nonnegative_integers():
    torch.manual_seed(0)
    mu, theta = _grid([0.0, 1e-8, 1e3, 1e8], [1e-6, 1e-4, 1.0, 1e8])
    dist = ZeroInflatedNegativeBinomial(torch.tensor(mu), torch.tensor(theta), torch.zeros(len(mu)))
    samples = dist.sample((200,))
    assert torch.isfinite(samples).all() and (samples >= 0).all() and (samples == samples.round()).all()


def test_zinb_matches_hand_computed_values():
    mu, theta, pi = _grid([0.3, 4.0, 250.0], [0.05, 1.5, 40.0], [1e-12, 1e-6, 0.2, 0.5, 0.9, 1 - 1e-9])
    logits = special.logit(pi)
    x = np.array([0, 1, 3, 30, 500])[:, None]
    nb = stats.nbinom(theta, theta / (theta + mu))
    expected = np.where(x == 0, np.log(pi + (1 - pi) * nb.pmf(0)), np.log1p(-pi) + nb.logpmf(x))
    ours = log_zinb(*(torch.tensor(np.broadcast_to(a, expected.shape)) for a in (x, mu, theta, logits)), eps=0.0)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-15)  # atol: rounding of pi near 1


@pytest.mark.parametrize("make", [
    lambda mu, theta, logits: ZeroInflatedNegativeBinomial(mu, theta, logits),
    lambda mu, theta, logits: ZeroInflatedDistribution(NegativeBinomial(mu, theta), gate_logits=logits),
], ids=["zinb", "zi(nb)"])
def test_gate_limits_give_the_base_and_a_point_mass_at_zero(make):
    mu, theta = (torch.tensor(a) for a in _grid([0.1, 10.0, 1e4], [0.01, 1.0, 1e4]))
    x = torch.tensor([0.0, 1.0, 7.0, 1e3], dtype=torch.float64)[:, None].expand(4, len(mu))
    nb = stats.nbinom(theta.numpy(), (theta / (theta + mu)).numpy())
    closed = make(mu, theta, torch.full_like(mu, -1e4))  # pi = exp(-1e4), below every NB(0) here
    reference = nb.logpmf(x.numpy())
    tolerance = 1e-9 * np.maximum(1.0, np.abs(reference)) + _eps_bias(x.numpy(), mu.numpy())
    np.testing.assert_array_less(np.abs(closed.log_prob(x).numpy() - reference), tolerance)
    np.testing.assert_allclose(closed.mean.numpy(), nb.mean(), rtol=1e-9)
    np.testing.assert_allclose(closed.variance.numpy(), nb.var(), rtol=1e-9)
    shut = make(mu, theta, torch.full_like(mu, 1e4))  # 1 - pi = exp(-1e4)
    log_prob = shut.log_prob(x)
    assert (log_prob[0] == 0).all() and (log_prob[1:] < -1e4 + 1).all()
    assert (shut.mean == 0).all() and (shut.variance == 0).all() and (shut.sample((100,)) == 0).all()


def test_huge_theta_gives_poisson():
    mu = np.array([1e-3, 0.5, 10.0, 1e3, 1e6])
    x = np.round(mu + np.arange(-3, 4)[:, None] * np.sqrt(mu)).clip(0)  # (7, 5), around the mean
    theta = 1e12
    ours = log_nb(torch.tensor(x), torch.tensor(mu), torch.tensor(theta), eps=0.0).numpy()
    reference = stats.poisson.logpmf(x, mu)
    # log NB - log Poisson = ((x - mu)^2 - x) / (2 theta) + O(theta^-2)
    tolerance = 1e-10 * np.maximum(1.0, np.abs(reference)) + ((x - mu) ** 2 + x) / (2 * theta)
    np.testing.assert_array_less(np.abs(ours - reference), tolerance)


@pytest.mark.parametrize("layout", ["full", "theta per gene", "theta (1, G)", "x broadcast", "3-d", "int64 counts"])
def test_log_nb_matches_scipy_for_every_layout(layout):
    """Counts on the CPU take a path over non-zero entries only for some layouts; all agree with scipy."""
    rng = np.random.default_rng(0)
    mu, theta = rng.lognormal(1.0, 2.0, (6, 5)), rng.lognormal(0.0, 2.0, 5)
    x = rng.negative_binomial(theta, theta / (theta + mu)) * (rng.random((6, 5)) < 0.5)  # half zeros
    x, theta = {"full": (x, np.broadcast_to(theta, x.shape)), "theta per gene": (x, theta),
                "theta (1, G)": (x, theta[None]), "x broadcast": (x[0], theta),
                "3-d": (np.stack([x, x]), theta), "int64 counts": (x.astype(np.int64), theta)}[layout]
    x_t = torch.tensor(x) if layout == "int64 counts" else torch.tensor(x, dtype=torch.float64)
    ours = log_nb(x_t, torch.tensor(mu), torch.tensor(theta), eps=0.0)
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "x broadcast"])
def test_include_constant_false_drops_exactly_lgamma_x_plus_one(broadcast):
    x = np.array([0.0, 1.0, 4.0, 80.0, 1e5])[:, None]
    x = x if broadcast else np.broadcast_to(x, (5, 12))
    mu, theta, logits = (torch.tensor(a) for a in _grid([0.2, 30.0, 1e4], [0.1, 3.0], [-1.0, 2.0]))
    x_t = torch.tensor(x)
    for function, args in ((log_nb, (x_t, mu, theta)), (log_zinb, (x_t, mu, theta, logits))):
        difference = function(*args) - function(*args, include_constant=False)
        expected = np.broadcast_to(-special.gammaln(x + 1), difference.shape)
        np.testing.assert_allclose(difference.numpy(), expected, rtol=1e-12, atol=1e-12)


EXTREMES = _grid([0.0, 1e-8, 1e-3, 1e8], [1e-6, 1e-4, 1.0, 1e8], [0.0, 1.0, 1e4, 1e6], [-50.0, 0.0, 50.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_probs_and_gradients_are_finite_at_extremes(dtype):
    mu, theta, x, logits = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in EXTREMES)
    nb, zinb = log_nb(x.detach(), mu, theta), log_zinb(x.detach(), mu, theta, logits)
    assert nb.dtype == dtype and torch.isfinite(nb).all() and torch.isfinite(zinb).all()
    assert (nb <= 1e-4).all() and (zinb <= 1e-4).all()  # valid log-probabilities, up to rounding
    (nb.sum() + zinb.sum()).backward()
    for parameter in (mu, theta, logits):
        assert torch.isfinite(parameter.grad).all()


def test_float32_stays_close_to_scipy_at_extremes():
    mu, theta, x, _ = EXTREMES
    keep = mu >= 1e-3  # below, the eps floor dominates (covered by the finiteness test)
    mu, theta, x = mu[keep], theta[keep], x[keep]
    ours = log_nb(*(torch.tensor(a, dtype=torch.float32) for a in (x, mu, theta))).double().numpy()
    reference = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    # float32 rounds x log(mu) and lgamma(x + 1), each about x log x in size, at ~1e-7 relative
    tolerance = 1e-4 * np.maximum(1.0, np.abs(reference)) + 1e-6 * x * np.log1p(x) + _eps_bias(x, mu)
    np.testing.assert_array_less(np.abs(ours - reference), tolerance)


def test_gradients_match_the_analytic_derivatives():
    mu, theta, x = _grid([0.1, 3.0, 1e4], [1e-3, 0.7, 50.0, 1e4], [0.0, 2.0, 1e3])
    mu_t, theta_t = torch.tensor(mu, requires_grad=True), torch.tensor(theta, requires_grad=True)
    log_nb(torch.tensor(x), mu_t, theta_t, eps=0.0).sum().backward()
    d_mu = x / mu - (x + theta) / (theta + mu)
    d_theta = (special.digamma(x + theta) - special.digamma(theta)
               + np.log(theta / (theta + mu)) + (mu - x) / (theta + mu))
    np.testing.assert_allclose(mu_t.grad.numpy(), d_mu, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(theta_t.grad.numpy(), d_theta, rtol=1e-6, atol=1e-9)


def test_shapes_and_argument_validation():
    mu, theta = torch.full((4, 3), 2.0), torch.ones(3)
    nb = NegativeBinomial(mu, theta)
    assert nb.batch_shape == (4, 3) and nb.sample((5,)).shape == (5, 4, 3) and nb.variance.shape == (4, 3)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, torch.zeros(2, 4, 3))  # gate broader than the NB
    assert zinb.batch_shape == (2, 4, 3) and zinb.sample().shape == (2, 4, 3)
    assert torch.equal(zinb.zi_probs, torch.full((2, 4, 3), 0.5)) and zinb.mu is mu and zinb.theta is theta
    assert ZeroInflatedNegativeBinomial(1.0, 2.0, 0.0).batch_shape == ()
    with pytest.raises(ValueError):
        NegativeBinomial(torch.tensor([-1.0]), torch.tensor([1.0]), validate_args=True)
    for dist in (NegativeBinomial(mu, theta, validate_args=True),
                 ZeroInflatedNegativeBinomial(mu, theta, torch.zeros(3), validate_args=True)):
        for bad in (-1.0, 0.5):
            with pytest.raises(ValueError):
                dist.log_prob(torch.full((4, 3), bad))


@settings(max_examples=60, deadline=None)
@given(log10_mu=st.floats(-3.0, 8.0), log10_theta=st.floats(-4.0, 6.0), x=st.integers(0, 1_000_000),
       zi_logit=st.floats(-40.0, 40.0))
def test_log_nb_matches_scipy_over_wide_ranges(log10_mu, log10_theta, x, zi_logit):
    mu, theta = 10.0**log10_mu, 10.0**log10_theta
    ours = log_nb(*(torch.tensor([v], dtype=torch.float64) for v in (float(x), mu, theta))).item()
    reference = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    rtol = 1e-9 if theta <= 1e4 else 1e-7  # as in the table above
    tolerance = rtol * max(1.0, abs(reference)) + _eps_bias(x, mu)
    assert math.isfinite(ours) and abs(ours - reference) <= tolerance
    zinb = log_zinb(*(torch.tensor([v], dtype=torch.float64) for v in (float(x), mu, theta, zi_logit))).item()
    assert math.isfinite(zinb) and zinb <= 1e-12


@pytest.mark.parametrize("count", [1e3 + 1, 1e4, 1e6, 1e7, 1e8])
def test_nb_log_prob_of_bulk_sized_counts_matches_scipy(count):
    """Counts this large cancel catastrophically in float32 (they are computed in float64)."""
    from scipy import stats

    from genailab.likelihood.distributions import NegativeBinomial

    for theta in (5.0, 500.0):
        mu = 1.1 * count
        value = NegativeBinomial(torch.tensor([mu]), torch.tensor([theta])).log_prob(torch.tensor([count]))
        assert value.dtype == torch.float32
        assert float(value) == pytest.approx(stats.nbinom.logpmf(count, theta, theta / (theta + mu)), abs=1e-4)
