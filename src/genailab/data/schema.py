"""How a model reads an AnnData: the layer, the genes and the condition columns.

A :class:`DataSchema` is fitted on the training AnnData, saved with the model, and then encodes and
validates every later AnnData the same way (same gene order, same category codes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from genailab.data.backed import OnDiskMatrix, is_on_disk
from genailab.data.sparse_structure import check_sparse_structure
from genailab.errors import ConfigError, InputDataError, SchemaMismatchError

logger = logging.getLogger(__name__)

ENCODINGS = ("onehot", "embedding")
MAX_MISSING_FRACTION = 0.1  # most model genes a new AnnData may lack when they are filled with zeros


# what an error for categories a model has not seen suggests: a VAE maps new cells; other models retrain
MAP_UNSEEN = ("Map the new cells onto the model (model.map_query(adata), genailab map), relabel them as a known "
              "category, or retrain including them.")
RETRAIN_UNSEEN = "Relabel them as a known category, or retrain including them."

_INTEGRAL_DECIMAL = r"^(-?\d+)\.0+$"  # 1.0, -3.00: a whole number written as a float


def category_labels(values) -> np.ndarray:
    """The category of each value as text, (n,) -> (n,) str: one number is one category however it is
    stored, so 1, 1.0 and "1" all read "1" (a batch column written as float by a CSV round trip still
    matches the model's integer batches). Missing values come out as "nan"; callers refuse them first."""
    array = np.asarray(values)
    if array.dtype.kind == "f":  # numpy spells a float32 0.1 "0.1"; as a Python float it reads 0.10000000149011612
        array = array.astype(str)
    text = pd.Series(np.asarray(array, dtype=object), dtype=object).astype(str)
    return text.str.replace(_INTEGRAL_DECIMAL, r"\1", regex=True).to_numpy(dtype=object)


def category_label(value) -> str:
    """:func:`category_labels` of one value."""
    return str(category_labels([value])[0])


@dataclass(frozen=True)
class DataSchema:
    """The layer, gene order and condition encoding a model was trained with."""

    gene_names: tuple[str, ...]
    layer: str | None = None  # None reads adata.X
    categorical_keys: tuple[str, ...] = ()  # obs columns treated as categories (batch, cell type, drug)
    categories: tuple[tuple[str, ...], ...] = ()  # the categories of each key, in code order
    continuous_keys: tuple[str, ...] = ()  # numeric obs columns (dose, age), standardised
    continuous_mean: tuple[float, ...] = ()
    continuous_std: tuple[float, ...] = ()
    encoding: str = "onehot"  # categorical conditions as one-hot columns or learned embeddings
    value_scale: float | None = None  # Gaussian models: validation.value_scale of the training matrix (else None)

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        categorical_keys: Sequence[str] = (),
        continuous_keys: Sequence[str] = (),
        encoding: str = "onehot",
    ) -> DataSchema:
        """Record the genes, categories and continuous-column scales of ``adata``."""
        if encoding not in ENCODINGS:
            raise ConfigError(f"condition encoding {encoding!r} is not one of {ENCODINGS}.")
        categorical_keys, continuous_keys = tuple(categorical_keys), tuple(continuous_keys)
        for name, keys in (("condition_keys", categorical_keys), ("continuous_keys", continuous_keys)):
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            if repeated:
                raise ConfigError(f"{name} names {repeated} more than once; list each obs column once.", argument=name)
        overlap = set(categorical_keys) & set(continuous_keys)
        if overlap:
            raise ConfigError(f"Columns {sorted(overlap)} are listed as both categorical and continuous.")
        _require_columns(adata.obs, categorical_keys + continuous_keys, when="training")
        _layer(adata, layer)  # the layer (or adata.raw for layer="raw") must be there
        var_names = _var_names(adata, layer)
        if adata.n_obs == 0 or var_names.size == 0:
            raise InputDataError(f"The AnnData is empty ({adata.n_obs} cells x {var_names.size} genes).")
        if not var_names.is_unique:
            dupes = [str(name) for name in var_names[var_names.duplicated()].unique()[:5]]
            raise InputDataError(f"Gene names are not unique (e.g. {dupes}); call adata.var_names_make_unique() in "
                                 "Python, or rename or merge the repeated genes in the file.")
        categories = []
        for key in categorical_keys:
            column = adata.obs[key]
            if column.isna().any():
                raise InputDataError(f"obs[{key!r}] has {int(column.isna().sum())} missing values; fill or drop them.")
            cats = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else pd.unique(column)
            used = set(category_labels(column))
            categories.append(tuple(dict.fromkeys(c for c in category_labels(cats) if c in used)))  # 1, 1.0, "1": one
        means, stds = [], []
        for key in continuous_keys:
            values = _continuous_column(adata.obs, key)
            means.append(float(values.mean()))
            stds.append(float(values.std()) or 1.0)
        return cls(
            gene_names=tuple(map(str, var_names)),
            layer=layer,
            categorical_keys=categorical_keys,
            categories=tuple(categories),
            continuous_keys=continuous_keys,
            continuous_mean=tuple(means),
            continuous_std=tuple(stds),
            encoding=encoding,
        )

    # -- layout of the condition vector ------------------------------------------------------
    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def categorical_sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categories)

    def model_condition_options(self) -> dict:
        """The :class:`~genailab.model.config.ModelConfig` fields that describe the conditions."""
        n_cont = len(self.continuous_keys)
        if self.encoding == "embedding" and self.categorical_keys:
            return {"categorical_sizes": self.categorical_sizes, "n_continuous": n_cont}
        return {"condition_dim": sum(self.categorical_sizes) + n_cont}

    # -- encoding ------------------------------------------------------------------------------
    def encode_obs(self, obs: pd.DataFrame, *, unseen: str = MAP_UNSEEN) -> np.ndarray | None:
        """Condition matrix (n_cells, raw_condition_dim) float32, or None without conditions;
        ``unseen`` is the remedy an error for a category the model has not seen suggests."""
        if not self.categorical_keys and not self.continuous_keys:
            return None
        _require_columns(obs, self.categorical_keys + self.continuous_keys, when="prediction")
        values = {key: obs[key].to_numpy() for key in self.categorical_keys + self.continuous_keys}
        return self._encode(values, len(obs), unseen=unseen)

    def check_known_values(self, values: Mapping[str, object]) -> None:
        """Raise :class:`SchemaMismatchError` for a categorical value in ``values`` (key -> one value)
        that the model has no category for; other keys are left to the caller."""
        for key, cats in zip(self.categorical_keys, self.categories):
            if key in values and category_label(values[key]) not in cats:
                raise SchemaMismatchError(
                    f"conditions[{key!r}] = {values[key]!r} is a category the model has not seen; known: "
                    f"{list(cats)[:20]}."
                )

    def encode_values(self, values: Mapping[str, object], n: int) -> np.ndarray | None:
        """Condition matrix (n, raw_condition_dim) for n cells that all share ``values``."""
        self.check_known_values(values)
        missing = [k for k in self.categorical_keys + self.continuous_keys if k not in values]
        if missing:
            raise SchemaMismatchError(
                f"Missing condition values for {missing}; give one value per condition "
                f"({', '.join(self.categorical_keys + self.continuous_keys)})."
            )
        unknown = sorted(set(values) - set(self.categorical_keys + self.continuous_keys))
        if unknown:
            raise SchemaMismatchError(
                f"Unknown condition keys {unknown}; this model's conditions are "
                f"{list(self.categorical_keys + self.continuous_keys)}."
            )
        if not self.categorical_keys and not self.continuous_keys:
            return None
        return self._encode({k: np.repeat(np.asarray([values[k]], dtype=object), n) for k in values}, n)

    def _encode(self, values: Mapping[str, np.ndarray], n: int, *, unseen: str = MAP_UNSEEN) -> np.ndarray:
        columns = []
        for key, cats in zip(self.categorical_keys, self.categories):
            codes = _category_codes(values[key], cats, key, unseen=unseen)
            if self.encoding == "embedding":
                columns.append(codes[:, None].astype(np.float32))
            else:
                onehot = np.zeros((n, len(cats)), dtype=np.float32)
                onehot[np.arange(n), codes] = 1.0
                columns.append(onehot)
        for key, mean, std in zip(self.continuous_keys, self.continuous_mean, self.continuous_std):
            raw = pd.to_numeric(pd.Series(values[key]), errors="coerce").to_numpy(dtype=np.float64)
            if not np.isfinite(raw).all():
                raise InputDataError(f"Condition {key!r} has missing or non-numeric values; fill them first.")
            columns.append(((raw - mean) / std).astype(np.float32)[:, None])
        return np.concatenate(columns, axis=1)

    # -- expression --------------------------------------------------------------------------
    def expression(
        self, adata: AnnData, *, align_genes: bool = False, max_missing_fraction: float = MAX_MISSING_FRACTION
    ):
        """The (n_cells, n_genes) matrix in the model's gene order: CSR float32 or dense float32, or
        for a backed AnnData an :class:`~genailab.data.backed.OnDiskMatrix` that converts as it reads.

        Genes in a different order are reordered by name and extra genes are dropped (see
        :meth:`gene_positions` for the rules on missing and duplicated genes).
        """
        matrix = _layer(adata, self.layer)
        # before any column is picked: a damaged index would make scipy read outside its arrays
        check_sparse_structure(matrix, source="adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]")
        if self.in_model_order(adata):
            return _in_model_order(matrix, None)
        names = _var_names(adata, self.layer).astype(str)
        position = self.gene_positions(names, align_genes=align_genes, max_missing_fraction=max_missing_fraction)
        return _in_model_order(matrix, position)

    def in_model_order(self, adata: AnnData) -> bool:
        """True when ``adata``'s genes (of the layer the model reads) are the model's, in its order."""
        names = _var_names(adata, self.layer)
        return names.size == self.n_genes and np.array_equal(names.astype(str).to_numpy(), np.asarray(self.gene_names))

    def gene_positions(
        self, var_names: Sequence[str], *, align_genes: bool = False, max_missing_fraction: float = MAX_MISSING_FRACTION
    ) -> np.ndarray:
        """Column of ``var_names`` holding each model gene, (n_genes,) int64; -1 for a missing gene.

        Duplicated names in ``var_names`` and data that share no gene with the model are
        :class:`InputDataError` / :class:`SchemaMismatchError`. Genes the model needs but the data
        lack are an error unless ``align_genes=True``: they are then filled with zeros and named in
        a warning, as long as they are at most ``max_missing_fraction`` of the model's genes (a
        cell missing more of them is encoded too far from what the model learnt; raise the
        fraction to accept that knowingly).
        """
        names = pd.Index([str(name) for name in var_names])
        if not names.is_unique:
            dupes = names[names.duplicated()].unique()
            raise InputDataError(
                f"Gene names are not unique: {dupes.size} names occur more than once (e.g. {dupes[:5].tolist()}); "
                "call adata.var_names_make_unique() or keep one column per gene, as at training."
            )
        if not 0.0 <= max_missing_fraction <= 1.0:
            raise ConfigError(f"max_missing_fraction must be between 0 and 1, got {max_missing_fraction}.")
        position = names.get_indexer(list(self.gene_names)).astype(np.int64)
        missing = np.flatnonzero(position < 0)
        if missing.size == self.n_genes:
            raise SchemaMismatchError(
                f"The data share no gene with the model: the model's genes are e.g. {list(self.gene_names[:5])}, "
                f"the data's are e.g. {names[:5].tolist()}. Use the same kind of gene identifiers (symbols or "
                "Ensembl IDs) in var_names as in training."
            )
        shown = ", ".join(self.gene_names[i] for i in missing[:10])
        if missing.size and not align_genes:
            raise SchemaMismatchError(
                f"{missing.size} of the model's {self.n_genes} genes are missing from the data "
                f"(e.g. {shown}). Use the same gene set (and var_names) as in training, or fill the missing genes "
                "with zeros: align_genes=True where the method takes it (get_latent, get_normalized_expression, "
                "get_marginal_ll, get_expression, the commands' --align-genes), or map the data with map_query."
            )
        if missing.size > max_missing_fraction * self.n_genes:
            raise SchemaMismatchError(
                f"{missing.size} of the model's {self.n_genes} genes ({missing.size / self.n_genes:.1%}) are missing "
                f"from the data (e.g. {shown}), more than max_missing_fraction={max_missing_fraction:g} allows. "
                "Filling that many with zeros distorts the cells; use data measured on the model's genes, or map "
                "them with map_query (genailab map), whose max_missing_fraction can be raised to accept it."
            )
        if missing.size:
            logger.warning(
                "Filling %d of the model's %d genes missing from the data with zeros: %s%s.",
                missing.size, self.n_genes, shown, ", ..." if missing.size > 10 else "",
            )  # fmt: skip
        extra = names.size - (self.n_genes - missing.size)
        if extra:
            logger.info("Ignoring %d genes the model was not trained on.", extra)
        return position

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: [list(v) for v in data[k]] if k == "categories" else (list(v) if isinstance(v, tuple) else v)
                for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> DataSchema:
        data = dict(data)
        data["categories"] = tuple(_stored_categories(c) for c in data.get("categories", ()))
        for key in ("gene_names", "categorical_keys", "continuous_keys", "continuous_mean", "continuous_std"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def _stored_categories(stored: Sequence[str]) -> tuple[str, ...]:
    """A saved model's categories in today's spelling (models saved before :func:`category_labels`
    kept "1.0" for a float column), unless that would merge two of them (their weights differ)."""
    labels = tuple(category_labels(list(stored))) if len(stored) else ()
    return labels if len(set(labels)) == len(labels) else tuple(stored)


def _require_columns(obs: pd.DataFrame, keys: Sequence[str], *, when: str) -> None:
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise SchemaMismatchError(
            f"Condition columns {missing} are not in adata.obs at {when} time "
            f"(available: {list(obs.columns)[:20]}); add them or choose other `condition_keys`."
        )


def _continuous_column(obs: pd.DataFrame, key: str) -> np.ndarray:
    values = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputDataError(
            f"obs[{key!r}] is used as a continuous condition but has missing or non-numeric values; "
            "fill them, or list the column as categorical."
        )
    return values


def _category_codes(values: np.ndarray, categories: tuple[str, ...], key: str, *, unseen: str) -> np.ndarray:
    missing = pd.isna(pd.Series(values))
    if missing.any():
        raise InputDataError(f"obs[{key!r}] has {int(missing.sum())} missing values; fill or drop them.")
    as_text = pd.Series(category_labels(values))
    codes = pd.Index(categories).get_indexer(as_text)
    if (codes < 0).any():
        unknown = sorted(set(as_text[codes < 0]))[:10]
        raise SchemaMismatchError(
            f"obs[{key!r}] has categories the model has not seen: {unknown}. Known categories: "
            f"{list(categories)[:20]}. {unseen}"
        )
    return codes


RAW = "raw"  # layer="raw" reads adata.raw.X (and adata.raw.var_names) when no layer has that name


def _layer(adata: AnnData, layer: str | None):
    """The matrix a model reads: ``X``, a layer, or for ``"raw"`` (without such a layer) ``adata.raw.X``."""
    if layer is None:
        try:
            matrix = adata.X
        except KeyError:  # a backed file without X
            matrix = None
        if matrix is None:
            raise SchemaMismatchError(
                f"adata.X is empty (None): this AnnData keeps its values in layers {list(adata.layers)}; name the one "
                "that holds them with `layer` (e.g. layer='counts' for raw counts)."
            )
        return matrix
    if layer == RAW and layer not in adata.layers:
        if adata.raw is None:
            raise SchemaMismatchError(
                "layer='raw' reads adata.raw, but this AnnData has no .raw; name the layer that holds the "
                f"counts (available: {list(adata.layers)}), or leave `layer` unset to read adata.X."
            )
        return adata.raw.X
    if layer not in adata.layers:
        raise SchemaMismatchError(
            f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers)}"
            f"{', or raw for adata.raw' if adata.raw is not None else ''}); name the layer that holds the "
            "values, or leave `layer` unset to read adata.X."
        )
    return adata.layers[layer]


def _var_names(adata: AnnData, layer: str | None) -> pd.Index:
    """Gene names of the matrix ``_layer`` reads (``adata.raw.var_names`` for adata.raw)."""
    if layer == RAW and layer not in adata.layers and adata.raw is not None:
        return adata.raw.var_names
    return adata.var_names


def _in_model_order(matrix, position: np.ndarray | None):
    """``matrix`` as float32 with columns ``position`` (all, in order, when None); a backed matrix
    stays on disk and each block is converted as it is read."""
    if is_on_disk(matrix):
        return OnDiskMatrix(matrix, transform=lambda block: _in_model_order(block, position))
    matrix = _as_float32(matrix)
    return matrix if position is None else _select_genes(matrix, position)


def _as_float32(matrix):
    if getattr(matrix, "dtype", None) is not None and matrix.dtype.kind == "c":
        raise InputDataError(f"The expression values are complex numbers ({matrix.dtype}); store real values.")
    try:
        if sp.issparse(matrix):
            matrix = sp.csr_matrix(matrix) if not sp.isspmatrix_csr(matrix) else matrix
            if not matrix.has_canonical_format:  # a count stored as two entries is one count to the likelihood
                matrix = matrix.copy()
                matrix.sum_duplicates()
            return matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)
        return np.asarray(matrix, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputDataError(
            f"The expression values cannot be read as numbers ({err}); store a numeric matrix in X or the layer."
        ) from err


def _select_genes(matrix, position: np.ndarray):
    """Columns ``position`` of ``matrix``; -1 gives a column of zeros."""
    present = position >= 0
    if sp.issparse(matrix):
        picked = matrix[:, np.where(present, position, 0)].tocsr()
        if not present.all():
            picked = picked @ sp.diags(present.astype(np.float32))
            picked.eliminate_zeros()
        return picked.tocsr()
    picked = matrix[:, np.where(present, position, 0)]
    picked[:, ~present] = 0.0
    return picked
