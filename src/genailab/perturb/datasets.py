"""Bring public perturbation data into genailab's columns: drug, dose, cell_type, is_control.

Two layouts cover most published files:

* ``"sciplex"`` (Srivatsan et al. 2020 and its CPA / scPerturb / pertpy versions): a compound per
  cell in ``product_name`` (or ``perturbation``, ``condition``), a dose in ``dose`` (or
  ``dose_value``, ``dose_val``) and a cell line in ``cell_type`` (or ``cell_line``); vehicle cells
  are labelled ``Vehicle``, ``DMSO`` or ``control``. Each label is one compound; a ``+`` inside a
  compound name becomes ``plus`` (``(+)-JQ1`` -> ``(plus)-JQ1``), as ``+`` joins combinations.
* ``"norman"`` (Norman et al. 2019 CRISPRa and its GEARS / pertpy versions): guide targets in
  ``perturbation_name`` (or ``condition``, ``perturbation``), combinations as ``A+B`` (GEARS writes
  ``A+ctrl`` for a single target and ``ctrl`` for controls; scPerturb writes ``A_B``); there is no dose, so treated cells get
  dose 1, and all cells are K562 unless a cell-type column exists.

Nothing is downloaded: read the file you have (:func:`genailab.data.read`) and pass it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from genailab.errors import ConfigError, SchemaMismatchError
from genailab.data.perturbation_schema import ObsKeys

CONTROL = "control"  # genailab's control label after standardisation


@dataclass(frozen=True)
class Layout:
    """Where a published layout keeps drugs, doses and cell types, and how it names controls."""

    drug_columns: tuple[str, ...]  # first present column wins
    dose_columns: tuple[str, ...]  # empty: no dose, treated cells get dose 1
    cell_type_columns: tuple[str, ...]
    control_labels: tuple[str, ...]  # whole labels meaning untreated (compared case-insensitively)
    separators: tuple[str, ...] = ()  # how combinations are written; none: every label is one drug
    default_cell_type: str | None = None  # used when no cell-type column exists


LAYOUTS = {
    "sciplex": Layout(
        drug_columns=("product_name", "perturbation", "condition"),
        dose_columns=("dose", "dose_value", "dose_val"),
        cell_type_columns=("cell_type", "cell_line"),
        control_labels=("vehicle", "dmso", "control", "ctrl"),
    ),
    "norman": Layout(
        drug_columns=("perturbation_name", "condition", "perturbation"),
        dose_columns=(),
        cell_type_columns=("cell_type", "cell_line"),
        control_labels=("ctrl", "control", "non-targeting", ""),
        separators=("+", "_"),
        default_cell_type="K562",
    ),
}


def standardize_obs(adata: AnnData, layout: str, *, keys: ObsKeys = ObsKeys()) -> AnnData:
    """A copy of ``adata`` with genailab's perturbation columns added to ``obs``.

    Parameters
    ----------
    adata
        A sciplex- or Norman-style AnnData (see the module docstring).
    layout
        ``"sciplex"`` or ``"norman"``.
    keys
        Names of the columns to write (default ``drug``, ``dose``, ``cell_type``) and the control
        label and combination separator to use.

    Returns
    -------
    AnnData (a copy) with ``obs[keys.drug]`` (``control``, one drug, or drugs joined by
    ``keys.separator`` in sorted order), ``obs[keys.dose]`` (float, 0 for controls),
    ``obs[keys.cell_type]`` and ``obs['is_control']``; the original columns are kept, and
    ``uns['genailab_perturb_source']`` records which columns were read.

    Examples
    --------
    >>> adata = standardize_obs(genailab.data.read("sciplex3.h5ad"), "sciplex")  # doctest: +SKIP
    >>> model = PerturbationModel(adata, layer=None)  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not one of {sorted(LAYOUTS)}.")
    spec = LAYOUTS[layout]
    obs = adata.obs
    drug_column = _first_present(obs, spec.drug_columns, what="drug/perturbation")
    controls = {c.lower() for c in spec.control_labels}
    labels = [_label(value, spec, controls, keys) for value in obs[drug_column].astype(str)]
    control = np.array([label == keys.control for label in labels])
    if spec.dose_columns:
        dose_column = _first_present(obs, spec.dose_columns, what="dose")
        dose = pd.to_numeric(obs[dose_column], errors="coerce").to_numpy(dtype=np.float64)
    else:
        dose_column, dose = None, np.ones(obs.shape[0])
    cell_type_column = next((c for c in spec.cell_type_columns if c in obs.columns), None)
    if cell_type_column is None and spec.default_cell_type is None:
        _first_present(obs, spec.cell_type_columns, what="cell type")  # raises with the candidates
    out = adata.copy()
    out.obs[keys.drug] = pd.Categorical(labels, categories=[keys.control, *sorted(set(labels) - {keys.control})])
    out.obs[keys.dose] = np.where(control, 0.0, dose)
    if keys.cell_type is not None:
        out.obs[keys.cell_type] = (
            obs[cell_type_column].astype(str).astype("category").to_numpy()
            if cell_type_column is not None
            else pd.Categorical([spec.default_cell_type] * obs.shape[0])
        )
    out.obs["is_control"] = control
    out.uns["genailab_perturb_source"] = {
        "layout": layout,
        "drug_column": drug_column,
        "dose_column": dose_column or "",
        "cell_type_column": cell_type_column or "",
    }
    return out


def _first_present(obs: pd.DataFrame, candidates: tuple[str, ...], *, what: str) -> str:
    for column in candidates:
        if column in obs.columns:
            return column
    raise SchemaMismatchError(
        f"No {what} column found: looked for {list(candidates)} in obs (available: {list(obs.columns)[:20]}). "
        "Rename the column, or build the drug/dose/cell_type columns yourself."
    )


def _label(value: str, spec: Layout, controls: set[str], keys: ObsKeys) -> str:
    """One drug label in genailab's form: control, one drug, or sorted drugs joined by the separator."""
    text = value.strip()
    if text.lower() in controls or text.lower() == "nan":
        return keys.control
    parts = [text]
    for separator in spec.separators:
        parts = [piece.strip() for part in parts for piece in part.split(separator)]
    drugs = sorted({p.replace(keys.separator, "plus") for p in parts if p.lower() not in controls})
    return keys.separator.join(drugs) if drugs else keys.control
