"""Readers: every format written here and read back equals the source matrix; clear errors."""

from __future__ import annotations

import gzip
import shutil

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from genailab.data.readers import read, read_bulk_counts
from genailab.errors import ConfigError, InputDataError

CELLS = [f"AAAC-{i}" for i in range(7)]
GENES = [f"G{j}" for j in range(5)]


@pytest.fixture(scope="module")
def counts():
    """(7 cells, 5 genes) integer counts with zeros and one all-zero gene."""
    x = np.random.default_rng(0).poisson(2.0, (7, 5)).astype(np.float32)
    x[:, 3] = 0
    return x


def _gzip(path):
    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


def _write_mtx_folder(folder, counts, *, v3: bool):
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(counts.T))  # 10x stores genes x cells
    genes = pd.DataFrame({"id": [f"ENSG{j}" for j in range(5)], "name": GENES})
    if v3:
        genes["type"] = "Gene Expression"
    genes.to_csv(folder / ("features.tsv" if v3 else "genes.tsv"), sep="\t", header=False, index=False)
    pd.Series(CELLS).to_csv(folder / "barcodes.tsv", header=False, index=False)
    if v3:
        for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            _gzip(folder / name)


@pytest.mark.parametrize("v3", [False, True], ids=["legacy", "v3-gz"])
def test_10x_mtx_folder_and_matrix_file(tmp_path, counts, v3):
    folder = tmp_path / "mtx"
    _write_mtx_folder(folder, counts, v3=v3)
    for path in (folder, folder / ("matrix.mtx.gz" if v3 else "matrix.mtx")):
        adata = read(path)
        np.testing.assert_array_equal(adata.X.toarray(), counts)
        assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES


@pytest.mark.parametrize(("features", "gzipped"), [("features.tsv", ()), ("genes.tsv", ("matrix.mtx", "genes.tsv",
                         "barcodes.tsv")), ("features.tsv", ("matrix.mtx",))], ids=["v3-plain", "v2-gz", "mixed"])
def test_10x_folders_scanpy_refuses_read_the_same(tmp_path, counts, features, gzipped):
    """Plain v3 files and gzipped v2 files were refused: 'Did not find file .../matrix.mtx.gz'."""
    reference = tmp_path / "reference"
    _write_mtx_folder(reference, counts, v3=True)
    expected = read(reference).var
    folder = tmp_path / "other"
    _write_mtx_folder(folder, counts, v3=False)  # plain files, genes.tsv with ids and names
    if features == "features.tsv":
        (folder / "genes.tsv").unlink()
        genes = pd.DataFrame({"id": [f"ENSG{j}" for j in range(5)], "name": GENES, "type": "Gene Expression"})
        genes.to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
    else:
        expected = expected[["gene_ids"]]
    for name in gzipped:
        _gzip(folder / name)
    adata = read(folder)
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES
    pd.testing.assert_frame_equal(adata.var, expected)


def test_10x_h5(tmp_path, counts):
    csc = sp.csc_matrix(counts.T)  # genes x cells, compressed by cell as Cell Ranger writes it
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(CELLS, dtype="S")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array(counts.T.shape, dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{j}" for j in range(5)], dtype="S")
        feats["name"] = np.array(GENES, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * 5, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * 5, dtype="S")
    adata = read(path)
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES


@pytest.mark.parametrize("backed", [False, True])
def test_h5ad_in_memory_and_backed(tmp_path, sim_adata, backed):
    path = tmp_path / "sim.h5ad"
    sim_adata.write_h5ad(path)
    adata = read(path, backed=backed)
    assert adata.isbacked == backed
    x = adata.X[:] if backed else adata.X
    assert (x != sim_adata.X).nnz == 0
    assert adata.obs["cell_type"].equals(sim_adata.obs["cell_type"])


@pytest.mark.parametrize("name, sep", [("x.csv", ","), ("x.tsv", "\t"), ("x.txt.gz", "\t")])
@pytest.mark.parametrize("transpose", [False, True])
def test_text_tables(tmp_path, counts, name, sep, transpose):
    table = pd.DataFrame(counts.astype(int), index=CELLS, columns=GENES)
    (table.T if transpose else table).to_csv(tmp_path / name, sep=sep)
    adata = read(tmp_path / name, transpose=transpose)
    np.testing.assert_array_equal(adata.X, counts)
    assert adata.X.dtype == np.float32
    assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES


def test_text_names_are_read_as_written(tmp_path):
    """Cell and gene names are strings as in the file: no 0001 -> 1, no NA -> nan, no 1 -> 1.0."""
    (tmp_path / "t.csv").write_text("cell,NA,0002\n0001,1,2\n0002,3,4\nNA,5,6\n")
    adata = read(tmp_path / "t.csv")
    assert list(adata.obs_names) == ["0001", "0002", "NA"] and list(adata.var_names) == ["NA", "0002"]
    np.testing.assert_array_equal(adata.X, [[1, 2], [3, 4], [5, 6]])
    (tmp_path / "t.tsv").write_text("G1\tG2\n1\t1\t2\nNA\t3\tNA\n")  # R's write.table: no header for the names
    adata = read(tmp_path / "t.tsv")
    assert list(adata.obs_names) == ["1", "NA"] and list(adata.var_names) == ["G1", "G2"]
    np.testing.assert_array_equal(adata.X, [[1, 2], [3, np.nan]])  # an NA value stays NaN, for the checks to report


def test_bulk_entrez_ids_are_read_as_written(tmp_path):
    (tmp_path / "counts.tsv").write_text("gene_id\ts1\ts2\n1\t1\t2\n2\t3\t4\nNA\t5\t6\n007\t7\t8\n")
    adata = read_bulk_counts(tmp_path / "counts.tsv")
    assert list(adata.var_names) == ["1", "2", "NA", "007"] and list(adata.obs_names) == ["s1", "s2"]
    np.testing.assert_array_equal(adata.X, [[1, 3, 5, 7], [2, 4, 6, 8]])


def test_duplicated_column_headers_raise_instead_of_being_renamed(tmp_path):
    (tmp_path / "t.csv").write_text("cell,TP53,TP53,GAPDH\nc1,1,2,3\n")
    with pytest.raises(InputDataError, match=r"duplicated column headers \['TP53'\]; make each header unique"):
        read(tmp_path / "t.csv")
    (tmp_path / "b.tsv").write_text("gene\ts1\ts1\ng1\t1\t2\n")
    with pytest.raises(InputDataError, match=r"duplicated column headers \['s1'\]"):
        read_bulk_counts(tmp_path / "b.tsv")


def test_a_table_without_a_name_column_is_refused_not_read_one_gene_short(tmp_path):
    """Without a name column the first gene's counts became the cell names (not unique), the gene was
    lost and training exited 0."""
    pd.DataFrame({"g0": [2, 1, 2, 3], "g1": [0, 4, 1, 1], "g2": [5, 5, 0, 2]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputDataError, match=r"first column, read as the row names, repeats \['2'\]: if the table "
                                             "has no name column, add one"):  # fmt: skip
        read(tmp_path / "t.csv")


@pytest.mark.parametrize("kind", ["loom renamed", "no groups"])
def test_an_hdf5_file_that_is_not_10x_is_named_as_such(tmp_path, counts, kind):
    """scanpy's 10x reader raised AttributeError or IndexError, shown as a traceback."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as handle:
        if kind == "loom renamed":
            handle["matrix"] = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    with pytest.raises(InputDataError, match="could not read .*x.h5 .*not in the format its name says"):
        read(path)


def test_loom_round_trip(tmp_path, counts):
    pytest.importorskip("loompy")
    path = tmp_path / "x.loom"
    source = anndata.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=CELLS), var=pd.DataFrame(index=GENES))
    source.write_loom(path)
    adata = read(path)
    np.testing.assert_array_equal(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X), counts)
    assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES


def test_loom_without_loompy_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "loompy", None)  # makes `import loompy` fail
    path = tmp_path / "x.loom"
    path.write_bytes(b"not empty")
    with pytest.raises(ImportError, match="pip install loompy"):
        read(path)


def test_bulk_featurecounts_table(tmp_path, counts):
    table = pd.DataFrame(counts.T.astype(int), index=GENES, columns=[f"s{i}.bam" for i in range(7)])
    annotation = pd.DataFrame(
        {"Chr": "chr1;chr1", "Start": "10;50", "End": "20;90", "Strand": "+;+", "Length": [100, 200, 300, 400, 500]},
        index=GENES,
    )
    full = pd.concat([annotation, table], axis=1).rename_axis("Geneid")
    path = tmp_path / "featureCounts.txt"
    with open(path, "w") as handle:
        handle.write('# Program:featureCounts v2.0.6; Command:"featureCounts" "-a" "genes.gtf"\n')
        full.to_csv(handle, sep="\t")
    adata = read_bulk_counts(path)
    np.testing.assert_array_equal(adata.X, counts)
    assert list(adata.obs_names) == list(table.columns) and list(adata.var_names) == GENES
    assert list(adata.var.columns) == ["chr", "start", "end", "strand", "length"]
    assert adata.var["length"].tolist() == [100, 200, 300, 400, 500]


def test_bulk_deseq2_csv_drops_htseq_rows_and_reads_samples_as_rows(tmp_path, counts):
    table = pd.DataFrame(counts.T.astype(int), index=GENES, columns=[f"s{i}" for i in range(7)])
    with_summary = pd.concat([table, pd.DataFrame(5, index=["__no_feature", "__ambiguous"], columns=table.columns)])
    with_summary.to_csv(tmp_path / "counts.csv")  # DESeq2's write.csv leaves the first header cell empty
    adata = read_bulk_counts(tmp_path / "counts.csv")
    np.testing.assert_array_equal(adata.X, counts)
    assert list(adata.var_names) == GENES
    table.T.to_csv(tmp_path / "rows.tsv", sep="\t")
    np.testing.assert_array_equal(read_bulk_counts(tmp_path / "rows.tsv", samples_as_rows=True).X, counts)


def test_missing_empty_unknown_and_malformed_files(tmp_path, counts):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read(tmp_path / "absent.h5ad")
    (tmp_path / "empty.csv").touch()
    with pytest.raises(InputDataError, match="empty"):
        read(tmp_path / "empty.csv")
    with pytest.raises(InputDataError, match="empty"):
        read_bulk_counts(tmp_path / "empty.csv")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(InputDataError, match=r"supported are .*\.h5ad"):
        read(tmp_path / "x.xlsx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputDataError, match="matrix.mtx"):
        read(tmp_path / "folder")
    pd.DataFrame({"G0": [1, 2], "G1": ["a", 3]}, index=["c0", "c1"]).to_csv(tmp_path / "text.csv")
    with pytest.raises(InputDataError, match=r"non-numeric values in columns \['G1'\]"):
        read(tmp_path / "text.csv")
    (tmp_path / "header.csv").write_text("cell\n")
    with pytest.raises(InputDataError, match="expected a header row"):
        read(tmp_path / "header.csv")
    with pytest.raises(ConfigError, match="backed=True"):
        read(tmp_path / "text.csv", backed=True)


def test_repeated_gene_names_are_shown_as_plain_names_with_a_fix_for_files(tmp_path, counts):
    """The message showed [np.str_('G0')] and only Python's fix."""
    import anndata as ad

    from genailab import VAE

    adata = ad.AnnData(counts, var=pd.DataFrame(index=["G0", "G0", "G2", "G3", "G4"]))
    with pytest.raises(InputDataError, match=r"not unique \(e.g. \['G0'\]\); call adata.var_names_make_unique\(\) in "
                                             "Python, or rename or merge the repeated genes in the file"):  # fmt: skip
        VAE(adata, latent_dim=2, hidden_dims=(4,))


def test_encoding_and_gzipped_hdf5_name_their_fix(tmp_path, sim_adata):
    """A Latin-1 table was asked whether it was really tab-separated; a gzipped h5ad was called
    truncated or corrupt."""
    (tmp_path / "t.tsv").write_bytes("cell\tgene_\xb5\nc1\t1\n".encode("latin-1"))
    with pytest.raises(InputDataError, match="is not UTF-8 text .*save it again as UTF-8"):
        read(tmp_path / "t.tsv")
    sim_adata.write_h5ad(tmp_path / "d.h5ad")
    _gzip(tmp_path / "d.h5ad")
    with pytest.raises(InputDataError, match=r"d.h5ad.gz is gzipped; unpack it first \(gunzip d.h5ad.gz\)"):
        read(tmp_path / "d.h5ad.gz")


def test_a_separator_ending_every_line_adds_no_gene(tmp_path):
    """It became a gene named '' of NaN values, refused later as 'contains NaN'."""
    (tmp_path / "t.csv").write_text("cell,g0,g1,\nc0,1,2,\nc1,3,0,\n")
    adata = read(tmp_path / "t.csv")
    assert list(adata.var_names) == ["g0", "g1"] and adata.X.tolist() == [[1, 2], [3, 0]]
