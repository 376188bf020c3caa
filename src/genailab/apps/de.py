"""Differential expression from the generative model, scVI's "change" mode.

For cells a of one group and b of the other, draw z from each cell's posterior and decode the
normalised expression (proportions) rho = f(z, c). At the ``cell`` level (scVI's change mode),
draws are paired across the groups at random and ``LFC = log2(rho_a + eps) - log2(rho_b + eps)``
per gene and pair, so the spread of LFC holds the cell-to-cell variation inside the groups. At the
``group`` level (as lvm-DE, Boyeau et al. 2023, compares populations), each posterior draw gives
the mean rho over a bootstrap sample of each group's cells and one LFC of the two means, so the
spread holds only the uncertainty about the groups' mean expression. The posterior probability of
differential expression is ``P(|LFC| > delta)``. Genes are called by the posterior expected false
discovery rate: sorted by that probability, the largest top set whose mean ``1 - P`` is at most
``fdr_target`` (scVI's ``fdr_target``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from genailab.apps._anndata import check_key_added, labelled_cells, record_params, require_count_model, require_obs_column
from genailab.checks import check_number
from genailab.data.schema import category_label, category_labels
from genailab.errors import ConfigError, InputDataError

LEVELS = ("cell", "group")
_DEFAULT_DRAWS = {"cell": 5, "group": 100}  # group level: one LFC per draw, so more draws


def differential_expression(
    adata: AnnData,
    model,
    *,
    groupby: str,
    group: str,
    reference: str = "rest",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    level: str = "cell",
    n_samples_per_cell: int | None = None,
    max_cells: int = 500,
    n_pairs: int = 5000,
    pseudocount: float = 1e-5,
    conditions: Mapping[str, object] | None = None,
    key_added: str = "genailab_de",
    seed: int = 0,
) -> pd.DataFrame:
    """Compare the model's normalised expression of two groups of cells, gene by gene.

    Parameters
    ----------
    adata
        Cells x genes with the model's layer and condition columns and ``obs[groupby]``.
    model
        A trained count :class:`~genailab.VAE` (nb or zinb).
    groupby
        ``obs`` column defining the groups (cluster, cell type, condition).
    group
        The group of interest; positive LFC means higher in ``group``.
    reference
        The group compared against, or ``"rest"`` for every other cell with a label (cells whose label is NaN join neither side).
    delta
        Smallest |log2 fold change| that counts as a change.
    fdr_target
        Posterior expected false discovery rate of the call list.
    level
        ``"cell"``: LFC between random pairs of single cells (scVI's change mode; genes must
        differ between most cells of the two groups, which is conservative for varied groups).
        ``"group"``: LFC between the groups' mean expression, one per posterior draw.
    n_samples_per_cell
        Posterior draws of z per cell; default 5 at the cell level, 100 at the group level.
    max_cells
        Cells drawn (without replacement) per group when a group is larger.
    n_pairs
        Cell level: random (group, reference) pairs of draws the LFC distribution is estimated from.
    pseudocount
        Added to proportions before the log (1e-5 = 0.1 counts per 10k).
    conditions
        Decode every cell under these conditions instead of its own (e.g. one batch).
    key_added
        ``uns`` key for the results and ``params``.
    seed
        Seeds the choice of cells, the posterior draws and the pairing.

    Returns
    -------
    DataFrame indexed by gene, sorted by ``proba_de`` (then |``lfc_mean``|), with ``lfc_mean``,
    ``lfc_median``, ``lfc_std``, ``proba_de``, ``bayes_factor`` (log odds of ``proba_de``),
    ``scale_group`` and ``scale_reference`` (mean proportions), ``is_de_fdr`` (the call list) and
    ``expected_fdr`` (of the top list down to each gene). The same table is stored in
    ``adata.uns[key_added]['results']`` beside ``adata.uns[key_added]['params']``.

    Examples
    --------
    >>> table = differential_expression(adata, model, groupby="cell_type", group="B", reference="T")  # doctest: +SKIP
    >>> table[table.is_de_fdr].head()  # doctest: +SKIP
    """
    if level not in LEVELS:
        raise ConfigError(f"level={level!r} is not one of {LEVELS}.")
    n_samples_per_cell = _DEFAULT_DRAWS[level] if n_samples_per_cell is None else n_samples_per_cell
    _check(delta=delta, fdr_target=fdr_target, n_samples_per_cell=n_samples_per_cell, max_cells=max_cells,
           n_pairs=n_pairs, pseudocount=pseudocount, seed=seed)  # fmt: skip
    check_key_added(key_added, None, where="uns")
    require_count_model(model)
    in_group, in_reference = _groups(adata, groupby, group, reference)
    rng = np.random.default_rng(seed)
    summarise = _cell_draws if level == "cell" else _group_means
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rho_group, rho_reference = (
            summarise(_posterior_draws(adata, model, mask, rng, n_samples_per_cell, max_cells, conditions), rng)
            for mask in (in_group, in_reference)
        )
    if level == "cell":
        rho_group = rho_group[rng.integers(rho_group.shape[0], size=n_pairs)]
        rho_reference = rho_reference[rng.integers(rho_reference.shape[0], size=n_pairs)]
    lfc = np.log2(rho_group + pseudocount) - np.log2(rho_reference + pseudocount)  # (n_pairs or n_draws, G)
    proba = np.mean(np.abs(lfc) > delta, axis=0)
    table = pd.DataFrame(
        {
            "lfc_mean": lfc.mean(axis=0),
            "lfc_median": np.median(lfc, axis=0),
            "lfc_std": lfc.std(axis=0),
            "proba_de": proba,
            "bayes_factor": np.log(proba + 1e-8) - np.log(1 - proba + 1e-8),
            "scale_group": rho_group.mean(axis=0),
            "scale_reference": rho_reference.mean(axis=0),
        },
        index=pd.Index(model.schema.gene_names, name="gene"),
    )
    table["_order"] = -np.abs(table["lfc_mean"])
    table = table.sort_values(["proba_de", "_order"], ascending=[False, True]).drop(columns="_order")
    table["expected_fdr"] = np.cumsum(1 - table["proba_de"].to_numpy()) / np.arange(1, len(table) + 1)
    table["is_de_fdr"] = table["expected_fdr"] <= fdr_target  # expected_fdr rises down the sorted list
    record_params(
        adata, key_added,
        dict(groupby=groupby, group=str(group), reference=str(reference), delta=delta, fdr_target=fdr_target,
             level=level, n_samples_per_cell=n_samples_per_cell, max_cells=max_cells, n_pairs=n_pairs,
             pseudocount=pseudocount, conditions=conditions, seed=seed, n_group=int(in_group.sum()),
             n_reference=int(in_reference.sum())),
        results=table,
    )  # fmt: skip
    return table


def _check(**options) -> None:
    check_number("delta", options["delta"], ge=0)
    check_number("fdr_target", options["fdr_target"], gt=0, lt=1)
    check_number("pseudocount", options["pseudocount"], gt=0)
    for name in ("n_samples_per_cell", "max_cells", "n_pairs"):
        check_number(name, options[name], integer=True, ge=1)
    check_number("seed", options["seed"], integer=True, ge=0)


def _groups(adata: AnnData, groupby: str, group: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
    require_obs_column(adata, groupby, argument="groupby")
    known = labelled_cells(adata, groupby, argument="groupby")  # NaN cells join neither side
    labels = np.where(known, category_labels(adata.obs[groupby]), None)  # 1, 1.0 and "1" are one group
    group_label = category_label(group)
    in_group = labels == group_label
    if reference == "rest" and "rest" in labels:
        raise ConfigError(
            f"obs[{groupby!r}] has a group called 'rest', so reference='rest' could mean it or every other cell; "
            f"rename that group (e.g. adata.obs[{groupby!r}] = adata.obs[{groupby!r}].replace('rest', 'rest_group')).",
            argument="reference",
        )
    in_reference = (known & ~in_group) if reference == "rest" else labels == category_label(reference)
    for name, mask, value in (("group", in_group, group), ("reference", in_reference, reference)):
        if not mask.any():
            raise InputDataError(
                f"{name} {value!r} has no cells in obs[{groupby!r}] (values: {sorted(set(labels[known]))[:20]})."
            )
    if group_label == category_label(reference):
        raise ConfigError("group and reference are the same; compare two different groups.")
    return in_group, in_reference


def _posterior_draws(adata, model, mask, rng, n_samples, max_cells, conditions) -> Iterator[np.ndarray]:
    """Decoded proportions, (n_cells, G), for each of ``n_samples`` posterior draws of up to ``max_cells`` cells."""
    rows = np.flatnonzero(mask)
    if rows.size > max_cells:
        rows = np.sort(rng.choice(rows, max_cells, replace=False))
    cells = adata[rows]
    z = model.get_latent(cells, n_samples=n_samples, seed=None)  # (S, n, L), from the caller's seeded stream
    c = model.encode_conditions(cells.obs, conditions)
    for draw in z:
        yield model.decode(draw, conditions=c, library=1.0)


def _cell_draws(draws: Iterator[np.ndarray], rng) -> np.ndarray:
    """Every cell's every draw, (S * n, G)."""
    return np.concatenate(list(draws))


def _group_means(draws: Iterator[np.ndarray], rng) -> np.ndarray:
    """Per draw, the mean over a bootstrap sample of the cells, (S, G)."""
    return np.stack([rho[rng.integers(rho.shape[0], size=rho.shape[0])].mean(axis=0) for rho in draws])
