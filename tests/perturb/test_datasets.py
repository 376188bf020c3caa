"""Public layouts (sciplex, Norman) mapped to genailab's drug/dose/cell-type columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from genailab.errors import ConfigError, SchemaMismatchError
from genailab.perturb import ObsKeys, PerturbationSchema, standardize_obs


def _adata(**columns) -> AnnData:
    n = len(next(iter(columns.values())))
    obs = pd.DataFrame(columns, index=[f"cell{i}" for i in range(n)])
    return AnnData(X=np.ones((n, 3), dtype=np.float32), obs=obs)


def test_sciplex_layout():
    adata = _adata(
        product_name=["Vehicle", "Dexamethasone", "(+)-JQ1", "Dexamethasone", "DMSO"],
        dose=[0.0, 10.0, 100.0, 1000.0, 0.0],
        cell_type=["A549", "A549", "K562", "MCF7", "MCF7"],
    )
    out = standardize_obs(adata, "sciplex")
    assert out.obs["drug"].tolist() == ["control", "Dexamethasone", "(plus)-JQ1", "Dexamethasone", "control"]
    assert out.obs["dose"].tolist() == [0.0, 10.0, 100.0, 1000.0, 0.0]
    assert out.obs["cell_type"].astype(str).tolist() == ["A549", "A549", "K562", "MCF7", "MCF7"]
    assert out.obs["is_control"].tolist() == [True, False, False, False, True]
    assert "product_name" in out.obs and "drug" not in adata.obs  # a copy, originals kept
    schema = PerturbationSchema.from_anndata(out, keys=ObsKeys())
    assert schema.drugs == ("(plus)-JQ1", "Dexamethasone") and schema.dose_scale == 100.0


def test_sciplex_layout_from_scperturb_columns():
    adata = _adata(perturbation=["control", "Dex"], dose_value=[0, 5], cell_line=["A549", "A549"])
    out = standardize_obs(adata, "sciplex")
    assert out.obs["drug"].tolist() == ["control", "Dex"] and out.obs["dose"].tolist() == [0.0, 5.0]


def test_norman_layout():
    adata = _adata(perturbation_name=["ctrl", "CEBPE+ctrl", "KLF1+CEBPE", "ctrl+SET", "control", "AHR_FEV"])
    out = standardize_obs(adata, "norman")
    assert out.obs["drug"].tolist() == ["control", "CEBPE", "CEBPE+KLF1", "SET", "control", "AHR+FEV"]
    assert out.obs["dose"].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert set(out.obs["cell_type"].astype(str)) == {"K562"}
    schema = PerturbationSchema.from_anndata(out, keys=ObsKeys())
    assert schema.drugs == ("AHR", "CEBPE", "FEV", "KLF1", "SET") and schema.max_drugs == 2


def test_layout_errors():
    with pytest.raises(SchemaMismatchError, match="product_name"):
        standardize_obs(_adata(compound=["a"], dose=[1.0], cell_type=["x"]), "sciplex")
    with pytest.raises(ConfigError, match="layout"):
        standardize_obs(_adata(compound=["a"]), "lincs")
