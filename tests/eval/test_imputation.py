"""scVI-style masking and the median L1 imputation score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from genailab.errors import ConfigError, InputDataError
from genailab.eval import imputation_median_l1, imputation_score, mask_counts


@pytest.fixture(scope="module")
def counts():
    """200 x 50 Poisson counts, about 40 % non-zero, with one explicitly stored zero."""
    matrix = sp.csr_matrix(np.random.default_rng(0).poisson(0.5, size=(200, 50)).astype(np.float32))
    matrix.data[0] = 0  # stored zero: must not count as a non-zero entry
    return matrix


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "anndata"])
def test_mask_counts_hides_exactly_ten_percent(counts, kind):
    original = counts.copy()
    inputs = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray(), "anndata": AnnData(counts)}
    masked, rows, cols, true_values = mask_counts(inputs[kind], fraction=0.1, seed=3)
    nnz = np.count_nonzero(counts.toarray())
    assert sp.isspmatrix_csr(masked)
    assert rows.size == cols.size == true_values.size == int(np.floor(0.1 * nnz + 0.5))
    dense, masked_dense = counts.toarray(), masked.toarray()
    np.testing.assert_array_equal(dense[rows, cols], true_values)
    assert np.all(true_values > 0) and np.all(masked_dense[rows, cols] == 0)
    assert len(set(zip(rows, cols))) == rows.size  # no entry hidden twice
    untouched = np.ones(dense.shape, dtype=bool)
    untouched[rows, cols] = False
    np.testing.assert_array_equal(masked_dense[untouched], dense[untouched])
    assert masked.nnz == nnz - rows.size  # nothing densified: only the non-zero entries are stored
    assert (counts != original).nnz == 0  # input unchanged


def test_mask_counts_is_seeded(counts):
    first, second = mask_counts(counts, seed=1), mask_counts(counts, seed=1)
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], mask_counts(counts, seed=2)[1])


def test_median_l1_matches_numpy():
    rng = np.random.default_rng(0)
    predicted, true_values = rng.gamma(2.0, size=101), rng.poisson(2.0, size=101) + 1.0
    assert imputation_median_l1(predicted, true_values) == pytest.approx(np.median(np.abs(predicted - true_values)))
    assert imputation_median_l1([1.0, 2.0, 10.0], [1.0, 4.0, 4.0]) == pytest.approx(2.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_imputation_score_reads_hidden_entries(counts, sparse):
    _, rows, cols, true_values = mask_counts(counts, seed=0)
    truth = counts.copy() if sparse else counts.toarray()
    assert imputation_score(truth, rows, cols, true_values=true_values) == 0.0
    shifted = counts.toarray() + 0.5
    assert imputation_score(shifted, rows, cols, true_values=true_values) == pytest.approx(0.5)


def test_bad_input_is_refused(counts):
    with pytest.raises(ConfigError, match="fraction"):
        mask_counts(counts, fraction=1.0)
    with pytest.raises(InputDataError, match="rounds to none"):
        mask_counts(sp.csr_matrix(np.eye(3)), fraction=0.1)
    with pytest.raises(InputDataError, match="1-D"):
        imputation_median_l1([1.0, 2.0], [1.0])
    with pytest.raises(InputDataError, match="outside"):
        imputation_score(np.zeros((2, 2)), [5], [0], true_values=[1.0])


def test_imputation_score_reads_dataframes_lists_and_refuses_negative_indices(counts):
    _, rows, cols, true_values = mask_counts(counts, seed=0)
    shifted = counts.toarray() + 0.5
    expected = np.median(np.abs(shifted[rows, cols] - true_values))
    frame = pd.DataFrame(shifted, index=[f"c{i}" for i in range(200)], columns=[f"g{j}" for j in range(50)])
    assert imputation_score(frame, rows, cols, true_values=true_values) == pytest.approx(expected)  # was KeyError
    assert imputation_score(shifted.tolist(), rows, cols, true_values=true_values) == pytest.approx(expected)
    with pytest.raises(InputDataError, match=r"rows must lie in 0\.\.199"):  # -1 used to wrap to the last cell
        imputation_score(shifted, rows - rows.min() - 1, cols, true_values=true_values)
    with pytest.raises(InputDataError, match=r"cols in 0\.\.49"):
        imputation_score(shifted, rows, -np.ones_like(cols), true_values=true_values)
    with pytest.raises(InputDataError, match="1-D integer"):
        imputation_score(shifted, rows.astype(float), cols, true_values=true_values)
