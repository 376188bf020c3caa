"""Baselines that perturbation benchmarks found hard to beat, each a counterfactual for control cells.

Every method has ``fit(adata, *, keys, layer)`` on training cells (raw counts in ``layer``) and
``predict(control, *, drug, dose)`` returning log-normalised predicted cells, one per control
cell of ``control`` (an AnnData of control cells of one cell type):

* :class:`NoChange`: the control cells themselves;
* :class:`PerturbedMean`: control cells plus the mean effect of all perturbations (Systema);
* :class:`AdditiveShift`: control cells plus each drug's mean shift, summed over a combination;
* :class:`MatchingMean`: the same with the drugs' shifts averaged (Systema's matching mean);
* :class:`RidgeCovariates`: control cells plus the change a ridge regression of group means on
  drug, drug x log-dose, cell type, drug x cell type and seen pairs predicts;
* :class:`LatentArithmetic`: scGen's latent vector arithmetic with the genailab :class:`~genailab.VAE`;
* :class:`Oracle`: the control cells moved by the data generator's true fold change (the ceiling).

A drug's shift at a dose it was never seen at is interpolated linearly in log dose between the
seen doses around it, and held at the nearest seen dose outside their range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from sklearn.linear_model import Ridge

from genailab.anndata_models.vae import VAE
from genailab.model.perturbation import shift_counts
from genailab.errors import InputDataError, SchemaMismatchError
from genailab.perturb.evaluate import cell_groups, cell_types, log_normalize
from genailab.data.perturbation_schema import ObsKeys, cell_doses

ShiftTable = dict[tuple[str, float], np.ndarray]  # (drug, dose) -> shift vector


def layer_values(adata: AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``; a missing layer is a :class:`SchemaMismatchError` naming the others."""
    if layer is not None and layer not in adata.layers:
        raise SchemaMismatchError(f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers)}); name the "
                                  "raw-count layer, or layer=None for adata.X.", argument="layer")  # fmt: skip
    return adata.X if layer is None else adata.layers[layer]


def _control_means(values: np.ndarray, groups: pd.DataFrame, keys: ObsKeys) -> dict[str, np.ndarray]:
    control = groups["drug"] == keys.control
    return {t: values[(control & (groups["cell_type"] == t)).to_numpy()].mean(0)
            for t in groups.loc[control, "cell_type"].unique()}  # fmt: skip


def cell_type_shifts(values: np.ndarray, obs: pd.DataFrame, keys: ObsKeys) -> dict[str, ShiftTable]:
    """Per cell type, the shift of each single drug at each dose: mean of the treated cells of
    that type minus the mean of that type's control cells (types without controls are left out).

    ``values`` (n_cells, d) is any per-cell representation (log expression, a latent space).
    """
    groups = pd.DataFrame(cell_groups(obs, keys), columns=["cell_type", "drug", "dose"])
    control_means = _control_means(values, groups, keys)
    tables: dict[str, ShiftTable] = {}
    for (cell_type, drug, dose), rows in groups.groupby(["cell_type", "drug", "dose"]).indices.items():
        if len(keys.drugs_of(drug)) == 1 and cell_type in control_means:
            tables.setdefault(cell_type, {})[(drug, float(dose))] = values[rows].mean(0) - control_means[cell_type]
    return tables


def mean_shifts(values: np.ndarray, obs: pd.DataFrame, keys: ObsKeys) -> ShiftTable:
    """Mean shift of each single drug at each dose: the average over cell types of (mean of the
    treated cells of that type - mean of that type's control cells), over types that have both."""
    per_type: dict[tuple[str, float], list[np.ndarray]] = {}
    for table in cell_type_shifts(values, obs, keys).values():
        for key, shift in table.items():
            per_type.setdefault(key, []).append(shift)
    return {key: np.mean(shifts, axis=0) for key, shifts in per_type.items()}


def drug_shift(table: ShiftTable, drug: str, dose: float) -> np.ndarray:
    """Shift of one drug at ``dose``, interpolated linearly in log dose between the two nearest
    seen doses; outside the seen range the nearest end is kept (no extrapolation); 0 at dose 0."""
    seen = np.array(sorted(x for d, x in table if d == drug and x > 0))
    if seen.size == 0:
        raise SchemaMismatchError(f"{drug} was never seen on its own in the training cells; no shift is known.")
    if dose <= 0:
        return np.zeros_like(table[(drug, float(seen[0]))])
    if dose <= seen[0] or dose >= seen[-1]:
        return table[(drug, float(seen[0] if dose <= seen[0] else seen[-1]))]
    upper = int(np.searchsorted(seen, dose))
    low, high = float(seen[upper - 1]), float(seen[upper])
    weight = (np.log(dose) - np.log(low)) / (np.log(high) - np.log(low))
    return (1.0 - weight) * table[(drug, low)] + weight * table[(drug, high)]


def combined_shift(table: ShiftTable, drug_label: str, dose: float, keys: ObsKeys) -> np.ndarray:
    """Sum of the shifts of the drugs in ``drug_label`` at ``dose`` (:func:`drug_shift` per drug)."""
    return np.asarray(sum(drug_shift(table, drug, dose) for drug in keys.drugs_of(drug_label)))


def _knows(table: ShiftTable, drug: str) -> bool:
    return any(d == drug for d, _ in table)


class NoChange:
    """Predicts that the drug changes nothing: the control cells are the prediction."""

    name = "no change"

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> NoChange:
        self.layer = layer
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        return log_normalize(layer_values(control, self.layer))


class _PerTypeShift:
    """Control cells plus the drugs' shifts for their cell type, joined by ``combine`` (sum, mean)."""

    combine: Callable[..., np.ndarray]

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None):
        self.keys, self.layer = keys, layer
        values = log_normalize(layer_values(adata, layer))
        self.by_type = cell_type_shifts(values, adata.obs, keys)
        self.average = mean_shifts(values, adata.obs, keys)
        return self

    def _drug_shifts(self, cell_type: str, drug_label: str, dose: float) -> list[np.ndarray]:
        """Each drug's shift: the cell type's own where it saw the drug, else the average over types."""
        own = self.by_type.get(cell_type, {})
        return [drug_shift(own if _knows(own, d) else self.average, d, dose) for d in self.keys.drugs_of(drug_label)]

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        out = log_normalize(layer_values(control, self.layer))
        types = cell_types(control.obs, self.keys)
        for cell_type in np.unique(types):
            out[types == cell_type] += self.combine(self._drug_shifts(cell_type, drug, dose), axis=0)
        return out


class AdditiveShift(_PerTypeShift):
    """Control cells plus each drug's mean shift in log expression, summed over a combination.

    A drug's shift is the control cells' own cell type's (treated mean - control mean) where that
    type saw the drug, else the average over the types that did; between seen doses it is
    interpolated in log dose (:func:`drug_shift`).
    """

    name = "additive"
    combine = staticmethod(np.sum)


class MatchingMean(_PerTypeShift):
    """Systema's matching mean: for a combination, the average of its drugs' shifts (not the sum);
    for a single drug the same as :class:`AdditiveShift`."""

    name = "matching mean"
    combine = staticmethod(np.mean)


class PerturbedMean:
    """Systema's perturbed mean: control cells shifted by the mean effect of *all* perturbations
    (mean of every perturbed training cell of the type minus its control mean; types that saw no
    perturbation take the average over types). It ignores which drug and dose are asked for."""

    name = "perturbed mean"

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> PerturbedMean:
        self.keys, self.layer = keys, layer
        values = log_normalize(layer_values(adata, layer))
        types, control = cell_types(adata.obs, keys), keys.is_control(adata.obs)
        self.shifts = {
            t: values[~control & (types == t)].mean(0) - values[control & (types == t)].mean(0)
            for t in np.unique(types)
            if (~control & (types == t)).any() and (control & (types == t)).any()
        }
        if not self.shifts:
            raise InputDataError("No cell type has both control and perturbed training cells.")
        self.average = np.mean(list(self.shifts.values()), axis=0)
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        out = log_normalize(layer_values(control, self.layer))
        types = cell_types(control.obs, self.keys)
        for cell_type in np.unique(types):
            out[types == cell_type] += self.shifts.get(cell_type, self.average)
        return out


class RidgeCovariates:
    """Ridge regression of group mean log expression on one-hot covariates.

    Each training group (cell type, drug label, dose) is one row with features: drug indicators,
    drug x log(dose / median dose), cell-type indicators, drug x cell-type indicators and one
    indicator per drug pair seen in training (0 for pairs never seen, which are then additive).
    The prediction for control cells is their expression plus ridge(cell type, drug, dose) minus
    ridge(cell type, control).
    """

    name = "ridge"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> RidgeCovariates:
        self.keys, self.layer = keys, layer
        values = log_normalize(layer_values(adata, layer))
        groups = pd.DataFrame(cell_groups(adata.obs, keys), columns=["cell_type", "drug", "dose"])
        labels = groups["drug"].unique()
        self.drugs = sorted({d for label in labels for d in keys.drugs_of(label)})
        self.pairs = sorted({label for label in labels if len(keys.drugs_of(label)) > 1})
        self.cell_types = sorted(groups["cell_type"].unique())
        doses = cell_doses(adata.obs, keys)
        self.dose_scale = float(np.median(doses[doses > 0])) if (doses > 0).any() else 1.0
        index = groups.groupby(["cell_type", "drug", "dose"]).indices
        features = np.stack([self._features(*group) for group in index])
        means = np.stack([values[rows].mean(0) for rows in index.values()])
        self.model = Ridge(alpha=self.alpha).fit(features, means)
        return self

    def _features(self, cell_type: str, drug_label: str, dose: float) -> np.ndarray:
        n_d, n_t = len(self.drugs), len(self.cell_types)
        drug, log_dose = np.zeros(n_d), np.zeros(n_d)
        for name in self.keys.drugs_of(drug_label):
            if name not in self.drugs:
                raise SchemaMismatchError(f"{name} was never seen in the training cells.")
            drug[self.drugs.index(name)] = 1.0
            log_dose[self.drugs.index(name)] = np.log(dose / self.dose_scale) if dose > 0 else 0.0
        kind = np.zeros(n_t)
        if cell_type in self.cell_types:
            kind[self.cell_types.index(cell_type)] = 1.0
        pair = np.array([float(drug_label == p) for p in self.pairs])
        return np.concatenate([drug, log_dose, kind, np.outer(drug, kind).ravel(), pair])

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        values = log_normalize(layer_values(control, self.layer))
        types = cell_types(control.obs, self.keys)
        out = values.copy()
        for cell_type in np.unique(types):
            rows = types == cell_type
            treated, untreated = self.model.predict(
                np.stack([self._features(cell_type, drug, dose), self._features(cell_type, self.keys.control, 0.0)])
            )
            out[rows] += treated - untreated
        return out


class LatentArithmetic:
    """scGen-style latent vector arithmetic (Lotfollahi et al., Nat. Methods 2019).

    An unconditional genailab :class:`~genailab.VAE` is trained on the training cells; a drug's
    latent shift is the mean latent of its treated cells minus that of the control cells (per
    cell type, averaged, as :func:`mean_shifts`, interpolated in log dose). Like genailab's
    counterfactual, the prediction moves each control cell's own counts by the decoded fold change
    decode(z + shift) / decode(z) (:func:`~genailab.model.perturbation.shift_counts`), so the
    decoder's reconstruction error cancels; a Gaussian decoder's change is added to the cells'
    log-normalised values. (Decoding z + shift alone, as before, scored the reconstruction error of
    every gene as predicted change: top-50 delta R2 -1.19 against +0.26 for one simulated group.)
    """

    name = "scGen"

    def __init__(self, *, likelihood: str = "nb", train_options: dict | None = None, **model_options):
        self.likelihood = likelihood
        self.train_options = dict(train_options or {})
        self.model_options = model_options

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> LatentArithmetic:
        self.keys, self.layer = keys, layer
        self.vae = VAE(adata, likelihood=self.likelihood, layer=layer, **self.model_options)
        self.vae.fit(**self.train_options)
        self.shifts = mean_shifts(self.vae.get_latent(adata), adata.obs, keys)
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        counts = layer_values(control, self.layer)
        counts = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float32)
        z = self.vae.get_latent(control)
        moved_z = z + combined_shift(self.shifts, drug, dose, self.keys)
        if self.likelihood == "gaussian":  # the model of log-normalised values: its change, added
            return counts + self.vae.decode(moved_z) - self.vae.decode(z)
        library = counts.sum(1)
        base = self.vae.decode(z, library=library)  # (n, G) expected counts of each control cell
        ratio = self.vae.decode(moved_z, library=library) / np.maximum(base, 1e-12)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            moved = shift_counts(torch.from_numpy(counts), torch.from_numpy(ratio), torch.from_numpy(base))
        return log_normalize(moved.numpy())


class Oracle:
    """The ceiling of a counterfactual of the given control cells: their counts moved by the
    generator's *true* fold change, the way genailab's counterfactual moves them by its predicted
    one (:func:`~genailab.model.perturbation.shift_counts`: thinning where the fold change is
    below 1, Poisson counts of mean ``(fold change - 1) * true mean`` added where it is above).

    ``log_fc(control, drug, dose)`` returns the true log fold change, genes x cell types (e.g.
    :func:`genailab.data.simulate.true_drug_log_fc`); the control cells need their expected counts
    in ``layers['true_mean']``, as both generators write them (a ZINB simulation writes its NB mean
    there, and the added counts then run ``1 / (1 - dropout)`` high). Each cell keeps its own noise, so the
    predicted change is the true change up to the noise of the thinning and added counts.
    """

    name = "oracle"

    def __init__(self, log_fc: Callable[..., pd.DataFrame], *, seed: int = 0):
        self.log_fc, self.seed = log_fc, seed

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> Oracle:
        self.keys, self.layer = keys, layer
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        if "true_mean" not in control.layers:
            raise InputDataError(
                "The oracle needs the control cells' expected counts in layers['true_mean'] (written by "
                "genailab.data.simulate and genailab.perturb.semisynthetic); other data have no known truth."
            )
        counts = layer_values(control, self.layer)
        counts = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float32)
        log_fc = self.log_fc(control, drug, dose)[cell_types(control.obs, self.keys)].to_numpy().T  # (n, G)
        mean = np.asarray(control.layers["true_mean"], dtype=np.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            moved = shift_counts(torch.from_numpy(counts), torch.from_numpy(np.exp(log_fc).astype(np.float32)),
                                 torch.from_numpy(mean))  # fmt: skip
        return log_normalize(moved.numpy())
