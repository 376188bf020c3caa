"""Generated-vs-real metrics: known answers, direct numpy/scipy computations, same vs shifted samples."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
from anndata import AnnData
from scipy.spatial.distance import cdist
from threadpoolctl import threadpool_limits

from genailab.errors import ConfigError, InputDataError
from genailab.eval import (
    classifier_two_sample_auc,
    energy_distance,
    gene_moment_agreement,
    mmd_rbf,
    pca_distance,
    per_condition,
    posterior_predictive_gene_stats,
)


@pytest.fixture(scope="module")
def samples():
    """Three 300 x 30 Gaussian samples: two from N(0, I), one shifted by 1 in every gene."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 30)), rng.normal(size=(300, 30)), rng.normal(size=(300, 30)) + 1.0


@pytest.fixture(scope="module")
def counts():
    """Two NB count samples from the same gene means (400 x 40) and one with means reversed."""
    rng = np.random.default_rng(0)
    means = np.exp(rng.normal(0.0, 1.0, size=40))
    def draw(mu):
        return rng.negative_binomial(2.0, 2.0 / (2.0 + mu), size=(400, 40)).astype(float)
    return draw(means), draw(means), draw(means[::-1])


def direct_mmd(a, b, bandwidth):
    """Unbiased MMD^2 by explicit sums over distinct pairs."""
    k = lambda x, y: np.exp(-cdist(x, y, "sqeuclidean") / (2 * bandwidth**2))
    kaa, kbb = k(a, a), k(b, b)
    n, m = len(a), len(b)
    off = lambda kk: kk[~np.eye(len(kk), dtype=bool)].sum()
    return off(kaa) / (n * (n - 1)) + off(kbb) / (m * (m - 1)) - 2 * k(a, b).sum() / (n * m)


def test_mmd_matches_direct_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    assert mmd_rbf(a, b, bandwidth=1.3) == pytest.approx(direct_mmd(a, b, 1.3))
    pooled = np.vstack([a, b])
    median = np.median(cdist(pooled, pooled)[np.triu_indices(16, k=1)])
    assert mmd_rbf(a, b) == pytest.approx(direct_mmd(a, b, median))


def test_energy_distance_matches_scipy_and_direct_computation():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=25), rng.normal(1.0, 2.0, size=30)
    assert energy_distance(u[:, None], v[:, None]) == pytest.approx(scipy.stats.energy_distance(u, v) ** 2)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(8, 4))
    direct = 2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean()
    assert energy_distance(a, b) == pytest.approx(direct)
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_distances_separate_same_from_shifted(samples):
    real, same, shifted = samples
    for metric in ("energy", "mmd"):
        near = pca_distance(real, same, n_comps=10, metric=metric)
        far = pca_distance(real, shifted, n_comps=10, metric=metric)
        assert abs(near) < 0.05 and far > 10 * abs(near)
    sparse_value = pca_distance(sp.csr_matrix(real), AnnData(shifted), n_comps=10)
    assert sparse_value == pytest.approx(pca_distance(real, shifted, n_comps=10), rel=1e-6)
    assert pca_distance(real, shifted, n_comps=10, max_cells=100) > 1.0


def test_classifier_auc(samples):
    real, same, shifted = samples
    assert classifier_two_sample_auc(real, same, n_comps=10) == pytest.approx(0.5, abs=0.08)
    assert classifier_two_sample_auc(real, shifted, n_comps=10) > 0.99


def test_gbm_sees_a_change_of_spread_that_logistic_misses(samples):
    real, same, _ = samples
    wider = 3.0 * same[:, :5]
    assert classifier_two_sample_auc(real[:, :5], wider, n_comps=3) < 0.65
    with threadpool_limits(1):  # OpenMP threads of the boosting crawl on a loaded machine; one is fast here
        assert classifier_two_sample_auc(real[:, :5], wider, n_comps=3, classifier="gbm") > 0.9


def test_gene_moments_by_hand():
    real = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 4.0], [2.0, 5.0, 0.0]])
    generated = np.array([[0.0, 2.0, 4.0], [0.0, 6.0, 8.0], [4.0, 10.0, 0.0]])  # real doubled
    scores = gene_moment_agreement(real, generated)
    assert scores["mean_pearson"] == pytest.approx(1.0)
    assert scores["variance_pearson"] == pytest.approx(1.0)
    assert scores["zero_fraction_pearson"] == pytest.approx(1.0)
    assert scores["zero_fraction_mae"] == 0.0


def test_gene_moments_dense_and_sparse_agree(counts):
    real, same, reversed_means = counts
    dense = gene_moment_agreement(real, same)
    sparse = gene_moment_agreement(sp.csr_matrix(real), AnnData(sp.csr_matrix(same)))
    assert dense == pytest.approx(sparse)
    assert dense["mean_pearson"] > 0.95 and dense["zero_fraction_mae"] < 0.05
    other = gene_moment_agreement(real, reversed_means)
    assert other["mean_pearson"] < 0.5 and other["zero_fraction_mae"] > 5 * dense["zero_fraction_mae"]


def test_posterior_predictive_stats(counts):
    observed, replicated, reversed_means = counts
    stats = posterior_predictive_gene_stats(observed, sp.csr_matrix(replicated))
    np.testing.assert_allclose(stats["cv_observed"], observed.std(axis=0, ddof=1) / observed.mean(axis=0))
    np.testing.assert_allclose(stats["zero_fraction_replicated"], (replicated == 0).mean(axis=0))
    assert stats["cv_pearson"] > 0.9 and stats["zero_fraction_pearson"] > 0.95
    assert stats["cv_mae"] == pytest.approx(np.mean(np.abs(stats["cv_observed"] - stats["cv_replicated"])))
    worse = posterior_predictive_gene_stats(observed, reversed_means)
    assert worse["zero_fraction_mae"] > 5 * stats["zero_fraction_mae"]


def test_cv_skips_genes_with_zero_mean():
    observed = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    stats = posterior_predictive_gene_stats(observed, observed)
    assert np.isnan(stats["cv_observed"][0])
    assert stats["cv_mae"] == 0.0


def test_cv_of_negative_means_matches_numpy():
    """Scaled (Gaussian-model) values have negative gene means: CV is std / |mean|, nan only at mean 0."""
    rng = np.random.default_rng(0)
    observed = rng.normal(-1.0, 1.0, size=(50, 4))
    observed[:, 3] = np.tile([-1.0, 1.0], 25)  # mean exactly 0
    stats = posterior_predictive_gene_stats(observed, observed + rng.normal(0.0, 0.1, size=observed.shape))
    expected = observed[:, :3].std(axis=0, ddof=1) / np.abs(observed[:, :3].mean(axis=0))
    np.testing.assert_allclose(stats["cv_observed"][:3], expected)
    assert np.all(observed.mean(axis=0)[:3] < 0) and np.isnan(stats["cv_observed"][3])
    assert np.isfinite(stats["cv_pearson"]) and stats["cv_mae"] < 0.1


def test_per_condition_splits_cells(samples):
    real, same, shifted = samples
    generated = np.vstack([same[:150], shifted[:150]])
    real_labels = np.repeat(["ctrl", "drug"], 150)
    generated_labels = np.repeat(["ctrl", "drug"], 150)
    result = per_condition(energy_distance, real, generated, real_labels=real_labels, generated_labels=generated_labels)
    assert list(result) == ["ctrl", "drug"]
    assert result["ctrl"] == pytest.approx(energy_distance(real[:150], same[:150]))
    assert result["drug"] > 10 * result["ctrl"]
    only_ctrl = per_condition(
        energy_distance, real, same[:150], real_labels=real_labels, generated_labels=np.repeat("ctrl", 150)
    )
    assert list(only_ctrl) == ["ctrl"]


def test_bad_input_is_refused(samples):
    real, same, _ = samples
    with pytest.raises(InputDataError, match="same genes"):
        gene_moment_agreement(real, same[:, :5])
    with pytest.raises(ConfigError, match="metric"):
        pca_distance(real, same, metric="wasserstein")
    with pytest.raises(ConfigError, match="n_comps"):
        pca_distance(real[:, :5], same[:, :5], n_comps=5)
    with pytest.raises(ConfigError, match="bandwidth"):
        mmd_rbf(real, same, bandwidth=0.0)
    with pytest.raises(InputDataError, match="at least 2 cells"):
        energy_distance(real[:1], same)
    with pytest.raises(InputDataError, match="share no condition"):
        per_condition(
            energy_distance, real, same, real_labels=np.repeat("a", 300), generated_labels=np.repeat("b", 300)
        )
