"""Real data that ships inside installed packages, so demos and tests need no download."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def pbmc68k_counts() -> AnnData:
    """700 PBMCs x 765 genes with integer UMI counts, from scanpy's bundled ``pbmc68k_reduced``.

    scanpy keeps that dataset's log-normalised values, ``log1p(counts / total * scale)``, in
    ``.raw``. Within a cell the smallest positive normalised value belongs to a count of 1, so
    ``expm1`` of the row divided by its smallest positive value gives the counts back; they are
    rounded (float32 storage leaves errors below 0.2 for the largest counts).

    Returns
    -------
    AnnData with ``layers['counts']`` (CSR counts, also in ``X``), ``obs['cell_type']`` (the
    ten ``bulk_labels``), scanpy's other ``obs`` columns, and ``obsm['X_umap']`` from scanpy.
    The library sizes cover these 765 genes only.
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    normalised = sp.csr_matrix(reduced.raw.X, dtype=np.float64)
    normalised.data = np.expm1(normalised.data)
    smallest = np.minimum.reduceat(normalised.data, normalised.indptr[:-1])  # every cell has counts
    normalised.data /= np.repeat(smallest, np.diff(normalised.indptr))
    counts = sp.csr_matrix(np.round(normalised), dtype=np.float32)
    counts.eliminate_zeros()
    obs = reduced.obs.copy()
    obs["cell_type"] = obs["bulk_labels"].astype("category")
    adata = AnnData(X=counts, obs=obs, var=reduced.raw.var.copy())
    adata.layers["counts"] = counts.copy()
    adata.obsm["X_umap"] = reduced.obsm["X_umap"].copy()
    adata.uns["genailab_dataset"] = {"name": "pbmc68k_reduced", "source": "scanpy.datasets.pbmc68k_reduced"}
    return adata
