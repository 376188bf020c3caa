"""The AnnData-facing VAE on the embedded real counts: fit, latent, denoising, sampling, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import genailab
from genailab.data import pbmc68k_counts
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError

FAST = dict(epochs=3, batch_size=64, progress=False, seed=0)


@pytest.fixture(scope="module")
def pbmc():
    adata = pbmc68k_counts()[:, :120].copy()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b0"))
    return adata


@pytest.fixture(scope="module")
def trained(pbmc):
    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=4, hidden_dims=(32,))
    return model.fit(**FAST)


def test_fit_records_history_split_and_provenance(trained, pbmc):
    assert len(trained.history) == 3
    info = trained.training_info
    assert info["n_train"] + info["n_validation"] == pbmc.n_obs and info["n_validation"] == 70
    assert len(info["data_sha256"]) == 64
    counts = np.asarray(pbmc.layers["counts"].sum(1)).ravel()
    assert float(trained.module.default_library) == pytest.approx(np.median(counts[trained._split["train"]]))


def test_latent_means_and_samples(trained, pbmc):
    z = trained.get_latent()
    assert z.shape == (pbmc.n_obs, 4) and np.isfinite(z).all()
    draws = trained.get_latent(n_samples=3)
    assert draws.shape == (3, pbmc.n_obs, 4)
    assert np.abs(draws.mean(0) - z).mean() < np.abs(draws - z).mean()  # draws scatter around the mean


def test_normalized_expression_scales_to_library(trained, pbmc):
    fixed = trained.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(fixed.sum(1), 1e4, rtol=1e-4)
    observed = trained.get_normalized_expression(library_size="observed")
    np.testing.assert_allclose(observed.sum(1), np.asarray(pbmc.layers["counts"].sum(1)).ravel(), rtol=1e-4)
    one_batch = trained.get_normalized_expression(conditions={"batch": "b0"})
    rows = (pbmc.obs["batch"] == "b0").to_numpy()
    np.testing.assert_allclose(one_batch[rows], fixed[rows], rtol=1e-5)
    assert not np.allclose(one_batch[~rows], fixed[~rows])
    with pytest.raises(ConfigError, match="library_size"):
        trained.get_normalized_expression(library_size=-1)


def test_sample_generates_counts_with_conditions(trained):
    generated = trained.sample(50, conditions={"batch": "b1"}, library_size=500, seed=0)
    assert generated.shape == (50, 120) and sp.issparse(generated.X)
    assert np.array_equal(generated.X.data, np.round(generated.X.data))
    assert (generated.obs["batch"] == "b1").all()
    totals = np.asarray(generated.X.sum(1)).ravel()
    assert 250 < totals.mean() < 1000  # NB draws around the requested library of 500
    with pytest.raises(SchemaMismatchError, match="Missing condition values"):
        trained.sample(5)
    with pytest.raises(SchemaMismatchError, match="not seen"):
        trained.sample(5, conditions={"batch": "b9"})


def test_save_load_round_trip_gives_identical_outputs(trained, pbmc, tmp_path):
    trained.save(tmp_path / "m")
    loaded = genailab.VAE.load(tmp_path / "m", pbmc)
    np.testing.assert_array_equal(loaded.get_latent(), trained.get_latent())
    np.testing.assert_array_equal(loaded.get_normalized_expression(), trained.get_normalized_expression())
    assert loaded.history == trained.history and loaded.schema == trained.schema
    np.testing.assert_array_equal(loaded._split["validation"], trained._split["validation"])
    with pytest.raises(Exception, match="already holds a saved model"):
        trained.save(tmp_path / "m")


def test_reordered_genes_are_aligned_by_name(trained, pbmc):
    shuffled = pbmc[:, np.random.default_rng(0).permutation(pbmc.n_vars)].copy()
    np.testing.assert_allclose(trained.get_latent(shuffled), trained.get_latent(), rtol=1e-5, atol=1e-6)


def test_gaussian_model_with_continuous_and_embedded_conditions(pbmc):
    lognorm = pbmc.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    model = genailab.VAE(lognorm, likelihood="gaussian", condition_keys=["batch", "phase"],
                         continuous_keys=["percent_mito"], condition_encoding="embedding", latent_dim=3,
                         hidden_dims=(16,), embedding_dim=4)
    assert model.config.categorical_sizes == (2, 3) and model.config.condition_dim == 9
    model.fit(**FAST)
    assert model.history[-1]["train_elbo_loss"] < model.history[0]["train_elbo_loss"]
    sample = model.sample(4, conditions={"batch": "b0", "phase": "S", "percent_mito": 0.02})
    assert sample.shape == (4, 120) and not sp.issparse(sample.X)
    # a library size means nothing to the Gaussian decoder: refused rather than ignored
    with pytest.raises(ConfigError, match="library_size=100 applies to count models"):
        model.get_normalized_expression(library_size=100)
    with pytest.raises(ConfigError, match="applies to count models"):
        model.sample(4, conditions={"batch": "b0", "phase": "S", "percent_mito": 0.02}, library_size=100)
    np.testing.assert_array_equal(model.get_normalized_expression(), model.get_normalized_expression(library_size="observed"))


def test_gaussian_model_keeps_scaled_cells_whose_values_sum_below_zero():
    """scanpy's pbmc68k_reduced.X is scaled: 389 of its 700 cells sum below zero and were refused
    (or dropped with empty_cells='drop') as cells with zero counts."""
    adata = sc.datasets.pbmc68k_reduced()
    assert (np.asarray(adata.X.sum(1)).ravel() <= 0).sum() == 389
    adata.X[5] = 0.0  # one truly empty cell
    model = genailab.VAE(adata, likelihood="gaussian", latent_dim=3, hidden_dims=(16,), empty_cells="drop")
    model.fit(**{**FAST, "epochs": 1})
    assert model.training_info["n_train"] + model.training_info["n_validation"] == 699


@pytest.mark.parametrize("model", ["VAE", "PerturbationModel"])
def test_a_gaussian_model_of_raw_counts_warns_and_of_prepared_values_does_not(pbmc, model, caplog):
    """Raw counts given to the Gaussian model trained without a word; log-normalised (at 1e4 or a
    million per cell) and scaled values are what it is made for."""
    from genailab.perturb import PerturbationModel

    adata = pbmc.copy()
    adata.obs["drug"] = np.where(np.arange(adata.n_obs) % 3, "drug_a", "control")
    adata.obs["dose"] = np.where(adata.obs["drug"] == "control", 0.0, 1.0)
    adata.layers["log"] = sc.pp.log1p(sc.pp.normalize_total(adata, layer="counts", target_sum=1e4, inplace=False)["X"])
    adata.layers["log_cpm"] = sc.pp.log1p(sc.pp.normalize_total(adata, layer="counts", target_sum=1e6, inplace=False)["X"])
    adata.layers["scaled"] = sc.pp.scale(adata.layers["log"].toarray(), max_value=10)
    build = genailab.VAE if model == "VAE" else lambda a, **o: PerturbationModel(a, cell_type_key=None, **o)
    for layer, warned in [("counts", True), ("log", False), ("log_cpm", False), ("scaled", False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="genailab"):
            build(adata, likelihood="gaussian", layer=layer)
        assert ("looks like raw counts" in caplog.text) == warned, layer
        assert ("adata.layers['counts'] holds whole numbers" in caplog.text) == warned


def test_counts_stored_as_duplicate_entries_are_summed(trained, pbmc):
    """A legal non-canonical CSR storing each count as two entries gave another ELBO (281.691
    against 281.612): the count terms saw two small counts instead of one."""
    counts = sp.csr_matrix(pbmc.layers["counts"], dtype=np.float32)
    half = np.floor(counts.data / 2)
    split = sp.csr_matrix(
        (np.column_stack([half, counts.data - half]).ravel(), np.repeat(counts.indices, 2), counts.indptr * 2),
        shape=counts.shape,
    )
    assert not split.has_canonical_format and abs(split - counts).sum() == 0
    twice = pbmc.copy()
    twice.layers["counts"] = split
    expected = trained.get_elbo(pbmc, seed=0)
    observed = trained.get_elbo(twice, seed=0)
    assert observed["reconstruction"] == pytest.approx(expected["reconstruction"], rel=1e-6)


def test_same_seed_same_latent(pbmc):
    def latent():
        model = genailab.VAE(pbmc, likelihood="zinb", layer="counts", latent_dim=3, hidden_dims=(16,))
        return model.fit(**FAST).get_latent()

    np.testing.assert_array_equal(latent(), latent())


def test_constructor_options_rebuild_the_same_architecture(pbmc):
    """Every architecture field of the config comes back (a new ModelConfig field cannot drop out)."""
    from genailab import VAE

    model = VAE(pbmc, likelihood="zinb", layer="counts", latent_dim=6, hidden_dims=(32, 16), dropout=0.2,
                dispersion="gene-cell", beta=0.5, norm="layer", activation="gelu")  # fmt: skip
    rebuilt = VAE(pbmc, **model.constructor_options())
    assert rebuilt.config == model.config
    assert rebuilt.schema.to_dict() == model.schema.to_dict()


def test_counts_in_adata_raw_are_read_with_layer_raw(pbmc):
    """Public h5ad files often keep counts in .raw and log-normalised highly variable genes in X."""
    import anndata
    import scanpy as sc

    from genailab import VAE
    from genailab.errors import SchemaMismatchError

    counts = anndata.AnnData(pbmc.layers["counts"].copy(), obs=pbmc.obs.copy(), var=pbmc.var[[]].copy())
    adata = counts.copy()
    adata.raw = counts  # all genes, raw counts
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata = adata[:, :200].copy()  # X: log-normalised subset; raw: every gene's counts
    model = VAE(adata, layer="raw", likelihood="nb", latent_dim=4, hidden_dims=(32,))
    assert model.schema.gene_names == tuple(counts.var_names)  # the genes of .raw, not of X
    model.fit(epochs=2, progress=False)
    np.testing.assert_allclose(model.get_expression(adata).toarray(), np.asarray(counts.X.todense()))
    assert model.get_latent(adata).shape == (adata.n_obs, 4)
    with pytest.raises(SchemaMismatchError, match="no .raw"):
        VAE(counts, layer="raw")


def test_indices_take_positions_or_a_boolean_mask(trained, pbmc):
    mask = (pbmc.obs["cell_type"] == pbmc.obs["cell_type"].iloc[0]).to_numpy()
    full = trained.get_latent()
    np.testing.assert_array_equal(trained.get_latent(indices=mask), full[mask])
    frame = trained.get_normalized_expression(indices=mask, return_pandas=True)
    assert list(frame.index) == list(pbmc.obs_names[mask])
    np.testing.assert_array_equal(trained.get_marginal_ll(indices=mask, n_samples=3),
                                  trained.get_marginal_ll(indices=np.flatnonzero(mask), n_samples=3))  # fmt: skip
    for bad, message in ((mask[:10], "boolean mask of 10 entries"), (np.array([0.0, 1.0]), "integer row positions"),
                         (list(pbmc.obs_names[:2]), "obs_names.get_indexer"), (pbmc.obs_names[:2], "obs_names.get_indexer"),
                         ([], "selects no cell"),
                         ([pbmc.n_obs], f"0..{pbmc.n_obs - 1}")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            trained.get_latent(indices=bad)


def test_fit_starts_fresh_unless_warm_start(trained, pbmc, tmp_path):
    trained.save(tmp_path / "run")
    loaded = genailab.VAE.load(tmp_path / "run", pbmc)
    fresh = genailab.VAE.load(tmp_path / "run", pbmc).fit(**{**FAST, "epochs": 1})
    again = genailab.VAE(pbmc, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=4,
                         hidden_dims=(32,)).fit(**{**FAST, "epochs": 1})  # fmt: skip
    np.testing.assert_array_equal(fresh.get_latent(), again.get_latent())  # a fit is reproducible from its seed
    loaded.fit(**{**FAST, "epochs": 1}, warm_start=True)
    # continuing from three epochs beats one epoch from scratch on the validation ELBO
    assert loaded.history[0]["val_elbo_loss"] < again.history[0]["val_elbo_loss"] - 1
    assert loaded.train_config.kl_warmup_epochs == 0.0 and again.train_config.kl_warmup_epochs > 0  # no second warm-up
    with pytest.raises(ConfigError, match="not both"):
        loaded.fit(warm_start=True, resume_from=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="not AnnData"):
        loaded.fit(pbmc)
    with pytest.raises(ConfigError, match=r"VAE.load\(folder, adata\)"):
        genailab.VAE.load(tmp_path / "run").fit(epochs=1)


@pytest.mark.parametrize("failure", ["option", "divergence"])
@pytest.mark.parametrize("warm_start", [False, True])
def test_a_failed_fit_leaves_the_trained_model_as_it_was(pbmc, failure, warm_start):
    """A refused option (checked when the trainer is built) or a diverged run replaced the weights of
    a trained model, fresh or blown up (latent 7e8), while is_trained and history still said trained."""
    import torch

    from genailab.errors import TrainingDivergedError

    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", latent_dim=4, hidden_dims=(32,)).fit(**FAST)
    before = {name: tensor.clone() for name, tensor in model.module.state_dict().items()}
    latent = model.get_latent()
    options = {"option": dict(checkpoint_every=1), "divergence": dict(lr=1e3, grad_clip=None)}[failure]
    error = ConfigError if failure == "option" else TrainingDivergedError
    with pytest.raises(error):
        model.fit(**{**FAST, **options}, warm_start=warm_start)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.module.state_dict().items())
    np.testing.assert_array_equal(model.get_latent(), latent)
    assert len(model.history) == 3


def test_fit_leaves_the_callers_random_streams_and_determinism_setting(pbmc):
    """fit() seeded Python's, NumPy's and torch's global streams to its own seed: every draw after a
    fit repeated the same numbers, and torch's deterministic flag was switched for good."""
    import random

    import torch

    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", latent_dim=4, hidden_dims=(32,))
    draws = []
    for seed in (1, 2):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        model.fit(**{**FAST, "epochs": 1}, deterministic=True)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert draws[0] == (random.random(), np.random.rand(), torch.rand(1).item())
    assert draws[0] != draws[1]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_category_without_training_cells_is_named(pbmc, caplog):
    import logging

    adata = pbmc.copy()
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    model = genailab.VAE(adata, likelihood="nb", layer="counts", latent_dim=4, hidden_dims=(32,))
    model.fit(**{**FAST, "epochs": 1})
    validation = model.validation_indices[0]
    adata.obs.iloc[validation, adata.obs.columns.get_loc("batch")] = "rare"  # its one cell is held out
    model = genailab.VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=4, hidden_dims=(32,))
    with caplog.at_level(logging.WARNING, logger="genailab"):
        model.fit(**{**FAST, "epochs": 1})
    assert any("no training cell" in r.getMessage() and "['rare']" in r.getMessage() for r in caplog.records)


def test_marginal_ll_is_seeded_and_leaves_the_global_stream_alone(trained):
    import torch

    first, second = trained.get_marginal_ll(n_samples=4), trained.get_marginal_ll(n_samples=4)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, trained.get_marginal_ll(n_samples=4, seed=1))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trained.get_marginal_ll(n_samples=2)
    trained.get_elbo()
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_columns_in_the_models_gene_order_are_named_in_a_warning(trained, pbmc, caplog):
    shuffled = pbmc[:, np.random.default_rng(0).permutation(pbmc.n_vars)].copy()
    with caplog.at_level("WARNING", logger="genailab.anndata_models.vae"):
        values = trained.get_normalized_expression(shuffled)
    assert "follow the model's genes" in caplog.text
    np.testing.assert_allclose(values, trained.get_normalized_expression(), rtol=1e-6)  # model order, as said
    caplog.clear()
    with caplog.at_level("WARNING", logger="genailab.anndata_models.vae"):
        trained.get_normalized_expression(pbmc)
    assert caplog.text == ""


def test_arguments_of_the_wrong_kind_are_named(trained, pbmc):
    gene = pbmc.var_names[3]
    np.testing.assert_array_equal(trained.get_normalized_expression(gene_list=gene),
                                  trained.get_normalized_expression(gene_list=[gene]))  # fmt: skip
    cases = [
        (dict(gene_list=[]), "gene_list is empty"),
        (dict(conditions="b0"), "conditions must be a dict"),
        (dict(conditions={"batch": np.array(["b0"] * pbmc.n_obs)}), "must be one value for every cell"),
        (dict(n_samples=2, seed="a"), "seed must be a whole number"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            trained.get_normalized_expression(**options)
    with pytest.raises(ConfigError, match="adata must be an AnnData, not ndarray"):
        trained.get_latent(np.zeros((3, pbmc.n_vars)))


def test_nonfinite_latent_points_and_misspelled_options_are_named(trained, pbmc):
    """decode() of NaN latent points returned NaN expression; a misspelled fit() option listed every option."""
    z = np.zeros((4, trained.config.latent_dim), dtype=np.float32)
    z[2, 1] = np.nan
    with pytest.raises(InputDataError, match=r"z has NaN or infinite values in 1 of its 4 rows \(e.g. row 2\)"):
        trained.decode(z, conditions={"batch": "b0"})
    z[2, 1] = np.inf
    with pytest.raises(InputDataError, match="row 2"):
        trained.decode(z, conditions={"batch": "b0"})
    with pytest.raises(ConfigError, match=r"Unknown option 'epoch' \(did you mean 'epochs'\?\)"):
        trained.fit(epoch=3)
    with pytest.raises(ConfigError, match=r"Unknown option 'latentdim' \(did you mean 'latent_dim'\?\)"):
        genailab.VAE(pbmc, layer="counts", latentdim=3)


def test_subpackages_are_attributes_of_the_package():
    assert genailab.apps.denoise is __import__("genailab.apps", fromlist=["denoise"]).denoise
    assert "perturb" in dir(genailab)


def test_an_unknown_condition_value_is_named_before_a_missing_one(pbmc):
    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", condition_keys=["batch", "phase"], latent_dim=3,
                         hidden_dims=(16,)).fit(**{**FAST, "epochs": 1})  # fmt: skip
    with pytest.raises(SchemaMismatchError, match=r"conditions\['batch'\] = 'b9' is a category the model has not seen"):
        model.sample(5, conditions={"batch": "b9"})  # 'phase' is missing too: the value asked for comes first
    without_phase = pbmc.copy()
    del without_phase.obs["phase"]
    with pytest.raises(SchemaMismatchError, match="has not seen"):
        model.get_normalized_expression(without_phase, conditions={"batch": "b9"})


def test_conditions_are_refused_where_the_decoder_does_not_read_them(pbmc):
    """With inject_condition='encoder', conditions={'batch': ...} gave bitwise-equal outputs for every batch."""
    model = genailab.VAE(pbmc, likelihood="nb", layer="counts", condition_keys=["batch"], inject_condition="encoder",
                         latent_dim=4, hidden_dims=(32,)).fit(**{**FAST, "epochs": 1})  # fmt: skip
    for call in (lambda: model.get_normalized_expression(conditions={"batch": "b0"}),
                 lambda: model.sample(5, conditions={"batch": "b0"})):
        with pytest.raises(ConfigError, match="decoder does not read the conditions"):
            call()
    assert model.get_normalized_expression().shape == (pbmc.n_obs, pbmc.n_vars)


def test_decode_checks_its_inputs_and_takes_conditions_as_a_dict(trained):
    """decode(conditions={...}) raised 'unhashable type: slice'; library=-5 gave rows summing to -5."""
    z = np.zeros((4, 4), dtype=np.float32)
    by_dict = trained.decode(z, conditions={"batch": "b1"}, library=100.0)
    by_matrix = trained.decode(z, conditions=trained.encode_conditions(None, {"batch": "b1"}, n_cells=4), library=100.0)
    np.testing.assert_array_equal(by_dict, by_matrix)
    for options, message in ((dict(library=-5.0), "library must be one positive"), (dict(library=np.ones(3)), "one per latent"),
                             (dict(library=np.nan), "finite")):
        with pytest.raises(ConfigError, match=message):
            trained.decode(z, conditions={"batch": "b1"}, **options)
    with pytest.raises(ConfigError, match=r"z must be \(n, latent_dim=4\)"):
        trained.decode(np.zeros((4, 3)), conditions={"batch": "b1"})


def test_decode_takes_an_obs_table_and_inference_refuses_a_fractional_batch_size(trained, pbmc):
    """decode(conditions=adata.obs[...]) raised numpy's 'could not determine the shape'; get_latent
    (batch_size=10.0) a TypeError from slicing."""
    obs = pbmc.obs.iloc[:4]
    z = np.zeros((4, 4), dtype=np.float32)
    np.testing.assert_array_equal(trained.decode(z, conditions=obs[["batch"]], library=100.0),
                                  trained.decode(z, conditions=trained.encode_conditions(obs), library=100.0))
    with pytest.raises(ConfigError, match=r"library must be one positive number or a 1-D array .* got shape \(4, 1\)"):
        trained.decode(z, conditions=obs, library=np.full((4, 1), 50.0))
    for call in (lambda: trained.get_latent(batch_size=10.0), lambda: trained.get_normalized_expression(batch_size=0)):
        with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
            call()


def test_gaussian_draws_follow_each_genes_variance():
    """The per-gene variance started at 1 and barely moved in a default fit: draws had a variance of
    about 1 whatever the gene's (correlation with the data's -0.02 on 1,500 cells); it now starts at
    the data's."""
    from genailab.data import simulate

    adata = simulate(1000, 80, n_cell_types=3, n_batches=1, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    model = genailab.VAE(adata, likelihood="gaussian", latent_dim=4, hidden_dims=(32,)).fit(seed=0, progress=False)
    drawn = model.sample(1000, seed=0)
    drawn = drawn.X if hasattr(drawn, "X") else drawn
    data_variance = np.asarray(adata.X.toarray()).var(0)
    assert np.corrcoef(np.asarray(drawn).var(0), data_variance)[0, 1] > 0.4


def test_a_number_is_one_category_however_it_is_stored(pbmc):
    """A batch column written as float (0.0, 1.0, e.g. after a CSV round trip) and the same batches as
    integers or text are one set of categories: encoded alike, known to map_query, matched by generate."""
    from genailab.apps import generate
    from genailab.data.schema import DataSchema

    adata = pbmc.copy()
    adata.obs["donor"] = (np.arange(adata.n_obs) % 2).astype(float)
    model = genailab.VAE(adata, likelihood="nb", layer="counts", condition_keys=["donor"], latent_dim=4, hidden_dims=(32,))
    model.fit(**{**FAST, "epochs": 1})
    assert model.schema.categories == (("0", "1"),)
    expected = model.get_latent()
    for spelling in (lambda c: c.astype(int), lambda c: c.astype(int).astype(str), lambda c: c.astype(int).astype("category")):
        other = adata.copy()
        other.obs["donor"] = spelling(other.obs["donor"])
        np.testing.assert_array_equal(model.get_latent(other), expected)
    query = adata.copy()
    query.obs["donor"] = query.obs["donor"].astype(int) + 1  # donor 1 is known, donor 2 is new
    assert model.map_query(query).schema.categories == (("0", "1", "2"),)
    drawn = generate(adata, model, n_cells=20, source="posterior", conditions={"donor": 1}, seed=0)
    assert set(drawn.obs["donor"].astype(str)) == {"1"} and drawn.n_obs == 20
    from_float = generate(adata, model, n_cells=20, conditions={"donor": 1.0}, seed=0)  # labels read "1", not NaN
    assert list(from_float.obs["donor"].astype(str).unique()) == ["1"]
    own = generate(adata, model, n_cells=20, source="posterior", seed=0).obs["donor"]  # each source cell's donor
    assert own.notna().all() and set(own.astype(str)) <= {"0", "1"}
    fractions = adata.copy()  # float32 values keep their short spelling: 0.1, not 0.10000000149011612
    fractions.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, 0.1, 0.3).astype(np.float32)
    by_fraction = genailab.VAE(fractions, likelihood="nb", layer="counts", condition_keys=["donor"], latent_dim=4, hidden_dims=(32,))
    assert by_fraction.schema.categories == (("0.3", "0.1"),)
    assert by_fraction.sample(3, conditions={"donor": 0.1}).obs["donor"].astype(str).tolist() == ["0.1"] * 3
    saved = {**model.schema.to_dict(), "categories": [["0.0", "1.0"]]}  # a model saved before this spelling
    assert DataSchema.from_dict(saved).categories == (("0", "1"),)
