"""Cell-type discovery: neighbours, UMAP and Leiden clusters on the latent, marker genes per cluster."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from genailab.apps._anndata import (
    check_key_added, key_or_keys, labelled_cells, model_counts, require_in_memory, require_obs_column,
)
from genailab.data.preprocess import log_normalize
from genailab.checks import check_number
from genailab.errors import ConfigError, InputDataError
from genailab.safe_write import atomic_file, check_output_file


def cluster(
    adata: AnnData,
    model,
    *,
    key_added: str = "leiden",
    latent_key: str = "X_genailab",
    resolution: float = 1.0,
    n_neighbors: int = 15,
    markers_key: str = "rank_genes_groups",
    plot: str | Path | None = None,
    color: Sequence[str] = (),
    labels_key: str | None = None,
    seed: int = 0,
) -> None:
    """Embed with the model, cluster with scanpy (kNN graph, UMAP, Leiden) and rank marker genes.

    Marker genes are ranked per cluster against the rest (Wilcoxon, ``sc.tl.rank_genes_groups``)
    on log-normalised counts (``log1p`` counts per 10k of the model's layer; for a Gaussian model
    the layer itself), so they can be read as in any scanpy workflow.

    Parameters
    ----------
    adata
        Cells x genes with the model's layer and condition columns.
    model
        A trained :class:`~genailab.VAE`.
    key_added
        ``obs`` column of the clusters; ``uns[key_added]['params']`` records the options.
    latent_key
        ``obsm`` key for the latent posterior means.
    resolution
        Leiden resolution (higher: more clusters).
    n_neighbors
        Neighbours per cell in the kNN graph.
    markers_key
        ``uns`` key of the marker ranking (read it with ``sc.get.rank_genes_groups_df``).
    plot
        Write a UMAP figure (PNG) here: one panel per ``color`` column, then the clusters.
    color
        ``obs`` columns to show beside the clusters in ``plot`` (e.g. known cell types, batch).
    labels_key
        ``obs`` column of known cell types: the clusters' ARI and NMI against it are recorded, and,
        as in scIB, those of the Leiden resolution among 0.1, 0.2, ..., 2.0 with the best NMI.
    seed
        Random state of the neighbour search, UMAP and Leiden.

    Returns
    -------
    Nothing; sets ``adata.obsm[latent_key]``, scanpy's ``obsp['connectivities']``,
    ``obsp['distances']``, ``uns['neighbors']`` and ``obsm['X_umap']``, ``adata.obs[key_added]``,
    ``adata.uns[markers_key]`` and ``adata.uns[key_added]['params']``; when ``adata`` holds the
    model's genes in its order, ``adata.layers['genailab_log1p_cp10k']``, the log-normalised values
    the markers are ranked on; with ``labels_key``,
    ``adata.uns[key_added]['scores']``: ``ari``, ``nmi`` at ``resolution`` and ``best_ari``,
    ``best_nmi``, ``best_n_clusters`` at ``best_resolution``.

    Examples
    --------
    >>> cluster(adata, model, resolution=0.8, plot="umap.png", color=["cell_type"])  # doctest: +SKIP
    >>> sc.get.rank_genes_groups_df(adata, group="0").head()  # doctest: +SKIP
    """
    import scanpy as sc

    check_number("resolution", resolution, gt=0)
    check_number("n_neighbors", n_neighbors, integer=True, ge=2, le=max(2, adata.n_obs - 1))
    check_number("seed", seed, integer=True, ge=0)
    require_in_memory(adata, "cluster")
    color = key_or_keys(color)
    check_key_added(key_added, model, where="obs")
    if labels_key is not None and labels_key == key_added:
        raise ConfigError(f"labels_key={labels_key!r} is also key_added: the clusters would replace the labels they "
                          "are scored against; choose another key_added.")  # fmt: skip
    scanpy_keys = {"neighbors", "umap"}  # uns keys the neighbour graph and UMAP write and read back
    if key_added in scanpy_keys or markers_key in scanpy_keys | {key_added}:
        clash = key_added if key_added in scanpy_keys else markers_key
        raise ConfigError(f"{clash!r} names two results in adata.uns (the clusters' params, the marker ranking, "
                          f"scanpy's {sorted(scanpy_keys)}); give key_added and markers_key names of their own.")
    if plot is not None:
        check_output_file(plot)  # before the work
        _check_figure_format(Path(plot))
    if labels_key is not None:
        require_obs_column(adata, labels_key, argument="labels_key")
    missing = [c for c in color if c not in adata.obs]
    if missing:
        raise InputDataError(
            f"Columns {missing} are not in adata.obs (named in `color`); choose from {list(adata.obs.columns)[:20]}.",
            argument="color",
        )
    adata.obsm[latent_key] = model.get_latent(adata)
    # exact neighbours: scanpy's approximate (PyNNDescent) path above 8192 cells fails with scipy >= 1.15
    sc.pp.neighbors(adata, use_rep=latent_key, n_neighbors=n_neighbors, random_state=seed, transformer="sklearn")
    sc.tl.umap(adata, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, key_added=key_added, flavor="igraph",
                 n_iterations=2, directed=False)  # fmt: skip
    adata.uns[markers_key] = _markers(adata, model, key_added)
    n_clusters = int(adata.obs[key_added].nunique())
    adata.uns[key_added]["params"].update(
        latent_key=latent_key, n_neighbors=n_neighbors, markers_key=markers_key, seed=seed, n_clusters=n_clusters
    )
    if labels_key is not None:
        adata.uns[key_added]["scores"] = _label_agreement(adata, labels_key, key_added, latent_key=latent_key)
    if plot is not None:
        _plot_umap(adata, [*color, key_added], Path(plot))


def _label_agreement(adata: AnnData, labels_key: str, key_added: str, *, latent_key: str) -> dict:
    """ARI/NMI of the clusters against the labels, and of the best resolution of scIB's sweep (on the
    same kNN graph: same latent, neighbours and seed)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from genailab.eval import leiden_ari_nmi_best_resolution

    params = adata.uns[key_added]["params"]
    known = labelled_cells(adata, labels_key)
    labels = adata.obs[labels_key].astype(str).to_numpy()[known]
    clusters = adata.obs[key_added].to_numpy()[known]
    best = leiden_ari_nmi_best_resolution(
        np.asarray(adata.obsm[latent_key])[known], labels, n_neighbors=params["n_neighbors"], seed=params["seed"]
    )
    return {
        "labels_key": labels_key,
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "resolution": float(params["resolution"]),
        "best_ari": best["ari"],
        "best_nmi": best["nmi"],
        "best_n_clusters": best["n_clusters"],
        "best_resolution": best["resolution"],
    }


MARKER_LAYER = "genailab_log1p_cp10k"  # the values the markers are ranked on, kept so the params stay true


def _markers(adata: AnnData, model, groupby: str) -> dict:
    """scanpy's Wilcoxon ranking of every cluster (of two cells or more) against the rest, on
    log-normalised counts (count models) or the model's values (Gaussian). When ``adata`` has the
    model's genes in its order, those values are stored as ``layers[MARKER_LAYER]`` and the ranking
    runs on that layer, so ``params['layer']`` says what was ranked and scanpy's plots find it."""
    import scanpy as sc

    values = (
        log_normalize(model_counts(adata, model)) if model.config.is_count_model else model.schema.expression(adata)
    )
    sizes = adata.obs[groupby].value_counts()
    groups = [str(g) for g in sizes.index[sizes >= 2]]
    if len(groups) < 2:
        fix = "lower `resolution`" if (sizes == 1).sum() > sizes.size // 2 else "raise `resolution`"
        shown = ", ".join(f"{name}: {int(n)}" for name, n in sizes.head(5).items())
        raise InputDataError(
            f"Leiden found {sizes.size} cluster(s) ({shown}{', ...' if sizes.size > 5 else ''} cells) but fewer than "
            f"two of two cells or more, so there are no marker genes to rank; {fix}.", argument="resolution"
        )
    same_genes = list(map(str, adata.var_names)) == list(model.schema.gene_names)
    target = adata if same_genes else AnnData(
        X=sp.csr_matrix(values.shape), obs=adata.obs[[groupby]].copy(), var=pd.DataFrame(index=list(model.schema.gene_names))
    )  # fmt: skip
    target.layers[MARKER_LAYER] = values
    sc.tl.rank_genes_groups(target, groupby, groups=sorted(groups, key=_natural), method="wilcoxon",
                            layer=MARKER_LAYER, use_raw=False, key_added="_genailab_markers")  # fmt: skip
    return target.uns.pop("_genailab_markers")


def _natural(label: str):
    return (0, int(label)) if label.isdigit() else (1, label)


def _check_figure_format(path: Path) -> None:
    """Refuse a ``plot`` path whose suffix matplotlib cannot write (it would fail after the clustering)."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"plot={str(path)!r} must end in a figure format, e.g. .png, .pdf or .svg (supported: "
                          f"{', '.join(sorted(formats))}).", argument="plot")


def _plot_umap(adata: AnnData, columns: list[str], path: Path) -> None:
    import scanpy as sc
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(columns), 5))
    for ax, column in zip(np.atleast_1d(fig.subplots(1, len(columns))), columns):
        sc.pl.umap(adata, color=column, ax=ax, show=False, title=column,
                   legend_loc="on data" if column == columns[-1] else "right margin")  # fmt: skip
    fig.tight_layout()
    with atomic_file(path) as handle:  # never through a link planted at the name; no empty file on a full disk
        fig.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
