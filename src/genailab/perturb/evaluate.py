"""Honest metrics for predicted perturbations, and the held-out split protocols they are measured on.

All metrics compare populations in log-normalised space, ``log1p(counts / total * 1e4)``:

* ``r2_mean``: R2 of the predicted vs true mean expression over all genes. It is flattered by
  the genes' baseline levels, which any method gets right by copying the control cells;
* ``r2_delta``: R2 of the predicted vs true *change* from the control mean, the honest one: the
  no-change baseline scores <= 0 by construction;
* ``*_top_de``: the same on the ``n_top_genes`` genes with the largest true |change| (the
  differentially expressed genes of that cell type, drug and dose);
* ``energy``: energy distance between predicted and true cells in a PCA space fitted on the
  training cells (:func:`genailab.eval.energy_distance`).

R2 is the coefficient of determination ``1 - SS_res / SS_tot`` (not a squared correlation), so
it is negative for predictions worse than the true mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genailab.errors import ConfigError, InputDataError
from genailab.eval import energy_distance
from genailab.data.perturbation_schema import ObsKeys, cell_doses, require_columns

PROTOCOLS = ("combination", "dose", "pair")
ALL_CELLS = "all"  # the cell type of every cell when the data have no cell-type column


def log_normalize(matrix, *, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(x / total * target_sum)`` per cell as a dense float64 array (cells with no counts stay 0)."""
    dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    dense = dense.astype(np.float64)
    totals = dense.sum(1, keepdims=True)
    return np.log1p(np.divide(dense * target_sum, totals, out=np.zeros_like(dense), where=totals > 0))


def r2_score(true: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination of ``predicted`` for ``true`` (1-D, same length)."""
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    total = np.sum((true - true.mean()) ** 2)
    if total == 0:
        return float("nan")
    return float(1.0 - np.sum((true - predicted) ** 2) / total)


def perturbation_metrics(
    control: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    *,
    n_top_genes: int = 50,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    max_cells: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of one predicted population (see the module docstring).

    Parameters
    ----------
    control
        Log-normalised control cells of the cell type, (n_control, G): the reference for changes.
    true
        Log-normalised cells observed under the perturbation, (n_true, G).
    predicted
        Log-normalised predicted cells, (n_predicted, G).
    n_top_genes
        Genes with the largest true |mean change| used for the ``*_top_de`` metrics.
    embed
        Maps cells to the space of the energy distance (a fitted PCA); identity when None.
    max_cells
        Cells per sample for the energy distance (random subsample, fixed by ``seed``).
    """
    if not control.shape[1] == true.shape[1] == predicted.shape[1]:
        raise InputDataError("control, true and predicted cells must have the same genes.")
    if min(control.shape[0], true.shape[0], predicted.shape[0]) < 2:
        raise InputDataError("Each population needs at least two cells.")
    control_mean, true_mean, predicted_mean = control.mean(0), true.mean(0), predicted.mean(0)
    true_delta, predicted_delta = true_mean - control_mean, predicted_mean - control_mean
    top = np.argsort(-np.abs(true_delta), kind="stable")[: min(n_top_genes, true.shape[1])]
    rng = np.random.default_rng(seed)
    project = embed or (lambda x: x)

    def cells(x: np.ndarray) -> np.ndarray:
        kept = x[rng.choice(x.shape[0], max_cells, replace=False)] if x.shape[0] > max_cells else x
        return project(kept)

    return {
        "r2_mean": r2_score(true_mean, predicted_mean),
        "r2_mean_top_de": r2_score(true_mean[top], predicted_mean[top]),
        "r2_delta": r2_score(true_delta, predicted_delta),
        "r2_delta_top_de": r2_score(true_delta[top], predicted_delta[top]),
        "energy": energy_distance(cells(true), cells(predicted)),
    }


# -- held-out split protocols --------------------------------------------------------------------
Group = tuple[str, str, float]  # (cell type, drug label, dose)


@dataclass(frozen=True)
class HoldoutSplit:
    """Groups of cells kept out of training and predicted from control cells."""

    protocol: str
    groups: tuple[Group, ...]  # (cell type, drug label, dose) held out of training

    def test_mask(self, obs: pd.DataFrame, keys: ObsKeys) -> np.ndarray:
        """Cells of the held-out groups."""
        held = set(self.groups)
        return np.array([g in held for g in cell_groups(obs, keys)], dtype=bool)


def cell_types(obs: pd.DataFrame, keys: ObsKeys) -> np.ndarray:
    """Cell type per cell as text (:data:`ALL_CELLS` without a cell-type column)."""
    if keys.cell_type is None:
        return np.full(obs.shape[0], ALL_CELLS, dtype=object)
    require_columns(obs, [keys.cell_type])
    return obs[keys.cell_type].astype(str).to_numpy(dtype=object)


def cell_groups(obs: pd.DataFrame, keys: ObsKeys) -> list[Group]:
    """(cell type, drug label, dose) of every cell; controls have dose 0."""
    labels = obs[keys.drug].astype(str).to_numpy()
    return list(zip(cell_types(obs, keys), labels, cell_doses(obs, keys).tolist()))


def holdout_split(
    obs: pd.DataFrame, protocol: str, *, keys: ObsKeys = ObsKeys(), n_groups: int | None = None, seed: int = 0
) -> HoldoutSplit:
    """Choose what to hold out under one protocol.

    ``"combination"``
        Unseen (cell type, drug, dose): for ``n_groups`` single drugs (default all), one random
        cell type and dose among those whose drug is still seen at that dose in another cell type
        and in that cell type at another dose.
    ``"dose"``
        Unseen dose: the middle dose of ``n_groups`` single drugs (default all; needs 3+ doses),
        in every cell type and in every combination containing the drug.
    ``"pair"``
        Unseen combination: ``n_groups`` drug pairs (default all), in every cell type and dose;
        their drugs stay seen on their own.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not one of {PROTOCOLS}.")
    groups = pd.DataFrame(cell_groups(obs, keys), columns=["cell_type", "drug", "dose"]).drop_duplicates()
    drug_parts = groups["drug"].map(keys.drugs_of)
    singles = groups[drug_parts.map(len) == 1]
    rng = np.random.default_rng(seed)
    chooser = {"combination": _unseen_combinations, "dose": _unseen_doses, "pair": _unseen_pairs}[protocol]
    held = chooser(groups, singles, drug_parts, keys, n_groups, rng)
    if not held:
        raise ConfigError(f"The data offer nothing to hold out under protocol {protocol!r}; see holdout_split's docs.")
    return HoldoutSplit(protocol=protocol, groups=tuple(sorted(held)))


def _pick(options: list, n: int | None, rng: np.random.Generator) -> list:
    if n is None or n >= len(options):
        return options
    return [options[i] for i in sorted(rng.choice(len(options), n, replace=False))]


def _unseen_combinations(groups, singles, drug_parts, keys, n_groups, rng) -> list[Group]:
    held = []
    for drug in _pick(sorted(singles["drug"].unique()), n_groups, rng):
        rows = singles[singles["drug"] == drug]
        types, doses = rows["cell_type"].to_numpy(), rows["dose"].to_numpy()
        candidates = [
            (str(t), drug, float(x))
            for t, x in zip(types, doses)
            if ((types != t) & (doses == x)).any() and ((types == t) & (doses != x)).any()
        ]
        if candidates:
            held.append(candidates[rng.integers(len(candidates))])
    return held


def _unseen_doses(groups, singles, drug_parts, keys, n_groups, rng) -> list[Group]:
    held = []
    for drug in _pick(sorted(singles["drug"].unique()), n_groups, rng):
        doses = np.sort(singles.loc[singles["drug"] == drug, "dose"].unique())
        if doses.size < 3:
            raise ConfigError(f"{drug} has {doses.size} doses; the 'dose' protocol needs 3+ to hold out a middle one.")
        middle = float(doses[doses.size // 2])
        contains = drug_parts.map(lambda parts: drug in parts) & (groups["dose"] == middle)
        held += list(groups[contains].itertuples(index=False, name=None))
    return sorted(set(held))


def _unseen_pairs(groups, singles, drug_parts, keys, n_groups, rng) -> list[Group]:
    seen_alone = set(singles["drug"])
    pairs = sorted({d for d, p in zip(groups["drug"], drug_parts) if len(p) == 2 and set(p) <= seen_alone})
    chosen = set(_pick(pairs, n_groups, rng))
    return list(groups[groups["drug"].isin(chosen)].itertuples(index=False, name=None))
