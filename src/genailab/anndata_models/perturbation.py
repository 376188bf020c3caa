"""The AnnData-facing perturbation model: fit, counterfactual prediction, save, load."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.anndata_models.base import INFERENCE_BATCH, MODEL_SET_FIELDS, AnnDataModel, build_config, seeded
from genailab.checks import check_library_size, check_number
from genailab.data.loader import MinibatchLoader
from genailab.data.perturbation_schema import ObsKeys, PerturbationSchema
from genailab.data.schema import RETRAIN_UNSEEN
from genailab.data.validation import warn_if_raw_counts
from genailab.errors import ConfigError, InputDataError
from genailab.model.adversary import BASAL_LATENT, AdversaryConfig
from genailab.model.config import ModelConfig
from genailab.model.perturbation import PerturbationConfig, PerturbationVAE

logger = logging.getLogger(__name__)


class PerturbationModel(AnnDataModel):
    """Predict perturbed expression for control cells: unseen cell type x drug x dose combinations.

    A basal latent is inferred from each cell's expression and decoded with the covariates
    (cell type...); each drug adds a per-gene change to the decoder's log expression, scaled by a
    monotone Hill dose response whose half-maximal dose starts at the geometric centre of the
    training doses, plus a low-rank cell type x drug term (:mod:`genailab.model.perturbation`).

    Parameters
    ----------
    adata
        Cells x genes with control and treated cells. Count models read raw counts from ``layer``.
    drug_key
        ``obs`` column of drug labels: ``control_value``, one drug, or drugs joined by ``"+"``.
    dose_key
        ``obs`` column of doses (one per cell, shared by the drugs of a combination; >= 0).
    cell_type_key
        ``obs`` column of cell types (None for a single cell line).
    covariate_keys
        Further categorical ``obs`` columns the response may depend on (batch, donor...).
    control_value
        The drug label of control (vehicle, non-targeting) cells.
    layer
        ``adata.layers`` key of the values to model; None uses ``adata.X``.
    likelihood
        ``"nb"`` or ``"zinb"`` for raw counts, ``"gaussian"`` for log-normalised values.
    adversary
        Weight, warm-up and mode of the discriminator that must not recover the drug label from
        the basal latent; None trains without it.
    unseen_interaction
        For a (cell type, drug) pair absent from the training data, the share (0-1) of the cell
        type's own interaction kept; the rest is the drug's average over the cell types that saw
        it (0, the default: that average effect).
    unseen_scale
        Factor (0-1) on such a pair's whole effect; None (the default) estimates it after training
        by predicting each seen pair from its drug's other cell types (leave one type out), which
        shrinks the effect where cell types differ in how strongly they respond; 1 keeps the
        drug's average effect.
    effect_l2
        Weight of an L2 penalty on each (cell type, drug) pair's full-dose log fold changes, so
        that genes the counts barely measure stay near no change instead of fitting noise; 0
        turns it off (:mod:`genailab.model.perturbation` says what it does to the dose curve).
    hidden_dims
        Encoder layer sizes (the decoder mirrors them). Two layers of 128, not ``ModelConfig``'s one:
        in one run of ``benchmarks/perturbation.py`` one layer gave a worse all-gene delta R2 and a
        higher energy distance on 11 of its 12 protocols (energy 1.14 against 0.59 on the
        simulator's unseen highest dose), and a top-50 delta R2 within 0.035 either way.
    **model_options
        Further :class:`~genailab.model.config.ModelConfig` fields: ``latent_dim``, ``dispersion``
        (``gene`` or ``gene-cell``), ``dropout``, ``norm``, ``activation``, ``beta``.

    Examples
    --------
    >>> model = PerturbationModel(adata, drug_key="drug", dose_key="dose", layer="counts")
    >>> model.fit(epochs=100)
    >>> controls = adata[adata.obs["drug"] == "control"]
    >>> predicted = model.predict(controls, drug="drug_1", dose=10.0)
    """

    MODEL_NAME = "perturbation model"
    MODEL_TYPE = "genailab.PerturbationModel"

    def __init__(
        self,
        adata: AnnData,
        *,
        drug_key: str = "drug",
        dose_key: str = "dose",
        cell_type_key: str | None = "cell_type",
        covariate_keys: Sequence[str] = (),
        control_value: str = "control",
        layer: str | None = None,
        likelihood: str = "nb",
        adversary: AdversaryConfig | None = BASAL_LATENT,
        unseen_interaction: float = 0.0,
        unseen_scale: float | None = None,
        effect_l2: float = PerturbationConfig.effect_l2,
        hidden_dims: Sequence[int] = (128, 128),
        **model_options,
    ):
        if isinstance(covariate_keys, str):
            raise ConfigError("covariate_keys takes a list of obs columns, e.g. ['batch'].")
        keys = ObsKeys(drug=drug_key, dose=dose_key, cell_type=cell_type_key, control=str(control_value))
        schema = PerturbationSchema.from_anndata(adata, keys=keys, covariate_keys=covariate_keys, layer=layer)
        vae = build_config(
            ModelConfig, input_dim=schema.data.n_genes, likelihood=likelihood, inject_condition="none",
            hidden_dims=tuple(hidden_dims), **model_options, set_by_model=MODEL_SET_FIELDS + ("inject_condition",),
        )  # fmt: skip
        config = PerturbationConfig(
            vae=vae, n_drugs=len(schema.drugs), max_drugs=schema.max_drugs, covariate_sizes=schema.covariate_sizes,
            dose_scale=schema.dose_scale, unseen_interaction=unseen_interaction,
            unseen_scale=unseen_scale, effect_l2=effect_l2,
        )  # fmt: skip
        if not vae.is_count_model:
            warn_if_raw_counts(schema.data.expression(adata), source="adata.X" if layer is None else f"adata.layers[{layer!r}]")
        self._assemble(schema=schema, config=config, adata=adata, adversary_config=adversary)

    def __repr__(self) -> str:
        state = f"trained {len(self.history)} epochs" if self.history else "untrained"
        return (
            f"PerturbationModel(likelihood={self.config.vae.likelihood!r}, genes={self.config.vae.input_dim}, "
            f"drugs={len(self.schema.drugs)}, covariates={list(self.schema.covariate_keys)}, {state})"
        )

    @property
    def keys(self) -> ObsKeys:
        return self.schema.keys

    @property
    def drugs(self) -> tuple[str, ...]:
        return self.schema.drugs

    # -- the parts AnnDataModel asks for ---------------------------------------------------------
    def _new_module(self) -> PerturbationVAE:
        """A fresh network whose response knows which (cell type, drug) pairs the training data hold."""
        module = PerturbationVAE(self.config)
        response = getattr(module, "gene_response", None)
        if self.adata is not None and response is not None and response.type_factor is not None:
            c = torch.as_tensor(self.schema.encode_obs(self.adata.obs), dtype=torch.float32)
            drugs, _, covariates = module.split_conditions(c)
            response.set_seen(covariates[:, 0], drugs)
        return module

    @property
    def _network_config(self) -> ModelConfig:
        return self.config.vae

    @property
    def _data_schema(self):
        return self.schema.data

    def _encode_data(self, adata: AnnData, *, align_genes: bool = False):
        return self.schema.data.expression(adata, align_genes=align_genes), self.schema.encode_obs(adata.obs)

    def _adversary_targets(self, adata: AnnData) -> tuple[np.ndarray, int] | None:
        """Code of each cell's drug label (control and each combination are labels), and their number."""
        if self.adversary_config is None:
            return None
        codes, uniques = pd.factorize(adata.obs[self.keys.drug].astype(str), sort=True)
        if uniques.size < 2:
            raise InputDataError("The adversary needs at least two drug labels (e.g. control and one drug).")
        return codes.astype(np.int64), int(uniques.size)

    def _description(self) -> dict:
        return {"perturbation_schema": self.schema.to_dict()}

    @classmethod
    def _parts_from_description(cls, metadata: dict) -> dict:
        return {
            "schema": PerturbationSchema.from_dict(metadata["perturbation_schema"]),
            "config": PerturbationConfig.from_dict(metadata["model_config"]),
        }

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def get_basal_latent(self, adata: AnnData | None = None, *, align_genes: bool = False) -> np.ndarray:
        """Posterior means of the basal latent z_basal, the cell state with the drug removed.

        Parameters
        ----------
        adata
            Cells to encode (None: the training AnnData).
        align_genes
            Reorder ``adata``'s genes by name to the model's (missing genes filled with zeros).

        Returns
        -------
        (n_cells, latent_dim) float32.
        """
        self.module.eval()
        matrix, _ = self._validated(self._data(adata), align_genes=align_genes, with_conditions=False)
        loader = MinibatchLoader(matrix, batch_size=INFERENCE_BATCH, shuffle=False, sparse_counts=False)
        return np.concatenate([self.module.encode(b.x.to(self.device))[0].cpu().numpy() for b in loader])

    @torch.no_grad()
    def predict(
        self,
        control_adata: AnnData,
        *,
        drug: str | Sequence[str],
        dose: float,
        library_size: float | str = "observed",
        seed: int | None = None,
        align_genes: bool = False,
    ) -> AnnData:
        """Counterfactual expression of the given control cells had they received ``drug`` at ``dose``.

        Each control cell's basal latent is inferred from its own expression, the requested drug
        term (and the cell's own covariates) is added, and the decoder gives p(x | z). This is a
        prediction for *these* control cells, never a reconstruction of cells observed under the
        perturbation: the treated cells are neither needed nor read, so the drug/dose/cell type
        combination may be one the model never saw.

        Parameters
        ----------
        control_adata
            Control cells only (``obs[drug_key] == control_value`` when the column exists; without it
            every cell is taken as a control, with a warning), with
            the model's genes and covariate columns (cell type...).
        drug
            One drug, a combination ``"A+B"``, or a list of drugs; all must be known to the model.
        dose
            Dose (>= 0) given to every drug of the combination; 0 gives the control prediction. A dose
            outside the range a drug was trained on is predicted along its fitted dose response,
            with a logged warning.
        library_size
            Total count of each predicted cell (count models): ``"observed"`` keeps each control
            cell's own total; a number gives every cell that total.
        seed
            Seeds the sampled counts in ``layers['sampled']``.
        align_genes
            Fill genes missing from ``control_adata`` with zeros instead of failing.

        Returns
        -------
        AnnData, one row per control cell, with the model's genes: ``X`` the expected expression
        E[x | z] (expected counts for count models, including ZINB dropout); ``layers['sampled']``
        one draw from p(x | z); for count models ``layers['counterfactual']``, each control cell's
        own counts moved by the model's fold change (thinned or topped up,
        :meth:`~genailab.model.perturbation.PerturbationVAE.counterfactual_counts`; observed library
        sizes). Log-normalise ``layers['counterfactual']`` to compare predictions with observed
        cells: the log of ``X`` is not the mean of log-normalised counts (it overstates low
        counts), and ``sampled`` adds the decoder's reconstruction error to every gene;
        ``obs`` the drug, dose and covariate columns plus
        ``obs['control_cell']`` (the source cell's name); ``uns['genailab_perturb']`` the request.
        """
        if not self.is_trained:
            raise ConfigError("The model has not been trained; call fit() (or load a trained model) before predict().")
        label = _label(drug, self.keys)
        self.schema.drug_codes(label)  # unknown drugs fail before any work
        dose = _checked_dose(dose)
        for name, lowest, highest in self.schema.doses_outside_training(label, dose):
            logger.warning(
                "dose %g of %s lies outside the doses it was trained on (%g to %g): the prediction extrapolates "
                "its fitted dose response, which the data did not check there.", dose, name, lowest, highest,
            )
        check_library_size(library_size, observed=True)
        obs = _control_obs(control_adata, self.keys)
        matrix, _ = self._validated(control_adata, align_genes=align_genes, with_conditions=False)
        covariates = self.schema.data.encode_obs(obs, unseen=RETRAIN_UNSEEN)
        c = self.schema.encode(np.repeat(label, obs.shape[0]), np.full(obs.shape[0], dose), covariates)
        with seeded(seed):
            mean, sampled, moved = self._decode_batches(matrix, c, library_size)
        return self._prediction_adata(obs, mean, sampled, moved, label, dose)

    def _decode_batches(self, matrix, c: np.ndarray, library_size) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        self.module.eval()
        device = self.device
        loader = MinibatchLoader(matrix, c, batch_size=INFERENCE_BATCH, shuffle=False, sparse_counts=False)
        means, samples, moved = [], [], []
        for batch in loader:
            x, c_batch = batch.x.to(device), batch.c.to(device)
            z_basal, _ = self.module.encode(x)
            library = None
            if self.config.vae.is_count_model:
                observed = x.sum(1, keepdim=True)
                library = observed if library_size == "observed" else torch.full_like(observed, float(library_size))
            px = self.module.decode(z_basal, c_batch, library)
            means.append(px.mean.cpu().numpy())
            samples.append(px.sample().cpu().numpy())
            if self.config.vae.is_count_model:
                moved.append(self.module.counterfactual_counts(x, c_batch).cpu().numpy())
        counterfactual = np.concatenate(moved).astype(np.float32) if moved else None
        return np.concatenate(means).astype(np.float32), np.concatenate(samples).astype(np.float32), counterfactual

    def _prediction_adata(self, obs: pd.DataFrame, mean, sampled, moved, label: str, dose: float) -> AnnData:
        keys = self.keys
        out_obs = pd.DataFrame(index=[f"{name}|{label}@{dose:g}" for name in obs.index])
        out_obs["control_cell"] = obs.index.to_numpy()
        for key in self.schema.covariate_keys:
            out_obs[key] = obs[key].to_numpy()
        out_obs[keys.drug] = label
        out_obs[keys.dose] = dose
        counts = self.config.vae.is_count_model
        predicted = AnnData(X=mean, obs=out_obs)
        predicted.layers["sampled"] = sp.csr_matrix(sampled) if counts else sampled
        if moved is not None:
            predicted.layers["counterfactual"] = sp.csr_matrix(moved)
        predicted.var_names = list(self.schema.data.gene_names)
        predicted.uns["genailab_perturb"] = {
            "drug": label,
            "dose": dose,
            "n_control_cells": int(obs.shape[0]),
            "semantics": "counterfactual expression of the given control cells under this drug and dose",
        }
        return predicted


def _label(drug: str | Sequence[str], keys: ObsKeys) -> str:
    """One drug label from a label string or a list of drug names."""
    if isinstance(drug, str):
        names = [d.strip() for d in drug.split(keys.separator)]
    else:
        names = [str(d) for d in drug]
    if not names or any(not d for d in names):
        raise ConfigError(f"drug={drug!r} has an empty drug name; name one drug, or join drugs as "
                          f"'A{keys.separator}B' with no leading, trailing or doubled separator.")
    if keys.control in names:
        raise ConfigError(
            f"drug={drug!r} must name one or more drugs (not the control label {keys.control!r}); "
            "for the control state predict dose=0."
        )
    return keys.separator.join(names)


def _checked_dose(dose: float) -> float:
    return check_number("dose", dose, ge=0, hint="0 gives the control prediction.")


def _control_obs(adata: AnnData, keys: ObsKeys) -> pd.DataFrame:
    """The obs of ``adata`` after checking that it holds control cells only."""
    if adata.n_obs == 0:
        raise InputDataError("No control cells were given; predict needs the control cells to perturb.")
    if keys.drug not in adata.obs.columns:  # documented: control cells alone need no drug column
        logger.warning(
            "adata.obs has no %r column, so every one of the %d cells is taken as a control; treated cells among "
            "them would be perturbed as if untreated. Add the column to have them refused.", keys.drug, adata.n_obs,
        )
        return adata.obs
    control = keys.is_control(adata.obs)
    if not control.any():
        raise InputDataError(
            f"None of the {adata.n_obs} cells has the control label {keys.control!r} in obs[{keys.drug!r}]; "
            "predict needs control cells (their counterfactual is what is predicted)."
        )
    if not control.all():
        raise InputDataError(
            f"{int((~control).sum())} of the cells are not controls; predict perturbs control cells only. "
            f"Pass adata[adata.obs[{keys.drug!r}] == {keys.control!r}]."
        )
    return adata.obs
