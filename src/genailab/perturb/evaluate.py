"""Honest metrics for predicted perturbations, and the held-out split protocols they are measured on.

All metrics compare populations in log-normalised space, ``log1p(counts / total * 1e4)``, one
held-out group (cell type, drug label, dose) at a time; benchmarks average them over groups.

* ``r2_mean`` / ``pearson_mean``: predicted vs true mean expression over all genes. Flattered by
  the genes' baseline levels, which any method gets right by copying the control cells;
* ``r2_delta`` / ``pearson_delta``: predicted vs true *change* from control (see below), the
  honest ones: the no-change baseline scores R2 <= 0 by construction (its Pearson is undefined, NaN);
* ``*_top_de``: the same on the ``n_top_genes`` genes with the largest true |change|;
* ``pearson_centred``: Systema's centred delta (Viñas Torné et al., Nat. Biotech. 2025): change
  from the mean of the perturbed training cells of the group's cell type instead of the controls,
  so that a method is not rewarded for the effect every perturbation shares;
* ``r2_delta_weighted``: delta R2 with gene weights ``|true change| / sum |true change|``, so the
  genes that move count most and unmoved genes cannot dominate;
* ``direction_top_de``: share of the top DE genes whose predicted change has the true sign;
* ``energy``: energy distance between predicted and true cells in a PCA space fitted on the
  training cells (:func:`genailab.eval.energy_distance`); lower is better;
* ``centroid_accuracy`` (computed across the groups of a split by the benchmark): 1 when the
  predicted centroid is nearer its own true centroid than any other held-out group's.

R2 is the coefficient of determination ``1 - SS_res / SS_tot`` (not a squared correlation), so
it is negative for predictions worse than the true mean.

**Two references, no shared cells.** The true change is the held-out cells' mean minus the mean
of *reference* control cells (:func:`reference_controls`: a seeded third of each cell type's
controls) that no method trains on or is given; a predicted change is the prediction's mean minus
the mean of the control cells it was made from (``predicted_from``). So the truth is estimated
from cells no method saw and shares no sampling error with any prediction. Measured from one
control mean that the methods also use, it did: the true change (held-out mean - control mean)
and an additive baseline's (treated training mean - the same control mean) carry the same error
of that mean, a counterfactual of the control cells (its change is the fold change it applies)
does not, and the top DE genes, picked by the largest true |change|, are largely the genes where
that error is large. On 3,000 semi-synthetic PBMCs the true fold change applied to the control
cells then scored a top-50 delta R2 of 0.363 on an unseen middle dose, below the additive
baseline's 0.425. Measuring the predictions from the reference as well (every change shares its
error) removes the bias but rewards it in every method: no change then scores a top-50 delta R2
of 0.375 and a top-50 delta Pearson of 0.69 on PBMC unseen (cell type, drug). With two references no
change scores R2 <= 0 by construction, as before, and its Pearson is undefined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genailab.checks import check_number
from genailab.data import preprocess
from genailab.data.perturbation_schema import ObsKeys, cell_doses, require_columns
from genailab.errors import ConfigError, InputDataError
from genailab.eval import energy_distance

PROTOCOLS = ("combination", "dose", "dose_extrapolation", "pair", "cell_type")
ALL_CELLS = "all"  # the cell type of every cell when the data have no cell-type column
REFERENCE_FRACTION = 1 / 3  # share of each cell type's controls kept apart as the reference of changes


def log_normalize(matrix, *, target_sum: float = 1e4) -> np.ndarray:
    """:func:`genailab.data.preprocess.log_normalize` as a dense float64 array, for population metrics."""
    values = preprocess.log_normalize(matrix, target_sum=target_sum)
    return values.toarray() if sp.issparse(values) else values


def r2_score(true: np.ndarray, predicted: np.ndarray, *, weights: np.ndarray | None = None) -> float:
    """(Weighted) coefficient of determination of ``predicted`` for ``true`` (1-D, same length)."""
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    w = np.ones_like(true) if weights is None else np.asarray(weights, dtype=np.float64)
    total = np.sum(w * (true - np.sum(w * true) / np.sum(w)) ** 2)
    if total == 0:
        return float("nan")
    return float(1.0 - np.sum(w * (true - predicted) ** 2) / total)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant."""
    a, b = np.asarray(a, dtype=np.float64) - np.mean(a), np.asarray(b, dtype=np.float64) - np.mean(b)
    norm = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / norm) if norm > 0 else float("nan")


def top_de_genes(control_mean: np.ndarray, true_mean: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Indices of the ``n_top_genes`` genes with the largest true |mean change| (ties: lower index first)."""
    return np.argsort(-np.abs(true_mean - control_mean), kind="stable")[: min(n_top_genes, true_mean.size)]


def mean_metrics(
    control_mean: np.ndarray,
    true_mean: np.ndarray,
    predicted_mean: np.ndarray,
    top: np.ndarray,
    *,
    predicted_from_mean: np.ndarray | None = None,
) -> dict[str, float]:
    """The delta metrics that need only population means (G,); ``top`` the DE genes' indices.

    The true change is measured from ``control_mean``, the predicted one from ``predicted_from_mean``
    (the mean of the cells the prediction was made from; default ``control_mean``).
    """
    origin = control_mean if predicted_from_mean is None else predicted_from_mean
    true_delta, predicted_delta = true_mean - control_mean, predicted_mean - origin
    return {
        "r2_delta": r2_score(true_delta, predicted_delta),
        "r2_delta_top_de": r2_score(true_delta[top], predicted_delta[top]),
        "pearson_delta": pearson(true_delta, predicted_delta),
        "pearson_delta_top_de": pearson(true_delta[top], predicted_delta[top]),
    }


def perturbation_metrics(
    control: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    *,
    predicted_from: np.ndarray | None = None,
    perturbed_mean: np.ndarray | None = None,
    n_top_genes: int = 50,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    max_cells: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of one predicted population (see the module docstring).

    Parameters
    ----------
    control
        Log-normalised control cells of the cell type, (n_control, G): the reference of the true
        change (and of the top DE genes). For a fair score, cells that no method saw or was given
        (:func:`reference_controls`).
    true
        Log-normalised cells observed under the perturbation, (n_true, G).
    predicted
        Log-normalised predicted cells, (n_predicted, G).
    predicted_from
        Log-normalised control cells the prediction was made from, (n_input, G): the reference of
        the predicted change. None: ``control`` (the prediction was made from those cells).
    perturbed_mean
        Mean of the perturbed training cells of the group's cell type (G,), the reference of
        ``pearson_centred``; without it that metric is NaN.
    n_top_genes
        Genes with the largest true |mean change| used for the ``*_top_de`` metrics.
    embed
        Maps cells to the space of the energy distance (a fitted PCA); identity when None.
    max_cells
        Cells per sample for the energy distance (random subsample, fixed by ``seed``).
    """
    given = control if predicted_from is None else np.asarray(predicted_from)
    if not control.shape[1] == true.shape[1] == predicted.shape[1] == given.shape[1]:
        raise InputDataError("control, true, predicted and predicted_from cells must have the same genes.")
    if min(control.shape[0], true.shape[0], predicted.shape[0], given.shape[0]) < 2:
        raise InputDataError("Each population needs at least two cells.")
    control_mean, true_mean, predicted_mean = control.mean(0), true.mean(0), predicted.mean(0)
    origin = given.mean(0)
    true_delta, predicted_delta = true_mean - control_mean, predicted_mean - origin
    top = top_de_genes(control_mean, true_mean, n_top_genes)
    rng = np.random.default_rng(seed)
    project = embed or (lambda x: x)

    def cells(x: np.ndarray) -> np.ndarray:
        kept = x[rng.choice(x.shape[0], max_cells, replace=False)] if x.shape[0] > max_cells else x
        return project(kept)

    centred = (
        pearson(true_mean - perturbed_mean, predicted_mean - perturbed_mean) if perturbed_mean is not None else np.nan
    )
    return {
        "r2_mean": r2_score(true_mean, predicted_mean),
        "r2_mean_top_de": r2_score(true_mean[top], predicted_mean[top]),
        "pearson_mean": pearson(true_mean, predicted_mean),
        "pearson_mean_top_de": pearson(true_mean[top], predicted_mean[top]),
        **mean_metrics(control_mean, true_mean, predicted_mean, top, predicted_from_mean=origin),
        "r2_delta_weighted": r2_score(true_delta, predicted_delta, weights=np.abs(true_delta)),
        "pearson_centred": centred,
        "direction_top_de": float(np.mean(np.sign(predicted_delta[top]) == np.sign(true_delta[top]))),
        "energy": energy_distance(cells(true), cells(predicted)),
    }


def centroid_accuracy(predicted_means: np.ndarray, true_means: np.ndarray) -> np.ndarray:
    """Per group, 1.0 when its predicted centroid is nearest (Euclidean) its own true centroid.

    ``predicted_means`` and ``true_means`` are (n_groups, G), row i of both for group i; with
    fewer than two groups there is nothing to confuse and every entry is NaN.
    """
    n = true_means.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    distances = np.linalg.norm(predicted_means[:, None, :] - true_means[None, :, :], axis=-1)  # (n, n)
    return (np.argmin(distances, axis=1) == np.arange(n)).astype(np.float64)


# -- held-out split protocols --------------------------------------------------------------------
Group = tuple[str, str, float]  # (cell type, drug label, dose)


@dataclass(frozen=True)
class HoldoutSplit:
    """Groups of cells kept out of training and predicted from control cells."""

    protocol: str
    groups: tuple[Group, ...]  # (cell type, drug label, dose) held out of training

    def test_mask(self, obs: pd.DataFrame, keys: ObsKeys = ObsKeys()) -> np.ndarray:
        """Cells of the held-out groups, (n_cells,) bool; ``keys`` names the obs columns, as elsewhere."""
        held = set(self.groups)
        return np.array([g in held for g in cell_groups(obs, keys)], dtype=bool)


def reference_controls(
    obs: pd.DataFrame, *, keys: ObsKeys = ObsKeys(), fraction: float = REFERENCE_FRACTION, seed: int = 0
) -> np.ndarray:
    """Mask of the reference control cells, (n_cells,): ``round(fraction * n)`` of the ``n``
    control cells of each cell type, drawn at random (fixed by ``seed``, independent of any split).

    Changes are measured from their mean, and they are kept out of training and out of the
    prediction inputs (see the module docstring for why).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction} must be strictly between 0 and 1.")
    rng = np.random.default_rng(seed)
    types, control = cell_types(obs, keys), keys.is_control(obs)
    mask = np.zeros(obs.shape[0], dtype=bool)
    for cell_type in sorted(set(types[control])):
        rows = np.flatnonzero(control & (types == cell_type))
        mask[rng.choice(rows, int(round(fraction * rows.size)), replace=False)] = True
    return mask


def cell_types(obs: pd.DataFrame, keys: ObsKeys) -> np.ndarray:
    """Cell type per cell as text (:data:`ALL_CELLS` without a cell-type column)."""
    if keys.cell_type is None:
        return np.full(obs.shape[0], ALL_CELLS, dtype=object)
    require_columns(obs, keys, ["cell_type"])
    return obs[keys.cell_type].astype(str).to_numpy(dtype=object)


def cell_groups(obs: pd.DataFrame, keys: ObsKeys) -> list[Group]:
    """(cell type, drug label, dose) of every cell; controls have dose 0."""
    labels = obs[keys.drug].astype(str).to_numpy()
    return list(zip(cell_types(obs, keys), labels, cell_doses(obs, keys).tolist()))


def holdout_split(
    obs: pd.DataFrame,
    protocol: str,
    *,
    keys: ObsKeys = ObsKeys(),
    n_groups: int | None = None,
    pairs: Sequence[str] | None = None,
    seed: int = 0,
) -> HoldoutSplit:
    """Choose what to hold out under one protocol.

    ``"combination"``
        Unseen (cell type, drug): for ``n_groups`` single drugs (default all), one random cell type
        in which the drug is held out at *every* dose, alone and in combinations; the drug stays
        seen in other cell types and the cell type stays seen under other drugs.
    ``"dose"``
        Unseen dose inside the seen range (interpolation): the middle dose of ``n_groups`` single
        drugs (default all; needs 3+ doses), in every cell type and combination containing the drug.
    ``"dose_extrapolation"``
        Unseen dose above the seen range: the highest dose of each drug (needs 2+ doses), likewise.
    ``"pair"``
        Unseen combinations whose drugs are seen alone: ``pairs`` (labels) or ``n_groups`` random
        pairs (default all), in every cell type and dose.
    ``"cell_type"``
        Unseen cell type: every treated cell of one random cell type (its controls stay), for
        drugs seen in the other cell types.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not one of {PROTOCOLS}.")
    check_number("n_groups", n_groups, integer=True, ge=1, allow_none=True, hint="None holds out every group.")
    require_columns(obs, keys, ["drug", "dose", "cell_type"])
    groups = pd.DataFrame(cell_groups(obs, keys), columns=["cell_type", "drug", "dose"]).drop_duplicates()
    groups = groups[groups["drug"] != keys.control]
    drug_parts = groups["drug"].map(keys.drugs_of)
    rng = np.random.default_rng(seed)
    if protocol == "combination":
        held = _unseen_cell_drug(groups, drug_parts, n_groups, rng)
    elif protocol in ("dose", "dose_extrapolation"):
        held = _unseen_doses(groups, drug_parts, n_groups, rng, extrapolate=protocol == "dose_extrapolation")
    elif protocol == "pair":
        held = _unseen_pairs(groups, drug_parts, n_groups, pairs, rng, keys)
    else:
        held = _unseen_cell_type(groups, rng)
    if not held:
        raise ConfigError(
            f"The data offer nothing to hold out under protocol {protocol!r} (e.g. 'pair' needs drug pairs whose "
            "drugs are also given alone); see holdout_split's docs."
        )
    # once each: a pair whose two drugs are both held out in one cell type is found under each drug
    return HoldoutSplit(protocol=protocol, groups=tuple(sorted(set(held))))


def _pick(options: list, n: int | None, rng: np.random.Generator) -> list:
    if n is None or n >= len(options):
        return options
    return [options[i] for i in sorted(rng.choice(len(options), n, replace=False))]


def _rows(frame: pd.DataFrame) -> list[Group]:
    return [(str(t), str(d), float(x)) for t, d, x in frame.itertuples(index=False, name=None)]


def _unseen_cell_drug(groups, drug_parts, n_groups, rng) -> list[Group]:
    singles = groups[drug_parts.map(len) == 1]
    seen = set(zip(singles["cell_type"], singles["drug"]))  # (cell type, drug) pairs left in training
    held = []
    for drug in _pick(sorted(singles["drug"].unique()), n_groups, rng):
        types = sorted(singles.loc[singles["drug"] == drug, "cell_type"].unique())
        # the chosen type keeps another drug in training (holding each drug out in one type would
        # otherwise hold a whole cell type out, the cell_type protocol)
        candidates = [t for t in types if len(types) > 1 and any(t == k and d != drug for k, d in seen)]
        if candidates:
            chosen = candidates[rng.integers(len(candidates))]
            seen.discard((chosen, drug))
            contains = drug_parts.map(lambda parts, d=drug: d in parts) & (groups["cell_type"] == chosen)
            held += _rows(groups[contains])
    return held


def _unseen_doses(groups, drug_parts, n_groups, rng, *, extrapolate: bool) -> list[Group]:
    singles = groups[drug_parts.map(len) == 1]
    held = []
    for drug in _pick(sorted(singles["drug"].unique()), n_groups, rng):
        doses = np.sort(singles.loc[singles["drug"] == drug, "dose"].unique())
        needed = 2 if extrapolate else 3
        if doses.size < needed:
            raise ConfigError(
                f"{drug} has {doses.size} doses; this protocol needs {needed}+ to hold one out "
                f"({'the highest' if extrapolate else 'a middle one'})."
            )
        chosen = float(doses[-1] if extrapolate else doses[doses.size // 2])
        contains = drug_parts.map(lambda parts, d=drug: d in parts) & (groups["dose"] == chosen)
        held += _rows(groups[contains])
    return sorted(set(held))


def _unseen_pairs(groups, drug_parts, n_groups, pairs, rng, keys: ObsKeys) -> list[Group]:
    seen_alone = set(groups.loc[drug_parts.map(len) == 1, "drug"])
    available = sorted({d for d, p in zip(groups["drug"], drug_parts) if len(p) == 2 and set(p) <= seen_alone})
    if pairs is not None:
        as_in_data = {frozenset(keys.drugs_of(label)): label for label in available}  # "B+A" names "A+B"
        pairs = [as_in_data.get(frozenset(keys.drugs_of(pair)), pair) for pair in pairs]
        missing = sorted(set(pairs) - set(available))
        if missing:
            raise ConfigError(f"pairs {missing} are not drug pairs of these data with both drugs seen alone: {available}.")
        chosen = set(pairs)
    else:
        chosen = set(_pick(available, n_groups, rng))
    return _rows(groups[groups["drug"].isin(chosen)])


def _unseen_cell_type(groups, rng) -> list[Group]:
    types = sorted(groups["cell_type"].unique())
    if len(types) < 2:
        return []
    chosen = types[rng.integers(len(types))]
    return _rows(groups[groups["cell_type"] == chosen])
