"""Read expression data into AnnData (cells/samples x genes) through anndata, scanpy and pandas.

:func:`read` picks the reader from the path; :func:`read_bulk_counts` reads bulk RNA-seq count
tables (genes x samples, featureCounts/HTSeq/DESeq2 style).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from genailab.errors import ConfigError, GenailabError, InputDataError

logger = logging.getLogger(__name__)

TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": "\t"}
SUPPORTED = (
    ".h5ad, 10x .h5, .loom, a 10x folder with matrix.mtx(.gz) (or that file), "
    "and cells x genes text tables .csv/.tsv/.tab/.txt (each optionally .gz)"
)
FEATURECOUNTS_ANNOTATION = ("chr", "start", "end", "strand", "length")  # kept in var, not counts


def read(path: str | Path, *, transpose: bool = False, backed: bool = False) -> AnnData:
    """Read an expression file or 10x folder as AnnData with cells as rows.

    Parameters
    ----------
    path
        ``.h5ad``; 10x ``.h5``; ``.loom`` (needs ``loompy``); a 10x folder holding
        ``matrix.mtx(.gz)`` with its barcodes/genes (or features) files, or that matrix file;
        a dense text table ``.csv``, ``.tsv``, ``.tab`` or ``.txt`` (tab-separated), optionally
        gzipped, with a header row of gene names and cell names in the first column. Names are
        kept as written (``0001`` stays ``0001``, ``NA`` stays ``NA``); repeated headers are an error.
    transpose
        Text tables only: the file is genes x cells.
    backed
        ``.h5ad`` only: open read-only on disk (``backed="r"``) instead of loading into memory.

    Returns
    -------
    AnnData as the underlying reader returns it (X in the file's dtype; 10x and text X as
    float32).

    Examples
    --------
    >>> adata = read("filtered_feature_bc_matrix/")  # doctest: +SKIP
    >>> adata = read("expression.csv.gz", transpose=True)  # doctest: +SKIP
    """
    path = _existing(path)
    try:
        return _read_any(path, transpose=transpose, backed=backed)
    except GenailabError:
        raise
    # h5py, pandas, scanpy on a bad file (scanpy's 10x .h5 reader fails with AttributeError/IndexError on other HDF5)
    except (OSError, ValueError, TypeError, KeyError, EOFError, AttributeError, IndexError) as err:
        raise InputDataError(
            f"could not read {path} ({type(err).__name__}: {err}); the file is truncated, corrupt or not in the "
            f"format its name says. Supported are {SUPPORTED}."
        ) from err


def _read_any(path: Path, *, transpose: bool, backed: bool) -> AnnData:
    if path.is_dir() or path.name in ("matrix.mtx", "matrix.mtx.gz"):
        _only(path, "a 10x matrix folder", transpose=transpose, backed=backed)
        return _read_10x_folder(path if path.is_dir() else path.parent)
    _check_not_empty(path)
    suffix = _suffix(path)
    if suffix in (".h5ad", ".h5", ".loom") and path.name.lower().endswith(".gz"):  # HDF5 files are read unpacked
        raise InputDataError(f"{path.name} is gzipped; unpack it first (gunzip {path.name}) and read "
                             f"{path.name[:-3]}.")
    if suffix == ".h5ad":
        _only(path, ".h5ad", transpose=transpose)
        import anndata

        return anndata.read_h5ad(path, backed="r" if backed else None)
    if suffix in TEXT_SEPARATORS:
        _only(path, "a text table", backed=backed)
        table = _read_table(path, TEXT_SEPARATORS[suffix])
        adata = _table_to_anndata(table, path, transpose=transpose)
        logger.info("Read %s as %d cells x %d genes (cells in %s)%s.", path.name, adata.n_obs, adata.n_vars,
                    "columns" if transpose else "rows",
                    "" if transpose else "; a genes x cells table needs transpose=True (genailab convert --transpose)")
        return adata
    if suffix == ".h5":
        _only(path, "10x .h5", transpose=transpose, backed=backed)
        import scanpy as sc

        return sc.read_10x_h5(path)
    if suffix == ".loom":
        _only(path, ".loom", transpose=transpose, backed=backed)
        return _read_loom(path)
    raise InputDataError(f"cannot tell the format of {path.name!r} from its name; supported are {SUPPORTED}.")


def read_bulk_counts(path: str | Path, *, samples_as_rows: bool = False) -> AnnData:
    """Read a bulk RNA-seq count table as AnnData with samples as rows and genes as columns.

    The usual layout is genes x samples with gene ids in the first column, as written by
    featureCounts, HTSeq (merged) or DESeq2's ``counts()``. Leading ``#`` lines (featureCounts'
    command line) are skipped; featureCounts' annotation columns (Chr, Start, End, Strand,
    Length) go to ``var`` instead of the counts; HTSeq summary rows (``__no_feature`` ...) are
    dropped. ``.csv`` is comma-separated, other names (``.txt``, ``.tsv``, ``.tab``) tab-separated,
    each optionally gzipped.

    Parameters
    ----------
    samples_as_rows
        The file is samples x genes with sample names in the first column (then only the
        leading ``#`` lines are treated specially).

    Returns
    -------
    AnnData with float32 counts in ``X`` (exact up to 2^24 per entry), sample names as
    ``obs_names``, gene ids as ``var_names`` (as written: Entrez id ``1`` stays ``"1"``) and any
    annotation columns in ``var``.

    Examples
    --------
    >>> bulk = read_bulk_counts("featureCounts.txt")  # doctest: +SKIP
    """
    path = _existing(path)
    _check_not_empty(path)
    if path.is_dir():
        raise InputDataError(f"{path} is a folder; read_bulk_counts needs a count table file.")
    separator = "," if _suffix(path) == ".csv" else "\t"
    table = _read_table(path, separator, skiprows=_leading_comment_lines(path))
    if samples_as_rows:
        return _table_to_anndata(table, path)
    annotation = [c for c in table.columns if str(c).lower() in FEATURECOUNTS_ANNOTATION]
    var = table[annotation].rename(columns=lambda c: str(c).lower())
    counts = table.drop(columns=annotation)
    summary = counts.index.astype(str).str.startswith("__")
    if summary.any():
        logger.info("dropping %d HTSeq summary rows from %s", int(summary.sum()), path.name)
    adata = _table_to_anndata(counts.loc[~summary], path, transpose=True)
    adata.var = var.loc[~summary].set_axis(adata.var_names)
    return adata


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {str(path)!r} (looked in {Path.cwd()}); check the path.")
    return path


def _check_not_empty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise InputDataError(f"{path} is empty (0 bytes); was it fully written or downloaded?")


def _suffix(path: Path) -> str:
    """Lower-case format suffix, looking past a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _only(path: Path, kind: str, *, transpose: bool = False, backed: bool = False) -> None:
    """Refuse options that the format cannot honour instead of ignoring them."""
    if transpose:
        raise ConfigError(f"transpose=True applies to text tables only, not {kind} ({path.name}).")
    if backed:
        raise ConfigError(f"backed=True applies to .h5ad files only, not {kind} ({path.name}).")


def _read_10x_folder(folder: Path) -> AnnData:
    import scanpy as sc

    if not any((folder / name).is_file() for name in ("matrix.mtx", "matrix.mtx.gz")):
        raise InputDataError(
            f"{folder} has no matrix.mtx or matrix.mtx.gz; a 10x folder holds matrix.mtx.gz, features.tsv.gz "
            "and barcodes.tsv.gz (Cell Ranger 3+) or matrix.mtx, genes.tsv and barcodes.tsv (older)."
        )
    files = {role: _one_of(folder, names) for role, names in _10X_FILES.items()}
    if None in files.values():
        missing = " or ".join(_10X_FILES[next(role for role, path in files.items() if path is None)])
        raise InputDataError(f"{folder} has no {missing}; a 10x folder holds matrix.mtx, features.tsv (genes.tsv "
                             "before Cell Ranger 3) and barcodes.tsv, each plain or gzipped.")  # fmt: skip
    v3 = all(path.suffix == ".gz" for path in files.values()) and files["features"].name.startswith("features")
    v2 = not any(path.suffix == ".gz" for path in files.values()) and files["features"].name == "genes.tsv"
    if v3 or v2:  # the layouts scanpy reads
        return sc.read_10x_mtx(folder)
    return _read_10x_files(**files)  # plain v3, gzipped v2, or a mix: the same conventions


_10X_FILES = {
    "matrix": ("matrix.mtx", "matrix.mtx.gz"),
    "features": ("features.tsv", "features.tsv.gz", "genes.tsv", "genes.tsv.gz"),
    "barcodes": ("barcodes.tsv", "barcodes.tsv.gz"),
}


def _one_of(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _read_10x_files(*, matrix: Path, features: Path, barcodes: Path) -> AnnData:
    """A 10x matrix folder as scanpy reads one (gene symbols as unique var_names, ``gene_ids`` and
    ``feature_types`` in var), for the layouts scanpy's reader refuses."""
    import scipy.io

    counts = sp.csr_matrix(scipy.io.mmread(matrix).T, dtype=np.float32)  # the file is genes x cells
    genes = pd.read_csv(features, sep="\t", header=None, dtype=str)
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0]
    if genes.shape[0] != counts.shape[1] or cells.shape[0] != counts.shape[0]:
        raise InputDataError(f"{matrix} is {counts.shape[1]} genes x {counts.shape[0]} cells, but {features.name} "
                             f"lists {genes.shape[0]} genes and {barcodes.name} {cells.shape[0]} barcodes; a header "
                             "line or a file from another run?")  # fmt: skip
    symbols = genes[genes.columns[min(1, genes.shape[1] - 1)]].to_numpy()  # scanpy's var_names="gene_symbols"
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()}, index=pd.Index(symbols))
    if genes.shape[1] > 2:
        var["feature_types"] = genes[2].to_numpy()
    adata = AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(cells.to_numpy())), var=var)
    adata.var_names_make_unique()
    return adata


def _read_loom(path: Path) -> AnnData:
    """A .loom file with its cell and gene names: the loom convention's ``CellID``/``Gene``
    attributes, or the ``obs_names``/``var_names`` that anndata's ``write_loom`` uses."""
    import anndata

    try:
        import loompy
    except ImportError as err:
        raise ImportError(f"reading {path.name} needs the loompy package: pip install loompy ({err}).") from err
    with loompy.connect(str(path), mode="r") as connection:
        cell_attrs, gene_attrs = set(connection.ca.keys()), set(connection.ra.keys())
    obs_names = next((name for name in ("CellID", "obs_names") if name in cell_attrs), None)
    var_names = next((name for name in ("Gene", "var_names") if name in gene_attrs), None)
    return anndata.read_loom(path, obs_names=obs_names, var_names=var_names)


def _leading_comment_lines(path: Path) -> int:
    """Number of lines starting with ``#`` at the top of the file (featureCounts writes one)."""
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    n = 0
    try:
        with opener(path, "rt") as handle:
            for line in handle:
                if not line.startswith("#"):
                    break
                n += 1
    except (UnicodeDecodeError, OSError, EOFError) as err:  # binary, or not gzip after all
        raise InputDataError(f"{path} is not a readable text table ({type(err).__name__}: {err}).") from err
    return n


def _read_table(path: Path, separator: str, *, skiprows: int = 0) -> pd.DataFrame:
    """The table's values (NA cells as NaN) with its header and first column as names, as written."""
    options = dict(sep=separator, skiprows=skiprows)
    try:  # names as strings without NA conversion: no "0001" -> 1, "NA" -> NaN or "TP53" -> "TP53.1"
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, na_filter=False, **options).iloc[0].tolist()
        values = pd.read_csv(path, index_col=0, **options)
        names = pd.read_csv(path, index_col=0, usecols=[0], dtype={0: str}, na_filter=False, **options).index
    except pd.errors.EmptyDataError:
        raise InputDataError(f"{path} has no data (no header or rows).") from None
    except UnicodeDecodeError as err:
        raise InputDataError(f"{path} is not UTF-8 text ({err}); save it again as UTF-8 (e.g. from a spreadsheet: "
                             "CSV UTF-8), or check that it is a text table at all.") from err
    except pd.errors.ParserError as err:
        raise InputDataError(f"{path} is not a readable text table ({err}); is it really {separator!r}-separated text?") from err
    if values.shape[1] == 0 or values.shape[0] == 0:
        raise InputDataError(
            f"{path} parsed as {values.shape[0]} rows x {values.shape[1]} columns besides the index; expected a "
            f"header row and {separator!r}-separated columns."
        )
    columns = pd.Index(header[len(header) - values.shape[1] :])  # R's write.table omits the name column's header
    if columns.has_duplicates:
        repeated = list(columns[columns.duplicated()].unique()[:5])
        raise InputDataError(
            f"{path} has duplicated column headers {repeated}; make each header unique (rename or merge the repeated "
            "columns) and read the file again."
        )
    values.columns = columns
    if columns[-1] == "" and values.iloc[:, -1].isna().all():  # every line ends with a separator: no column there
        values = values.iloc[:, :-1]
    values.index = pd.Index(names, name=header[0] if len(header) > values.shape[1] else None)
    if values.index.has_duplicates:  # most often a table without a name column: its first gene became the names
        repeated = list(values.index[values.index.duplicated()].unique()[:3])
        raise InputDataError(
            f"{path}'s first column, read as the row names, repeats {repeated}: if the table has no name "
            "column, add one (a unique name per row) so that its first column of values is not taken for names; "
            "otherwise make the names unique."
        )
    return values


def _table_to_anndata(table: pd.DataFrame, path: Path, *, transpose: bool = False) -> AnnData:
    """A numeric table as AnnData (its transpose when asked), naming non-numeric columns if any."""
    numeric = table.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & table.notna()
    if bad.to_numpy().any():
        columns = list(table.columns[bad.any(axis=0)][:5])
        raise InputDataError(
            f"{path} has non-numeric values in columns {columns}; expected numbers everywhere except the "
            "header row and the first (name) column."
        )
    if transpose:
        numeric = numeric.T
    def names(index: pd.Index) -> pd.Index:  # an empty header ("" from an unnamed index) makes an unreadable h5ad
        return index.astype(str).rename(index.name or None)

    return AnnData(
        X=numeric.to_numpy(dtype=np.float32),
        obs=pd.DataFrame(index=names(numeric.index)),
        var=pd.DataFrame(index=names(numeric.columns)),
    )
