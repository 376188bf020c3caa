"""How a perturbation model reads an AnnData: drug labels, doses, covariates and the control label.

Every cell carries one drug label in ``obs[drug_key]``: the control value (e.g. ``"control"``),
one drug (``"drug_0"``) or a combination joined by the separator (``"drug_0+drug_1"``), and one
dose in ``obs[dose_key]``, shared by the drugs of a combination and ignored for control cells.
The model sees them as a float matrix c (n_cells, 2 K + J): the codes of K drug slots (-1 for an
empty slot), their doses (0 for an empty slot), then the codes of J covariates (cell type first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from genailab.data.schema import RETRAIN_UNSEEN, DataSchema
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError

logger = logging.getLogger(__name__)

EMPTY_SLOT = -1  # drug code of an unused slot (control cells, or one drug in a two-slot model)


@dataclass(frozen=True)
class ObsKeys:
    """The obs columns and labels that describe perturbations."""

    drug: str = "drug"  # drug label per cell: control value, one drug, or drugs joined by the separator
    dose: str = "dose"  # one dose per cell, shared by the drugs of a combination
    cell_type: str | None = "cell_type"  # the covariate a response depends on most; None for one cell line
    control: str = "control"  # the drug label of untreated (vehicle, non-targeting) cells
    separator: str = "+"  # joins the drugs of a combination: "drug_0+drug_1"

    def drugs_of(self, label: str) -> tuple[str, ...]:
        """The drugs of one label, () for the control label; a drug named twice or an empty name is an error."""
        label = str(label)
        if label == self.control:
            return ()
        drugs = tuple(part.strip() for part in label.split(self.separator))
        if "" in drugs:
            raise InputDataError(
                f"The drug label {label!r} has an empty drug name; join drugs as 'A{self.separator}B' with no "
                "leading, trailing or doubled separator."
            )
        if self.control in drugs:
            alone = self.separator.join(d for d in drugs if d != self.control)
            raise InputDataError(
                f"The drug label {label!r} combines the control label {self.control!r} with drugs; the control "
                f"is no drug: label those cells {alone!r}."
            )
        twice = sorted({d for d in drugs if drugs.count(d) > 1})
        if twice:
            raise InputDataError(
                f"The drug label {label!r} names {twice} more than once; a combination lists each drug once "
                f"(the dose of a drug goes in the dose column, e.g. {twice[0]!r} at twice the dose)."
            )
        return drugs

    def labels(self, obs: pd.DataFrame) -> np.ndarray:
        """The drug label of every cell as text, (n_cells,); missing labels (NaN, None) are an error."""
        require_columns(obs, self, ["drug"])
        column = obs[self.drug]
        missing = column.isna().to_numpy()
        if missing.any():
            shown = ", ".join(map(str, obs.index[missing][:5]))
            raise InputDataError(
                f"obs[{self.drug!r}] has {int(missing.sum())} missing drug labels (NaN or None), e.g. cells {shown}; "
                f"label untreated cells {self.control!r} and fill in or drop the others."
            )
        return column.astype(str).to_numpy()

    def is_control(self, obs: pd.DataFrame) -> np.ndarray:
        """Boolean mask of control cells."""
        return self.labels(obs) == self.control

    def to_dict(self) -> dict:
        return asdict(self)


def require_columns(obs: pd.DataFrame, keys: ObsKeys, roles: Sequence[str]) -> None:
    """The obs columns that ``keys`` names for ``roles`` (``"drug"``, ``"dose"``, ``"cell_type"``)
    exist; an error names the argument that gave the missing one (``drug_key``, ...)."""
    for role in roles:
        column = getattr(keys, role)
        if column is not None:
            _require_column(obs, column, argument=f"{role}_key")


def _require_column(obs: pd.DataFrame, column: str, *, argument: str) -> None:
    if column not in obs.columns:
        raise SchemaMismatchError(
            f"obs has no column {column!r} (given as `{argument}`); choose one of {list(obs.columns)[:20]}, or map a "
            "public layout first with genailab.perturb.standardize_obs.", argument=argument,
        )  # fmt: skip


def check_key_roles(obs: pd.DataFrame, keys: ObsKeys, covariate_keys: Sequence[str]) -> None:
    """Each obs column a perturbation model is trained on exists and plays one role (drug, dose,
    cell type, a covariate); errors name the argument that gave it."""
    roles = [("drug_key", keys.drug), ("dose_key", keys.dose)]
    roles += [("cell_type_key", keys.cell_type)] if keys.cell_type else []
    roles += [("covariate_keys", key) for key in covariate_keys]
    given = {}
    for argument, column in roles:
        if column in given:
            also = " (the cell type is a covariate already)" if given[column] == "cell_type_key" else ""
            raise ConfigError(f"obs column {column!r} is given as `{given[column]}` and as `{argument}`{also}; "
                              "each role needs a column of its own.", argument=argument)  # fmt: skip
        given[column] = argument
    for argument, column in roles:
        _require_column(obs, column, argument=argument)


def require_control_labels(obs: pd.DataFrame, keys: ObsKeys) -> None:
    """Refuse cells to be perturbed whose drug column is absent: controls cannot be told from treated cells."""
    if keys.drug not in obs.columns:
        raise SchemaMismatchError(
            f"adata.obs has no {keys.drug!r} column, so control cells cannot be told from treated ones, and "
            f"predictions perturb control cells only. Add it: adata.obs[{keys.drug!r}] = {keys.control!r} if "
            f"every cell is untreated, or keep only the cells labelled {keys.control!r}."
        )


def cell_doses(obs: pd.DataFrame, keys: ObsKeys) -> np.ndarray:
    """Dose per cell as float64, 0 for control cells; errors for missing or negative doses of treated cells."""
    require_columns(obs, keys, ["drug", "dose"])
    control = keys.is_control(obs)
    dose = pd.to_numeric(obs[keys.dose], errors="coerce").to_numpy(dtype=np.float64)
    treated = ~control
    bad = treated & ~np.isfinite(dose)
    if bad.any():
        labels = obs[keys.drug].astype(str)[bad].value_counts()
        example = obs[keys.dose][bad].iloc[0]
        raise InputDataError(
            f"obs[{keys.dose!r}] has {int(bad.sum())} missing or non-numeric doses (e.g. {example}) for cells "
            f"treated with {labels.index[:3].tolist()}; fill them with numbers (one dose per cell, shared by the "
            f"drugs of a combination). If those cells are the untreated ones, name their label: control_value="
            f"{labels.index[0]!r} (CLI: --control-value), not {keys.control!r}."
        )
    if (dose[treated] < 0).any():
        bad = np.unique(dose[treated][dose[treated] < 0])[:5].tolist()
        raise InputDataError(f"obs[{keys.dose!r}] has negative doses {bad}; doses must be >= 0.")
    return np.where(control, 0.0, dose)


@dataclass(frozen=True)
class PerturbationSchema:
    """Genes, layer, covariate categories and drug vocabulary a perturbation model was trained with."""

    data: DataSchema  # layer, gene order, covariate categories (cell type first) as embedding codes
    keys: ObsKeys
    drugs: tuple[str, ...]  # drug vocabulary in code order, without the control label
    max_drugs: int = 2  # drug slots per cell: the largest combination the model can represent
    # geometric centre of the positive training doses, sqrt(min * max): the dose response starts with its
    # half-maximal dose there (the median was the lowest dose once a middle dose was held out)
    dose_scale: float = 1.0
    # per drug (in code order), the lowest and highest positive dose it received in training, alone
    # or in a combination; empty for models saved before it was recorded
    dose_ranges: tuple[tuple[float, float], ...] = ()

    @classmethod
    def from_anndata(
        cls, adata: AnnData, *, keys: ObsKeys, covariate_keys: Sequence[str] = (), layer: str | None = None
    ) -> PerturbationSchema:
        """Record the drugs, doses and covariates of ``adata``."""
        covariates = ((keys.cell_type,) if keys.cell_type else ()) + tuple(covariate_keys)
        check_key_roles(adata.obs, keys, covariate_keys)
        data = DataSchema.from_anndata(adata, layer=layer, categorical_keys=covariates, encoding="embedding")
        labels = keys.labels(adata.obs)
        parts = [keys.drugs_of(label) for label in pd.unique(labels)]
        drugs = tuple(sorted({d for p in parts for d in p}))
        if not drugs:
            raise InputDataError(
                f"Every cell has the control label {keys.control!r} in obs[{keys.drug!r}]; a perturbation model "
                "needs treated cells."
            )
        if not any(len(p) == 0 for p in parts):
            common = pd.Series(labels).value_counts().index[:3].tolist()
            logger.warning(
                "No cell has the control label %r in obs[%r], so every label is a drug (most common: %s); the "
                "model trains, but predictions need controls (predict() perturbs control cells). Name your "
                "untreated cells' label with control_value= (CLI: --control-value).", keys.control, keys.drug, common,
            )
        doses = cell_doses(adata.obs, keys)
        undosed = ~keys.is_control(adata.obs) & (doses == 0)
        if undosed.any():
            logger.warning(
                "%d treated cells (of %s) have dose 0 in obs[%r]: at dose 0 a drug has no effect, so they are "
                "fitted as controls that carry a drug label. Give their doses (1 for a screen without doses).",
                int(undosed.sum()), pd.unique(labels[undosed])[:3].tolist(), keys.dose,
            )
        positive = doses[doses > 0]
        return cls(
            data=data,
            keys=keys,
            drugs=drugs,
            max_drugs=max(2, max(len(p) for p in parts)),
            dose_scale=float(np.sqrt(positive.min() * positive.max())) if positive.size else 1.0,
            dose_ranges=_dose_ranges(labels, doses, drugs, keys),
        )

    @property
    def covariate_keys(self) -> tuple[str, ...]:
        return self.data.categorical_keys

    @property
    def covariate_sizes(self) -> tuple[int, ...]:
        return self.data.categorical_sizes

    def doses_outside_training(self, label: str, dose: float) -> list[tuple[str, float, float]]:
        """The drugs of ``label`` for which a positive ``dose`` lies outside the doses they were
        trained on, each with that (lowest, highest) range; empty when the ranges were not recorded."""
        if dose <= 0 or not self.dose_ranges:
            return []
        ranges = dict(zip(self.drugs, self.dose_ranges))
        return [(d, *ranges[d]) for d in self.keys.drugs_of(label) if not ranges[d][0] <= dose <= ranges[d][1]]

    def drug_codes(self, label: str) -> list[int]:
        """Codes of the drugs in one label; unknown drugs raise :class:`SchemaMismatchError`."""
        names = self.keys.drugs_of(label)
        unknown = [d for d in names if d not in self.drugs]
        if unknown:
            raise SchemaMismatchError(
                f"Unknown drug(s) {unknown}; this model knows {list(self.drugs)[:20]}. A drug the model never saw "
                "has no learned embedding; retrain with cells that received it."
            )
        if len(names) > self.max_drugs:
            raise ConfigError(
                f"{label!r} combines {len(names)} drugs but this model holds at most {self.max_drugs} per cell."
            )
        return [self.drugs.index(d) for d in names]

    def encode(self, labels: Sequence[str], doses: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
        """The model's condition matrix (n, 2 K + J) float32 from labels, doses (n,) and covariate codes (n, J)."""
        n, k = len(labels), self.max_drugs
        codes = np.full((n, k), EMPTY_SLOT, dtype=np.float32)
        slot_doses = np.zeros((n, k), dtype=np.float32)
        labels = np.asarray(labels, dtype=object)
        for label in pd.unique(labels):
            rows = np.flatnonzero(labels == label)
            for slot, code in enumerate(self.drug_codes(label)):
                codes[rows, slot] = code
                slot_doses[rows, slot] = doses[rows]
        parts = [codes, slot_doses] + ([covariates.astype(np.float32)] if covariates is not None else [])
        return np.concatenate(parts, axis=1)

    def encode_obs(self, obs: pd.DataFrame) -> np.ndarray:
        """Condition matrix for cells with their own drug, dose and covariates."""
        doses = cell_doses(obs, self.keys)
        return self.encode(self.keys.labels(obs), doses, self.data.encode_obs(obs, unseen=RETRAIN_UNSEEN))

    def to_dict(self) -> dict:
        return {
            "data": self.data.to_dict(),
            "keys": self.keys.to_dict(),
            "drugs": list(self.drugs),
            "max_drugs": self.max_drugs,
            "dose_scale": self.dose_scale,
            "dose_ranges": [list(r) for r in self.dose_ranges],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PerturbationSchema:
        return cls(
            data=DataSchema.from_dict(data["data"]),
            keys=ObsKeys(**data["keys"]),
            drugs=tuple(data["drugs"]),
            max_drugs=int(data["max_drugs"]),
            dose_scale=float(data["dose_scale"]),
            dose_ranges=tuple((float(lo), float(hi)) for lo, hi in data.get("dose_ranges", ())),
        )


def _dose_ranges(labels: np.ndarray, doses: np.ndarray, drugs: Sequence[str], keys: ObsKeys) -> tuple[tuple[float, float], ...]:
    """Per drug of ``drugs``, (lowest, highest) positive dose among the cells whose label names it."""
    lowest, highest = dict.fromkeys(drugs, np.inf), dict.fromkeys(drugs, -np.inf)
    positive = np.asarray(doses) > 0
    codes, names = pd.factorize(np.asarray(labels, dtype=object)[positive])  # one pass, not one per label
    given = np.asarray(doses, dtype=np.float64)[positive]
    label_lowest, label_highest = np.full(names.size, np.inf), np.full(names.size, -np.inf)
    np.minimum.at(label_lowest, codes, given)
    np.maximum.at(label_highest, codes, given)
    for label, low, high in zip(names, label_lowest, label_highest):
        for drug in keys.drugs_of(label):
            lowest[drug], highest[drug] = min(lowest[drug], low), max(highest[drug], high)
    return tuple((float(lowest[d]), float(highest[d])) if np.isfinite(lowest[d]) else (0.0, 0.0) for d in drugs)
