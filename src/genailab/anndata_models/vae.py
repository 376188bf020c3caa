"""The AnnData-facing conditional VAE: build from an AnnData, fit, embed, denoise, generate, save, load."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.anndata_models.base import (
    INFERENCE_BATCH, MODEL_SET_FIELDS, AnnDataModel, build_config, seeded, storable_params,
)
from genailab.anndata_models.files import warn_if_reference_changed
from genailab.checks import check_library_size, check_number
from genailab.data.schema import DataSchema, category_labels
from genailab.data.validation import EMPTY_CELL_ACTIONS, value_scale, warn_if_raw_counts
from genailab.errors import ConfigError, InputDataError
from genailab.model.adversary import BATCH_CORRECTION, AdversaryConfig
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE
from genailab.train.trainer import elbo_terms

logger = logging.getLogger(__name__)

DENOISED_LIBRARY = 1e4  # get_normalized_expression's default total per cell (count models)
GENERATED_KEY = "genailab_generate"  # uns key of every generated AnnData: {"params": ...}


class VAE(AnnDataModel):
    """A conditional VAE for an AnnData (the scverse way to use :mod:`genailab.model`).

    Parameters
    ----------
    adata
        Cells x genes. Count models read raw counts from ``layer`` (or ``X``).
    likelihood
        ``"nb"`` or ``"zinb"`` for raw counts, ``"gaussian"`` for log-normalised values.
    layer
        ``adata.layers`` key holding the values to model; None uses ``adata.X``.
    condition_keys
        Categorical ``obs`` columns to condition on (batch, cell type, drug...).
    continuous_keys
        Numeric ``obs`` columns to condition on (dose, age...), standardised.
    condition_encoding
        ``"onehot"`` or ``"embedding"`` (learned embeddings, for many categories).
    empty_cells
        What to do with cells whose counts are all zero: ``"error"``, ``"drop"`` or ``"warn"``.
    adversarial_key
        A categorical condition (usually the batch) that an adversarial discriminator on the
        latent must not be able to predict: batch correction. Must be one of ``condition_keys``.
    adversary
        Weight, warm-up and mode of the adversary (:class:`~genailab.model.adversary.AdversaryConfig`);
        default the ``batch_correction`` preset (:data:`~genailab.model.adversary.BATCH_CORRECTION`).
    **model_options
        Architecture options of :class:`~genailab.model.config.ModelConfig` (``latent_dim``,
        ``hidden_dims``, ``dispersion``, ``dropout``, ``norm``, ``activation``, ``inject_condition``,
        ``beta``, ``embedding_dim``).

    Examples
    --------
    >>> model = VAE(adata, likelihood="nb", layer="counts", condition_keys=["batch"])
    >>> model.fit(epochs=50)
    >>> adata.obsm["X_genailab"] = model.get_latent()
    """

    MODEL_NAME = "VAE"
    MODEL_TYPE = "genailab.VAE"

    def __init__(
        self,
        adata: AnnData,
        *,
        likelihood: str = "nb",
        layer: str | None = None,
        condition_keys: Sequence[str] = (),
        continuous_keys: Sequence[str] = (),
        condition_encoding: str = "onehot",
        empty_cells: str = "error",
        adversarial_key: str | None = None,
        adversary: AdversaryConfig | None = None,
        **model_options,
    ):
        if isinstance(condition_keys, str) or isinstance(continuous_keys, str):
            raise ConfigError("condition_keys and continuous_keys take lists of obs columns, e.g. ['batch'].")
        if adversarial_key is not None and adversarial_key not in condition_keys:
            raise ConfigError(
                f"adversarial_key={adversarial_key!r} must also be a condition so the decoder can model the "
                f"batch effect the latent is freed of; add it to condition_keys (now {list(condition_keys)})."
            )
        if adversary is not None and adversarial_key is None:
            raise ConfigError("An adversary needs adversarial_key=<obs column of the batch>.")
        schema = DataSchema.from_anndata(
            adata, layer=layer, categorical_keys=condition_keys, continuous_keys=continuous_keys,
            encoding=condition_encoding,
        )  # fmt: skip
        config = build_config(
            ModelConfig, input_dim=schema.n_genes, likelihood=likelihood, **schema.model_condition_options(),
            **model_options, set_by_model=MODEL_SET_FIELDS,
        )  # fmt: skip
        if not config.is_count_model:  # the scale its values were prepared at, to recognise other preparations
            values = schema.expression(adata)
            warn_if_raw_counts(values, source="adata.X" if layer is None else f"adata.layers[{layer!r}]")
            schema = dataclasses.replace(schema, value_scale=value_scale(values))
        self._assemble(
            schema=schema, config=config, adata=adata, empty_cells=empty_cells, adversarial_key=adversarial_key,
            adversary_config=(adversary or BATCH_CORRECTION) if adversarial_key is not None else None,
        )  # fmt: skip

    def _assemble(self, *, empty_cells: str = "error", adversarial_key: str | None = None, **parts) -> None:
        if empty_cells not in EMPTY_CELL_ACTIONS:
            raise ConfigError(f"empty_cells={empty_cells!r} is not one of {EMPTY_CELL_ACTIONS}.")
        self.empty_cells = empty_cells
        self.adversarial_key = adversarial_key
        super()._assemble(**parts)

    def __repr__(self) -> str:
        state = f"trained {len(self.history)} epochs" if self.history else "untrained"
        return (
            f"VAE(likelihood={self.config.likelihood!r}, genes={self.config.input_dim}, "
            f"latent_dim={self.config.latent_dim}, conditions={self.condition_keys}, {state})"
        )

    # -- the parts AnnDataModel asks for ---------------------------------------------------------
    def _new_module(self) -> ConditionalVAE:
        return ConditionalVAE.from_config(self.config)

    @property
    def _network_config(self) -> ModelConfig:
        return self.config

    @property
    def _empty_cells(self) -> str:
        return self.empty_cells

    def _encode_data(self, adata: AnnData, *, align_genes: bool = False):
        return self.schema.expression(adata, align_genes=align_genes), self.schema.encode_obs(adata.obs)

    def _adversary_targets(self, adata: AnnData) -> tuple[np.ndarray, int] | None:
        if self.adversarial_key is None:
            return None
        categories = self.schema.categories[self.schema.categorical_keys.index(self.adversarial_key)]
        codes = pd.Index(categories).get_indexer(category_labels(adata.obs[self.adversarial_key]))
        return codes, len(categories)

    def _description(self) -> dict:
        return {"schema": self.schema.to_dict(), "empty_cells": self.empty_cells, "adversarial_key": self.adversarial_key}

    @classmethod
    def _parts_from_description(cls, metadata: dict) -> dict:
        warn_if_reference_changed(metadata.get("reference"))  # a query model's (map_query's) reference
        return {
            "schema": DataSchema.from_dict(metadata["schema"]),
            "config": ModelConfig.from_dict(metadata["model_config"]),
            "empty_cells": metadata.get("empty_cells", "error"),
            "adversarial_key": metadata.get("adversarial_key"),
        }

    def constructor_options(self) -> dict:
        """Keyword options of ``VAE(adata, **options)`` that rebuild this model (data handling,
        conditions, adversary and every architecture field of its config) on other data, e.g. to
        retrain it with another ``latent_dim``. Fields the schema derives from the data (genes,
        condition widths) are left to the new data."""
        derived = {"input_dim", "condition_dim", "categorical_sizes", "n_continuous"}
        return {
            "layer": self.schema.layer,
            "condition_keys": list(self.schema.categorical_keys),
            "continuous_keys": list(self.schema.continuous_keys),
            "condition_encoding": self.schema.encoding,
            "empty_cells": self.empty_cells,
            "adversarial_key": self.adversarial_key,
            "adversary": self.adversary_config if self.adversarial_key else None,
            **{k: v for k, v in self.config.to_dict().items() if k not in derived},
        }

    # -- reference mapping -----------------------------------------------------------------------
    def map_query(self, query: AnnData, **options) -> VAE:
        """A model for ``query`` on top of this trained reference: the query's new categories get
        their own parameters and ``fit()`` trains only those.

        Parameters
        ----------
        query
            The new cells, with the reference's condition columns (new categories allowed) and
            genes matched by name.
        **options
            ``unfreeze``, ``epochs``, ``max_missing_fraction`` and the rest of
            :func:`~genailab.anndata_models.mapping.map_query`, which also says what is written.

        Returns
        -------
        An untrained query VAE; call ``fit()`` on it.

        >>> query_model = reference.map_query(query).fit(seed=0)  # doctest: +SKIP
        """
        from genailab.anndata_models.mapping import map_query  # the mapping module builds on this class

        return map_query(query, self, **options)

    # -- conditions ------------------------------------------------------------------------------
    @property
    def condition_keys(self) -> list[str]:
        """The obs columns the model conditions on: categorical, then continuous."""
        return list(self.schema.categorical_keys + self.schema.continuous_keys)

    @property
    def default_library(self) -> float:
        """Total count a decoded cell gets when no library size is given (the training median)."""
        return float(self.module.default_library)

    def encode_conditions(
        self, obs: pd.DataFrame | None = None, overrides: Mapping[str, object] | None = None, *, n_cells: int | None = None
    ) -> np.ndarray | None:
        """The condition matrix the network reads.

        Parameters
        ----------
        obs
            Each cell's conditions (the model's condition columns).
        overrides
            Values that replace some conditions, one per key for every cell (e.g.
            ``{"batch": "batch_0"}`` decodes every cell as if from that batch). Without ``obs``
            every condition must be here.
        n_cells
            Rows to make when ``obs`` is None (default 1).

        Returns
        -------
        (n_cells, raw_condition_dim) float32, or None for a model without conditions.
        """
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"conditions must be a dict of condition key -> value (e.g. {{'batch': 'batch_0'}}), "
                              f"not {type(overrides).__name__}.")
        overrides = dict(overrides or {})
        if overrides and self.config.inject_condition not in ("both", "decoder"):
            raise ConfigError(
                f"This model's decoder does not read the conditions (inject_condition={self.config.inject_condition!r}), "
                "so conditions=... would change nothing; build the model with inject_condition='both' or 'decoder' "
                "to decode cells under other conditions.", argument="conditions",
            )
        several = [key for key, value in overrides.items() if np.ndim(value) > 0]
        if several:
            raise ConfigError(
                f"conditions[{several[0]!r}] must be one value for every cell, not an array; to decode cells under "
                f"values of their own, set them in obs[{several[0]!r}] and leave the key out of conditions."
            )
        if obs is None:
            return self.schema.encode_values(overrides, 1 if n_cells is None else n_cells)
        keys = self.condition_keys
        unknown = sorted(set(overrides) - set(keys))
        if unknown:
            raise ConfigError(f"Unknown condition keys {unknown}; the model's conditions are {keys}.")
        self.schema.check_known_values(overrides)  # what was asked for first, then what is missing
        frame = pd.DataFrame(index=obs.index)
        for key in keys:
            if key in overrides:
                frame[key] = [overrides[key]] * len(obs.index)
            elif key in obs.columns:
                frame[key] = obs[key].to_numpy()
            else:
                known = dict(zip(self.schema.categorical_keys, self.schema.categories)).get(key)
                example = repr(str(known[0])) if known is not None and len(known) else "VALUE"
                raise ConfigError(
                    f"No values for the model's condition {key!r}: add the obs column, or give every cell one "
                    f"value, e.g. conditions[{key!r}] = {example}"
                    + (f" (known: {[str(c) for c in known][:20]})." if known is not None else ".")
                )
        return self.schema.encode_obs(frame)

    # -- inference -------------------------------------------------------------------------------
    @torch.inference_mode()
    def get_latent(
        self,
        adata: AnnData | None = None,
        *,
        indices: np.ndarray | None = None,
        n_samples: int = 0,
        seed: int | None = 0,
        align_genes: bool = False,
        batch_size: int = INFERENCE_BATCH,
    ) -> np.ndarray:
        """Posterior means of z under q(z|x,c), or draws from it.

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        n_samples
            0 for the posterior means; k > 0 for k draws per cell.
        seed
            Seed of the draws (None: torch's global random state). The draws of a cell depend on
            the cells asked for, so compare draws of the same selection.
        align_genes
            Reorder ``adata``'s genes by name to the model's (missing genes filled with zeros).
        batch_size
            Cells per forward pass; changes memory, not the means.

        Returns
        -------
        (n_cells, latent_dim) float32 means, or (n_samples, n_cells, latent_dim) draws.
        """
        check_number("n_samples", n_samples, integer=True, ge=0, hint="0 gives the posterior means.")
        self.module.eval()
        device = self.device
        means, variances = [], []
        loader = self._loader(adata, indices=indices, align_genes=align_genes, batch_size=batch_size, sparse_counts=True)
        for batch in loader:
            batch = batch.to(device)  # off the CPU without its sparse entries: the dense encoder
            mean, var = _encode(self.module, batch)
            means.append(mean)
            variances.append(var)
        mean, var = torch.cat(means).cpu(), torch.cat(variances).cpu()  # one copy to the host, not one per batch
        if n_samples <= 0:
            return mean.numpy()
        with seeded(seed):
            eps = torch.randn((n_samples, *mean.shape))
        return (mean + var.sqrt() * eps).numpy()

    def _check_include_dropout(self, include_dropout: bool) -> None:
        """``include_dropout`` only changes a ZINB model's mean: refused elsewhere rather than ignored."""
        if include_dropout and self.config.likelihood != "zinb":
            raise ConfigError(f"include_dropout=True needs a zinb model (its dropout probability); this model's "
                              f"likelihood is {self.config.likelihood!r}, whose mean has no dropout term.")

    @torch.no_grad()
    def decode(
        self,
        z: np.ndarray,
        *,
        conditions: np.ndarray | None = None,
        library: np.ndarray | float | None = None,
        sample: bool = False,
        include_dropout: bool = False,
        seed: int | None = None,
    ) -> np.ndarray:
        """Expected expression E[x|z,c] of latent points, or with ``sample`` values drawn from p(x|z,c).

        Parameters
        ----------
        z
            Latent points, (n, latent_dim).
        conditions
            Their condition matrix from :meth:`encode_conditions`, (n, raw_condition_dim), an obs
            table with the condition columns (n rows, e.g. ``adata.obs``), or a dict of one value
            per condition for every point (e.g. ``{"batch": "batch_0"}``); None for a model without
            conditions.
        library
            Total count per cell, (n,) or one number (count models); None gives the training median.
        sample
            Draw counts (values) instead of returning the mean.
        include_dropout
            ZINB: include the dropout probability in the mean.
        seed
            Seeds the draws; None uses torch's global random state.

        Returns
        -------
        (n, n_genes) float32.
        """
        z = np.asarray(z, dtype=np.float32)
        self._check_include_dropout(include_dropout)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ConfigError(f"z must be (n, latent_dim={self.config.latent_dim}) latent points, got shape {z.shape}.",
                              argument="z")
        if not np.isfinite(z).all():
            rows = np.flatnonzero(~np.isfinite(z).all(axis=1))
            raise InputDataError(f"z has NaN or infinite values in {rows.size} of its {z.shape[0]} rows (e.g. row "
                                 f"{rows[0]}); decode finite latent points.", argument="z")  # fmt: skip
        n = z.shape[0]
        if isinstance(conditions, Mapping):  # one value per condition for every point, as other methods take them
            conditions = self.encode_conditions(None, conditions, n_cells=n)
        elif isinstance(conditions, pd.DataFrame):  # an obs table: one row of condition columns per point
            conditions = self.encode_conditions(conditions)
        if conditions is not None and np.shape(conditions)[0] != n:
            raise ConfigError(f"conditions has {np.shape(conditions)[0]} rows for {n} latent points; give one row per "
                              "point (encode_conditions) or a dict of one value per condition.", argument="conditions")
        if library is None:
            library = np.full(n, self.default_library, dtype=np.float32)
        library = np.asarray(library, dtype=np.float32)
        if library.ndim > 1 or library.size not in (1, n) or not (np.isfinite(library).all() and (library > 0).all()):
            raise ConfigError(f"library must be one positive number or a 1-D array of one per latent point ({n}), "
                              f"finite; got shape {library.shape}, smallest {library.min() if library.size else 'none'}.",
                              argument="library")
        library = np.broadcast_to(library.reshape(-1) if library.ndim else library, (n,))
        module = self.module.eval()
        device = self.device
        out = _cells_by_genes(n, self.schema.n_genes)
        with seeded(seed):
            for start in range(0, n, INFERENCE_BATCH):
                rows = slice(start, start + INFERENCE_BATCH)
                z_batch = torch.as_tensor(z[rows], device=device)
                c_batch = None if conditions is None else torch.as_tensor(conditions[rows], device=device)
                lib_batch = torch.tensor(library[rows, None], device=device)
                if sample:
                    values = module.decode(z_batch, c_batch, lib_batch).sample()
                else:
                    values = module.expected_expression(z_batch, c_batch, lib_batch, include_dropout=include_dropout)
                out[rows] = values.cpu().numpy()
        return out

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        *,
        indices: np.ndarray | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = DENOISED_LIBRARY,
        conditions: Mapping[str, object] | None = None,
        n_samples: int = 1,
        include_dropout: bool = False,
        align_genes: bool = False,
        batch_size: int = INFERENCE_BATCH,
        return_pandas: bool = False,
        seed: int | None = 0,
    ) -> np.ndarray | pd.DataFrame:
        """Denoised expected expression E[x | z, c].

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        gene_list
            Genes to return, in this order (None: every model gene).
        library_size
            Count models: total count of each decoded cell, a number or ``"observed"`` (each cell's
            own total). The Gaussian model returns the decoded mean and ignores it.
        conditions
            Condition values that replace the cells' own in the decoder, one per key (e.g.
            ``{"batch": "batch_0"}`` projects every cell into one batch).
        n_samples
            1 decodes the posterior mean; k > 1 averages k posterior draws of z (seeded by ``seed``).
        include_dropout
            ZINB: multiply by (1 - dropout probability); by default the NB mean is returned, the
            expression without technical dropout.
        align_genes
            Reorder ``adata``'s genes by name to the model's (missing genes filled with zeros).
        batch_size
            Cells per forward pass.
        return_pandas
            Return a DataFrame indexed by cell and gene names.
        seed
            Seed of the posterior draws (None: torch's global random state).

        Returns
        -------
        (n_cells, n_genes) float32 array, or a DataFrame with ``return_pandas``.
        """
        check_library_size(library_size, observed=True)
        if not self.config.is_count_model and library_size not in (DENOISED_LIBRARY, "observed"):
            raise ConfigError(
                f"library_size={library_size} applies to count models (nb, zinb); the Gaussian model decodes the mean "
                "of the values it was trained on, at their own scale. Leave library_size out.", argument="library_size"
            )
        check_number("n_samples", n_samples, integer=True, ge=1, hint="1 decodes the posterior mean.")
        self._check_include_dropout(include_dropout)
        columns = self._gene_positions(gene_list)
        module = self.module.eval()
        device = self.device
        adata = self._data(adata)
        decode_conditions = None if conditions is None else self.encode_conditions(adata.obs, conditions)
        loader = self._loader(adata, indices=indices, align_genes=align_genes, batch_size=batch_size, sparse_counts=True)
        n_rows = loader.indices.size  # the rows asked for, as the loader reads them (a mask becomes positions)
        out = _cells_by_genes(n_rows, len(columns) if columns is not None else self.schema.n_genes)
        result = torch.from_numpy(out)  # the batches' rows are written into views of it
        gene_index = None if columns is None else torch.as_tensor(columns, device=device)
        # Where a batch's decoded means go: straight into the result (CPU, all genes, one draw) or a
        # device buffer, reused across batches, that is then summed, subset or copied over.
        direct = device.type == "cpu" and columns is None and n_samples == 1
        buffer = None
        done = 0
        with seeded(seed if n_samples > 1 else None):
            for batch in loader:
                rows = batch.index.numpy()
                target = result[done : done + len(rows)]  # the loader keeps the cells' order
                done += len(rows)
                batch = batch.to(device)
                mean, var = _encode(module, batch)
                c = batch.c if decode_conditions is None else torch.as_tensor(decode_conditions[rows], device=device)
                if library_size == "observed":
                    library = batch.x.sum(1, keepdim=True)
                else:
                    library = torch.full((len(rows), 1), float(library_size), device=device)
                if direct:
                    module.expected_expression(mean, c, library, include_dropout=include_dropout, out=target)
                    continue
                if buffer is None or buffer.shape[0] != len(rows):
                    buffer = torch.empty((len(rows), self.schema.n_genes), device=device)
                    total = torch.empty_like(buffer) if n_samples > 1 else buffer
                if n_samples == 1:
                    module.expected_expression(mean, c, library, include_dropout=include_dropout, out=buffer)
                else:
                    total.zero_()
                    for _ in range(n_samples):
                        z = module.reparameterize(mean, var)
                        total.add_(module.expected_expression(z, c, library, include_dropout=include_dropout, out=buffer))
                    total.div_(n_samples)
                target.copy_(total if gene_index is None else total.index_select(1, gene_index))
        if not return_pandas:
            if columns is None and not self.schema.in_model_order(adata):
                logger.warning(
                    "The %d columns follow the model's genes (model.schema.gene_names), not adata.var_names, "
                    "whose genes are in another order or differ; pass return_pandas=True for named columns, or "
                    "adata[:, list(model.schema.gene_names)] to store the result as a layer.", out.shape[1])
            return out
        names = adata.obs_names[loader.indices]
        genes = list(self.schema.gene_names) if columns is None else [self.schema.gene_names[i] for i in columns]
        return pd.DataFrame(out, index=names, columns=genes)

    def _gene_positions(self, gene_list: Sequence[str] | None) -> list[int] | None:
        if gene_list is None:
            return None
        if isinstance(gene_list, str):
            gene_list = [gene_list]
        if len(gene_list) == 0:
            raise ConfigError("gene_list is empty; name at least one gene, or pass None for every gene.")
        position = pd.Index(self.schema.gene_names).get_indexer(list(gene_list))
        if (position < 0).any():
            unknown = [g for g, p in zip(gene_list, position) if p < 0][:10]
            raise ConfigError(f"gene_list names genes the model does not have: {unknown}.")
        return position.tolist()

    @torch.no_grad()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        *,
        n_samples: int = 100,
        indices: np.ndarray | None = None,
        align_genes: bool = False,
        batch_size: int = 256,
        seed: int | None = 0,
    ) -> np.ndarray:
        """Held-out log-likelihood per cell, log p(x|c), estimated by importance sampling (the IWAE
        bound). Higher is better; compare models on the same cells, e.g.
        ``indices=model.validation_indices``.

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        n_samples
            Importance samples per cell; more tighten the bound.
        align_genes
            Reorder ``adata``'s genes by name to the model's (missing genes filled with zeros).
        batch_size
            Cells per pass. The samples are drawn batch by batch, so they depend on it and on the
            cells given.
        seed
            Seed of the samples (None: torch's global random state).

        Returns
        -------
        (n_cells,) float32 log-likelihoods in nats.
        """
        check_number("n_samples", n_samples, integer=True, ge=1)
        self.module.eval()
        device = self.device
        loader = self._loader(adata, indices=indices, align_genes=align_genes, batch_size=batch_size)
        with seeded(seed):
            out = [
                self.module.marginal_log_likelihood(b.x, b.c, n_samples=n_samples).cpu()
                for b in (batch.to(device) for batch in loader)
            ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def get_elbo(
        self, adata: AnnData | None = None, *, indices: np.ndarray | None = None, seed: int | None = 0
    ) -> dict[str, float]:
        """The negative ELBO's terms, averaged over cells, at KL weight 1.

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        seed
            Seed of the one posterior sample per cell (None: torch's global random state).

        Returns
        -------
        dict with the mean per-cell reconstruction -log p(x|z,c), KL(q(z|x,c) || p(z)) and their sum.
        """
        loader = self._loader(adata, indices=indices, sparse_counts=True)
        with seeded(seed):
            return elbo_terms(self.module, loader, self.device)

    @torch.no_grad()
    def get_reconstruction_error(self, adata: AnnData | None = None, *, indices: np.ndarray | None = None) -> dict:
        """How well the posterior mean reconstructs the cells.

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).

        Returns
        -------
        dict: ``nll``, the mean per-cell -log p(x | z = E[z|x,c], c) (count models at the observed
        library); ``mse``, the mean squared difference of observed and expected values per entry
        (on the log1p scale for count models); ``n_cells``.
        """
        module = self.module.eval()
        is_count = self.config.is_count_model
        nll, squared, n_cells = 0.0, 0.0, 0
        for batch in self._loader(adata, indices=indices):
            batch = batch.to(self.device)
            x, c = batch.x, batch.c
            mean, _ = module.encode(x, c)
            library = x.sum(1, keepdim=True) if is_count else None
            nll += float(-module.decode(mean, c, library).log_prob(x).sum())
            expected = module.expected_expression(mean, c, library)
            difference = (torch.log1p(x) - torch.log1p(expected)) if is_count else (x - expected)
            squared += float(difference.double().pow(2).sum())
            n_cells += x.shape[0]
        return {"nll": nll / n_cells, "mse": squared / (n_cells * self.config.input_dim), "n_cells": n_cells}

    @torch.no_grad()
    def posterior_predictive_sample(
        self, adata: AnnData | None = None, *, indices: np.ndarray | None = None, n_samples: int = 1, seed: int | None = 0
    ) -> np.ndarray:
        """Posterior predictive replicates x_rep ~ p(x | z, c), z ~ q(z | x, c), each cell at its
        observed library. The library is the NB mean's total (scVI's convention), so ZINB replicates
        lose the dropout share on top: their totals run about (1 - mean dropout) of the observed
        ones (0.71 at 30% dropout).

        Parameters
        ----------
        adata
            Cells to use, with the model's genes and condition columns; None: the training AnnData.
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        n_samples
            Replicates per cell.
        seed
            Seed of the draws (None: torch's global random state).

        Returns
        -------
        (n_samples, n_cells, n_genes) float32.
        """
        check_number("n_samples", n_samples, integer=True, ge=1)
        module = self.module.eval()
        draws = []
        with seeded(seed):
            for _ in range(n_samples):
                draws.append(np.concatenate([
                    module(b.x, b.c).px.sample().cpu().numpy()
                    for b in (batch.to(self.device) for batch in self._loader(adata, indices=indices))
                ]))  # fmt: skip
        return np.stack(draws).astype(np.float32)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        conditions: Mapping[str, object] | None = None,
        library_size: float | None = None,
        seed: int | None = 0,
    ) -> AnnData:
        """Generate ``n`` cells from the prior: z ~ N(0, I), x ~ p(x | z, c).

        Parameters
        ----------
        n
            Cells to generate.
        conditions
            One value per condition of the model, shared by every generated cell; every condition
            must be given.
        library_size
            Count models: expected total count per generated cell (None: the training median; for
            ZINB the total before technical dropout, which then zeroes some counts).
        seed
            Seed of the draws (None: torch's global random state).

        Returns
        -------
        AnnData of :func:`generated_anndata`: sampled values in ``X`` (and in the model's layer),
        the conditions in ``obs``, ``uns['genailab_generate']['params']``.
        """
        n = check_number("n", n, integer=True, ge=1)
        library_size = check_library_size(library_size, allow_none=True)
        if library_size is not None and not self.config.is_count_model:
            raise ConfigError(f"library_size={library_size} applies to count models (nb, zinb); the Gaussian model "
                              "samples values at the scale it was trained on. Leave library_size out.",
                              argument="library_size")  # fmt: skip
        values = dict(conditions or {})
        c = self.encode_conditions(None, values, n_cells=n)
        with seeded(seed):
            z = torch.randn(n, self.config.latent_dim).numpy()
            x = self.decode(z, conditions=c, library=library_size, sample=True)
        obs = pd.DataFrame({k: [v] * n for k, v in values.items()})
        return generated_anndata(self, x, obs, params={"n": n, "conditions": values, "library_size": library_size,
                                                       "seed": seed, "source": "prior"})  # fmt: skip


def generated_anndata(model: VAE, values: np.ndarray, obs: pd.DataFrame, *, params: Mapping[str, object]) -> AnnData:
    """Generated cells as an AnnData a scanpy user can concatenate with the real data.

    ``values`` (n, n_genes) go to ``X`` (CSR for count models) and, when the model reads a layer,
    to that layer too, so ``anndata.concat([adata, generated])`` keeps it; the model's categorical
    conditions in ``obs`` get the training categories; ``uns['genailab_generate']['params']``
    records the request.
    """
    values = np.asarray(values, dtype=np.float32)
    obs = obs.copy()
    obs.index = [f"generated_{i}" for i in range(values.shape[0])]
    for key, categories in zip(model.schema.categorical_keys, model.schema.categories):
        if key in obs:
            obs[key] = pd.Categorical(category_labels(obs[key]), categories=list(categories))
    matrix = sp.csr_matrix(values) if model.config.is_count_model else values
    generated = AnnData(X=matrix, obs=obs)
    generated.var_names = list(model.schema.gene_names)
    if model.schema.layer is not None:
        generated.layers[model.schema.layer] = matrix.copy()
    generated.uns[GENERATED_KEY] = {"params": storable_params(params)}
    return generated


def _encode(module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x,c) of a loader batch: from its stored entries when it has them (the batch's dense x
    is then never built), else from x."""
    if batch.x_sparse is not None:
        return module.encode(None, batch.c, x_sparse=batch.x_sparse)
    return module.encode(batch.x, batch.c)


def _cells_by_genes(n_cells: int, n_genes: int) -> np.ndarray:
    """An uninitialised (n_cells, n_genes) float32 result for the batches to be written into.

    Allocated by torch rather than numpy: numpy asks the kernel for transparent huge pages on large
    arrays, and on a machine whose memory a training run has just fragmented, the first write
    then waits for the kernel to compact memory (200-390 ms for 20,000 x 2,000 cells, about as long
    as decoding them); torch's plain pages cost 60-130 ms.
    """
    return torch.empty((n_cells, n_genes), dtype=torch.float32).numpy()
