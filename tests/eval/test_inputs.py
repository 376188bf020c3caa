"""The shared input checks: a missing label or batch (NaN, None, pandas' NA) is refused by every
metric with one message naming the argument, instead of a wrong number or a raw numpy/sklearn error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genailab import eval as ge
from genailab.errors import InputDataError

N_CELLS = 200


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N_CELLS, 5)), rng.choice(["a", "b", "c"], N_CELLS), rng.choice(["x", "y"], N_CELLS)


def _with_missing(values: np.ndarray, kind: str):
    """``values`` with the first 5 cells missing, as an object Series, a float array or a Categorical."""
    if kind == "float":
        values = np.where(values == values[0], 1.0, 2.0)
    missing = pd.Series(values, dtype=float if kind == "float" else object)
    missing[:5] = None if kind == "none" else np.nan
    return pd.Categorical(missing) if kind == "categorical" else missing


BATCH_METRICS = {
    "kbet": lambda x, batch, labels: ge.kbet(x, batch),
    "ilisi": lambda x, batch, labels: ge.ilisi(x, batch),
    "knn_batch_entropy": lambda x, batch, labels: ge.knn_batch_entropy(x, batch),
    "knn_batch_inverse_simpson": lambda x, batch, labels: ge.knn_batch_inverse_simpson(x, batch),
    "batch_silhouette": ge.batch_silhouette,
    "kbet_per_label": ge.kbet_per_label,
    "kbet_label_table": ge.kbet_label_table,
}
LABEL_METRICS = {
    "lisi": lambda x, labels: ge.lisi(x, labels),
    "clisi": lambda x, labels: ge.clisi(x, labels),
    "graph_connectivity": lambda x, labels: ge.graph_connectivity(x, labels),
    "label_silhouette": ge.label_silhouette,
    "leiden_ari_nmi": lambda x, labels: ge.leiden_ari_nmi(x, labels),
    "leiden_ari_nmi_best_resolution": lambda x, labels: ge.leiden_ari_nmi_best_resolution(x, labels),
}


@pytest.mark.parametrize("kind", ["object", "none", "float", "categorical"])
@pytest.mark.parametrize("metric", sorted(BATCH_METRICS))
def test_missing_batch_is_refused(data, metric, kind):
    """knn_batch_entropy used to return 0.61 here (NaN neighbours counted in no batch, yet log(3)
    batches) against 0.95 on the annotated cells; others raised a raw TypeError or ValueError, and
    kbet_per_label scored NaN as a batch."""
    latent, labels, batch = data
    with pytest.raises(InputDataError, match="batch has missing values .* in 5 of 200 cells; drop those") as error:
        BATCH_METRICS[metric](latent, _with_missing(batch, kind), labels)
    assert error.value.argument == "batch"


@pytest.mark.parametrize("kind", ["object", "none", "categorical"])
@pytest.mark.parametrize("metric", sorted(LABEL_METRICS) + ["batch_silhouette", "kbet_per_label"])
def test_missing_labels_are_refused(data, metric, kind):
    latent, labels, batch = data
    labels = _with_missing(labels, kind)
    with pytest.raises(InputDataError, match="labels has missing values .* in 5 of 200 cells") as error:
        if metric in LABEL_METRICS:
            LABEL_METRICS[metric](latent, labels)
        else:
            BATCH_METRICS[metric](latent, batch, labels)
    assert error.value.argument == "labels"



def test_named_genes_are_matched_by_name_not_position():
    """Inputs that name their genes (Series index, AnnData var_names, DataFrame columns) are compared
    gene by gene: a DE table sorted by probability against truth in var order scored precision 0.71
    and recall 0.9 instead of 1 and 1, and two AnnData with reversed genes a moment Pearson of -0.18."""
    from anndata import AnnData

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(40)]
    scores = pd.Series(rng.normal(size=40), index=genes)
    shuffled = scores.sample(frac=1.0, random_state=1)
    assert ge.top_k_overlap(scores, shuffled, k=10) == 1.0
    truth = pd.Series(np.arange(40) < 8, index=genes)
    assert ge.precision_recall(truth.sample(frac=1.0, random_state=2), truth) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert ge.top_k_overlap(scores.to_numpy(), pd.Series(scores.to_numpy()), k=10) == 1.0  # unnamed: by position
    real = AnnData(rng.poisson(rng.gamma(2.0, 2.0, size=40), size=(200, 40)).astype(np.float32))
    real.var_names = genes
    reversed_genes = real[:, genes[::-1]].copy()
    assert ge.gene_moment_agreement(real, reversed_genes)["mean_pearson"] == pytest.approx(1.0)
    other = real.copy()
    other.var_names = [f"h{i}" for i in range(40)]
    with pytest.raises(InputDataError, match="name different genes"):
        ge.gene_moment_agreement(real, other)
    with pytest.raises(InputDataError, match="name different genes"):
        ge.top_k_overlap(scores, pd.Series(scores.to_numpy(), index=other.var_names), k=5)


def test_a_sparse_matrix_with_unsorted_indices_is_read_not_scrambled():
    """scipy shares index arrays across a dtype change: sorting the float64 copy's indices (as its
    arithmetic does) reordered the caller's float32 indices under unchanged values, so a second
    metric on the same matrix saw other numbers (energy distance 12.4 then 6.4)."""
    import scipy.sparse as sp

    from genailab.data.preprocess import log_normalize

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(60, 12)).astype(np.float32))[:, ::-1]  # indices unsorted
    other = sp.csr_matrix(rng.poisson(2.0, size=(40, 12)).astype(np.float32))[:, ::-1]
    assert not counts.has_sorted_indices
    before = counts.toarray()
    first = ge.gene_moment_agreement(counts, other)
    np.testing.assert_array_equal(counts.toarray(), before)
    assert ge.gene_moment_agreement(counts, other) == pytest.approx(first)
    assert ge.gene_moment_agreement(before, other.toarray()) == pytest.approx(first)
    log_normalize(counts)
    np.testing.assert_array_equal(counts.toarray(), before)
