"""Architecture surgery for reference mapping (as in scArches): new condition categories, frozen rest.

A trained :class:`~genailab.model.vae.ConditionalVAE` sees its categorical conditions (batches,
donors...) as one-hot columns appended to the inputs of the first encoder and decoder layers (and,
with ``dispersion="gene-condition"``, of the dispersion head), or as rows of learned embeddings.
To map a query with new categories, :func:`extend_conditions` builds a wider copy: every reference
weight is copied to its place, and each new category gets a column (or embedding row) initialised to
the mean of its condition's reference columns, i.e. the query starts as the "average" reference
category. :func:`freeze_reference` then lets only chosen entries learn:

* ``"new_categories"``: the new columns / rows only;
* ``"first_layer"``: those plus the whole first encoder layer (weights and bias);
* ``"encoder"``: those plus the whole encoder (its layers and the posterior heads), the generative
  model (decoder, likelihood head) staying the reference's;
* ``"all"``: everything (fine-tuning from the reference weights).

:func:`training_stages` orders them: the entries outside the encoder (the decoder's and the
dispersion head's new columns) learn first, the encoder's afterwards. Trained together, the
encoder's new column is a free shift of every query cell's latent, and the ELBO uses it to explain
the query's batch effect as a change of cell state through the frozen decoder before the decoder's
own new column has absorbed it: on a reference trained 10 epochs (400 simulated cells, 3 batches)
label transfer fell from 0.855 before query training to 0.324 after it, while the decoder's new
columns alone reached the same reconstruction without moving the query (0.855 kept). Once the
decoder side has absorbed the batch effect, the encoder's column only corrects what remains;
:func:`anchor_to_start` can hold it near a data-driven start (:func:`start_precision`) meanwhile.

Partly trainable tensors (a first layer whose old columns stay fixed) get a gradient hook that zeroes
the gradient of the frozen entries; wholly frozen tensors get ``requires_grad=False``, so optimisers
skip them. With Adam/AdamW and no weight decay, an entry whose gradient is always zero is updated by
exactly zero, so the reference entries stay bitwise unchanged. Except for ``"all"``, batch
normalisation is kept in evaluation mode (the reference's running statistics normalise the query and
are not updated); dropout stays as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.hooks import RemovableHandle

from genailab.errors import ConfigError
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE

UNFREEZE = ("new_categories", "first_layer", "encoder", "all")
ENCODER_FIRST_LAYER = "encoder.layers.0"
ENCODER_PARTS = ("encoder.", "z_mean.", "z_logvar.")  # parameter-name prefixes of q(z|x,c)


@dataclass(frozen=True)
class ConditionExtension:
    """How many categories each categorical condition has in the reference, and how many are added.

    New categories of condition ``i`` are placed after its reference categories, so the one-hot
    block of condition ``i`` grows from ``old_sizes[i]`` to ``old_sizes[i] + n_new[i]`` columns and
    the later blocks (and the continuous columns) shift right.
    """

    old_sizes: tuple[int, ...]  # categories per categorical condition in the reference
    n_new: tuple[int, ...]  # categories added to each condition (0 for none)
    n_continuous: int = 0  # continuous condition columns after the categorical ones

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_sizes", tuple(int(k) for k in self.old_sizes))
        object.__setattr__(self, "n_new", tuple(int(k) for k in self.n_new))
        if len(self.old_sizes) != len(self.n_new):
            raise ConfigError(
                f"n_new has {len(self.n_new)} entries but the model has {len(self.old_sizes)} categorical conditions."
            )
        if min(self.n_new, default=0) < 0 or min(self.old_sizes, default=1) < 1:
            raise ConfigError("Every condition needs at least one reference category and n_new >= 0.")

    @property
    def new_sizes(self) -> tuple[int, ...]:
        return tuple(k + n for k, n in zip(self.old_sizes, self.n_new))

    def onehot_layout(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Where the reference's one-hot condition columns go in the extended condition vector.

        Returns
        -------
        old_to_new
            (old_condition_dim,) column of each reference condition column in the extended vector.
        new_blocks
            Per categorical condition: (its new columns, its reference columns), both positions in
            the extended vector; a new column starts as the mean of that condition's reference columns.
        """
        old_to_new, new_blocks = [], []
        start = 0
        for old, added in zip(self.old_sizes, self.n_new):
            old_columns = np.arange(start, start + old)
            old_to_new.append(old_columns)
            new_blocks.append((np.arange(start + old, start + old + added), old_columns))
            start += old + added
        old_to_new.append(np.arange(start, start + self.n_continuous))
        return np.concatenate(old_to_new).astype(np.int64), new_blocks


@dataclass(frozen=True)
class ExtendedTensor:
    """A reference tensor that grew along one axis: where its old slices went, which slices are new."""

    axis: int  # 1 for one-hot columns of a weight (out, in); 0 for embedding rows
    old_positions: np.ndarray  # (old size along axis,) positions of the reference slices in the new tensor
    blocks: tuple[tuple[np.ndarray, np.ndarray], ...]  # (new slices, reference slices they start as the mean of)

    @property
    def new_positions(self) -> np.ndarray:
        return np.concatenate([new for new, _ in self.blocks]) if self.blocks else np.zeros(0, dtype=np.int64)


def extend_conditions(
    reference: ConditionalVAE, extension: ConditionExtension
) -> tuple[ConditionalVAE, dict[str, ExtendedTensor]]:
    """A new model like ``reference`` whose condition encodings also take the extension's new categories.

    Parameters
    ----------
    reference
        The trained model; it is not modified.
    extension
        Reference categories per categorical condition and how many are added.

    Returns
    -------
    model
        The extended model (in evaluation mode, on the reference's device): every reference tensor
        copied, new one-hot columns / embedding rows set to the mean of their condition's reference
        columns / rows.
    extended
        For each state-dict entry that grew, an :class:`ExtendedTensor` saying where the old and
        new slices are; tensors not listed have the reference's shape and values.
    """
    config = reference.config
    embedded = bool(config.categorical_sizes)
    if embedded and tuple(config.categorical_sizes) != extension.old_sizes:
        raise ConfigError(
            f"The model embeds conditions with {config.categorical_sizes} categories but the extension "
            f"describes {extension.old_sizes}; describe the model's own categories."
        )
    if not embedded and sum(extension.old_sizes) + extension.n_continuous != config.condition_dim:
        raise ConfigError(
            f"The model's condition vector has {config.condition_dim} columns but the extension describes "
            f"{sum(extension.old_sizes)} one-hot + {extension.n_continuous} continuous; describe the model's own layout."
        )
    if not extension.old_sizes:
        raise ConfigError("The model has no categorical conditions, so there are no categories to add.")
    if embedded:
        new_config = ModelConfig(**{**config.to_dict(), "categorical_sizes": extension.new_sizes, "condition_dim": 0})
    else:
        new_config = ModelConfig(**{**config.to_dict(), "condition_dim": config.condition_dim + sum(extension.n_new)})
    model = ConditionalVAE.from_config(new_config)
    old_state, new_state = reference.state_dict(), model.state_dict()
    extended = _extended_tensors(old_state, new_state, extension, config.condition_dim, embedded)
    with torch.no_grad():
        for name, old in old_state.items():
            if name in extended:
                _place(new_state[name], old, extended[name])
            else:
                new_state[name].copy_(old)
    device = next(reference.parameters()).device
    return model.to(device).eval(), extended


def _extended_tensors(
    old_state: dict, new_state: dict, extension: ConditionExtension, old_condition_dim: int, embedded: bool
) -> dict[str, ExtendedTensor]:
    """The state-dict entries whose shape changed, with the positions of their old and new slices."""
    extended = {}
    old_to_new, blocks = extension.onehot_layout()
    for name, old in old_state.items():
        if old.shape == new_state[name].shape:
            continue
        if embedded:  # condition_embedding.embeddings.<i>.weight: (categories, embedding_dim)
            condition = int(name.split(".")[-2])
            size, added = extension.old_sizes[condition], extension.n_new[condition]
            rows = np.arange(size)
            extended[name] = ExtendedTensor(0, rows, ((np.arange(size, size + added), rows),))
        else:  # a weight (out, inputs + condition_dim) whose last columns are the condition vector
            offset = old.shape[1] - old_condition_dim
            shifted = tuple((offset + new, offset + ref) for new, ref in blocks if new.size)
            old_positions = np.concatenate([np.arange(offset), offset + old_to_new])  # inputs stay, conditions move
            extended[name] = ExtendedTensor(1, old_positions, shifted)
    return extended


def _place(target: torch.Tensor, old: torch.Tensor, spec: ExtendedTensor) -> None:
    """Copy ``old`` into its slices of ``target`` and set each new slice to the mean of its reference slices."""
    target.index_copy_(spec.axis, torch.as_tensor(spec.old_positions), old)
    for new, reference in spec.blocks:
        mean = target.index_select(spec.axis, torch.as_tensor(reference)).mean(dim=spec.axis, keepdim=True)
        shape = list(target.shape)
        shape[spec.axis] = new.size
        target.index_copy_(spec.axis, torch.as_tensor(new), mean.expand(shape).contiguous())


def takes_data_start(config: ModelConfig) -> bool:
    """Whether new encoder columns can start from data: one-hot conditions seen by the encoder, whose
    first layer is followed by batch norm (the starts shift the column at that norm's input)."""
    return config.norm == "batch" and not config.categorical_sizes and config.inject_condition in ("both", "encoder")


def _first_layer(model: ConditionalVAE, extended: dict[str, ExtendedTensor]) -> tuple[nn.Linear, nn.Module, ExtendedTensor]:
    """The encoder's first linear layer, the normalisation after it, and where its new one-hot columns are."""
    spec = extended.get(f"{ENCODER_FIRST_LAYER}.weight")
    linear, norm = model.encoder.layers[0], model.encoder.layers[1]
    if spec is None or spec.axis != 1 or not spec.new_positions.size:
        raise ConfigError("Starting the query's encoder column from data needs new one-hot condition columns in the encoder (not embedded conditions).")
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"Starting the query's encoder column from data needs an encoder with batch norm (norm='batch'); this one has {type(norm).__name__}.")
    return linear, norm, spec


@torch.no_grad()
def first_norm_inputs(model: ConditionalVAE, x: torch.Tensor, c: torch.Tensor, *, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """What the encoder's first batch norm receives for each cell (evaluation mode), and its condition vector.

    Returns
    -------
    inputs
        (n_cells, hidden) first-layer activations before normalisation.
    conditions
        (n_cells, condition_dim) the condition vector the first layer saw (one-hot columns).
    """
    norm = model.encoder.layers[1]
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    training = model.training
    model.eval()
    conditions = []
    try:
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            model.encode(x[rows], c[rows])
            conditions.append(model._condition(c[rows], x[rows].shape[0]))
    finally:
        handle.remove()
        model.train(training)
    return torch.cat(seen), torch.cat(conditions)


def _query_cells_per_new_column(conditions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(n_cells, new columns) bool: which new category each query cell belongs to (at most one)."""
    active = conditions[:, columns] != 0
    if (active.sum(dim=1) > 1).any():
        raise ConfigError("Starting the encoder columns from data needs each query cell in at most one new category; use encoder_start='mean' (the default 'auto' does so for such a query), or map one new condition at a time.")
    return active


def centre_new_encoder_columns(
    model: ConditionalVAE, extended: dict[str, ExtendedTensor], x: torch.Tensor, c: torch.Tensor, *, chunk: int = 4096
) -> None:
    """Set each new one-hot column of the encoder's first layer so that the query cells of its category
    reach the first batch-norm layer with the reference's running mean as their mean (in place).

    A data-driven start for the new column instead of the mean of the reference columns: the query's
    first-layer activations are centred where the reference's were, as if the batch norm had been
    re-estimated on the query (its mean only), while every reference tensor stays as it was. It
    assumes the running mean describes the reference cells under the final weights, which a briefly
    trained reference does not satisfy, and that the query has the reference's cell-type
    composition (a query of some of the types is moved onto the others).

    Parameters
    ----------
    model
        The extended model of :func:`extend_conditions` (one-hot conditions, ``norm="batch"``).
    extended
        Its extended tensors.
    x, c
        The query's counts (or values) (n_cells, n_genes) and conditions (n_cells, raw_condition_dim);
        each cell may belong to at most one new category.
    """
    linear, norm, spec = _first_layer(model, extended)
    inputs, conditions = first_norm_inputs(model, x, c, chunk=chunk)
    columns = torch.as_tensor(spec.new_positions)
    active = _query_cells_per_new_column(conditions, columns - linear.in_features + conditions.shape[1])
    with torch.no_grad():
        for j, column in enumerate(columns.tolist()):
            if active[:, j].any():
                shift = norm.running_mean.double() - inputs[active[:, j]].double().mean(dim=0)
                linear.weight[:, column] += shift.to(linear.weight.dtype)


@dataclass(frozen=True)
class ColumnStart:
    """What :func:`align_new_encoder_columns` did to one new encoder column."""

    pairs: int  # mutual query-reference pairs behind its shift (0: the column stayed where it was)
    latent_spread: float | None  # the query's latent spread after the first-layer offset over the reference's (None: no pairs)
    refined: bool  # whether the shift was then refined in the latent (match_cluster_latents)
    precision: torch.Tensor | None = None  # (H,) the shift's precision per query cell and unit (start_precision; None: no pairs)


def align_new_encoder_columns(
    model: ConditionalVAE,
    extended: dict[str, ExtendedTensor],
    x: torch.Tensor,
    c: torch.Tensor,
    x_reference: torch.Tensor,
    c_reference: torch.Tensor,
    *,
    n_neighbors: int = 20,
    cells_per_cluster: int = 50,
    latent_steps: int = 0,
    refine_below: float | None = None,
) -> list[ColumnStart]:
    """Shift each new one-hot column of the encoder's first layer so that, at the first batch norm,
    the query cells of its category reach the means of the reference clusters their mutual nearest
    reference cells belong to (in place).

    Mutual nearest neighbours (as in MNN batch correction) pair query and reference cells of the same
    state, so the offset is the batch's own shift even when the query holds only some of the
    reference's cell types (matching the means of all cells would move those onto the others), and
    it is measured with the reference's final weights rather than its running statistics. The pairs'
    own offsets fall short of the shift (a query cell pairs with the reference cells on the side
    facing it: 4.95 against the 6.04 that centres the query, on simulated seed 1 of
    ``benchmarks/mapping.py``), so the pairs only say where each query cell belongs: the reference
    cells are split into k-means clusters of about ``cells_per_cluster`` cells, each paired query
    cell joins the cluster most of its partners are in, and the offset is the mean, over those
    query cells, of their cluster's reference mean minus the cell. Clusters that small hold one
    cell state, so the offset stays the batch's; with 6 or 12 clusters for 2,227 reference cells a
    query of 3 of the 6 types lost its labels again (0.73 / 0.81 against 0.89 from the pairs'
    offsets). Distances and clusters are taken after dividing by the batch norm's running standard
    deviation, as the next layer sees them. That offset matches means at the first layer, not in the
    latent: a query that spreads less there (fewer counts) stays apart after the nonlinearity. With
    ``latent_steps`` the shift is then refined until each cluster's query cells have its reference
    cells' mean in the latent (:func:`match_cluster_latents`; PBMC split of ``benchmarks/mapping.py``:
    kNN mixing before ``fit()`` 0.757 -> 0.945; but simulated seed 4 labels 0.934 -> 0.918), with
    ``refine_below`` only where the query, after the first-layer offset, spreads in the latent less
    than that share of its clusters' reference cells (:func:`latent_spread_ratio`; the PBMC splits
    0.43-0.63, the simulated ones 0.76-1.13).

    Parameters
    ----------
    model
        The extended model of :func:`extend_conditions` (one-hot conditions, ``norm="batch"``).
    extended
        Its extended tensors.
    x, c
        The query's counts (or values) (n_cells, n_genes) and conditions (n_cells, raw_condition_dim),
        each cell in at most one new category.
    x_reference, c_reference
        Reference cells, (n_reference, n_genes) and (n_reference, raw_condition_dim), in the extended
        model's encoding (their categories are the reference's).
    n_neighbors
        Neighbours searched each way; a pair is mutual when each is among the other's. The search
        compares every query cell with every reference cell: pass subsets of large datasets.
    cells_per_cluster
        Reference cells per k-means cluster (``round(n_reference / cells_per_cluster)`` clusters, at
        least one; seeded, so the start is reproducible).
    latent_steps
        Most L-BFGS iterations of the latent refinement; 0 (default) keeps the first-layer offset.
    refine_below
        With ``latent_steps``, refine only the columns whose query cells, after the first-layer
        offset, spread in the latent less than this share of their clusters' reference cells
        (:func:`latent_spread_ratio`); None refines every column.

    Returns
    -------
    Per new column, a :class:`ColumnStart`: the mutual pairs behind its shift (0 leaves the column
    as it was), the query's latent spread after the first-layer offset, whether it was refined, and
    the first-layer shift's precision (:func:`start_precision`).
    """
    linear, norm, spec = _first_layer(model, extended)
    reference, _ = first_norm_inputs(model, x_reference, c_reference)
    inputs, conditions = first_norm_inputs(model, x, c)
    columns = torch.as_tensor(spec.new_positions)
    active = _query_cells_per_new_column(conditions, columns - linear.in_features + conditions.shape[1])
    scale = (norm.running_var + norm.eps).sqrt()
    clusters = kmeans_labels(reference / scale, max(1, round(reference.shape[0] / cells_per_cluster)))
    with torch.no_grad():
        targets = _encoder_after_first_layer(model, reference)  # (n_reference, L) their latent means
    encode = partial(_encoder_after_first_layer, model)  # (n, H) first-layer outputs -> (n, L) latent means
    starts = []
    for j, column in enumerate(columns.tolist()):
        query = inputs[active[:, j]]
        i, r = mutual_neighbours(query / scale, reference / scale, n_neighbors)
        if not i.numel():
            starts.append(ColumnStart(0, None, False))
            continue
        cells, joined = joined_clusters(query.shape[0], clusters, i, r)
        offsets = cluster_offsets(query, reference, clusters, cells, joined)  # (P, H)
        shift = offsets.mean(dim=0).to(query.dtype)
        precision = start_precision(offsets, n_query=inputs.shape[0])
        with torch.no_grad():
            spread = latent_spread_ratio(encode(query[cells] + shift), targets, clusters, joined)
        refine = bool(latent_steps) and (refine_below is None or spread < refine_below)
        if refine:
            shift = match_cluster_latents(encode, query[cells], cluster_means(targets, clusters)[joined], joined, shift,
                                          scale=scale, steps=latent_steps)  # fmt: skip
        starts.append(ColumnStart(int(i.numel()), spread, refine, precision))
        with torch.no_grad():
            linear.weight[:, column] += shift.to(linear.weight.dtype)
    return starts


def start_precision(offsets: torch.Tensor, *, n_query: int) -> torch.Tensor:
    """How well the first-layer shift of :func:`align_new_encoder_columns` is known, per unit and per query cell: (d,).

    The shift is the mean of the P paired query cells' ``offsets`` (P, d) (:func:`cluster_offsets`),
    so its sampling variance in unit j is var_j / P, var_j the variance of those offsets. Taken as a
    Gaussian prior on the column centred at the shift, added to the query's summed negative ELBO and
    divided by the ``n_query`` query cells as the per-cell training loss is (those compared, when a
    subset was), it weighs ½ Σ_j precision_j (column_j - start_j)² with precision_j = P / (n_query var_j).
    """
    variance = offsets.var(dim=0, unbiased=offsets.shape[0] > 1).clamp_min(torch.finfo(torch.float32).eps)
    return (offsets.shape[0] / n_query / variance).float()


def anchor_to_start(parameter: nn.Parameter, start: torch.Tensor, precision: torch.Tensor) -> RemovableHandle:
    """Pull ``parameter`` toward ``start``: a gradient hook adding precision * (parameter - start), the
    gradient of ½ Σ precision (parameter - start)² (a Gaussian prior centred at ``start``), to the
    gradient of the training loss.

    The penalty enters the gradient only (the recorded losses stay the ELBO's). Where ``precision``
    is 0 the gradient is unchanged, so a frozen entry (masked by :func:`freeze_reference`, whose hook
    runs first when registered first) still gets exactly zero. ``start`` and ``precision`` have the
    parameter's shape. Returns the hook handle (``handle.remove()`` undoes it).
    """
    start, precision = start.detach().clone(), precision.detach().clone()

    def hook(gradient: torch.Tensor) -> torch.Tensor:
        pull = precision.to(gradient.device, gradient.dtype) * (parameter.detach() - start.to(gradient.device, gradient.dtype))
        return gradient + pull

    return parameter.register_hook(hook)


def within_cluster_spread(points: torch.Tensor, clusters: torch.Tensor) -> float:
    """Root mean squared distance of the rows of ``points`` (n, d) to the mean of their cluster (``clusters``, (n,))."""
    return float(((points - cluster_means(points, clusters)[clusters]) ** 2).sum(dim=1).mean().sqrt())


def latent_spread_ratio(query: torch.Tensor, reference: torch.Tensor, clusters: torch.Tensor, joined: torch.Tensor) -> float:
    """How widely the query spreads in the latent within the reference clusters it joined, as a share
    of the reference cells of those clusters: :func:`within_cluster_spread` of ``query`` (n, L) by
    ``joined`` (n,) over that of the ``reference`` rows (m, L) whose ``clusters`` (m,) are among ``joined``."""
    kept = torch.isin(clusters, joined)
    return within_cluster_spread(query, joined) / within_cluster_spread(reference[kept], clusters[kept])


def _encoder_after_first_layer(model: ConditionalVAE, pre_norm: torch.Tensor) -> torch.Tensor:
    """The encoder from its first batch norm to the posterior mean, (n, H) -> (n, L), in evaluation mode
    (differentiable; the first layer's output is where the new column adds its shift)."""
    training = model.training
    model.eval()
    try:
        return model.z_mean(model.encoder.layers[1:](pre_norm))
    finally:
        model.train(training)


def cluster_means(points: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """(K, d) mean of the rows of ``points`` (m, d) in each of the K clusters of ``clusters`` (m,)."""
    n_clusters = int(clusters.max()) + 1
    sizes = torch.bincount(clusters, minlength=n_clusters).to(points.dtype).clamp(min=1)
    return torch.zeros(n_clusters, points.shape[1], dtype=points.dtype).index_add_(0, clusters, points) / sizes.unsqueeze(1)


def match_cluster_latents(
    encode: Callable[[torch.Tensor], torch.Tensor],
    query: torch.Tensor,
    targets: torch.Tensor,
    joined: torch.Tensor,
    shift: torch.Tensor,
    *,
    scale: torch.Tensor,
    steps: int = 200,
) -> torch.Tensor:
    """Refine a first-layer ``shift`` so that, in the latent space, the query cells of each reference cluster
    have that cluster's reference mean as their mean.

    The shift that matches first-layer means does not match the latent: the query's first-layer
    activations spread less than the reference's (PBMC query of ``benchmarks/mapping.py``: 0.69-0.78
    of the within-type spread at lower depth), and through the batch norm and nonlinearity equal
    means there are not equal means after them; even centring each cell type at the first layer with
    the true labels left the PBMC query as unmixed as the clusters' offset (kNN mixing 0.759 before
    ``fit()``). Matching each cluster's mean in the latent instead, every cluster a separate
    constraint on the one shift, is minimised here over the whole query (deterministic: no
    minibatches, no sampling), with L-BFGS and a strong-Wolfe line search.

    Parameters
    ----------
    encode
        (n, H) first-layer outputs -> (n, L) latent means, differentiable (the frozen rest of the encoder).
    query
        (n, H) the query cells' first-layer outputs before the shift.
    targets
        (n, L) the latent mean of the reference cluster each query cell joined.
    joined
        (n,) that cluster's index; each cluster weighs by its number of query cells.
    shift
        (H,) the first-layer shift to start from.
    scale
        (H,) units of the search (the batch norm's running standard deviation, so that every hidden
        unit's shift is measured as the next layer sees it).
    steps
        Most L-BFGS iterations (it stops earlier once the loss stops changing).

    Returns
    -------
    (H,) the refined shift, ``query.dtype``.
    """
    _, group = torch.unique(joined, return_inverse=True)
    counts = torch.bincount(group).to(query.dtype).unsqueeze(1)  # (K', 1) query cells per cluster
    goal = cluster_means(targets.to(query.dtype), group)  # (K', L)
    units = torch.zeros_like(shift, requires_grad=True)  # (H,) the refinement in units of scale
    optimiser = torch.optim.LBFGS([units], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        latent = encode(query + shift + units * scale)  # (n, L)
        means = cluster_means(latent, group)  # (K', L)
        value = (counts * (means - goal) ** 2).sum() / query.shape[0]
        (units.grad,) = torch.autograd.grad(value, units)  # the model's own parameters get no gradient
        return value.detach()

    optimiser.step(loss)
    return (shift + units.detach() * scale).detach()


def kmeans_labels(points: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """(n,) k-means cluster of each row of ``points`` (n, d) (scikit-learn, 3 seeded starts)."""
    n_clusters = min(n_clusters, points.shape[0])
    labels = KMeans(n_clusters, n_init=3, random_state=0).fit_predict(points.detach().cpu().double().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def cluster_offsets(
    query: torch.Tensor, reference: torch.Tensor, clusters: torch.Tensor, cells: torch.Tensor, joined: torch.Tensor
) -> torch.Tensor:
    """Each paired query cell's offset to the reference cluster it joined: (its cluster's reference
    mean - the cell), float64 (P, d); their mean is the neighbours start's shift.

    Parameters
    ----------
    query, reference
        (n, d) and (m, d) points.
    clusters
        (m,) cluster of each reference point.
    cells, joined
        (P,) the paired query rows and the cluster each joined (:func:`joined_clusters`).
    """
    return cluster_means(reference.double(), clusters)[joined] - query[cells].double()


def joined_clusters(n_query: int, clusters: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paired query rows (ascending) and, for each, the cluster most of its partners are in (the
    lowest-numbered on a tie): two (P',) long tensors, from the pairs ``i``, ``r`` (P,) and the
    reference clusters ``clusters`` (m,); a query row joins the cluster most of its partners are in."""
    votes = torch.zeros(n_query, int(clusters.max()) + 1, dtype=torch.long)  # (n, K) partners per cluster
    votes.index_put_((i, clusters[r]), torch.ones_like(i), accumulate=True)
    paired = votes.sum(dim=1) > 0
    return torch.nonzero(paired).squeeze(1), votes[paired].argmax(dim=1)


def mutual_neighbours(a: torch.Tensor, b: torch.Tensor, k: int, *, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i, j) where b[j] is among the k nearest rows of b to a[i] and a[i] among the k nearest of a to b[j].

    Parameters
    ----------
    a, b
        (n, d) and (m, d) points (Euclidean distance).
    k
        Neighbours on each side (clipped to the other side's size).

    Returns
    -------
    (P,) row indices into a and (P,) the matching row indices into b.
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a_to_b = _nearest(a, b, min(k, b.shape[0]), chunk)  # (n, k) rows of b
    b_to_a = _nearest(b, a, min(k, a.shape[0]), chunk)  # (m, k) rows of a
    rows = torch.arange(a.shape[0]).unsqueeze(1).expand_as(a_to_b)
    mutual = (b_to_a[a_to_b] == rows.unsqueeze(-1)).any(dim=-1)  # (n, k): a[i] among b[j]'s neighbours
    return rows[mutual], a_to_b[mutual]


def _nearest(points: torch.Tensor, among: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(n, k) indices of the k rows of ``among`` nearest to each row of ``points``."""
    return torch.cat([torch.cdist(points[start : start + chunk], among).topk(k, dim=1, largest=False).indices
                      for start in range(0, points.shape[0], chunk)])  # fmt: skip


def trainable_entries(
    model: ConditionalVAE, extended: dict[str, ExtendedTensor], *, unfreeze: str = "new_categories"
) -> dict[str, torch.Tensor | None]:
    """Which parameter entries may learn during query training.

    Returns
    -------
    dict
        Parameter name -> None (the whole tensor learns) or a bool mask of the parameter's shape
        (True entries learn). Parameters not listed are frozen.
    """
    if unfreeze not in UNFREEZE:
        raise ConfigError(f"unfreeze={unfreeze!r} is not one of {UNFREEZE}.")
    parameters = dict(model.named_parameters())
    if unfreeze == "all":
        return {name: None for name in parameters}
    trainable: dict[str, torch.Tensor | None] = {}
    for name, spec in extended.items():
        if name not in parameters or not spec.new_positions.size:
            continue
        mask = torch.zeros(parameters[name].shape, dtype=torch.bool)
        mask.index_fill_(spec.axis, torch.as_tensor(spec.new_positions), True)
        trainable[name] = mask
    if unfreeze == "first_layer":
        for suffix in ("weight", "bias"):
            trainable[f"{ENCODER_FIRST_LAYER}.{suffix}"] = None
    if unfreeze == "encoder":
        trainable.update({name: None for name in parameters if name.startswith(ENCODER_PARTS)})
    return trainable


def training_stages(
    model: ConditionalVAE, extended: dict[str, ExtendedTensor], *, unfreeze: str = "new_categories"
) -> list[tuple[str, dict[str, torch.Tensor | None]]]:
    """The entries of :func:`trainable_entries` split into the stages that learn one after the other.

    Returns
    -------
    list
        ``[("decoder", entries outside the encoder), ("encoder", the encoder's entries)]`` when both
        are non-empty, else one stage ``[(unfreeze, all entries)]`` (``"all"``; embedded conditions,
        whose one new embedding row feeds both networks; conditions that enter one network only).
    """
    trainable = trainable_entries(model, extended, unfreeze=unfreeze)
    encoder = {name: mask for name, mask in trainable.items() if name.startswith(ENCODER_PARTS)}
    decoder = {name: mask for name, mask in trainable.items() if not name.startswith(ENCODER_PARTS)}
    if unfreeze == "all" or not encoder or not decoder:
        return [(unfreeze, trainable)]
    return [("decoder", decoder), ("encoder", encoder)]


def freeze_reference(
    model: ConditionalVAE, trainable: dict[str, torch.Tensor | None], *, freeze_norm_statistics: bool = True
) -> list[RemovableHandle]:
    """Freeze every parameter entry of ``model`` that ``trainable`` does not list (in place).

    Wholly frozen parameters get ``requires_grad=False``; partly trainable ones keep it and get a
    gradient hook multiplying the gradient by their mask. With ``freeze_norm_statistics`` every
    batch-norm layer is put in evaluation mode before each forward pass, so it normalises with the
    reference's running statistics and never updates them, even while the rest of the model trains.

    Returns
    -------
    The hook handles (``handle.remove()`` undoes the masking and the batch-norm freezing).
    """
    handles = []
    parameters = dict(model.named_parameters())
    unknown = sorted(set(trainable) - set(parameters))
    if unknown:
        raise ConfigError(f"No parameters named {unknown} in the model.")
    for name, parameter in parameters.items():
        if name not in trainable:
            parameter.requires_grad_(False)
            continue
        parameter.requires_grad_(True)
        mask = trainable[name]
        if mask is not None:
            handles.append(parameter.register_hook(_masked_gradient(mask)))
    if freeze_norm_statistics:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_pre_hook(_stay_in_eval_mode))
    return handles


def _masked_gradient(mask: torch.Tensor):
    def hook(gradient: torch.Tensor) -> torch.Tensor:
        return gradient * mask.to(device=gradient.device, dtype=gradient.dtype)

    return hook


def _stay_in_eval_mode(module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    module.train(False)
