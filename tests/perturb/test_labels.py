"""Perturbation labels that are missing or ambiguous are errors, not drugs called "nan" or "A+A";
training without controls warns; predicting on data without the drug column refuses."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from click.testing import CliRunner

from genailab.cli import main
from genailab.data.perturbation_schema import ObsKeys, PerturbationSchema
from genailab.errors import ConfigError, InputDataError
from genailab.perturb import PerturbationModel


@pytest.fixture()
def small(perturb_adata):
    """300 cells of the shared simulation (a copy), controls and both drugs, counts in layers['counts']."""
    return perturb_adata[:300].copy()


def test_a_missing_drug_label_is_an_error_not_a_drug_called_nan(small, model_options):
    small.obs["drug"] = small.obs["drug"].astype(object)
    small.obs.iloc[[3, 8], small.obs.columns.get_loc("drug")] = np.nan
    with pytest.raises(InputDataError, match=r"obs\['drug'\] has 2 missing drug labels \(NaN or None\)") as info:
        PerturbationModel(small, **model_options)
    assert str(small.obs_names[3]) in str(info.value)
    with pytest.raises(InputDataError, match="missing drug labels"):
        ObsKeys().is_control(small.obs)


@pytest.mark.parametrize("label, message", [
    ("drug_0+drug_0", r"names \['drug_0'\] more than once"),
    ("drug_0+", "has an empty drug name"),
    ("+drug_1", "has an empty drug name"),
    ("drug_0+control", r"combines the control label 'control' with drugs; .* label those cells 'drug_0'"),
])
def test_an_ambiguous_combination_is_an_error(small, model_options, label, message):
    small.obs["drug"] = small.obs["drug"].astype(object)
    small.obs.iloc[0, small.obs.columns.get_loc("drug")] = label
    with pytest.raises(InputDataError, match=message):
        PerturbationModel(small, **model_options)
    with pytest.raises(InputDataError, match=message):
        ObsKeys().drugs_of(label)


def test_a_doubled_drug_in_a_prediction_request_is_refused(trained, controls):
    with pytest.raises(InputDataError, match="more than once"):
        trained.predict(controls, drug="drug_0+drug_0", dose=1.0)


def test_a_prediction_request_names_its_own_mistake(trained, controls):
    """'drug_0+' was told it named the control label."""
    with pytest.raises(ConfigError, match=r"drug='drug_0\+' has an empty drug name"):
        trained.predict(controls, drug="drug_0+", dose=1.0)
    with pytest.raises(ConfigError, match="not the control label 'control'"):
        trained.predict(controls, drug="control+drug_0", dose=1.0)


def test_training_without_controls_warns_that_predictions_need_them(small, caplog):
    treated = small[small.obs["drug"].astype(str) != "control"].copy()
    with caplog.at_level(logging.WARNING, logger="genailab.data.perturbation_schema"):
        schema = PerturbationSchema.from_anndata(treated, keys=ObsKeys(), layer="counts")
    assert schema.drugs == ("drug_0", "drug_1")
    assert any("predictions need controls" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genailab.data.perturbation_schema"):
        PerturbationSchema.from_anndata(small, keys=ObsKeys(), layer="counts")
    assert not any("predictions need controls" in record.getMessage() for record in caplog.records)


def test_predicting_on_data_without_the_drug_column_refuses(trained, perturb_adata, tmp_path):
    """The command reads any file, so it refuses; the API, documented to take control cells alone
    (tests/perturb/test_api.py), warns that every cell is then taken as a control."""
    run = tmp_path / "run"
    trained.save(run)
    mixed = perturb_adata[:200].copy()  # controls and treated cells, then the column that tells them apart is lost
    del mixed.obs["drug"]
    data = tmp_path / "no_drug.h5ad"
    mixed.write_h5ad(data)
    result = CliRunner().invoke(main, ["perturb", "predict", str(run), str(data), "--drug", "drug_0", "--dose", "1",
                                       "--out", str(tmp_path / "p.h5ad")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "SchemaMismatchError: adata.obs has no 'drug' column, so control cells cannot be told" in result.output
    assert not (tmp_path / "p.h5ad").exists()


def test_the_api_warns_when_it_cannot_tell_controls(trained, controls, caplog):
    bare = controls.copy()
    del bare.obs["drug"]
    with caplog.at_level(logging.WARNING, logger="genailab.anndata_models.perturbation"):
        unlabelled = trained.predict(bare, drug="drug_0", dose=1.0, seed=0)
    assert any("every one of the 203 cells is taken as a control" in r.getMessage() for r in caplog.records)
    labelled = trained.predict(controls, drug="drug_0", dose=1.0, seed=0)
    np.testing.assert_allclose(unlabelled.X, labelled.X, rtol=1e-5)  # the same cells, the same prediction


def test_a_nan_or_huge_dose_and_library_are_refused(trained, controls):
    with pytest.raises(ConfigError, match=re.escape("dose is NaN; give a non-negative number.")):
        trained.predict(controls, drug="drug_0", dose=float("nan"))
    with pytest.raises(ConfigError, match=re.escape("dose=1e+39 overflows float32")):
        trained.predict(controls, drug="drug_0", dose=1e39)
    with pytest.raises(ConfigError, match=re.escape("library_size must be a positive finite number, got inf.")):
        trained.predict(controls, drug="drug_0", dose=1.0, library_size=float("inf"))


def test_missing_doses_under_another_control_label_name_that_label(small):
    relabelled = small.copy()
    relabelled.obs["drug"] = relabelled.obs["drug"].astype(str).replace({"control": "DMSO"})
    relabelled.obs.loc[relabelled.obs["drug"] == "DMSO", "dose"] = np.nan  # sciplex-style controls
    with pytest.raises(InputDataError, match=r"control_value='DMSO' \(CLI: --control-value\), not 'control'"):
        PerturbationSchema.from_anndata(relabelled, keys=ObsKeys(), layer="counts")


def test_an_untrained_model_does_not_predict(small):
    from genailab.errors import ConfigError
    from genailab.perturb import PerturbationModel

    controls = small[small.obs["drug"].astype(str) == "control"]
    with pytest.raises(ConfigError, match="has not been trained"):
        PerturbationModel(small, layer="counts").predict(controls, drug="drug_0", dose=1.0)
