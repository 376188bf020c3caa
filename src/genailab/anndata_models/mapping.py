"""Reference mapping at the AnnData level: put a query dataset into a trained model's latent space.

:func:`map_query` aligns the query's genes to the reference, adds the query's new condition
categories (new batches, donors, labs) to the reference network by architecture surgery
(:mod:`genailab.model.surgery`), starts the new batch's encoder column from the query cells'
offset to the reference clusters of their mutual nearest reference cells when the reference's
cells are at hand (refined in the latent for a query that spreads less there), and
returns a :class:`QueryVAE`. Its ``fit()`` is the ordinary
training loop (same trainer, seeds, checkpoints, progress) but only the parameters of the new
categories learn (optionally also the encoder's first layer, the whole encoder, or everything), in
two stages: the decoder's first, then the encoder's at a tenth of the learning rate
(:func:`~genailab.model.surgery.training_stages` says why; after a latent start, the decoder's
only); by default every reference weight and
batch-norm statistic stays bitwise as it was (see :class:`QueryVAE`). The query model is then a
:class:`~genailab.VAE` like any other: it embeds, denoises, saves and loads as one, and its ``genailab.json`` records the
reference it came from (folder and SHA-256 of its files). The reference is never modified.

A reference trained with the batch adversary is mapped without it: the adversary shaped the
reference encoder, which stays frozen; training the new categories against a discriminator that
has never seen the query batch would only add noise, so the query model has no adversary.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from genailab.anndata_models.base import build_config
from genailab.anndata_models.vae import VAE
from genailab.checks import check_number
from genailab.data.loader import LoaderOptions
from genailab.data.schema import MAX_MISSING_FRACTION, DataSchema, category_labels
from genailab.data.validation import EMPTY_CELL_ACTIONS, check_expression
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError
from genailab.model.surgery import (
    UNFREEZE,
    ConditionExtension,
    ENCODER_FIRST_LAYER,
    align_new_encoder_columns,
    anchor_to_start,
    centre_new_encoder_columns,
    extend_conditions,
    freeze_reference,
    takes_data_start,
    training_stages,
)
from genailab.model.vae import ConditionalVAE
from genailab.train.config import TrainConfig
from genailab.train.trainer import load_checkpoint

QUERY_EPOCH_CELLS = 400_000  # default query epochs = this / query cells, clipped to QUERY_EPOCHS
QUERY_EPOCHS = (20, 200)  # a small query needs more passes over it, a large one fewer
QUERY_LR = 1e-2  # few parameters learn, each far from its start (1e-3 needs ~3x the epochs for the same fit)
ENCODER_STAGE_LR_FACTOR = 0.1  # the encoder stage corrects what the decoder stage left; at the full lr it drifts the latent
ENCODER_STARTS = ("auto", "neighbours", "latent", "mean", "batch_norm")  # where the new encoder columns start (map_query)
START_NEIGHBOURS = 20  # neighbours searched each way for the mutual pairs of the "neighbours" start
START_CLUSTER_CELLS = 50  # reference cells per k-means cluster of that start (small enough to hold one cell state)
START_MAX_CELLS = 10_000  # cells of each side compared by that search (a seeded subset of larger data)
START_LATENT_STEPS = 200  # most L-BFGS iterations of the "latent" start (it stops once the loss settles; PBMC split: 2.6 s)
START_LATENT_SPREAD = 2 / 3  # "auto" refines in the latent when the query spreads less than this share of the reference there
ENCODER_ANCHOR = 1.0  # encoder stage: pull of a data-started column to its start, times the start's sampling precision (1: that prior)


def default_query_epochs(n_cells: int) -> int:
    """Fine-tuning epochs for a query of ``n_cells``: about 400,000 cell visits, between 20 and 200."""
    return int(np.clip(round(QUERY_EPOCH_CELLS / max(n_cells, 1)), *QUERY_EPOCHS))


def map_query(
    query: AnnData,
    reference: VAE,
    *,
    unfreeze: str = "new_categories",
    epochs: int | None = None,
    encoder_start: str = "auto",
    encoder_stage: bool | None = None,
    encoder_anchor: float | None = None,
    reference_data: AnnData | None = None,
    max_missing_fraction: float = MAX_MISSING_FRACTION,
    empty_cells: str | None = None,
) -> QueryVAE:
    """A model for ``query`` built on the trained ``reference``, ready to ``fit()``.

    Parameters
    ----------
    query
        Cells x genes in memory, with the reference's layer (raw counts for count models) and its
        condition columns in ``obs``. Genes are matched by name: reordered, extra genes dropped,
        genes the query lacks filled with zeros and named in a warning (refused above
        ``max_missing_fraction`` of the reference genes); duplicated names or no shared gene are errors.
    reference
        A trained :class:`~genailab.VAE` with at least one categorical condition (the batch). It is
        not modified.
    unfreeze
        What learns: ``"new_categories"`` (the one-hot columns or embedding rows of the query's new
        categories: scArches' default), ``"first_layer"`` (also the encoder's first layer),
        ``"encoder"`` (also the whole encoder: the query's own inference network for the
        reference's generative model) or ``"all"`` (fine-tune everything, starting from the
        reference weights). Except for ``"all"``, the decoder's part learns first and the encoder's
        part after it. ``"first_layer"`` and ``"encoder"`` can map closer to a model trained from
        scratch, but they lost the labels of a briefly trained reference that the default kept
        (README, "Map a new dataset"): use them with a well-trained reference.
    epochs
        Default epochs of each stage of the query model's ``fit()``; None chooses them from the
        query size (:func:`default_query_epochs`).
    empty_cells
        What ``fit()`` does with query cells whose counts are all zero: ``"error"``, ``"drop"`` or
        ``"warn"`` as for :class:`~genailab.VAE`; None takes the reference's setting.
    encoder_start
        Where the new batch's encoder column starts (its decoder column starts at the mean of the
        reference's): ``"neighbours"`` shifts it so that, at the encoder's first batch norm, the
        query cells reach the means of the reference clusters (about 50 cells each) their mutual
        nearest reference cells belong to
        (:func:`~genailab.model.surgery.align_new_encoder_columns`; needs the reference's cells);
        ``"latent"`` starts there and refines the shift until, in the latent, each cluster's query
        cells have its reference cells' mean (:func:`~genailab.model.surgery.match_cluster_latents`),
        for a query that spreads less than the reference, e.g. at lower depth, whose equal
        first-layer means are not equal latent means;
        ``"mean"`` at the mean of the reference columns; ``"batch_norm"`` where it centres the
        query's first-layer activations on the reference's running mean
        (:func:`~genailab.model.surgery.centre_new_encoder_columns`), which lost the labels of a
        briefly trained reference and of a query holding half of the cell types; ``"auto"``, when
        the reference's cells are at hand, the query has new categories and the model takes a data
        start: ``"neighbours"``, refined as ``"latent"`` when the query, so placed, spreads in the
        latent less than ``START_LATENT_SPREAD`` of its clusters' reference cells; else ``"mean"``.
        ``model.mapping`` records the start taken and that spread. The data-driven starts need
        one-hot conditions and ``norm="batch"``.
    encoder_stage
        Whether ``fit()`` trains the new encoder columns after the decoder's. None (default): yes,
        except after a latent start with ``unfreeze="new_categories"``, which already fitted them to
        the reference's latent (an encoder stage there pulled the query back toward a tighter,
        less mixed placement). False holds them at their start for ``unfreeze="new_categories"``;
        True always trains them.
    encoder_anchor
        During the encoder stage, how strongly a column started from the reference's cells
        (``"neighbours"``, ``"latent"``) is pulled back toward its start: the gradient of
        ``encoder_anchor`` times ½ Σ_j precision_j (column_j - start_j)² joins the ELBO's, where
        precision_j is how well the first-layer shift is known per query cell (its sampling
        variance from the per-cell offsets, :func:`~genailab.model.surgery.start_precision`), so 1
        is a Gaussian prior centred at the start with the start's own standard error (the ELBO
        alone explains part of the batch as a change of cell state and drifts the column). None
        (default): ``ENCODER_ANCHOR`` where it applies (``unfreeze="new_categories"``, a data start
        with mutual pairs, an encoder stage), else no pull; 0 trains the column by the ELBO alone.
        After a latent start with ``encoder_stage=True`` the pull is centred on the refined column
        with the neighbours start's precision, whose standard error is far smaller than the
        refinement's move, so at 1 it all but holds the column. The README's "Map a new dataset"
        has the measurements behind each default.
    reference_data
        The reference's cells (its layer and condition columns; genes matched by name) for the
        ``"neighbours"`` start; None uses the data the reference model holds (the cells it was
        trained on or loaded with), if any. At most 10,000 cells of each side are compared.
    max_missing_fraction
        Largest share of reference genes the query may lack.

    Returns
    -------
    An untrained :class:`QueryVAE` whose default data is the gene-aligned query.

    Examples
    --------
    >>> reference = genailab.VAE.load("runs/reference")  # doctest: +SKIP
    >>> model = reference.map_query(query).fit(seed=0)  # doctest: +SKIP
    >>> query.obsm["X_genailab"] = model.get_latent()  # doctest: +SKIP
    """
    if unfreeze not in UNFREEZE:
        raise ConfigError(f"unfreeze={unfreeze!r} is not one of {UNFREEZE}.")
    if encoder_start not in ENCODER_STARTS:
        raise ConfigError(f"encoder_start={encoder_start!r} is not one of {ENCODER_STARTS}.")
    if encoder_anchor is not None and not encoder_anchor >= 0:
        raise ConfigError(f"encoder_anchor={encoder_anchor!r} must be 0 or more (0: no pull toward the start), or None for the default.")
    check_number("max_missing_fraction", max_missing_fraction, ge=0, le=1, hint="1 accepts any number of missing genes.")
    check_number("epochs", epochs, integer=True, ge=1, allow_none=True, hint="None chooses them from the query size.")
    for name, value in (("query", query), ("reference_data", reference_data)):
        if value is not None and not isinstance(value, AnnData):
            raise ConfigError(f"{name} must be an AnnData, got {type(value).__name__}; read a file first "
                              f"(e.g. anndata.read_h5ad(path)).", argument=name)  # fmt: skip
    if empty_cells is not None and empty_cells not in EMPTY_CELL_ACTIONS:
        raise ConfigError(f"empty_cells={empty_cells!r} is not one of {EMPTY_CELL_ACTIONS} (or None: the reference's).")
    if not reference.is_trained:
        raise ConfigError("The reference model is not trained; fit() it (or load a trained one) before mapping a query.")
    if query.isbacked:
        raise InputDataError("map_query needs the query in memory; read it without backed='r' (query.to_memory()).")
    if query.n_obs == 0:
        raise InputDataError("The query has no cells (0 rows); pass at least one cell.")
    schema = reference.schema
    if not schema.categorical_keys:
        raise ConfigError(
            "The reference has no categorical condition, so there is nothing to extend; embed the query "
            "directly with reference.get_latent(query, align_genes=True)."
        )
    new = new_categories(query.obs, schema)
    if unfreeze == "new_categories" and not any(new):
        raise ConfigError(
            f"Every query category of {list(schema.categorical_keys)} is already in the reference, so "
            "unfreeze='new_categories' has nothing to train; embed the query with the reference model itself "
            "(reference.get_latent(query), or genailab embed), "
            "or fine-tune with unfreeze='first_layer', unfreeze='encoder' or unfreeze='all'."
        )
    aligned, filled = aligned_query(query, schema, max_missing_fraction=max_missing_fraction)
    _check_values(aligned, schema, reference, name="query")
    if reference_data is not None:  # the model's own data passed these checks when it trained
        _check_reference_data(reference_data, schema, max_missing_fraction=max_missing_fraction)
        _check_values(reference_data, schema, reference, name="reference_data")
    reference_cells = reference_data if reference_data is not None else reference.adata
    if encoder_start == "auto" and not (any(new) and reference_cells is not None and takes_data_start(reference.config)
                                        and not _in_two_new_categories(query.obs, schema, new)):
        encoder_start = "mean"
    if encoder_start in ("neighbours", "latent") and reference_cells is None:
        raise ConfigError(
            f"encoder_start={encoder_start!r} needs the reference's cells: pass reference_data=REFERENCE_ADATA "
            "(or load the reference with its data), or use encoder_start='mean'."
        )
    query_schema = dataclasses.replace(schema, categories=tuple(old + added for old, added in zip(schema.categories, new)))
    extension = ConditionExtension(schema.categorical_sizes, [len(a) for a in new], len(schema.continuous_keys))
    mapping = {
        "unfreeze": unfreeze,
        "encoder_start": encoder_start,  # "auto" becomes the start taken
        "new_categories": {key: list(added) for key, added in zip(schema.categorical_keys, new)},
        "genes_filled_with_zeros": filled,
    }
    start_cells = reference_cells if encoder_start in ("auto", "neighbours", "latent") else None
    return QueryVAE(aligned, reference, schema=query_schema, extension=extension, mapping=mapping, encoder_stage=encoder_stage,
                    encoder_anchor=encoder_anchor, epochs=epochs or default_query_epochs(query.n_obs),
                    reference_cells=start_cells, empty_cells=empty_cells or reference.empty_cells)  # fmt: skip


def _check_reference_data(reference_data: AnnData, schema: DataSchema, *, max_missing_fraction: float) -> None:
    """``reference_data`` holds the reference's genes (up to ``max_missing_fraction`` missing) and only
    categories the reference was trained on: a start from query cells would pair them with themselves."""
    try:
        schema.gene_positions(reference_data.var_names.astype(str), align_genes=True,
                              max_missing_fraction=max_missing_fraction)  # fmt: skip
        unseen = new_categories(reference_data.obs, schema)
    except (InputDataError, SchemaMismatchError) as exc:
        raise type(exc)(f"reference_data: {exc}", argument="reference_data") from exc
    if any(unseen):
        named = {key: list(added) for key, added in zip(schema.categorical_keys, unseen) if added}
        raise InputDataError(f"reference_data holds cells of categories the reference was never trained on "
                             f"({named}); pass the reference's own cells only, without the query's.",
                             argument="reference_data")  # fmt: skip


def _in_two_new_categories(obs: pd.DataFrame, schema: DataSchema, new: tuple[tuple[str, ...], ...]) -> bool:
    """Whether a query cell has new categories in two conditions (no data start can place it)."""
    per_cell = sum(np.isin(category_labels(obs[key]), added).astype(int)
                   for key, added in zip(schema.categorical_keys, new) if added)  # fmt: skip
    return bool(np.max(per_cell, initial=0) > 1)


def new_categories(obs: pd.DataFrame, schema: DataSchema) -> tuple[tuple[str, ...], ...]:
    """Per categorical condition of ``schema``, the categories of ``obs`` it has not seen, in their order.

    Missing condition columns are :class:`SchemaMismatchError`; missing values (NaN) in them are
    :class:`InputDataError` (a query cell without a batch cannot be mapped).
    """
    missing = [key for key in schema.categorical_keys + schema.continuous_keys if key not in obs.columns]
    if missing:
        raise SchemaMismatchError(
            f"The query's obs lacks the reference's condition columns {missing}; add them (e.g. the query's "
            "batch as a new category)."
        )
    found = []
    for key, known in zip(schema.categorical_keys, schema.categories):
        column = obs[key]
        n_missing = int(column.isna().sum())
        if n_missing:
            raise InputDataError(
                f"obs[{key!r}] of the query has {n_missing} missing values (NaN); every query cell needs a {key} "
                f"to be mapped. Fill them (e.g. with a new label such as 'query_{key}') or drop those cells."
            )
        values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else pd.unique(column)
        used, seen = set(category_labels(column)), set(known)
        found.append(tuple(dict.fromkeys(v for v in category_labels(values) if v in used and v not in seen)))
    return tuple(found)


def aligned_query(
    query: AnnData, schema: DataSchema, *, max_missing_fraction: float = MAX_MISSING_FRACTION
) -> tuple[AnnData, list[str]]:
    """The query with exactly the schema's genes in its order (in ``X`` and the schema's layer), and
    the names of the genes filled with zeros; ``obs`` is copied."""
    matrix = schema.expression(query, align_genes=True, max_missing_fraction=max_missing_fraction)
    positions = schema.gene_positions(query.var_names.astype(str), align_genes=True, max_missing_fraction=1.0)
    filled = [schema.gene_names[i] for i in np.flatnonzero(positions < 0)]
    aligned = AnnData(X=matrix, obs=query.obs.copy(), var=pd.DataFrame(index=pd.Index(schema.gene_names)))
    if schema.layer is not None:
        aligned.layers[schema.layer] = matrix
    return aligned, filled


class QueryVAE(VAE):
    """A :class:`~genailab.VAE` for a query mapped onto a reference (made by :func:`map_query`).

    ``fit()`` restarts from the extended reference weights and trains only what ``unfreeze``
    allows, in the stages of :func:`~genailab.model.surgery.training_stages`: first the new
    parameters outside the encoder (the decoder's one-hot columns), then the encoder's (its new
    columns, its whole first layer or the whole encoder) at ``ENCODER_STAGE_LR_FACTOR`` (0.1) times the
    learning rate (held constant for the default ``unfreeze``, see :meth:`_stage_config`) and, for a
    data-driven start, pulled toward it (``encoder_anchor`` of :func:`map_query`), unless
    ``encoder_stage`` of :func:`map_query` holds the new encoder columns at their start;
    each stage runs up to ``epochs`` with early stopping (one stage for ``unfreeze="all"`` and for
    embedded conditions). Its defaults differ from a new model's: ``epochs`` from the query size, a
    learning rate of 1e-2, no weight decay (it would shrink the frozen weights) and a constant KL
    weight (the reference is trained with the full KL already). As for any model, ``fit()`` sets
    the default library size (used only when decoding without one) to the median of its own (query)
    cells. ``history`` holds the epochs of every stage, each record naming its ``stage``;
    ``train_config`` is the first stage's. It saves as a plain VAE (``genailab.VAE.load`` reads it)
    whose description also holds ``reference`` (folder and hashes of the reference files) and
    ``mapping`` (unfreeze mode, stages, new categories, zero-filled genes); a loaded query model is a
    plain VAE whose ``fit()`` would train from scratch.
    """

    def __init__(
        self,
        aligned: AnnData,
        reference: VAE,
        *,
        schema: DataSchema,
        extension: ConditionExtension,
        mapping: dict,
        epochs: int,
        encoder_stage: bool | None = None,
        encoder_anchor: float | None = None,
        reference_cells: AnnData | None = None,
        empty_cells: str = "error",
    ):
        self._reference_module = copy.deepcopy(reference.module).cpu().eval()
        self._extension = extension
        self.unfreeze = mapping["unfreeze"]
        module, self._extended = extend_conditions(self._reference_module, extension)
        start, precision = self._set_encoder_start(module, aligned, schema, mapping["encoder_start"], reference_cells, reference.schema)
        self._stages = self._training_stages(module, encoder_stage, refined=start.get("encoder_start") == "latent")
        self._start = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        anchor = self._anchor_weight(encoder_anchor, precision)
        self._anchor = precision * anchor if anchor else None  # (H, in) per-entry precision of the pull, or no pull
        self.mapping = {**mapping, **start, "stages": [name for name, _ in self._stages], "encoder_anchor": anchor}
        self.reference = reference_record(reference)
        self.default_epochs = int(epochs)
        self._stage: int | None = None  # the stage being trained (recorded in its checkpoints)
        self._carried: dict | None = None  # the previous stage's weights, where the next one starts
        self._assemble(schema=schema, config=module.config, adata=aligned, empty_cells=empty_cells,
                       adversarial_key=None, adversary_config=None)  # fmt: skip

    def _set_encoder_start(
        self, module: ConditionalVAE, aligned: AnnData, schema: DataSchema, start: str,
        reference_cells: AnnData | None, reference_schema: DataSchema,
    ) -> tuple[dict, torch.Tensor | None]:  # fmt: skip
        """Move the new encoder columns of ``module`` to the data-driven ``start`` (in place); returns
        what to record of it and, for a start from the reference's cells, the precision of each
        column's shift (:func:`~genailab.model.surgery.start_precision`) in the encoder's first-layer
        weight's shape (H, in), zero off the shifted columns (else None). The record: for ``"auto"``,
        ``"neighbours"`` and ``"latent"``, the start taken (``"latent"`` when every new column was
        refined in the latent, else ``"neighbours"``), the mutual pairs behind each column's shift
        and the query's latent spread after the first-layer offset
        (:class:`~genailab.model.surgery.ColumnStart`)."""
        if start == "mean":
            return {}, None
        x, c = _cells(aligned, schema, schema)
        if start == "batch_norm":
            centre_new_encoder_columns(module, self._extended, x, c)
            return {}, None
        x_reference, c_reference = _cells(reference_cells, reference_schema, schema)
        steps = 0 if start == "neighbours" else START_LATENT_STEPS
        columns = align_new_encoder_columns(module, self._extended, x, c, x_reference, c_reference, n_neighbors=START_NEIGHBOURS,
                                            cells_per_cluster=START_CLUSTER_CELLS, latent_steps=steps,
                                            refine_below=START_LATENT_SPREAD if start == "auto" else None)  # fmt: skip
        precision = torch.zeros_like(module.encoder.layers[0].weight, requires_grad=False)
        for position, column in zip(self._extended[f"{ENCODER_FIRST_LAYER}.weight"].new_positions.tolist(), columns):
            if column.precision is not None:
                precision[:, position] = column.precision
        record = {
            "encoder_start": "latent" if all(column.refined for column in columns) else "neighbours",
            "start_pairs": [column.pairs for column in columns],
            "start_latent_spread": [None if c.latent_spread is None else round(c.latent_spread, 4) for c in columns],
        }
        return record, precision.detach() if precision.any() else None

    def _anchor_weight(self, encoder_anchor: float | None, precision: torch.Tensor | None) -> float:
        """The weight of the encoder stage's pull toward the start (``encoder_anchor`` of :func:`map_query`):
        None gives ENCODER_ANCHOR where it applies (the default ``unfreeze``, a data start with pairs,
        an encoder stage) and 0 elsewhere; a positive weight where it cannot apply is refused."""
        applies = precision is not None and self.unfreeze == "new_categories" and "encoder" in [name for name, _ in self._stages]
        if encoder_anchor is None:
            return ENCODER_ANCHOR if applies else 0.0
        if encoder_anchor > 0 and not applies:
            raise ConfigError(
                f"encoder_anchor={encoder_anchor} pulls a new encoder column toward a start taken from the reference's cells "
                f"during the encoder stage, but here unfreeze={self.unfreeze!r}, the stages are "
                f"{[name for name, _ in self._stages]} and the start {'has' if precision is not None else 'has no'} mutual "
                "pairs; use unfreeze='new_categories', encoder_start='neighbours' (with the reference's cells) and an "
                "encoder stage, or encoder_anchor=None (the default)."
            )
        return float(encoder_anchor)

    def _training_stages(
        self, module: ConditionalVAE, encoder_stage: bool | None, *, refined: bool
    ) -> list[tuple[str, dict[str, torch.Tensor | None]]]:
        """:func:`~genailab.model.surgery.training_stages`, less the encoder stage when ``encoder_stage``
        is False, or None after a latent start (``refined``) with ``unfreeze="new_categories"``: that
        start already fits the encoder column, on the whole query, to the reference's latent; the
        ELBO's encoder stage pulled it back toward a tighter, less mixed placement and ran all its
        epochs (PBMC split of ``benchmarks/mapping.py``: kNN mixing 0.945 held, 0.904 after 200
        encoder epochs, 1.14 of from scratch's time)."""
        stages = training_stages(module, self._extended, unfreeze=self.unfreeze)
        separate = [name for name, _ in stages] == ["decoder", "encoder"]
        if encoder_stage is False and not (separate and self.unfreeze == "new_categories"):
            raise ConfigError(
                f"encoder_stage=False holds the new encoder columns at their start, but with unfreeze={self.unfreeze!r} and "
                f"these conditions the stages are {[name for name, _ in stages]}; use unfreeze='new_categories' with "
                "one-hot conditions seen by both networks, or leave encoder_stage=False out (the default trains them).",
                argument="encoder_stage",
            )
        hold = encoder_stage is False or (encoder_stage is None and refined and separate and self.unfreeze == "new_categories")
        return stages[:1] if hold else stages

    def _new_module(self) -> ConditionalVAE:
        module, _ = extend_conditions(self._reference_module, self._extension)
        module.load_state_dict(self._carried if self._carried is not None else self._start)
        name, trainable = self._stages[self._stage or 0]
        freeze_reference(module, trainable, freeze_norm_statistics=self.unfreeze != "all")
        if name == "encoder" and self._anchor is not None:  # registered after the freezing masks, so it runs after them
            weight = f"{ENCODER_FIRST_LAYER}.weight"
            anchor_to_start(dict(module.named_parameters())[weight], self._start[weight], self._anchor)
        return module

    @property
    def fit_defaults(self) -> dict:
        """The TrainConfig options ``fit()`` uses unless given."""
        return {"epochs": self.default_epochs, "lr": QUERY_LR, "weight_decay": 0.0, "kl_schedule": "constant"}

    def fit_config(self, **options) -> TrainConfig:
        """The :class:`~genailab.train.config.TrainConfig` of ``fit(**options)``: :attr:`fit_defaults`
        updated by ``options``."""
        return build_config(TrainConfig, **{**self.fit_defaults, **options})

    def fit(
        self,
        config: TrainConfig | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        loader: LoaderOptions | None = None,
        **options,
    ) -> QueryVAE:
        """Train the query parameters stage by stage: :meth:`genailab.VAE.fit` with :attr:`fit_defaults`
        for the training options not given (and without them when ``config`` is given).

        ``config`` (or the options) is the first stage's; the encoder stage uses its learning rate
        times ``ENCODER_STAGE_LR_FACTOR``. ``resume_from`` continues the stage its checkpoint was
        written in, then runs the later stages (``history`` then starts at that stage).
        """
        if loader is None:
            loader, options = LoaderOptions.split(options)
        if config is None:
            config = self.fit_config(**options)
        elif options:
            raise ConfigError("Pass either a TrainConfig or keyword options to fit(), not both.")
        if self.unfreeze != "all" and config.weight_decay != 0:
            raise ConfigError(
                f"weight_decay={config.weight_decay} would shrink the frozen reference weights; use weight_decay=0 "
                "(the default for a query model), or unfreeze='all' to fine-tune everything."
            )
        first = 0 if resume_from is None else int(load_checkpoint(resume_from)["extra"].get("stage", 0))
        records, first_config, self._carried = [], None, None
        for stage in range(first, len(self._stages)):
            self._stage = stage
            resume = resume_from if stage == first else None
            if resume is not None:
                self.module = self._new_module()  # frozen as that stage was; the checkpoint restores the weights
            super().fit(self._stage_config(config, stage), checkpoint_dir=checkpoint_dir, resume_from=resume, loader=loader)
            records += [{**record, "stage": self._stages[stage][0]} for record in self.history]
            first_config = first_config or self.train_config
            self._carried = {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        self.history, self.train_config = records, first_config
        self._stage, self._carried = None, None
        return self

    def _continues_checkpoint(self) -> bool:
        return bool(self._stage)  # a later stage replaces the checkpoint of the stage before it

    def _starts_from_data(self) -> bool:
        return False  # the reference's weights are the start

    def _stage_config(self, config: TrainConfig, stage: int) -> TrainConfig:
        """The first stage trains at ``config.lr``; the encoder stage at ENCODER_STAGE_LR_FACTOR times it,
        held constant when only the new columns learn (``unfreeze="new_categories"``): halved further on
        validation plateaus, the encoder's new column stopped before it had converged (simulated seed 1
        of ``benchmarks/mapping.py``: label transfer 0.759 after 78 or 200 encoder epochs alike, 0.806 at
        the constant rate). Where whole encoder tensors learn, the plateau schedule stays: at a constant
        rate ``"encoder"`` mapped worse on 5 of 6 benchmark splits (seed 1: 0.828 -> 0.803)."""
        if self._stages[stage][0] != "encoder":
            return config
        lr = config.lr * ENCODER_STAGE_LR_FACTOR
        plateau = None if self.unfreeze == "new_categories" else config.lr_plateau_patience
        return dataclasses.replace(config, lr=lr, min_lr=min(config.min_lr, lr), lr_plateau_patience=plateau)

    def _description(self) -> dict:
        stage = {} if self._stage is None else {"stage": self._stage}
        return {**super()._description(), "reference": self.reference, "mapping": self.mapping, **stage}


def _check_values(adata: AnnData, schema: DataSchema, reference: VAE, *, name: str) -> None:
    """The data checks of training (:func:`~genailab.data.validation.check_expression`) on ``adata``'s
    values in the reference's layer, before any start is computed from them, and for a Gaussian
    reference a warning when they are on another scale than its training data."""
    where = "X" if schema.layer is None else f"layers[{schema.layer!r}]"
    remedy = f"Put the raw counts of `{name}` in {where}, the layer the reference was trained on."
    matrix = schema.expression(adata, align_genes=True, max_missing_fraction=1.0)
    check_expression(matrix, counts=reference.config.is_count_model, source=f"{name}.{where}", remedy=remedy,
                     structure_checked=True)  # fmt: skip
    reference._warn_if_other_scale(matrix, source=f"{name}.{where}")


def _cells(adata: AnnData, schema: DataSchema, encoding: DataSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (cells, genes) values in ``schema``'s gene order and their conditions encoded by ``encoding``
    (the query's schema, which also knows the reference categories), for at most START_MAX_CELLS
    cells (a seeded random subset, in file order)."""
    rows = np.arange(adata.n_obs)
    if rows.size > START_MAX_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(rows, START_MAX_CELLS, replace=False))
    cells = adata[rows]
    x = schema.expression(cells, align_genes=True, max_missing_fraction=1.0)  # checked by map_query
    x = torch.as_tensor(x.toarray() if sp.issparse(x) else np.asarray(x), dtype=torch.float32)
    return x, torch.as_tensor(encoding.encode_obs(cells.obs), dtype=torch.float32)


def reference_record(reference: VAE) -> dict:
    """Where the reference came from: its folder and the SHA-256 of its two files as they were when
    it was loaded or saved (not retrained since), else the SHA-256 of its weights in memory."""
    if reference.saved_dir is not None and reference.saved_files is not None:
        return {"path": str(reference.saved_dir.resolve()), **reference.saved_files}
    return {"path": None, "weights_sha256": _state_sha256(reference.module.state_dict())}


def _state_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
