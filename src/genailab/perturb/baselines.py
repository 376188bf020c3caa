"""Baselines that perturbation benchmarks found hard to beat, each a counterfactual for control cells.

Every method has ``fit(adata, *, keys, layer)`` on training cells (raw counts in ``layer``) and
``predict(control, *, drug, dose)`` returning log-normalised predicted cells, one per control
cell of ``control`` (an AnnData of control cells of one cell type):

* :class:`NoChange`: the control cells themselves;
* :class:`AdditiveShift`: control cells plus each drug's mean shift, summed over a combination;
* :class:`RidgeCovariates`: control cells plus the change a ridge regression of group means on
  drug, drug x log-dose, cell type and drug x cell type predicts;
* :class:`LatentArithmetic`: scGen's latent vector arithmetic with the genailab :class:`~genailab.VAE`.

A drug's shift at a dose it was never seen at is read at its nearest seen dose (in log dose).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from sklearn.linear_model import Ridge

from genailab.anndata_models.vae import VAE
from genailab.errors import SchemaMismatchError
from genailab.perturb.evaluate import cell_groups, cell_types, log_normalize
from genailab.data.perturbation_schema import ObsKeys, cell_doses

ShiftTable = dict[tuple[str, float], np.ndarray]  # (drug, dose) -> shift vector


def _layer(adata: AnnData, layer: str | None):
    return adata.X if layer is None else adata.layers[layer]


def mean_shifts(values: np.ndarray, obs: pd.DataFrame, keys: ObsKeys) -> ShiftTable:
    """Mean shift of each single drug at each dose: the average over cell types of (mean of the
    treated cells of that type - mean of that type's control cells), over types that have both.

    ``values`` (n_cells, d) is any per-cell representation (log expression, a latent space).
    """
    groups = pd.DataFrame(cell_groups(obs, keys), columns=["cell_type", "drug", "dose"])
    control = groups["drug"] == keys.control
    control_means = {t: values[(control & (groups["cell_type"] == t)).to_numpy()].mean(0)
                     for t in groups.loc[control, "cell_type"].unique()}  # fmt: skip
    per_type: dict[tuple[str, float], list[np.ndarray]] = {}
    for (cell_type, drug, dose), rows in groups.groupby(["cell_type", "drug", "dose"]).indices.items():
        if len(keys.drugs_of(drug)) == 1 and cell_type in control_means:
            per_type.setdefault((drug, float(dose)), []).append(values[rows].mean(0) - control_means[cell_type])
    return {key: np.mean(shifts, axis=0) for key, shifts in per_type.items()}


def combined_shift(table: ShiftTable, drug_label: str, dose: float, keys: ObsKeys) -> np.ndarray:
    """Sum of the shifts of the drugs in ``drug_label`` at ``dose`` (nearest seen dose per drug)."""
    total = 0.0
    for drug in keys.drugs_of(drug_label):
        seen = np.array(sorted(x for d, x in table if d == drug and x > 0))
        if seen.size == 0:
            raise SchemaMismatchError(f"{drug} was never seen on its own in the training cells; no shift is known.")
        if dose > 0:
            nearest = float(seen[np.argmin(np.abs(np.log(seen) - np.log(dose)))])
            total = total + table[(drug, nearest)]
    return np.asarray(total)


class NoChange:
    """Predicts that the drug changes nothing: the control cells are the prediction."""

    name = "no change"

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> NoChange:
        self.layer = layer
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        return log_normalize(_layer(control, self.layer))


class AdditiveShift:
    """Control cells plus the per-drug mean shift in log expression (summed for combinations)."""

    name = "additive"

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> AdditiveShift:
        self.keys, self.layer = keys, layer
        self.shifts = mean_shifts(log_normalize(_layer(adata, layer)), adata.obs, keys)
        return self

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        return log_normalize(_layer(control, self.layer)) + combined_shift(self.shifts, drug, dose, self.keys)


class RidgeCovariates:
    """Ridge regression of group mean log expression on the covariates.

    Each training group (cell type, drug label, dose) is one row with features: drug indicators,
    drug x log(dose / median dose), cell-type indicators and drug x cell-type indicators. The
    prediction for control cells is their expression plus ridge(cell type, drug, dose) minus
    ridge(cell type, control).
    """

    name = "ridge"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, adata: AnnData, *, keys: ObsKeys, layer: str | None = None) -> RidgeCovariates:
        self.keys, self.layer = keys, layer
        values = log_normalize(_layer(adata, layer))
        groups = pd.DataFrame(cell_groups(adata.obs, keys), columns=["cell_type", "drug", "dose"])
        self.drugs = sorted({d for label in groups["drug"].unique() for d in keys.drugs_of(label)})
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
        return np.concatenate([drug, log_dose, kind, np.outer(drug, kind).ravel()])

    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        values = log_normalize(_layer(control, self.layer))
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
    cell type, averaged, as :func:`mean_shifts`); control latents plus the shift are decoded with
    each control cell's own library size and one count sample is drawn per cell.
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

    @torch.no_grad()
    def predict(self, control: AnnData, *, drug: str, dose: float) -> np.ndarray:
        z = self.vae.get_latent(control) + combined_shift(self.shifts, drug, dose, self.keys)
        counts = _layer(control, self.layer)
        device = next(self.vae.module.parameters()).device
        library = torch.as_tensor(np.asarray(counts.sum(1), dtype=np.float32).reshape(-1, 1), device=device)
        px = self.vae.module.decode(torch.as_tensor(z, dtype=torch.float32, device=device), None, library)
        return log_normalize(px.sample().cpu().numpy())
