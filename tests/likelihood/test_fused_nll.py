"""The fused count likelihood (training's hot path) against scipy and against autograd through a
plain reference formula: values and all gradients, NB and ZINB, per-gene and per-cell dispersion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import special, stats

from genailab.data.loader import MinibatchLoader
from genailab.likelihood.distributions import _digamma
from genailab.likelihood.fused_nll import _count_terms_per_cell, count_nll
from genailab.model.vae import CVAE_NB, CVAE_ZINB


def _reference_ll(x, logits, library, theta, zi_logits):
    """log NB / ZINB per entry, written out with plain torch ops (autograd gives the reference gradients)."""
    mu = library * torch.softmax(logits, -1)
    log_nb = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
              + theta * (torch.log(theta) - torch.log(theta + mu)) + x * (torch.log(mu) - torch.log(theta + mu)))
    if zi_logits is None:
        return log_nb
    log_pi, log_keep = -F.softplus(-zi_logits), -F.softplus(zi_logits)
    return torch.where(x == 0, torch.logaddexp(log_pi, log_keep + log_nb), log_keep + log_nb)


def _case(rng, n_cells=7, n_genes=11, theta_layout="gene", theta_scale=1.0):
    mu_scale = rng.lognormal(2.0, 2.0, (n_cells, 1))
    logits = rng.normal(0.0, 2.0, (n_cells, n_genes))
    theta_shape = (n_genes,) if theta_layout == "gene" else (n_cells, n_genes)
    theta = theta_scale * rng.lognormal(0.0, 2.0, theta_shape)
    mu = mu_scale * special.softmax(logits, axis=1)
    x = rng.negative_binomial(np.broadcast_to(theta, mu.shape), theta / (theta + mu)).astype(float)
    x[rng.random(x.shape) < 0.3] = 0.0  # extra zeros, as dropout would give
    x[x.sum(1) == 0, 0] = 1.0
    x[0] = 0.0  # a cell without counts
    library = x.sum(1, keepdims=True)
    library[0] = 3.0  # the library is data: it need not equal the observed total
    return x, logits, library, theta


@pytest.mark.parametrize("theta_layout", ["gene", "cell"])
@pytest.mark.parametrize("theta_scale", [1.0, 1e3], ids=["theta ~ 1", "theta ~ 1e3"])
@pytest.mark.parametrize("zero_inflated", [False, True], ids=["nb", "zinb"])
def test_values_and_gradients_match_the_reference(theta_layout, theta_scale, zero_inflated):
    rng = np.random.default_rng(0)
    x, logits, library, theta = _case(rng, theta_layout=theta_layout, theta_scale=theta_scale)
    zi = rng.normal(0.0, 2.0, x.shape) if zero_inflated else None
    weights = torch.tensor(rng.normal(size=x.shape[0]))  # any upstream gradient, not only ones
    grads = []
    for function in (lambda *a: -count_nll(*a), lambda *a: _reference_ll(*a).sum(-1)):
        leaves = [torch.tensor(a, requires_grad=True) for a in (logits, theta) + ((zi,) if zero_inflated else ())]
        value = function(torch.tensor(x), leaves[0], torch.tensor(library), leaves[1],
                         leaves[2] if zero_inflated else None)
        grads.append((value.detach().numpy(), torch.autograd.grad((value * weights).sum(), leaves)))
    (ours, our_grads), (reference, reference_grads) = grads
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-7)
    for mine, theirs in zip(our_grads, reference_grads):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-7, atol=1e-7)


def test_nb_matches_scipy():
    rng = np.random.default_rng(1)
    x, logits, library, theta = _case(rng)
    mu = library * special.softmax(logits, axis=1)
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu)).sum(1)
    ours = count_nll(*(torch.tensor(a) for a in (x, logits, library, theta)))
    np.testing.assert_allclose(-ours.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("zero_inflated", [False, True], ids=["nb", "zinb"])
def test_a_cell_without_counts_and_library_has_likelihood_one(zero_inflated):
    x, library = torch.zeros(2, 5), torch.tensor([[0.0], [4.0]])
    logits, theta, zi = torch.randn(2, 5, requires_grad=True), torch.rand(5) + 0.1, torch.randn(2, 5)
    nll = count_nll(x, logits, library, theta, zi if zero_inflated else None)
    assert nll[0].abs() < 1e-6 and nll[1] > 0  # float32 rounding of softplus(z) - z - softplus(-z)
    nll.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().max() < 1e-20


def test_float32_agrees_with_float64():
    rng = np.random.default_rng(2)
    x, logits, library, theta = _case(rng, n_cells=32, n_genes=300)
    zi = rng.normal(0.0, 2.0, x.shape)
    ours = [count_nll(*(torch.tensor(a, dtype=dtype) for a in (x, logits, library, theta, zi))).double().numpy()
            for dtype in (torch.float32, torch.float64)]
    np.testing.assert_allclose(ours[0], ours[1], rtol=2e-5)


@pytest.mark.parametrize("zero_inflated", [False, True], ids=["nb", "zinb"])
def test_bulk_sized_counts_in_float32_match_float64(zero_inflated):
    """At 1e6 counts per gene the float32 loss was 47 nats off (8 cells) and d/dtheta 27%: the large
    terms cancel, so those batches run in float64 on the CPU, as log_nb does."""
    rng = np.random.default_rng(5)
    theta = np.full(100, 20.0)
    mu = np.full((8, 100), 1e6)
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
    logits, library = np.log(mu / mu.sum(1, keepdims=True)), mu.sum(1, keepdims=True)
    zi = np.full(x.shape, -2.0) if zero_inflated else None
    results = []
    for dtype in (torch.float32, torch.float64):
        tensors = [None if a is None else torch.tensor(a, dtype=dtype, requires_grad=True) for a in (logits, theta, zi)]
        nll = count_nll(torch.tensor(x, dtype=dtype), tensors[0], torch.tensor(library, dtype=dtype), tensors[1], tensors[2])
        nll.sum().backward()
        assert nll.dtype == dtype and tensors[1].grad.dtype == dtype
        results.append((nll.detach().double().numpy(), tensors[1].grad.double().numpy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4)


def test_zero_inflation_gradient_keeps_its_precision_at_very_negative_dropout_logits():
    """d/dz at a zero count used 1 - sigmoid(gap), all rounding where sigmoid(gap) is near 1 (100% off at z = -50)."""
    x, logits, library = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    theta = torch.full((3,), 2.0, dtype=torch.float64)
    zi = torch.full((1, 3), -50.0, dtype=torch.float64, requires_grad=True)
    count_nll(x, logits, library, theta, zi).sum().backward()
    reference = zi.detach().clone().requires_grad_(True)
    (-_reference_ll(x, logits, library, theta, reference).sum()).backward()
    np.testing.assert_allclose(zi.grad.numpy(), reference.grad.numpy(), rtol=1e-9)


def test_the_loaders_sparse_counts_give_the_same_loss_and_gradients():
    rng = np.random.default_rng(3)
    matrix = sp.random(40, 30, density=0.3, format="csr", random_state=4, data_rvs=lambda n: rng.integers(1, 50, n))
    matrix.data = matrix.data.astype(np.float32)
    batch = next(iter(MinibatchLoader(matrix, batch_size=16, seed=0)))
    assert batch.x_sparse is not None
    logits, zi = torch.randn(16, 30, requires_grad=True), torch.randn(16, 30, requires_grad=True)
    theta = torch.rand(30, requires_grad=True)
    library = batch.x.sum(1, keepdim=True)
    results = []
    for x_sparse in (None, batch.x_sparse):
        value = count_nll(batch.x, logits, library, theta + 0.5, zi, x_sparse=x_sparse)
        results.append((value, torch.autograd.grad(value.sum(), (logits, theta, zi))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", ["uniform", "per cell"])
def test_count_terms_beyond_the_table_and_not_whole_match_scipy(weights):
    # Counts 0..32 come from a table, others (large or non-whole) from lgamma: both against scipy.
    rng = np.random.default_rng(5)
    x = rng.poisson(rng.lognormal(1.0, 1.5, (30, 40))).astype(float)
    x[0, :6] = [32.0, 33.0, 1000.0, 2.5, 0.5, 1e5]
    theta = np.exp(np.linspace(-7.0, 14.0, 40))  # across the range the dispersion clamp allows
    cell_weights = np.full(30, 0.25) if weights == "uniform" else rng.normal(size=30)
    theta_tensor = torch.tensor(theta, requires_grad=True)
    terms = _count_terms_per_cell(torch.tensor(x), theta_tensor, None)
    (gradient,) = torch.autograd.grad((terms * torch.tensor(cell_weights)).sum(), theta_tensor)
    expected = special.gammaln(x + theta) - special.gammaln(theta) - x * np.log(theta) - special.gammaln(x + 1)
    slopes = special.digamma(x + theta) - special.digamma(theta) - x / theta
    np.testing.assert_allclose(terms.detach().numpy(), expected.sum(1), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(gradient.numpy(), cell_weights @ slopes, rtol=1e-8, atol=1e-10)
    float32 = _count_terms_per_cell(torch.tensor(x, dtype=torch.float32), torch.tensor(theta, dtype=torch.float32), None)
    np.testing.assert_allclose(float32.numpy(), expected.sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("model_class", [CVAE_NB, CVAE_ZINB])
@pytest.mark.parametrize("dispersion", ["gene", "gene-cell", "gene-condition"])
def test_model_loss_is_minus_the_decoded_log_prob(model_class, dispersion):
    torch.manual_seed(0)
    model = model_class(input_dim=25, latent_dim=3, condition_dim=2, hidden_dims=[16], dispersion=dispersion).double().eval()
    x = torch.poisson(torch.rand(9, 25, dtype=torch.float64) * 4)
    c = F.one_hot(torch.arange(9) % 2, 2).double()
    z = torch.randn(9, 3, dtype=torch.float64)
    library = x.sum(1, keepdim=True)
    fused = model.reconstruction_nll(x, z, c, library)
    expected = -model.decode(z, c, library).log_prob(x).sum(-1)  # with log(mu + 1e-8): equal to ~1e-7
    np.testing.assert_allclose(fused.detach().numpy(), expected.detach().numpy(), rtol=1e-6)


def test_digamma_matches_scipy_over_the_range_counts_reach():
    y = np.concatenate([np.logspace(-6, 7, 4000), np.arange(1, 200) + 0.5])
    np.testing.assert_allclose(_digamma(torch.tensor(y)).numpy(), special.digamma(y), rtol=1e-9, atol=1e-9)


def test_half_precision_logits_are_computed_in_float32():
    """Under autocast the decoder's logits may arrive in bfloat16; the loss is still float32."""
    rng = np.random.default_rng(5)
    x, logits, library, theta = _case(rng, n_cells=8, n_genes=40)
    zi = rng.normal(0.0, 1.0, x.shape)
    low = [torch.tensor(a, dtype=torch.bfloat16) for a in (logits, zi)]
    full = [a.float() for a in low]  # the same rounded values, in float32
    as_float32 = torch.tensor(x, dtype=torch.float32), torch.tensor(library, dtype=torch.float32)
    theta32 = torch.tensor(theta, dtype=torch.float32)
    ours = count_nll(as_float32[0], low[0], as_float32[1], theta32, low[1])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, count_nll(as_float32[0], full[0], as_float32[1], theta32, full[1]))
