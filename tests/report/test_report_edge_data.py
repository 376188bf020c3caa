"""write_report on awkward data: cells without a label or batch (NaN), and fewer genes than PCA components."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from genailab import VAE
from genailab import eval as ge
from genailab.data import simulate
from genailab.errors import InputDataError
from genailab.report import write_report
from genailab.report.evaluate import _de
from genailab.report.model_generation import generation_fidelity

pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside scanpy


@pytest.fixture(scope="module")
def partial():
    """A 3-epoch NB model of 300 simulated cells (3 types, 2 batches); every 2nd cell has no
    ``ct_partial`` label and every 5th no ``batch_partial`` (both NaN, neither a model condition)."""
    adata = simulate(300, 60, n_cell_types=3, n_batches=2, seed=0)
    labels, batch = adata.obs["cell_type"].astype(object), adata.obs["batch"].astype(object)
    labels.iloc[::2], batch.iloc[::5] = np.nan, np.nan
    adata.obs["ct_partial"], adata.obs["batch_partial"] = pd.Categorical(labels), pd.Categorical(batch)
    model = VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=4, hidden_dims=[32])
    model.fit(epochs=3, progress=False, seed=0)
    return adata, model


def test_unannotated_cells_are_left_out_of_label_and_batch_metrics(partial, tmp_path, caplog):
    """The report used to score NaN as a label called 'nan' (label silhouette 0.46 against 0.64 on
    the annotated cells) and as a batch."""
    adata, model = partial
    with caplog.at_level(logging.WARNING, logger="genailab.report.evaluate"):
        metrics = write_report(adata, model, tmp_path, label_key="ct_partial", batch_key="batch_partial", n_samples=5)
    latent = metrics["latent"]
    assert latent["n_cells_without_label"] == 150 and latent["n_cells_without_batch"] == 60
    assert json.loads((tmp_path / "metrics.json").read_text())["latent"]["n_cells_without_label"] == 150
    assert "150 of 300 cells have no 'ct_partial' (NaN) and are left out of the label metrics" in caplog.text
    assert "60 of 300 cells have no 'batch_partial'" in caplog.text
    assert "150 cells without a label left out of the label metrics" in (tmp_path / "index.html").read_text()

    z = model.get_latent(adata)
    labels, batch = adata.obs["ct_partial"], adata.obs["batch_partial"]
    labelled, batched = labels.notna().to_numpy(), batch.notna().to_numpy()
    both = labelled & batched
    assert latent["label_silhouette"] == pytest.approx(ge.label_silhouette(z[labelled], labels[labelled]))
    assert latent["label_silhouette"] > ge.label_silhouette(z, labels.astype(str)) + 0.1  # 'nan' as a type
    assert latent["clisi"] == pytest.approx(ge.clisi(z[labelled], labels[labelled]))
    assert latent["graph_connectivity"] == pytest.approx(ge.graph_connectivity(z[labelled], labels[labelled]))
    assert latent["ilisi"] == pytest.approx(ge.ilisi(z[batched], batch[batched]))
    assert latent["kbet"] == pytest.approx(ge.kbet(z[batched], batch[batched]))
    assert latent["batch_silhouette"] == pytest.approx(ge.batch_silhouette(z[both], batch[both], labels[both]))


def test_a_label_column_missing_everywhere_is_refused_before_writing(partial, tmp_path):
    adata, model = partial
    adata = adata.copy()
    adata.obs["unannotated"] = pd.Categorical([np.nan] * adata.n_obs, categories=["a"])
    with pytest.raises(InputDataError, match="label_key='unannotated' is missing .* in every cell") as error:
        write_report(adata, model, tmp_path / "out", label_key="unannotated", n_samples=5)
    assert error.value.argument == "label_key" and not (tmp_path / "out" / "metrics.json").exists()


def test_a_missing_label_is_never_a_de_group(partial):
    """With half the cells unannotated, 'nan' was the largest group and the DE check contrasted it."""
    adata, model = partial
    result = _de(model, adata, np.arange(adata.n_obs), label_key="ct_partial", seed=0)
    largest = adata.obs["ct_partial"].value_counts().index[:2]  # NaN not counted
    assert result["contrast"] == f"{largest[0]} vs {largest[1]}"
    assert "nan" not in result["contrast"]


def test_fidelity_and_report_run_at_their_defaults_on_15_genes(tmp_path):
    """simulate(200, 15): the default 20 components were cut to 15 genes, which a PCA of 15 genes
    cannot give ('n_comps=15 must be ... below ... 15'); now 14, and the report is complete."""
    adata = simulate(200, 15, n_cell_types=2, n_batches=2, n_markers=3, seed=0)
    model = VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=[16])
    model.fit(epochs=2, progress=False, seed=0)
    default = generation_fidelity(adata, model)["overall"]
    assert default["energy_distance"] == pytest.approx(generation_fidelity(adata, model, n_comps=14)["overall"]
                                                       ["energy_distance"])  # fmt: skip
    assert 0 <= default["classifier_auc"] <= 1
    metrics = write_report(adata, model, tmp_path, label_key="cell_type", batch_key="batch", n_samples=3)
    assert json.loads((tmp_path / "metrics.json").read_text())["generation"]["overall"] == pytest.approx(
        metrics["generation"]["overall"]
    )
    assert {"metrics.json", "index.html", "gene_agreement.png"} <= {p.name for p in tmp_path.iterdir()}


def test_cells_the_report_cannot_score_are_refused_before_writing(partial, tmp_path):
    """Empty cells failed late with the internal 'library must be one positive number', and 1 or 3
    cells with sklearn/scipy tracebacks, after the first figures were written."""
    import scipy.sparse as sp
    from click.testing import CliRunner

    from genailab.cli import main
    from genailab.report.model_generation import generate_like

    adata, model = partial
    empty = adata.copy()
    counts = empty.layers["counts"].toarray() if sp.issparse(empty.layers["counts"]) else empty.layers["counts"].copy()
    counts[[3, 7]] = 0
    empty.layers["counts"] = sp.csr_matrix(counts)
    with pytest.raises(InputDataError, match=r"2 of the 300 cells scored have zero total counts .*first: 'cell_3'"):
        write_report(empty, model, tmp_path / "empty")
    with pytest.raises(InputDataError, match="zero total counts"):
        generate_like(empty, model, indices=np.arange(10))
    with pytest.raises(InputDataError, match="has only 3 cell.s.; .* needs at least 16 cells"):
        write_report(adata[:3].copy(), model, tmp_path / "three")
    small = adata[:40].copy()
    small_model = VAE(small, likelihood="nb", layer="counts", latent_dim=2, hidden_dims=[8]).fit(epochs=1, progress=False)
    with pytest.raises(InputDataError, match=r"scores 4 cells \(validation cells.*5-fold cross-validation needs at least 5"):
        write_report(small, small_model, tmp_path / "few")
    assert not any((tmp_path / name).exists() for name in ("empty", "three", "few"))

    model.save(tmp_path / "run")
    adata[:1].copy().write_h5ad(tmp_path / "one.h5ad")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run"), str(tmp_path / "one.h5ad"), "--out",
                                       str(tmp_path / "report" / "one")])  # fmt: skip
    assert result.exit_code == 1 and "has only 1 cell(s)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "report").exists()
