"""The conditional VAEs: seed API, ELBO terms against closed forms and scipy, gradients, overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch
from torch.distributions import Normal, kl_divergence

from genailab.errors import ConfigError, InputDataError
from genailab.model.config import ModelConfig
from genailab.model.vae import CVAE, CVAE_NB, CVAE_ZINB, ConditionalVAE, gaussian_kl


def _counts(n=32, g=40, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32))


def _onehot(n, k, seed=0):
    codes = np.random.default_rng(seed).integers(0, k, n)
    return torch.from_numpy(np.eye(k, dtype=np.float32)[codes])


@pytest.mark.parametrize("cls, likelihood", [(CVAE, "gaussian"), (CVAE_NB, "nb"), (CVAE_ZINB, "zinb")])
def test_seed_api_builds_and_runs(cls, likelihood):
    torch.manual_seed(0)
    model = cls(input_dim=2000, latent_dim=10, condition_dim=5, hidden_dims=[512, 256])
    assert model.config.likelihood == likelihood
    assert model.config.hidden_dims == (512, 256)
    assert model.encoder.layers[0].in_features == 2005
    x, c = _counts(8, 2000), _onehot(8, 5)
    mean, var = model.encode(x, c)
    assert mean.shape == var.shape == (8, 10) and bool((var > 0).all())
    px = model.decode(model.reparameterize(mean, var), c, x.sum(1, keepdim=True))
    assert px.batch_shape == (8, 2000)
    out = model.loss(x, c)
    assert out.reconstruction.shape == out.kl.shape == (8,)
    model.eval()
    assert model.sample(3, c[0]).shape == (3, 2000)


def test_named_class_rejects_other_likelihood():
    with pytest.raises(ConfigError, match="fixes likelihood"):
        CVAE_NB(input_dim=10, latent_dim=2, likelihood="gaussian")


def test_from_config_returns_named_class():
    assert type(ConditionalVAE.from_config(ModelConfig(input_dim=20, latent_dim=3, likelihood="zinb"))) is CVAE_ZINB


def test_kl_matches_torch_closed_form():
    mean, var = torch.randn(6, 4), torch.rand(6, 4) + 0.1
    expected = kl_divergence(Normal(mean, var.sqrt()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean, var), expected)


def test_kl_matches_monte_carlo_estimate():
    torch.manual_seed(1)
    mean, var = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, 2.0]])
    z = mean + var.sqrt() * torch.randn(200_000, 2)
    q, p = Normal(mean, var.sqrt()), Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()
    assert abs(gaussian_kl(mean, var).item() - mc.item()) < 0.01


def test_nb_reconstruction_equals_scipy_on_decoded_parameters():
    torch.manual_seed(0)
    model = CVAE_NB(input_dim=30, latent_dim=4, condition_dim=3, hidden_dims=[16]).eval()
    x, c = _counts(5, 30), _onehot(5, 3)
    torch.manual_seed(7)
    out = model.loss(x, c)
    torch.manual_seed(7)
    fwd = model(x, c)
    mu, theta = fwd.px.mu.detach().double().numpy(), fwd.px.theta.detach().double().numpy()
    expected = -st.nbinom.logpmf(x.numpy(), theta, theta / (theta + mu)).sum(1)
    np.testing.assert_allclose(out.reconstruction.detach().numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(fwd.px.mu.sum(1).detach().numpy(), x.sum(1).numpy(), rtol=1e-5)  # observed library


def test_gaussian_reconstruction_equals_scipy_normal():
    torch.manual_seed(0)
    model = CVAE(input_dim=12, latent_dim=2, hidden_dims=[8]).eval()
    x = torch.randn(4, 12)
    torch.manual_seed(3)
    out = model.loss(x)
    torch.manual_seed(3)
    px = model(x).px
    expected = -st.norm.logpdf(x.numpy(), px.mean.detach().numpy(), px.stddev.detach().numpy()).sum(1)
    np.testing.assert_allclose(out.reconstruction.detach().numpy(), expected, rtol=1e-5)


def test_loss_is_mean_of_reconstruction_plus_weighted_kl():
    torch.manual_seed(0)
    model = CVAE_ZINB(input_dim=20, latent_dim=3, hidden_dims=[8], beta=0.5).eval()
    x = _counts(6, 20)
    torch.manual_seed(2)
    out = model.loss(x, kl_weight=0.3)
    torch.testing.assert_close(out.loss, (out.reconstruction + 0.5 * 0.3 * out.kl).mean())


def test_pathwise_gradients_reach_encoder_mean_and_variance():
    torch.manual_seed(0)
    model = CVAE_NB(input_dim=20, latent_dim=3, hidden_dims=[8])
    model.loss(_counts(16, 20)).loss.backward()
    assert model.z_mean.weight.grad.abs().sum() > 0
    assert model.z_logvar.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("inject", ["both", "encoder", "decoder", "none"])
def test_condition_injection_changes_input_widths(inject):
    model = CVAE(input_dim=10, latent_dim=2, condition_dim=4, hidden_dims=[6], inject_condition=inject)
    assert model.encoder.layers[0].in_features == 10 + (4 if inject in ("both", "encoder") else 0)
    assert model.decoder.layers[0].in_features == 2 + (4 if inject in ("both", "decoder") else 0)


def test_decoder_output_depends_on_condition():
    torch.manual_seed(0)
    model = CVAE_NB(input_dim=10, latent_dim=2, condition_dim=2, hidden_dims=[6]).eval()
    z = torch.zeros(1, 2)
    a = model.decode(z, torch.tensor([[1.0, 0.0]])).mean
    b = model.decode(z, torch.tensor([[0.0, 1.0]])).mean
    assert not torch.allclose(a, b)


def test_embedded_categorical_conditions():
    model = CVAE_NB(input_dim=10, latent_dim=2, hidden_dims=[6], categorical_sizes=[3, 4], embedding_dim=5, n_continuous=1)
    assert model.config.condition_dim == 11
    c = torch.tensor([[0, 3, 0.5], [2, 1, -1.0]])
    assert model.loss(_counts(2, 10), c).reconstruction.shape == (2,)


@pytest.mark.parametrize("dispersion", ["gene", "gene-condition", "gene-cell"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_dispersion_and_norm_options(dispersion, norm):
    torch.manual_seed(0)
    model = CVAE_NB(input_dim=15, latent_dim=2, condition_dim=2, hidden_dims=[8], dispersion=dispersion, norm=norm)
    out = model(_counts(4, 15), _onehot(4, 2))
    assert out.px.variance.shape == (4, 15) and bool(torch.isfinite(out.px.theta).all())


def test_bad_shapes_and_options_raise_clear_errors():
    model = CVAE(input_dim=10, latent_dim=2, condition_dim=3, hidden_dims=[4])
    with pytest.raises(InputDataError, match="expected"):
        model.loss(torch.randn(4, 10), torch.randn(4, 2))
    with pytest.raises(InputDataError, match="conditional"):
        model.loss(torch.randn(4, 10))
    with pytest.raises(ConfigError, match="larger than the number of genes"):
        CVAE(input_dim=5, latent_dim=10)
    with pytest.raises(ConfigError, match="likelihood"):
        ModelConfig(input_dim=5, latent_dim=2, likelihood="poisson")


@pytest.mark.parametrize("cls", [CVAE_NB, CVAE_ZINB, CVAE])
def test_tiny_model_overfits_tiny_data(cls):
    """Full-batch training on 32 cells of 4 types: the negative ELBO falls by a stated factor and,
    for count models, gets within 15% of the negative log-likelihood of the true Poisson model."""
    rng = np.random.default_rng(0)
    rates = rng.gamma(0.5, 20, size=(4, 40))[rng.integers(0, 4, 32)]
    counts = rng.poisson(rates)
    true_nll = -st.poisson.logpmf(counts, rates).sum(1).mean()
    x = torch.from_numpy(counts.astype(np.float32))
    if cls is CVAE:
        x = torch.log1p(x)
    torch.manual_seed(0)
    model = cls(input_dim=40, latent_dim=4, hidden_dims=[64], dropout=0.0, norm="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(x).loss.item()
    for _ in range(800):
        optimizer.zero_grad()
        loss = model.loss(x).loss
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = model.loss(x).loss.item()
    if cls is CVAE:
        assert final < first - 80  # Gaussian NLL can go negative: demand a large absolute fall
    else:
        assert final < 0.7 * first
        assert final < 1.15 * true_nll


def test_marginal_log_likelihood_matches_quadrature_in_one_latent_dimension():
    """With L = 1, log p(x) = log of the integral of p(x|z) N(z; 0, 1) dz, computed on a fine grid."""
    torch.manual_seed(0)
    model = CVAE_NB(input_dim=6, latent_dim=1, hidden_dims=[8], dropout=0.0).eval()
    x = _counts(3, 6, seed=4)
    library = x.sum(1, keepdim=True)
    grid = torch.linspace(-9, 9, 4001)
    with torch.no_grad():
        log_terms = torch.stack([
            model.decode(grid[:, None], None, library[i].expand(grid.numel(), 1)).log_prob(x[i]).sum(-1)
            + Normal(0.0, 1.0).log_prob(grid)
            for i in range(3)
        ])
    exact = torch.logsumexp(log_terms, dim=1) + torch.log(grid[1] - grid[0])
    torch.manual_seed(1)
    estimate = model.marginal_log_likelihood(x, n_samples=3000)
    torch.testing.assert_close(estimate, exact, atol=0.05, rtol=0)
    with torch.no_grad():
        elbo = torch.stack([-(o.reconstruction + o.kl) for o in (model.loss(x) for _ in range(500))]).mean(0)
    assert bool((estimate >= elbo - 0.01).all())  # the importance-weighted bound is at least the ELBO


@pytest.mark.parametrize("cls", [CVAE, CVAE_NB, CVAE_ZINB])
def test_expected_expression_equals_distribution_mean(cls):
    torch.manual_seed(0)
    model = cls(input_dim=12, latent_dim=3, condition_dim=2, hidden_dims=[8]).eval()
    z, c, library = torch.randn(5, 3), _onehot(5, 2), torch.full((5, 1), 300.0)
    px = model.decode(z, c, library)
    torch.testing.assert_close(model.expected_expression(z, c, library, include_dropout=True), px.mean)
    nb_mean = px.mu if cls is CVAE_ZINB else px.mean
    torch.testing.assert_close(model.expected_expression(z, c, library), nb_mean)
