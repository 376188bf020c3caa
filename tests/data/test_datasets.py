"""The embedded PBMC data: integer counts recovered exactly from scanpy's normalised values."""

from __future__ import annotations

import numpy as np
import scanpy as sc

from genailab.data import pbmc68k_counts


def test_pbmc68k_counts_are_integers_that_reproduce_scanpy_values():
    adata = pbmc68k_counts()
    assert adata.shape == (700, 765)
    counts = adata.layers["counts"]
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() >= 1
    assert adata.obs["cell_type"].nunique() == 10
    # Normalising the recovered counts the way scanpy did gives back the stored values up to a
    # per-cell scale (the target sum): log1p(c * s) must match for one s per cell.
    raw = sc.datasets.pbmc68k_reduced().raw.X.toarray()
    dense = counts.toarray().astype(np.float64)
    scale = np.expm1(raw).sum(1) / dense.sum(1)
    np.testing.assert_allclose(np.log1p(dense * scale[:, None]), raw, atol=2e-3)
