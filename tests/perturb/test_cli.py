"""`genailab perturb train | predict | evaluate` end to end on a temporary h5ad."""

from __future__ import annotations

import anndata
import pandas as pd
from click.testing import CliRunner

from genailab.cli import main


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
    assert set(scores["method"]) == {"no change", "additive", "ridge", "scGen", "genailab"}
    assert (scores.loc[scores["method"] == "no change", "r2_delta"] <= 0).all()
    assert "r2_delta" in result.output and (tmp_path / "scores_summary.csv").is_file()


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
