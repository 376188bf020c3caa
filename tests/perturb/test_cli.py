"""`genailab perturb train | predict | evaluate` end to end on a temporary h5ad."""

from __future__ import annotations

import anndata
import pandas as pd
import pytest
from click.testing import CliRunner

from genailab.cli import main
from genailab.errors import ConfigError, SchemaMismatchError
from genailab.perturb import PerturbationModel


def test_train_predict_evaluate(perturb_adata, tmp_path):
    data = tmp_path / "data.h5ad"
    perturb_adata[:800].copy().write_h5ad(data)
    runner = CliRunner()
    common = ["--layer", "counts", "--latent-dim", "4", "--hidden", "32", "--epochs", "3"]

    result = runner.invoke(main, ["perturb", "train", str(data), "--out", str(tmp_path / "run"), *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "genailab.json").is_file() and (tmp_path / "run" / "history.csv").is_file()

    out = tmp_path / "pred.h5ad"
    args = ["perturb", "predict", str(tmp_path / "run"), str(data), "--drug", "drug_0+drug_1", "--dose", "1",
            "--cell-type", "type_1", "--out", str(out)]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    predicted = anndata.read_h5ad(out)
    obs = perturb_adata[:800].obs
    assert predicted.n_obs == int(((obs["drug"] == "control") & (obs["cell_type"] == "type_1")).sum())
    assert set(predicted.obs["drug"]) == {"drug_0+drug_1"} and set(predicted.obs["dose"]) == {1.0}

    table = tmp_path / "scores.csv"
    args = ["perturb", "evaluate", str(data), "--out", str(table), "--protocol", "combination", "--n-groups", "1", *common]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(table)
    assert set(scores["method"]) == {"no change", "perturbed mean", "additive", "ridge", "scGen", "genailab"}
    assert (scores.loc[scores["method"] == "no change", "r2_delta"] <= 0).all()
    assert "R2 d50" in result.output and (tmp_path / "scores_summary.csv").is_file()


def test_evaluate_pairs_from_the_simulator_and_refuses_before_training(tmp_path):
    from genailab.data.simulate import PerturbationSpec, simulate

    runner = CliRunner()
    common = ["--layer", "counts", "--latent-dim", "4", "--hidden", "16", "--epochs", "2"]
    singles = tmp_path / "singles.h5ad"
    simulate(300, 30, n_cell_types=2, n_batches=1, n_markers=3, seed=0,
             perturbation=PerturbationSpec(n_drugs=2, n_target_genes=5)).write_h5ad(singles)  # fmt: skip
    table = tmp_path / "none.csv"
    args = ["perturb", "evaluate", str(singles), "--out", str(table), "--protocol", "dose", "--protocol", "pair", *common]
    result = runner.invoke(main, args)
    assert result.exit_code != 0 and "ConfigError" in result.output and "pair" in result.output
    assert not table.exists()  # refused before any protocol was trained

    pairs = tmp_path / "pairs.h5ad"
    spec = PerturbationSpec(n_drugs=3, pair_fraction=0.4, interacting_pairs=1, n_target_genes=5)
    simulate(1500, 30, n_cell_types=2, n_batches=1, n_markers=3, seed=0, perturbation=spec).write_h5ad(pairs)
    table = tmp_path / "pairs.csv"
    args = ["perturb", "evaluate", str(pairs), "--out", str(table), "--protocol", "pair", "--protocol", "dose", *common]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(table)
    assert {"pair (additive)", "pair (interacting)", "dose"} <= set(scores["protocol"])
    assert "matching mean" in set(scores["method"])


def test_errors_are_one_clean_line(perturb_adata, tmp_path):
    data = tmp_path / "data.h5ad"
    perturb_adata[:300].copy().write_h5ad(data)
    runner = CliRunner()
    run = tmp_path / "run"
    assert runner.invoke(main, ["perturb", "train", str(data), "--out", str(run), "--layer", "counts",
                                "--hidden", "16", "--latent-dim", "4", "--epochs", "1"]).exit_code == 0  # fmt: skip
    for drug, dose, message in [("drug_9", "1", "SchemaMismatchError"), ("drug_0", "-2", "ConfigError")]:
        result = runner.invoke(main, ["perturb", "predict", str(run), str(data), "--drug", drug, "--dose", dose,
                                      "--out", str(tmp_path / "p.h5ad")])  # fmt: skip
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["perturb", "train", str(data), "--out", str(run), "--drug-key", "compound",
                                  "--overwrite"])
    assert result.exit_code != 0 and "SchemaMismatchError" in result.output


def test_evaluate_trains_its_neural_methods_with_the_given_options(perturb_adata, tmp_path, monkeypatch):
    """--likelihood, --batch-size, --lr and --patience reach both neural methods' fits."""
    import genailab.perturb as perturb
    from genailab.anndata_models.perturbation import PerturbationModel

    data = tmp_path / "data.h5ad"
    perturb_adata[:800].copy().write_h5ad(data)
    seen = []
    fit = PerturbationModel.fit

    def recording_fit(self, *args, **options):
        seen.append((self.config.vae.likelihood, options))
        return fit(self, *args, **options)

    monkeypatch.setattr(PerturbationModel, "fit", recording_fit)
    args = ["perturb", "evaluate", str(data), "--out", str(tmp_path / "s.csv"), "--protocol", "combination", "--n-groups",
            "1", "--layer", "counts", "--latent-dim", "4", "--hidden", "16", "--epochs", "2", "--likelihood", "zinb",
            "--batch-size", "64", "--lr", "0.002", "--patience", "0"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert seen and all(likelihood == "zinb" for likelihood, _ in seen)
    assert all(o["batch_size"] == 64 and o["lr"] == 0.002 and o["early_stopping_patience"] is None for _, o in seen)
    scgen = perturb.default_methods(likelihood="zinb")[-2]
    assert type(scgen).__name__ == "LatentArithmetic" and scgen.likelihood == "zinb"  # scGen's VAE follows too


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--drug-key", "compound"], "obs has no column 'compound' (given as --drug-key)"),
        (["--covariate-key", "donor"], "obs has no column 'donor' (given as --covariate-key)"),
        (["--covariate-key", "drug"], "'drug' is given as --drug-key and as --covariate-key"),
        (["--covariate-key", "cell_type"], "as --cell-type-key and as --covariate-key (the cell type is a covariate"),
        (["--drug-key", "cell_type", "--dose-key", "library_size"], "'cell_type' is given as --drug-key and as --cell"),
    ],
)
def test_each_obs_column_plays_one_role_and_errors_name_the_option(perturb_adata, tmp_path, options, expected):
    """A column missing or given for two roles (drug, dose, cell type, covariate) names the options at fault."""
    data = tmp_path / "data.h5ad"
    perturb_adata[:300].copy().write_h5ad(data)
    result = CliRunner().invoke(main, ["perturb", "train", str(data), "--out", str(tmp_path / "run"), "--layer",
                                       "counts", "--epochs", "1", *options])  # fmt: skip
    assert result.exit_code != 0 and expected in result.output, result.output
    assert "Traceback" not in result.output and "_key" not in result.output
    assert not (tmp_path / "run" / "model.pt").exists()
    arguments = {o[2:].replace("-", "_"): v for o, v in zip(options[::2], options[1::2])}  # the Python spelling
    if "covariate_key" in arguments:
        arguments["covariate_keys"] = [arguments.pop("covariate_key")]
    with pytest.raises((ConfigError, SchemaMismatchError), match="given as `"):
        PerturbationModel(perturb_adata[:300].copy(), layer="counts", **arguments)


def test_evaluate_refuses_n_groups_below_one_instead_of_skipping_every_protocol(perturb_adata, tmp_path):
    data = tmp_path / "data.h5ad"
    perturb_adata[:300].copy().write_h5ad(data)
    result = CliRunner().invoke(main, ["perturb", "evaluate", str(data), "--out", str(tmp_path / "e.csv"),
                                       "--n-groups", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--n-groups must be a whole number >= 1, got 0" in result.output, result.output
    assert "No protocol" not in result.output and not (tmp_path / "e.csv").exists()
