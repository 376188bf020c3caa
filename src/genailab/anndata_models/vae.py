"""The AnnData-facing model: build from an AnnData, fit, embed, denoise, generate, save, load."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.data.backed import ChunkedLoader, minibatch_loader
from genailab.data.loader import MinibatchLoader
from genailab.data.schema import DataSchema
from genailab.data.validation import EMPTY_CELL_ACTIONS, cell_totals, check_expression, empty_cells
from genailab.errors import CheckpointError, ConfigError, InputDataError
from genailab.model.adversary import AdversaryConfig, BatchDiscriminator
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE
from genailab.anndata_models.files import check_writable, data_fingerprint, load_model_files, save_model_files
from genailab.train.config import TrainConfig
from genailab.train.trainer import Trainer, load_checkpoint, resolve_device, seed_everything

logger = logging.getLogger(__name__)

_INFERENCE_BATCH = 1024
_MIN_CELLS = 10


class VAE:
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
        Weight, warm-up and mode of the adversary (:class:`~genailab.model.adversary.AdversaryConfig`).
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
        if adversarial_key is not None and adversarial_key not in condition_keys:
            raise ConfigError(
                f"adversarial_key={adversarial_key!r} must also be a condition so the decoder can model the "
                f"batch effect the latent is freed of; add it to condition_keys (now {list(condition_keys)})."
            )
        if adversary is not None and adversarial_key is None:
            raise ConfigError("An adversary needs adversarial_key=<obs column of the batch>.")
        if empty_cells not in EMPTY_CELL_ACTIONS:
            raise ConfigError(f"empty_cells={empty_cells!r} is not one of {EMPTY_CELL_ACTIONS}.")
        if isinstance(condition_keys, str) or isinstance(continuous_keys, str):
            raise ConfigError("condition_keys and continuous_keys take lists of obs columns, e.g. ['batch'].")
        schema = DataSchema.from_anndata(
            adata,
            layer=layer,
            categorical_keys=condition_keys,
            continuous_keys=continuous_keys,
            encoding=condition_encoding,
        )
        config = _build_config(
            ModelConfig,
            input_dim=schema.n_genes,
            likelihood=likelihood,
            **schema.model_condition_options(),
            **model_options,
        )
        self.schema = schema
        self.config = config
        self.empty_cells = empty_cells
        self.adversarial_key = adversarial_key
        self.adversary_config = adversary or (AdversaryConfig() if adversarial_key is not None else None)
        self.module = ConditionalVAE.from_config(config)
        self.adversary: BatchDiscriminator | None = None
        self.adata = adata
        self.train_config: TrainConfig | None = None
        self.history: list[dict] = []
        self.training_info: dict = {}

    def __repr__(self) -> str:
        state = f"trained {len(self.history)} epochs" if self.history else "untrained"
        return (
            f"VAE(likelihood={self.config.likelihood!r}, genes={self.config.input_dim}, "
            f"latent_dim={self.config.latent_dim}, conditions={list(self.schema.categorical_keys + self.schema.continuous_keys)}, "
            f"{state})"
        )

    @property
    def is_trained(self) -> bool:
        return bool(self.history)

    # -- data ------------------------------------------------------------------------------------
    def _prepare(self, adata: AnnData | None, *, align_genes: bool = False):
        """Validated (matrix, conditions, rows to use) for ``adata`` (default: the training data)."""
        adata = self._adata(adata)
        if adata.n_obs == 0:
            raise InputDataError("The AnnData has no cells (0 rows); pass at least one cell.")
        matrix = self.schema.expression(adata, align_genes=align_genes)
        check_expression(matrix, counts=self.config.is_count_model, source="The expression matrix")
        conditions = self.schema.encode_obs(adata.obs)
        return matrix, conditions

    def _adata(self, adata: AnnData | None) -> AnnData:
        if adata is not None:
            return adata
        if self.adata is None:
            raise ConfigError("This model was loaded without an AnnData; pass adata=... explicitly.")
        return self.adata

    # -- training --------------------------------------------------------------------------------
    def fit(
        self,
        config: TrainConfig | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        **options,
    ) -> VAE:
        """Train on the AnnData the model was built with.

        Parameters
        ----------
        config
            A :class:`~genailab.train.config.TrainConfig`; or give its fields as keyword options
            (``epochs``, ``batch_size``, ``lr``, ``kl_warmup_epochs``, ``seed``...).
        checkpoint_dir
            Folder for resumable checkpoints (``checkpoint.pt``), written every
            ``checkpoint_every`` epochs.
        resume_from
            A checkpoint file to continue from; training then reaches the same result as an
            uninterrupted run with the same seed.

        Returns
        -------
        The model itself; ``history`` holds one record per epoch (train/validation reconstruction,
        KL and negative ELBO, KL weight, learning rate, seconds).
        """
        if config is None:
            config = _build_config(TrainConfig, **options)
        elif options:
            raise ConfigError("Pass either a TrainConfig or keyword options to fit(), not both.")
        if config.batch_size == 1 and self.config.norm == "batch":
            raise ConfigError("batch_size=1 cannot train batch normalisation; use batch_size >= 2 or norm='layer'.")
        matrix, conditions = self._prepare(None)
        keep = empty_cells(matrix, action=self.empty_cells, source="The training data")
        rows = np.flatnonzero(keep)
        train_rows, val_rows = _split(rows, config.validation_fraction, config.seed)

        seed_everything(config.seed, deterministic=config.deterministic)
        if resume_from is None:
            self.module = ConditionalVAE.from_config(self.config)  # initial weights depend on the seed
            self.adversary = self._new_adversary()
        if self.config.is_count_model:
            library = cell_totals(matrix)[train_rows]
            self.module.default_library.fill_(float(np.median(library)))

        checkpoint_path = check_writable(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
        trainer = Trainer(
            self.module,
            config,
            checkpoint_path=checkpoint_path,
            checkpoint_extra={"schema": self.schema.to_dict(), "empty_cells": self.empty_cells},
            adversary=self.adversary,
        )
        if resume_from is not None:
            trainer.load_state_dict(_checked_checkpoint(resume_from, self.config, config))
        rank_rows = trainer.dist.shard(train_rows)  # all rows unless running under torchrun
        drop_last = rank_rows.size % config.batch_size == 1  # a batch of one cell breaks batch norm
        labels = self._adversary_labels()
        train_loader = minibatch_loader(
            matrix, conditions, labels=labels, indices=rank_rows, batch_size=config.batch_size, seed=config.seed,
            drop_last=drop_last, chunk_rows=config.chunk_rows, chunks_in_memory=config.chunks_in_memory,
        )
        val_loader = (
            minibatch_loader(matrix, conditions, labels=labels, indices=val_rows, batch_size=_INFERENCE_BATCH, shuffle=False)
            if val_rows.size
            else None
        )
        self.history = trainer.fit(train_loader, val_loader)
        self.train_config = config
        self.training_info = {
            "n_cells": int(matrix.shape[0]),
            "n_train": int(train_rows.size),
            "n_validation": int(val_rows.size),
            "stopped_early": trainer.stopped_early,
            "data_sha256": data_fingerprint(matrix, conditions, self.schema.gene_names),
        }
        self._split = {"train": train_rows, "validation": val_rows}
        self.module.eval()
        return self

    def _new_adversary(self) -> BatchDiscriminator | None:
        if self.adversarial_key is None:
            return None
        n_batches = len(self.schema.categories[self.schema.categorical_keys.index(self.adversarial_key)])
        return BatchDiscriminator(self.config.latent_dim, n_batches, self.adversary_config)

    def _adversary_labels(self) -> np.ndarray | None:
        """Codes of ``adversarial_key`` for every cell of the training data, or None."""
        if self.adversarial_key is None:
            return None
        position = self.schema.categorical_keys.index(self.adversarial_key)
        values = self.adata.obs[self.adversarial_key].astype(str)
        return pd.Index(self.schema.categories[position]).get_indexer(values)

    # -- inference -------------------------------------------------------------------------------
    def _loader(self, adata: AnnData | None, align_genes: bool, batch_size: int) -> MinibatchLoader | ChunkedLoader:
        matrix, conditions = self._prepare(adata, align_genes=align_genes)
        return minibatch_loader(matrix, conditions, batch_size=batch_size, shuffle=False, sparse_counts=False)

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def get_latent(
        self,
        adata: AnnData | None = None,
        *,
        n_samples: int = 0,
        align_genes: bool = False,
        batch_size: int = _INFERENCE_BATCH,
    ) -> np.ndarray:
        """Posterior means of z, (n_cells, latent_dim); with ``n_samples`` > 0, draws from q(z|x,c)
        instead, (n_samples, n_cells, latent_dim)."""
        self.module.eval()
        device = self._device()
        means, variances = [], []
        for batch in self._loader(adata, align_genes, batch_size):
            batch = batch.to(device)
            mean, var = self.module.encode(batch.x, batch.c)
            means.append(mean.cpu())
            variances.append(var.cpu())
        mean, var = torch.cat(means), torch.cat(variances)
        if n_samples <= 0:
            return mean.numpy()
        eps = torch.randn((n_samples, *mean.shape))
        return (mean + var.sqrt() * eps).numpy()

    @torch.no_grad()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        *,
        n_samples: int = 100,
        indices: np.ndarray | None = None,
        align_genes: bool = False,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Held-out log-likelihood per cell, log p(x|c) estimated by importance sampling (IWAE
        bound with ``n_samples`` samples), (n_cells,) or (len(indices),). Higher is better; compare
        models on the same cells, e.g. ``indices=model.validation_indices``."""
        self.module.eval()
        device = self._device()
        matrix, conditions = self._prepare(adata, align_genes=align_genes)
        loader = minibatch_loader(matrix, conditions, indices=indices, batch_size=batch_size, shuffle=False,
                                  sparse_counts=False)
        out = [
            self.module.marginal_log_likelihood(b.x, b.c, n_samples=n_samples).cpu()
            for b in (batch.to(device) for batch in loader)
        ]
        return torch.cat(out).numpy()

    @property
    def validation_indices(self) -> np.ndarray:
        """Rows of the training AnnData held out for validation (never used for gradient steps)."""
        split = getattr(self, "_split", None)
        if split is None:
            raise ConfigError("The model has not been trained, so it has no validation cells.")
        return split["validation"]

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        *,
        library_size: float | str = 1e4,
        conditions: Mapping[str, object] | None = None,
        n_samples: int = 1,
        include_dropout: bool = False,
        align_genes: bool = False,
        batch_size: int = _INFERENCE_BATCH,
    ) -> np.ndarray:
        """Denoised expected expression E[x | z, c], (n_cells, n_genes) float32.

        For count models this is the decoder's expression proportions times ``library_size`` (a
        number, or ``"observed"`` for each cell's own total). For the Gaussian model it is the decoded
        mean. ``conditions`` replaces the cells' own conditions in the decoder (e.g.
        ``{"batch": "batch_0"}`` to project every cell into one batch). With ``n_samples`` > 1, the
        result averages over posterior samples of z; with 1 it decodes the posterior mean. For ZINB the
        NB mean is returned (the expression without technical dropout) unless ``include_dropout``.
        """
        if not (library_size == "observed" or (isinstance(library_size, (int, float)) and library_size > 0)):
            raise ConfigError(f"library_size must be a positive number or 'observed', got {library_size!r}.")
        self.module.eval()
        device = self._device()
        adata = self._adata(adata)
        loader = self._loader(adata, align_genes, batch_size)
        decode_conditions = None
        if conditions is not None:
            decode_conditions = self.schema.encode_obs(_override_obs(adata.obs, self.schema, conditions))
        out = np.empty((adata.n_obs, self.schema.n_genes), dtype=np.float32)
        done = 0
        for batch in loader:
            rows = batch.index.numpy()
            batch = batch.to(device)
            mean, var = self.module.encode(batch.x, batch.c)
            c = batch.c if decode_conditions is None else torch.from_numpy(decode_conditions[rows]).to(device)
            if library_size == "observed":
                library = batch.x.sum(1, keepdim=True)
            else:
                library = torch.full((batch.x.shape[0], 1), float(library_size), device=device)
            if n_samples <= 1:
                expression = self.module.expected_expression(mean, c, library, include_dropout=include_dropout)
            else:
                expression = sum(
                    self.module.expected_expression(self.module.reparameterize(mean, var), c, library,
                                                    include_dropout=include_dropout)
                    for _ in range(n_samples)
                ) / n_samples
            out[done : done + len(rows)] = expression.cpu().numpy()  # the loader keeps the cells' order
            done += len(rows)
        return out

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        conditions: Mapping[str, object] | None = None,
        library_size: float | None = None,
        seed: int | None = None,
    ) -> AnnData:
        """Generate ``n`` cells from the prior: z ~ N(0, I), x ~ p(x | z, c).

        Returns an AnnData with the sampled values in ``X`` (counts for count models), the
        conditions in ``obs`` and the model's genes as ``var_names``. ``library_size`` is the total
        count per generated cell (default: the training median).
        """
        if seed is not None:
            torch.manual_seed(seed)
        self.module.eval()
        values = dict(conditions or {})
        c = self.schema.encode_values(values, n)
        c_tensor = None if c is None else torch.from_numpy(c).to(self._device())
        x = self.module.sample(n, c_tensor, library=library_size).cpu().numpy().astype(np.float32)
        obs = pd.DataFrame({k: [v] * n for k, v in values.items()}, index=[f"generated_{i}" for i in range(n)])
        for key in self.schema.categorical_keys:
            obs[key] = pd.Categorical(obs[key].astype(str), categories=self.schema.categories[self.schema.categorical_keys.index(key)])
        generated = AnnData(X=sp.csr_matrix(x) if self.config.is_count_model else x, obs=obs)
        generated.var_names = list(self.schema.gene_names)
        generated.uns["genailab_generated"] = {"n": n, "conditions": {k: str(v) for k, v in values.items()}}
        return generated

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to ``directory`` (genailab.json + model.pt); returns the folder."""
        directory = Path(directory)
        if (directory / "genailab.json").exists() and not overwrite:
            raise CheckpointError(f"{directory} already holds a saved model; pass overwrite=True to replace it.")
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if self.adversary is not None:
            tensors.update({f"adversary.{k}": v for k, v in self.adversary.state_dict().items()})
        split = getattr(self, "_split", None)
        if split is not None:
            tensors["split.train"] = torch.from_numpy(split["train"])
            tensors["split.validation"] = torch.from_numpy(split["validation"])
        metadata = {
            "model_config": self.config.to_dict(),
            "train_config": None if self.train_config is None else self.train_config.to_dict(),
            "schema": self.schema.to_dict(),
            "empty_cells": self.empty_cells,
            "adversarial_key": self.adversarial_key,
            "adversary_config": None if self.adversary_config is None else self.adversary_config.to_dict(),
            "training": self.training_info,
            "history": self.history,
        }
        return save_model_files(directory, metadata=metadata, tensors=tensors)

    @classmethod
    def load(cls, directory: str | Path, adata: AnnData | None = None, *, device: str = "cpu") -> VAE:
        """Load a saved model; ``adata`` (optional) becomes the default data for inference."""
        metadata, tensors = load_model_files(directory)
        model = cls.__new__(cls)
        try:
            model.schema = DataSchema.from_dict(metadata["schema"])
            model.config = ModelConfig.from_dict(metadata["model_config"])
            model.train_config = TrainConfig.from_dict(metadata["train_config"]) if metadata["train_config"] else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The description in {directory} is damaged or incomplete ({type(exc).__name__}: {exc}); "
                "restore genailab.json from a backup or retrain."
            ) from exc
        model.empty_cells = metadata.get("empty_cells", "error")
        model.history = list(metadata.get("history", []))
        model.training_info = dict(metadata.get("training", {}))
        model.adversarial_key = metadata.get("adversarial_key")
        adversary_config = metadata.get("adversary_config")
        model.adversary_config = AdversaryConfig(**adversary_config) if adversary_config else None
        model.module = ConditionalVAE.from_config(model.config)
        model.adversary = model._new_adversary()
        state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
        try:
            model.module.load_state_dict(state)
            if model.adversary is not None:
                model.adversary.load_state_dict(
                    {k.removeprefix("adversary."): v for k, v in tensors.items() if k.startswith("adversary.")}
                )
        except RuntimeError as exc:
            raise CheckpointError(f"The weights in {directory} do not fit the saved architecture: {exc}") from exc
        if "split.train" in tensors:
            model._split = {"train": tensors["split.train"].numpy(), "validation": tensors["split.validation"].numpy()}
        model.module.to(resolve_device(device)).eval()
        model.adata = adata
        return model


def _build_config(config_class, **options):
    """``config_class(**options)`` with unknown, doubled or mistyped options reported as ConfigError."""
    try:
        return config_class(**options)
    except TypeError as exc:
        known = sorted(f.name for f in dataclasses.fields(config_class))
        raise ConfigError(f"{exc}; the options of {config_class.__name__} are {known}.") from exc


def _split(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``rows``, fixed by ``seed``."""
    if rows.size < _MIN_CELLS:
        raise InputDataError(f"Only {rows.size} usable cells; training needs at least {_MIN_CELLS}.")
    n_val = int(round(fraction * rows.size))
    if fraction > 0 and (n_val < 1 or rows.size - n_val < 2):
        raise InputDataError(
            f"{rows.size} cells are too few for validation_fraction={fraction}; use more cells or "
            "validation_fraction=0 (early stopping then watches the training loss)."
        )
    shuffled = np.random.default_rng(seed).permutation(rows)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def _checked_checkpoint(path: str | Path, model_config: ModelConfig, train_config: TrainConfig) -> dict:
    state = load_checkpoint(path)
    if state["model_config"] != model_config.to_dict():
        raise CheckpointError(f"{path} was written for a different architecture; build the model with the same options.")
    if state["train_config"]["seed"] != train_config.seed:
        raise CheckpointError(
            f"{path} was trained with seed {state['train_config']['seed']}, not {train_config.seed}; "
            "resume with the same seed so the data split and order match."
        )
    return state


def _override_obs(obs: pd.DataFrame, schema: DataSchema, overrides: Mapping[str, object]) -> pd.DataFrame:
    """The model's condition columns of ``obs`` with some replaced by one value for every cell."""
    keys = list(schema.categorical_keys + schema.continuous_keys)
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ConfigError(f"Unknown condition keys {unknown}; the model's conditions are {keys}.")
    missing = [k for k in keys if k not in overrides and k not in obs.columns]
    if missing:
        raise ConfigError(f"obs lacks condition columns {missing}; add them or give a value in conditions=.")
    frame = pd.DataFrame(index=obs.index)
    for key in keys:
        frame[key] = overrides[key] if key in overrides else obs[key].to_numpy()
    return frame
