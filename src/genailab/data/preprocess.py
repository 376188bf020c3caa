"""Scanpy-style preparation of raw counts for the models: filter, select genes, log-normalise.

The count models (nb, zinb) read the raw counts kept in ``layers['counts']``; the Gaussian
model reads the log-normalised ``X``.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from genailab.checks import check_number
from genailab.data.validation import cell_totals, check_expression
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError

logger = logging.getLogger(__name__)


def prepare_counts(
    adata: AnnData,
    *,
    layer: str | None = None,
    counts_layer: str = "counts",
    min_counts: int = 1,
    min_cells: int = 1,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    log_normalize: bool = True,
    target_sum: float = 1e4,
    library_key: str = "library_size",
) -> AnnData:
    """Return a filtered, gene-selected copy of ``adata`` with raw counts kept beside log data.

    ``adata`` itself is not modified (a backed AnnData is loaded into memory for the copy).

    Parameters
    ----------
    layer
        Where the raw integer counts are: a layer name, or ``None`` for ``X``.
    counts_layer
        Layer of the result that keeps the raw counts.
    min_counts, min_cells
        Drop cells with fewer than ``min_counts`` counts and genes seen in fewer than
        ``min_cells`` cells (``sc.pp.filter_cells`` / ``sc.pp.filter_genes``).
    n_top_genes
        Keep only this many highly variable genes, chosen on the raw counts with scanpy's
        ``flavor="seurat_v3"`` (needs scikit-misc), per batch when ``batch_key`` is given. Cells
        left with fewer than ``min_counts`` counts in these genes are dropped too.
    log_normalize
        Put ``log1p`` of counts scaled to ``target_sum`` per cell in ``X``
        (``sc.pp.normalize_total`` + ``sc.pp.log1p``); otherwise ``X`` holds the counts.
    library_key
        ``obs`` column for each cell's total count over the kept genes. Simulated data keep their
        true library sizes in ``obs['library_size']``; pass another key to keep those.

    Returns
    -------
    A new AnnData with ``layers[counts_layer]`` (raw counts, float32), ``X`` (log-normalised
    or counts), ``obs[library_key]``, scanpy's ``obs['n_counts']`` and ``var['n_cells']``,
    ``var['highly_variable']`` and scanpy's HVG statistics when ``n_top_genes`` is set, and
    ``uns['genailab_preprocess']`` with ``params`` (options that are not None) and the numbers
    of cells and genes removed.

    Examples
    --------
    >>> from genailab.data.simulate import simulate
    >>> adata = prepare_counts(simulate(500, 300, n_cell_types=3), n_top_genes=100, library_key="observed_library")
    >>> adata.shape
    (500, 100)
    """
    import scanpy as sc

    _check_options(
        adata, layer=layer, counts_layer=counts_layer, min_counts=min_counts, min_cells=min_cells,
        n_top_genes=n_top_genes, batch_key=batch_key, target_sum=target_sum, library_key=library_key,
    )  # fmt: skip
    out = adata.to_memory() if adata.isbacked else adata.copy()
    counts = out.layers[layer] if layer is not None else out.X
    check_expression(counts, counts=True, source=f"adata.{'X' if layer is None else f'layers[{layer!r}]'}")
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True) if sp.issparse(counts) else np.asarray(counts, dtype=np.float32)
    out.X = counts.copy()
    out.layers[counts_layer] = counts
    n_cells, n_genes = out.shape

    sc.pp.filter_cells(out, min_counts=min_counts)
    sc.pp.filter_genes(out, min_cells=min_cells)
    if n_top_genes is not None and out.n_vars > 0:
        _select_genes(out, n_top_genes=n_top_genes, counts_layer=counts_layer, batch_key=batch_key)
        sc.pp.filter_cells(out, min_counts=min_counts)
    if out.n_obs == 0 or out.n_vars == 0:
        raise InputDataError(
            f"no cells or genes are left after filtering (min_counts={min_counts}, min_cells={min_cells}); "
            "check that the data hold raw counts and lower the thresholds."
        )
    logger.info("kept %d of %d cells and %d of %d genes", out.n_obs, n_cells, out.n_vars, n_genes)

    out.obs[library_key] = cell_totals(out.layers[counts_layer]).astype(np.float32)
    if log_normalize:
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
    params = dict(
        layer=layer, counts_layer=counts_layer, min_counts=min_counts, min_cells=min_cells,
        n_top_genes=n_top_genes, hvg_flavor="seurat_v3" if n_top_genes is not None else None,
        batch_key=batch_key, log_normalize=log_normalize, target_sum=target_sum, library_key=library_key,
    )  # fmt: skip
    out.uns["genailab_preprocess"] = {
        "params": {key: value for key, value in params.items() if value is not None},  # h5ad cannot store None
        "n_cells_removed": n_cells - out.n_obs,
        "n_genes_removed": n_genes - out.n_vars,
    }
    return out


def _check_options(
    adata: AnnData, *, layer, counts_layer, min_counts, min_cells, n_top_genes, batch_key, target_sum, library_key
) -> None:
    if layer is not None and layer not in adata.layers:
        raise SchemaMismatchError(
            f"layer {layer!r} is not in adata.layers {list(adata.layers)}; name one, or layer=None to use X."
        )
    if layer is None and adata.X is None:
        raise InputDataError(
            f"adata.X is None, so there are no counts to read there; pass the layer that holds the raw counts"
            f"{_layer_hint(adata)}.",
            argument="layer",
        )
    if not adata.var_names.is_unique:
        repeated = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        raise InputDataError(
            f"adata.var_names repeat {repeated}; make them unique first with adata.var_names_make_unique() "
            "(or sum the repeated genes)."
        )
    if batch_key is not None and batch_key not in adata.obs:
        raise SchemaMismatchError(f"batch_key {batch_key!r} is not a column of adata.obs {list(adata.obs.columns)}.")
    names = (("counts_layer", counts_layer, "counts"), ("library_key", library_key, "library_size"))
    for name, value, example in names:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty name such as {example!r}, got {value!r}.", argument=name)
    check_number("n_top_genes", n_top_genes, integer=True, ge=1, allow_none=True, hint="None keeps every gene.")
    check_number("min_counts", min_counts, integer=True, ge=0)
    check_number("min_cells", min_cells, integer=True, ge=0)
    check_number("target_sum", target_sum, gt=0, hint="It is the total each cell is scaled to, e.g. 1e4.")


def _layer_hint(adata: AnnData) -> str:
    """``", e.g. layer='counts' (...)"`` naming a layer of ``adata``, or how to add one when it has none."""
    if not adata.layers:
        return " (adata.layers is empty: put the counts in adata.X or a layer first)"
    name = "counts" if "counts" in adata.layers else next(iter(adata.layers))
    return f", e.g. layer={name!r} (adata.layers has {list(adata.layers)})"


def _select_genes(adata: AnnData, *, n_top_genes: int, counts_layer: str, batch_key: str | None) -> None:
    """Subset ``adata`` in place to its ``n_top_genes`` most variable genes (seurat_v3 on counts)."""
    import scanpy as sc

    if n_top_genes >= adata.n_vars:
        logger.warning("n_top_genes=%d >= %d genes left; keeping all of them.", n_top_genes, adata.n_vars)
        adata.var["highly_variable"] = True
        return
    sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=n_top_genes, layer=counts_layer, batch_key=batch_key, subset=True
    )


def log_normalize(counts, *, target_sum: float = 1e4):
    """``log1p(counts / total * target_sum)`` per cell, as ``sc.pp.normalize_total`` + ``sc.pp.log1p``.

    The one log-normalisation of the package. ``counts`` is (n_cells, n_genes), sparse or dense;
    the result is of the same kind (CSR or ndarray), float64; cells with no counts stay 0.
    """
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        totals = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        out = sp.csr_matrix(sp.diags(scale) @ counts)
        out.data = np.log1p(out.data)
        return out
    dense = np.asarray(counts, dtype=np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(dense * target_sum, totals, out=np.zeros_like(dense), where=totals > 0))
