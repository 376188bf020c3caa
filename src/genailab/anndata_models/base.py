"""The lifecycle every AnnData model shares: validate, split, seed, load minibatches, train (with
checkpoints, resume and torchrun sharding), record provenance, save and load.

:class:`AnnDataModel` holds that lifecycle once; :class:`~genailab.anndata_models.vae.VAE` and
:class:`~genailab.anndata_models.perturbation.PerturbationModel` supply only what differs (their
schema, network, condition encoding and adversary targets) through a few small methods. Both
``__init__`` and :meth:`AnnDataModel.load` build the object through one private constructor,
``_assemble``, so a loaded model is put together exactly like a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.anndata_models.files import (
    CHECKPOINT_FILE,
    check_model_folder,
    check_writable,
    data_fingerprint,
    load_model_files,
    save_model_files,
    saved_file_hashes,
)
from genailab.checks import check_number
from genailab.data.loader import LoaderOptions, MinibatchLoader, row_indices
from genailab.data.schema import category_labels
from genailab.data.validation import cell_totals, check_expression, empty_cells, gene_variances, warn_if_other_scale
from genailab.errors import CheckpointError, ConfigError, InputDataError
from genailab.model.adversary import AdversaryConfig, BatchDiscriminator
from genailab.model.config import ModelConfig
from genailab.safe_write import FolderLock
from genailab.train.config import TrainConfig
from genailab.train.checkpoint import check_same_data
from genailab.train.trainer import Trainer, load_checkpoint, resolve_device, seed_everything

logger = logging.getLogger(__name__)

INFERENCE_BATCH = 1024  # cells per minibatch whenever a model only reads data (inference, metrics)
MIN_CELLS = 10  # fewest usable cells a model trains on


class AnnDataModel:
    """Base of the AnnData-facing models; not used directly.

    A subclass sets ``MODEL_TYPE`` and implements ``_assemble`` (its own settings, then this
    class's), ``_new_module``, ``_network_config``, ``_encode_data``, ``_adversary_targets``,
    ``_description`` and ``_parts_from_description``.

    Attributes
    ----------
    schema
        How the AnnData is read and encoded (genes, layer, condition categories).
    config
        The frozen architecture, saved with the model.
    module
        The tensor network (:mod:`genailab.model`). Code outside :mod:`genailab.anndata_models`
        uses the model's public methods instead.
    adata
        The AnnData the model was built with (or given to ``load``); the default for every method.
    train_config, history, training_info
        How it was trained, one record per epoch, and the provenance of the fit.
    """

    MODEL_TYPE = ""  # recorded in genailab.json and checked on load
    MODEL_NAME = ""  # what the messages call it

    # -- the one constructor -----------------------------------------------------------------------
    def _assemble(self, *, schema, config, adata: AnnData | None, adversary_config: AdversaryConfig | None) -> None:
        self.schema = schema
        self.config = config
        self.adata = adata
        self.adversary_config = adversary_config
        self.module = self._new_module()
        self.adversary: BatchDiscriminator | None = None
        self.train_config: TrainConfig | None = None
        self.history: list[dict] = []
        self.training_info: dict = {}
        self._split: dict[str, np.ndarray] | None = None
        self.saved_dir: Path | None = None  # the folder this model was loaded from or last saved to, until refitted
        self.saved_files: dict[str, str] | None = None  # SHA-256 of that folder's files then (files.saved_file_hashes)

    # -- what a subclass supplies ------------------------------------------------------------------
    def _new_module(self) -> torch.nn.Module:
        """A freshly initialised network for ``self.config``."""
        raise NotImplementedError

    @property
    def _network_config(self) -> ModelConfig:
        """The :class:`ModelConfig` of the encoder/decoder (likelihood, latent size, norm)."""
        raise NotImplementedError

    @property
    def _empty_cells(self) -> str:
        """What training does with all-zero cells: ``"error"``, ``"drop"`` or ``"warn"``."""
        return "drop"

    def _encode_data(self, adata: AnnData, *, align_genes: bool = False):
        """(expression matrix, condition matrix or None) of ``adata`` as the network reads them."""
        raise NotImplementedError

    def _adversary_targets(self, adata: AnnData) -> tuple[np.ndarray, int] | None:
        """Per-cell class codes the adversary must not recover from the latent, and their number."""
        return None

    def _description(self) -> dict:
        """The subclass's part of ``genailab.json`` (schema and settings), plain data."""
        raise NotImplementedError

    @classmethod
    def _parts_from_description(cls, metadata: dict) -> dict:
        """Keyword arguments of ``_assemble`` from a saved description (raises KeyError/TypeError/ValueError)."""
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------
    def _data(self, adata: AnnData | None) -> AnnData:
        """``adata``, or the model's own AnnData when None."""
        if adata is not None:
            if not isinstance(adata, AnnData):
                raise ConfigError(
                    f"adata must be an AnnData, not {type(adata).__name__}; wrap a matrix as anndata.AnnData(X, "
                    "var=pd.DataFrame(index=gene_names)) with the model's gene names."
                )
            return adata
        if self.adata is None:
            raise ConfigError("This model was loaded without an AnnData; pass adata=... explicitly.")
        return self.adata

    def _validated(self, adata: AnnData, *, align_genes: bool = False, with_conditions: bool = True):
        """``_encode_data`` after checking the cells are there and the values fit the likelihood;
        without ``with_conditions`` the conditions are not read (None)."""
        if adata.n_obs == 0:
            raise InputDataError("The AnnData has no cells (0 rows); pass at least one cell.")
        if with_conditions:
            matrix, conditions = self._encode_data(adata, align_genes=align_genes)
        else:
            matrix, conditions = self._data_schema.expression(adata, align_genes=align_genes), None
        # the schema checked the in-memory source's structure; a backed matrix is checked block by block here
        check_expression(matrix, counts=self._network_config.is_count_model, source="The expression matrix",
                         structure_checked=True)
        if adata is not self.adata:
            self._warn_if_other_scale(matrix, source="The AnnData")
        return matrix, conditions

    def _warn_if_other_scale(self, matrix, *, source: str) -> None:
        """For a Gaussian model, :func:`~genailab.data.validation.warn_if_other_scale` against the
        training data's scale (count models take any library size, and refuse non-counts)."""
        trained = self._data_schema.value_scale
        if not self._network_config.is_count_model and trained is not None:
            warn_if_other_scale(matrix, trained, source=source)

    def _loader(
        self,
        adata: AnnData | None = None,
        *,
        indices: np.ndarray | None = None,
        align_genes: bool = False,
        batch_size: int = INFERENCE_BATCH,
        conditions: np.ndarray | None = None,
        sparse_counts: bool = False,
    ):
        """Minibatches of ``adata`` in order, for inference; ``conditions`` replaces the encoded ones."""
        adata = self._data(adata)
        if indices is not None:
            indices = row_indices(indices, adata.n_obs)
            if indices.size == 0:
                raise ConfigError("`indices` selects no cell; pass at least one row (or None for every cell).")
        matrix, encoded = self._validated(adata, align_genes=align_genes)
        return MinibatchLoader(
            matrix, encoded if conditions is None else conditions, indices=indices, batch_size=batch_size,
            shuffle=False, sparse_counts=sparse_counts,
        )  # fmt: skip

    def get_expression(self, adata: AnnData | None = None, *, indices: np.ndarray | None = None, align_genes: bool = False):
        """The values the network reads: the model's layer and genes, in its order, checked as at
        training.

        Parameters
        ----------
        adata
            Cells to read (None: the training AnnData).
        indices
            Rows of ``adata`` to keep, in their order (None: every cell).
        align_genes
            Reorder ``adata``'s genes by name to the model's (missing genes filled with zeros).

        Returns
        -------
        (n_cells, n_genes) float32: CSR for count models, dense otherwise.
        """
        rows = [b.x.numpy() for b in self._loader(adata, indices=indices, align_genes=align_genes)]
        values = np.concatenate(rows) if rows else np.zeros((0, len(self.schema_genes)), dtype=np.float32)
        return sp.csr_matrix(values) if self._network_config.is_count_model else values

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        return next(self.module.parameters()).device

    @property
    def is_trained(self) -> bool:
        return bool(self.history)

    @property
    def validation_indices(self) -> np.ndarray:
        """Rows of the training AnnData held out for validation (never used for gradient steps)."""
        if self._split is None:
            raise ConfigError("The model has not been trained, so it has no validation cells.")
        return self._split["validation"]

    @property
    def train_indices(self) -> np.ndarray:
        """Rows of the training AnnData the gradient steps used."""
        if self._split is None:
            raise ConfigError("The model has not been trained, so it has no training cells.")
        return self._split["train"]

    # -- training --------------------------------------------------------------------------------
    def fit(
        self,
        config: TrainConfig | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        loader: LoaderOptions | None = None,
        warm_start: bool = False,
        **options,
    ):
        """Train on the AnnData the model was built with (or loaded with).

        Each call starts from new weights drawn from ``seed``, so a call gives the same model
        whatever was trained before; ``warm_start=True`` continues from the current weights instead
        (e.g. to train a loaded model further), with a new optimiser and learning-rate schedule and
        no KL warm-up unless ``kl_warmup_epochs`` is given; ``history`` then holds this call's
        epochs. A call that raises leaves the model as it was. The caller's global random streams
        (Python, NumPy, torch) and torch's deterministic-algorithms setting are left as they were.
        Training ends at the last epoch run: early stopping stops there and keeps those weights
        (not the best epoch's).

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
        warm_start
            Start from the model's current weights (trained or loaded) rather than new ones.
        loader
            How a backed AnnData is read (:class:`~genailab.data.loader.LoaderOptions`); its fields
            ``chunk_rows`` and ``chunks_in_memory`` may also be given as keyword options.

        Returns
        -------
        The model itself; ``history`` holds one record per epoch (train/validation reconstruction,
        KL and negative ELBO, adversary loss, KL weight, learning rate, seconds).

        Notes
        -----
        Under ``torchrun`` every process trains on its own shard of the training cells and only
        rank 0 writes checkpoints; a backed AnnData (``backed="r"``) is read chunk by chunk.
        """
        if loader is None:
            loader, options = LoaderOptions.split(options)
        if config is not None and not isinstance(config, TrainConfig):
            raise ConfigError(
                f"fit() takes a TrainConfig or its fields as keywords, not {type(config).__name__}; the model trains on "
                "the AnnData it was built or loaded with."
            )
        if config is None:
            config = build_config(TrainConfig, **options)
        elif options:
            raise ConfigError("Pass either a TrainConfig or keyword options to fit(), not both.")
        if config.batch_size == 1 and self._network_config.norm == "batch":
            raise ConfigError("batch_size=1 cannot train batch normalisation; use batch_size=2 or more (or build the "
                              "model with norm='layer').", argument="batch_size")
        if warm_start and resume_from is not None:
            raise ConfigError("Pass warm_start=True or resume_from=..., not both: a checkpoint restores its own weights.")
        if warm_start and config.kl_warmup_epochs is None:  # a trained model has no KL warm-up to go through again
            config = dataclasses.replace(config, kl_warmup_epochs=0.0)
        if self.adata is None:
            raise ConfigError(f"This model was loaded without an AnnData; to train it, load it with the data: "
                              f"{type(self).__name__}.load(folder, adata).")
        adata = self._data(None)
        matrix, conditions = self._validated(adata)
        rows = np.flatnonzero(empty_cells(matrix, action=self._empty_cells, source="The training data"))
        train_rows, val_rows = split_rows(rows, config.validation_fraction, config.seed)
        self._warn_if_categories_untrained(adata.obs, rows, train_rows)
        config = config.resolved(train_rows.size)  # the data-dependent defaults (epochs, schedules), as trained
        targets = self._adversary_targets(adata)
        labels = None if targets is None else targets[0]

        fresh = resume_from is None and not warm_start  # initial weights drawn from the seed
        with kept_global_random_state():  # the caller's random streams and determinism flag are theirs
            seed_everything(config.seed, deterministic=config.deterministic)
            module = self._new_module() if fresh else self.module
            adversary = self.adversary if targets is not None else None  # on resume the checkpoint restores it
            if targets is not None and (adversary is None or fresh):
                adversary = BatchDiscriminator(self._network_config.latent_dim, targets[1], self.adversary_config)
            before = None if fresh else [_cloned_state(part) for part in (module, adversary)]
            try:
                trainer, data_sha256, interrupted = self._train(
                    module, adversary, config, matrix, conditions, labels, train_rows, val_rows,
                    checkpoint_dir=checkpoint_dir, resume_from=resume_from, loader=loader, fresh=fresh,
                )  # fmt: skip
            except BaseException:  # a failed fit leaves the model as it was (an interrupt keeps its last epoch)
                for part, state in zip((module, adversary), before or ()):
                    if state is not None:
                        part.load_state_dict(state)
                raise
        self.module, self.adversary = module, adversary
        self.saved_dir = self.saved_files = None  # the weights are no longer those of a saved folder
        self.history = trainer.history
        self.train_config = config
        self.training_info = {
            "n_cells": int(matrix.shape[0]),
            "n_train": int(train_rows.size),
            "n_validation": int(val_rows.size),
            "stopped_early": trainer.stopped_early,
            "data_sha256": data_sha256,
        }
        self._split = {"train": train_rows, "validation": val_rows}
        self.module.eval()
        if interrupted is not None:
            raise interrupted
        return self

    def _warn_if_categories_untrained(self, obs, rows: np.ndarray, train_rows: np.ndarray) -> None:
        """Log a warning for condition categories whose cells all fell into the validation split:
        their parameters then learn nothing, yet the model accepts them."""
        for key in self._data_schema.categorical_keys:
            values = category_labels(obs[key])
            untrained = sorted(set(values[rows]) - set(values[train_rows]))
            if untrained:
                logger.warning(
                    "obs[%r] has categories with no training cell (all their cells are in the validation split): "
                    "%s; the model learns nothing for them. Add cells of them, or lower validation_fraction.",
                    key, untrained[:10],
                )

    def _starts_from_data(self) -> bool:
        """Whether a fresh fit may set starting values from the data (a query model's decoder is the
        frozen reference's)."""
        return True

    def _continues_checkpoint(self) -> bool:
        """Whether a checkpoint already in ``checkpoint_dir`` is this model's own, to be replaced by a
        fit that does not resume it (a query model's earlier stage)."""
        return False

    def _train(self, module, adversary, config: TrainConfig, matrix, conditions, labels, train_rows, val_rows, *,
               checkpoint_dir, resume_from, loader, fresh: bool):
        """Run the :class:`~genailab.train.trainer.Trainer` on ``module`` (and ``adversary``);
        returns (trainer, data fingerprint, the KeyboardInterrupt that stopped it or None)."""
        if self._network_config.is_count_model:
            module.default_library.fill_(float(np.median(cell_totals(matrix)[train_rows])))
        elif fresh and self._starts_from_data() and hasattr(module.head, "start_variance"):
            # a new Gaussian decoder starts at the data's per-gene variances
            module.head.start_variance(torch.as_tensor(gene_variances(matrix), dtype=torch.float32))
        checkpoint_path = check_writable(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        if (checkpoint_path is not None and checkpoint_path.exists() and not self._continues_checkpoint()
                and (resume_from is None or Path(resume_from).resolve() != checkpoint_path.resolve())):
            raise CheckpointError(
                f"{checkpoint_path} holds the checkpoint of another run; resume it with resume_from={str(checkpoint_path)!r}, "
                "or delete it (or choose another checkpoint_dir) to start a new run there."
            )
        data_sha256 = data_fingerprint(matrix, conditions, self.schema_genes)
        trainer = Trainer(
            module,
            config,
            checkpoint_path=checkpoint_path,
            checkpoint_extra={"model_type": self.MODEL_TYPE, **self._description(), "data_sha256": data_sha256},
            adversary=adversary,
        )
        if resume_from is not None:
            trainer.load_state_dict(self._checked_checkpoint(resume_from, data_sha256), source=resume_from)
        rank_rows = trainer.dist.shard(train_rows)  # all rows unless running under torchrun
        drop_last = rank_rows.size % config.batch_size == 1  # a batch of one cell breaks batch norm
        train_loader = MinibatchLoader(
            matrix, conditions, labels=labels, indices=rank_rows, batch_size=config.batch_size, seed=config.seed,
            drop_last=drop_last, options=loader,
        )  # fmt: skip
        val_loader = (
            MinibatchLoader(matrix, conditions, labels=labels, indices=val_rows, batch_size=INFERENCE_BATCH, options=loader,
                             shuffle=False)
            if val_rows.size
            else None
        )
        writes_checkpoints = checkpoint_dir is not None and trainer.dist.is_main
        try:
            with FolderLock(checkpoint_dir) if writes_checkpoints else contextlib.nullcontext():  # one writer per folder
                trainer.fit(train_loader, val_loader)
        except KeyboardInterrupt as exc:  # the trainer went back to its last finished epoch: keep that
            return trainer, data_sha256, exc
        return trainer, data_sha256, None

    @property
    def schema_genes(self) -> tuple[str, ...]:
        """The model's genes, in the order its network reads them."""
        return tuple(self._data_schema.gene_names)

    @property
    def _data_schema(self):
        """The :class:`~genailab.data.schema.DataSchema` that reads the expression matrix."""
        return self.schema

    def _checked_checkpoint(self, path: str | Path, data_sha256: str) -> dict:
        """A trainer checkpoint written for this data (its genes, conditions and cells); the trainer
        checks the architecture and options when it loads it."""
        state = load_checkpoint(path)
        check_same_data(state, path, description=self._description(), data_sha256=data_sha256, model_type=self.MODEL_TYPE)
        return state

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to ``directory`` (genailab.json + model.pt).

        Parameters
        ----------
        directory
            Folder to write; created when missing.
        overwrite
            Replace a model already saved there (refused otherwise).

        Returns
        -------
        The folder, as a Path.
        """
        directory = check_model_folder(directory, overwrite=overwrite)  # refuses a saved model unless overwrite
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if self.adversary is not None:
            tensors.update({f"adversary.{k}": v for k, v in self.adversary.state_dict().items()})
        if self._split is not None:
            tensors["split.train"] = torch.from_numpy(self._split["train"])
            tensors["split.validation"] = torch.from_numpy(self._split["validation"])
        metadata = {
            "model_type": self.MODEL_TYPE,
            "model_config": self.config.to_dict(),
            "train_config": None if self.train_config is None else self.train_config.to_dict(),
            "adversary_config": None if self.adversary_config is None else self.adversary_config.to_dict(),
            **self._description(),
            "training": self.training_info,
            "history": self.history,
        }
        save_model_files(directory, metadata=metadata, tensors=tensors)
        self.saved_dir, self.saved_files = directory, saved_file_hashes(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, adata: AnnData | None = None, *, device: str = "auto"):
        """Load a saved model.

        Parameters
        ----------
        directory
            Folder written by :meth:`save` (or a ``genailab train`` run folder).
        adata
            Becomes the default data of every method (optional).
        device
            ``"auto"`` puts the weights on a CUDA GPU when one is present, as training does;
            any other torch device name (``"cpu"``, ``"cuda:1"``) is used as given.

        Returns
        -------
        The model, of the class it was saved from.
        """
        metadata, tensors = load_model_files(directory)
        model_type = metadata.get("model_type", "genailab.VAE")  # format 1 files of a VAE carry no type
        if model_type != cls.MODEL_TYPE:
            raise CheckpointError(
                f"{directory} holds a {model_type} model, not a {cls.MODEL_NAME}; load it with the matching "
                "class (genailab.VAE.load for `genailab train` runs, PerturbationModel.load for `perturb train`)."
            )
        try:
            parts = cls._parts_from_description(metadata)
            adversary = metadata.get("adversary_config")
            train = metadata.get("train_config")
            train_config = TrainConfig.from_dict(train) if train else None
            adversary_config = AdversaryConfig(**adversary) if adversary else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The description in {directory} is damaged or incomplete ({type(exc).__name__}: {exc}); "
                "restore genailab.json from a backup or retrain."
            ) from exc
        model = cls.__new__(cls)
        model._assemble(**parts, adata=adata, adversary_config=adversary_config)
        model.train_config = train_config
        model.history = list(metadata.get("history", []))
        model.training_info = dict(metadata.get("training", {}))
        adversary_state = {k.removeprefix("adversary."): v for k, v in tensors.items() if k.startswith("adversary.")}
        if adversary_state and adversary_config is not None:
            model.adversary = BatchDiscriminator(
                model._network_config.latent_dim, int(adversary_state["out.weight"].shape[0]), adversary_config
            )
            try:
                model.adversary.load_state_dict(adversary_state)
            except RuntimeError as exc:
                raise CheckpointError(f"The adversary weights in {directory} do not fit its architecture: {exc}") from exc
        try:
            model.module.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")})
        except RuntimeError as exc:
            raise CheckpointError(f"The weights in {directory} do not fit the saved architecture: {exc}") from exc
        if "split.train" in tensors:
            model._split = {"train": tensors["split.train"].numpy(), "validation": tensors["split.validation"].numpy()}
        model.module.to(resolve_device(device)).eval()
        model.saved_dir = Path(directory)
        model.saved_files = saved_file_hashes(model.saved_dir)
        return model


MODEL_SET_FIELDS = ("input_dim", "condition_dim", "categorical_sizes", "n_continuous")  # ModelConfig fields read off the data
# What scvi-tools' and CPA's option names are called here (an unknown option gets the hint).
PEER_OPTION_NAMES = {
    "batch_key": "condition_keys=['batch'] (with adversarial_key='batch' for adversarial batch correction)",
    "categorical_covariate_keys": "condition_keys=[...]",
    "continuous_covariate_keys": "continuous_keys=[...]",
    "labels_key": "condition_keys=[...] to condition on the labels, or apps.transfer_labels(label_key=...) to transfer them",
    "n_latent": "latent_dim",
    "n_hidden": "hidden_dims=[n_hidden] * n_layers",
    "n_layers": "hidden_dims=[n_hidden] * n_layers",
    "gene_likelihood": "likelihood ('nb', 'zinb' or 'gaussian')",
    "dropout_rate": "dropout",
    "max_epochs": "epochs",
}


def build_config(config_class, *, set_by_model: tuple[str, ...] = (), **options):
    """``config_class(**options)`` with unknown, doubled or mistyped options reported as ConfigError;
    ``set_by_model`` are fields the caller fills from the data, left out of the options listed."""
    try:
        return config_class(**options)
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        name = unknown.group(1) if unknown else None
        known = sorted(f.name for f in dataclasses.fields(config_class) if f.name not in set_by_model)
        if name in PEER_OPTION_NAMES:
            hint = f" (genailab calls it {PEER_OPTION_NAMES[name]})"
        elif name in {f.name for f in dataclasses.fields(TrainConfig)} and config_class is not TrainConfig:
            hint = " (a training option: give it to fit() or a TrainConfig, not to the model)"
        else:
            close = difflib.get_close_matches(name or "", known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        message = f"Unknown option {name!r}{hint}" if name else str(exc)
        raise ConfigError(f"{message}; the options of {config_class.__name__} are {known}.", argument=name) from exc


def split_rows(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``rows`` (sorted halves), fixed by ``seed``."""
    if rows.size < MIN_CELLS:
        raise InputDataError(f"Only {rows.size} usable cells; training needs at least {MIN_CELLS}.")
    n_val = int(round(fraction * rows.size))
    if fraction > 0 and (n_val < 1 or rows.size - n_val < 2):
        raise InputDataError(
            f"{rows.size} cells are too few for validation_fraction={fraction}; use more cells or "
            "validation_fraction=0 (early stopping then watches the training loss)."
        )
    shuffled = np.random.default_rng(seed).permutation(rows)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed torch's generators (CPU and CUDA) inside the block, leaving the caller's streams as they
    were; ``None`` uses the global random state."""
    if seed is None:
        yield
        return
    check_number("seed", seed, integer=True, ge=0, le=2**63 - 1, hint="None uses torch's global random state.")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def kept_global_random_state():
    """Leave Python's, NumPy's and torch's global random streams and torch's deterministic-algorithms
    setting as they were before the block (training seeds and sets them for its own run)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = benchmark


def _cloned_state(part: torch.nn.Module | None) -> dict | None:
    """A copy of ``part``'s state dict (None for no part), to put back after a failed fit."""
    return None if part is None else {name: tensor.detach().clone() for name, tensor in part.state_dict().items()}


def storable_params(params: Mapping[str, object]) -> dict:
    """``params`` as h5ad can store them in ``uns``: None values left out, sequences as lists."""
    return {str(k): _storable(v) for k, v in params.items() if v is not None}


def _storable(value):
    if isinstance(value, Mapping):
        return storable_params(value)
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, (int, float, bool, str)) else str(v) for v in value]
    if isinstance(value, (int, float, bool, str, np.number, np.bool_)):
        return value
    return str(value)
