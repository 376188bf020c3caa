"""The simulator: counts follow the stated NB/ZINB law, and the stored ground truth is the truth."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from genailab.data.simulate import PerturbationSpec, hill_response, simulate, true_drug_log_fc, write_simulated_h5ad
from genailab.errors import ConfigError


def _nb(adata):
    """scipy's NB with the simulator's true means and per-gene theta."""
    mu = adata.layers["true_mean"].astype(np.float64)
    theta = adata.var["theta"].to_numpy(np.float64)
    return stats.nbinom(n=theta, p=theta / (theta + mu))


def test_counts_are_integer_csr_in_x_and_layer(sim_adata):
    counts = sim_adata.layers["counts"]
    assert sp.issparse(counts) and counts.format == "csr" and counts.dtype == np.float32
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() > 0
    assert (sim_adata.X != counts).nnz == 0
    assert sim_adata.layers["true_mean"].dtype == np.float32


def test_nb_counts_match_scipy_moments_and_zero_probability(sim_adata):
    x = sim_adata.layers["counts"].toarray().astype(np.float64)
    nb = _nb(sim_adata)
    residual = (x - nb.mean()) / nb.std()  # standardised: mean 0, variance 1 under the stated law
    assert abs(residual.mean()) < 0.02
    assert residual.var() == pytest.approx(1.0, abs=0.05)
    # Per gene: observed mean and variance against the averaged NB moments across cells.
    var_total = nb.var().mean(0) + nb.mean().var(0)  # law of total variance over the cells' means
    busy = nb.mean().mean(0) > 2
    np.testing.assert_allclose(x.mean(0)[busy], nb.mean().mean(0)[busy], rtol=0.2)
    assert np.median(x.var(0)[busy] / var_total[busy]) == pytest.approx(1.0, abs=0.1)
    zero_prob = nb.pmf(0)
    assert (x == 0).mean() == pytest.approx(zero_prob.mean(), abs=0.01)
    assert np.abs((x == 0).mean(0) - zero_prob.mean(0)).max() < 0.1


def test_zinb_zero_fraction_includes_dropout(sim_adata_zinb):
    x = sim_adata_zinb.layers["counts"].toarray()
    zero_prob = 0.1 + 0.9 * _nb(sim_adata_zinb).pmf(0)
    assert (x == 0).mean() == pytest.approx(zero_prob.mean(), abs=0.01)
    assert np.abs((x == 0).mean(0) - zero_prob.mean(0)).max() < 0.1
    assert x.mean() == pytest.approx(0.9 * sim_adata_zinb.layers["true_mean"].mean(), rel=0.03)


def test_annotations_and_latent_are_stored(sim_adata):
    obs = sim_adata.obs
    assert list(obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    assert list(obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    np.testing.assert_allclose(sim_adata.layers["true_mean"].sum(1), obs["library_size"], rtol=1e-4)
    totals = np.asarray(sim_adata.layers["counts"].sum(1)).ravel()
    assert np.corrcoef(totals, obs["library_size"])[0, 1] > 0.95
    z = sim_adata.obsm["X_true_latent"]
    assert z.shape == (600, 5)
    codes = obs["cell_type"].cat.codes.to_numpy()
    centroids = np.stack([z[codes == k].mean(0) for k in range(3)])
    nearest = np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == codes).mean() > 0.95  # the latent holds the cell types
    assert sim_adata.uns["simulation"]["seed"] == 0 and sim_adata.uns["simulation"]["likelihood"] == "nb"


def test_batches_shift_expression(sim_adata):
    counts = sim_adata.layers["counts"].toarray()
    norm = counts / counts.sum(1, keepdims=True)
    in_b0 = (sim_adata.obs["batch"] == "batch_0").to_numpy()
    types = sim_adata.obs["cell_type"] == "type_0"
    gap = np.abs(np.log1p(1e4 * norm[in_b0 & types].mean(0)) - np.log1p(1e4 * norm[~in_b0 & types].mean(0)))
    assert np.median(gap) > 0.1  # batch_effect_scale=0.3 moves every gene's logit


def test_marker_genes_and_log_fc_ground_truth(sim_adata):
    var = sim_adata.var
    assert var["marker_of"].value_counts().to_dict() == {"type_0": 10, "type_1": 10, "type_2": 10}
    truth = sim_adata.varm["true_cell_type_log_fc"]
    assert list(truth.columns) == ["type_0", "type_1", "type_2"]
    # Same seed without markers: in each type's column the markers gain exactly marker_log_fc
    # over genes that are nobody's marker (both shift by the same softmax normaliser).
    gain = truth - simulate(20, 200, n_cell_types=3, marker_log_fc=0.0, seed=0).varm["true_cell_type_log_fc"]
    unrelated = var["marker_of"].isna().to_numpy()
    for cell_type in truth.columns:
        markers = (var["marker_of"] == cell_type).to_numpy()
        np.testing.assert_allclose(gain.loc[markers, cell_type] - gain.loc[unrelated, cell_type].mean(), 2.0, atol=1e-9)
    # Empirical log fold change of normalised expression tracks the stored truth.
    counts = sim_adata.layers["counts"].toarray()
    norm = counts / counts.sum(1, keepdims=True)
    codes = sim_adata.obs["cell_type"].cat.codes.to_numpy()
    log_means = np.log(np.stack([norm[codes == k].mean(0) for k in range(3)]))
    empirical = log_means - (log_means.sum(0) - log_means) / 2  # each type vs the mean of the other two
    expressed = counts.mean(0) > 1
    for k, cell_type in enumerate(truth.columns):
        r = np.corrcoef(empirical[k, expressed], truth[cell_type].to_numpy()[expressed])[0, 1]
        assert r > 0.9


def test_same_seed_same_data_other_seed_other_data():
    a = simulate(100, 40, n_cell_types=2, n_markers=3, seed=3)
    b = simulate(100, 40, n_cell_types=2, n_markers=3, seed=3)
    c = simulate(100, 40, n_cell_types=2, n_markers=3, seed=4)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_per_gene_theta_is_drawn_around_the_scalar():
    theta = simulate(50, 300, n_cell_types=2, theta=5.0, theta_log_sd=0.5).var["theta"]
    assert theta.nunique() == 300
    assert np.median(theta) == pytest.approx(5.0, rel=0.15)


def test_invalid_options_raise_config_error():
    with pytest.raises(ConfigError, match="likelihood"):
        simulate(10, 50, likelihood="poisson")
    with pytest.raises(ConfigError, match="markers"):
        simulate(10, 20, n_cell_types=3, n_markers=10)
    with pytest.raises(ConfigError, match="n_drugs"):
        PerturbationSpec(n_drugs=1, pair_fraction=0.5)
    with pytest.raises(ConfigError, match="unknown simulation option"):
        write_simulated_h5ad("unused.h5ad", 10, 50, n_types=3)



@pytest.mark.parametrize(
    "options, message",
    [
        (dict(seed=-1), r"seed must be a whole number in \[0, 9223372036854775808\), got -1"),
        (dict(seed=None), r"seed must be a whole number .* got None"),
        (dict(seed=1.5), r"seed must be a whole number .* got 1.5"),
        (dict(seed="a"), r"seed must be a whole number .* got 'a'"),
        (dict(n_markers=-1), "n_markers must be a non-negative whole number, got -1"),
        (dict(theta_log_sd=-1), "theta_log_sd must be a non-negative number, got -1"),
        (dict(library_log_sd=-0.3), "library_log_sd must be a non-negative number, got -0.3"),
        (dict(batch_effect_scale=-1), "batch_effect_scale must be a non-negative number, got -1"),
        (dict(theta_log_sd=float("nan")), "theta_log_sd is NaN"),
        (dict(library_log_sd=float("nan")), "library_log_sd is NaN"),
        (dict(batch_effect_scale=float("inf")), "batch_effect_scale must be a non-negative finite number, got inf"),
        (dict(marker_log_fc=float("nan")), "marker_log_fc is NaN"),
        (dict(library_mean=1e30), r"library_mean must be a number in \(0, 1e\+09\], got 1e\+30"),
        (dict(perturbation=dict(n_target_genes=-2)), "n_target_genes must be a non-negative whole number, got -2"),
        (dict(perturbation=dict(n_drugs=2.5)), "n_drugs must be a whole number >= 1, got 2.5"),
        (dict(perturbation=dict(doses=1.0)), r"doses must be a list of positive doses like \(0.1, 1.0, 10.0\), got 1"),
        (dict(perturbation=dict(doses=(1.0, float("inf")))), r"doses\[1\] must be a positive finite number, got inf"),
        (dict(perturbation=dict(doses=())), "doses must hold at least one dose"),
        (dict(perturbation=dict(hill=0)), "hill must be a positive number, got 0"),
        (dict(perturbation=dict(n_drugs=2, pair_fraction=0.5, interacting_pairs=3)),
         r"interacting_pairs must be a whole number in \[0, 1\], got 3. 2 drugs form 1 pair."),
        (dict(perturbation=dict(dose=1.0)), "perturbation has an unknown PerturbationSpec field"),
        (dict(perturbation=True), "perturbation must be a PerturbationSpec, a dict of its fields or None, got True"),
    ],
)
def test_every_numeric_option_is_checked_before_numpy_sees_it(options, message):
    """Each message names the argument (the error carries it too, for the command line) and what is valid."""
    with pytest.raises(ConfigError, match=message) as caught:
        simulate(50, 60, **{"n_cell_types": 2, "n_markers": 3, **options})
    named = caught.value.argument
    assert named is not None and message.replace("\\", "").startswith(named.split("[")[0])


def test_the_writer_checks_its_sizes_first(tmp_path):
    with pytest.raises(ConfigError, match="n_cells must be a whole number >= 1, got 10.5"):
        write_simulated_h5ad(tmp_path / "x.h5ad", 10.5, 60)
    with pytest.raises(ConfigError, match="n_genes must be a whole number >= 1, got 0"):
        write_simulated_h5ad(tmp_path / "x.h5ad", 10, 0)
    with pytest.raises(ConfigError, match="chunk_size must be a whole number >= 1, got 0"):
        write_simulated_h5ad(tmp_path / "x.h5ad", 10, 60, chunk_size=0)
    assert not (tmp_path / "x.h5ad").exists()


def test_rates_beyond_the_count_sampler_raise_config_error():
    with pytest.raises(ConfigError, match="count rates are above 1e\\+18 or not finite.*`max_log_fc`"):
        simulate(50, 60, n_cell_types=2, n_markers=3, perturbation=dict(max_log_fc=200.0))


def test_doses_are_kept_as_a_tuple_of_floats():
    assert PerturbationSpec(doses=[1, np.float32(10)]).doses == (1.0, 10.0)


PERTURBATION = dict(n_drugs=2, doses=(0.1, 1.0, 10.0), pair_fraction=0.3, n_target_genes=10)


@pytest.fixture(scope="module")
def perturbed():
    return simulate(1500, 60, n_cell_types=2, n_markers=5, perturbation=PERTURBATION, seed=1)


def test_perturbation_labels_and_truth_layout(perturbed):
    obs = perturbed.obs
    assert list(obs["drug"].cat.categories) == ["control", "drug_0", "drug_1", "drug_0+drug_1"]
    assert obs["drug"].notna().all() and (obs["drug"] == "drug_0+drug_1").sum() > 100
    assert np.array_equal(obs["is_control"], obs["drug"] == "control")
    assert (obs.loc[obs["is_control"], "dose"] == 0).all()
    assert set(obs.loc[~obs["is_control"], "dose"]) == {0.1, 1.0, 10.0}
    effect = perturbed.varm["true_drug_effect_drug_0"]
    assert effect.shape == (60, 2) and ((effect != 0).sum(0) == 10).all()
    assert not np.allclose(effect["type_0"], effect["type_1"])  # cell-type specific


def test_true_means_shift_by_exactly_the_stated_drug_effect(perturbed):
    # The drug arm draws after every other per-cell draw, so without it the same cells come back.
    plain = simulate(1500, 60, n_cell_types=2, n_markers=5, seed=1)
    shift = np.log(perturbed.layers["true_mean"]) - np.log(plain.layers["true_mean"])
    for i in np.flatnonzero(~perturbed.obs["is_control"].to_numpy())[:200]:
        row = perturbed.obs.iloc[i]
        expected = true_drug_log_fc(perturbed, row["drug"], row["dose"])[row["cell_type"]]
        np.testing.assert_allclose(shift[i], expected, atol=1e-4)
    assert np.abs(shift[perturbed.obs["is_control"].to_numpy()]).max() < 1e-4


def test_drug_effect_grows_with_dose(perturbed):
    sizes = [true_drug_log_fc(perturbed, "drug_1", dose).abs().to_numpy() for dose in (0.01, 0.1, 1, 10, 100)]
    assert all(np.all(b >= a) for a, b in zip(sizes, sizes[1:])) and sizes[-1].max() > sizes[0].max()
    # The counts agree: treated vs control log expression (per library size) along the effect's
    # sign follows the truth at each dose.
    obs = perturbed.obs
    norm = perturbed.layers["counts"].toarray() / obs["library_size"].to_numpy()[:, None]
    effect = perturbed.varm["true_drug_effect_drug_1"]["type_0"].to_numpy()
    targets = effect != 0
    control = np.log(norm[((obs["drug"] == "control") & (obs["cell_type"] == "type_0")).to_numpy()][:, targets].mean(0))
    observed, expected = [], []
    for dose in (0.1, 1.0, 10.0):
        rows = ((obs["drug"] == "drug_1") & (obs["dose"] == dose) & (obs["cell_type"] == "type_0")).to_numpy()
        change = np.log(norm[rows][:, targets].mean(0)) - control
        observed.append(np.mean(np.sign(effect[targets]) * change))
        expected.append(np.abs(true_drug_log_fc(perturbed, "drug_1", dose)["type_0"].to_numpy()[targets]).mean())
    assert observed[0] < observed[1] < observed[2]
    np.testing.assert_allclose(observed, expected, atol=0.1)


def test_hill_response_is_a_sigmoid_in_log_dose():
    assert hill_response(0.0, 1.0, 2.0) == 0.0
    assert hill_response(1.0, 1.0, 2.0) == pytest.approx(0.5)
    assert hill_response(3.0, 1.0, 2.0) == pytest.approx(9 / 10)


def test_chunked_writer_matches_in_memory_simulation(tmp_path):
    options = dict(n_cell_types=2, n_markers=4, likelihood="zinb", perturbation=PERTURBATION, seed=5)
    path = write_simulated_h5ad(tmp_path / "sim.h5ad", 2500, 40, chunk_size=1000, **options)
    backed = anndata.read_h5ad(path, backed="r")
    memory = simulate(2500, 40, **options)
    assert backed.shape == (2500, 40) and not backed.layers
    x = backed.X[:]
    assert x.dtype == np.float32 and (x != memory.X).nnz == 0
    assert backed.obs.equals(memory.obs) and backed.var.equals(memory.var)
    np.testing.assert_array_equal(backed.obsm["X_true_latent"], memory.obsm["X_true_latent"])
    assert backed.varm["true_drug_effect_drug_1"].equals(memory.varm["true_drug_effect_drug_1"])
    assert backed.uns["simulation"]["perturbation"]["ec50"] == memory.uns["simulation"]["perturbation"]["ec50"]
