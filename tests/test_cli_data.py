"""`genailab simulate` and out-of-core `genailab train --backed` on temporary files."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from click.testing import CliRunner

from genailab.cli import data as data_commands
from genailab.cli import main
from genailab.data import simulate


def test_simulate_writes_the_simulator_output(tmp_path):
    out = tmp_path / "sub" / "sim.h5ad"
    args = ["--cells", "300", "--genes", "60", "--cell-types", "3", "--batches", "2", "--seed", "4"]
    result = CliRunner().invoke(main, ["simulate", *args, "--likelihood", "zinb", "--perturbation", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(out)
    expected = simulate(300, 60, n_cell_types=3, n_batches=2, likelihood="zinb", seed=4, perturbation={})
    np.testing.assert_array_equal(written.X.toarray(), expected.X.toarray())
    np.testing.assert_allclose(written.layers["true_mean"], expected.layers["true_mean"])
    assert {"cell_type", "batch", "drug", "dose"} <= set(written.obs) and "X_true_latent" in written.obsm


def test_large_simulation_is_written_in_chunks_and_trains_backed(tmp_path, monkeypatch):
    monkeypatch.setattr(data_commands, "IN_MEMORY_VALUES", 1000)
    out = tmp_path / "big.h5ad"
    runner = CliRunner()
    result = runner.invoke(main, ["simulate", "--cells", "400", "--genes", "50", "--batches", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "chunk by chunk" in result.output
    written = ad.read_h5ad(out)
    np.testing.assert_array_equal(written.X.toarray(), simulate(400, 50, n_batches=2).X.toarray())
    assert not written.layers

    run = tmp_path / "run"
    result = runner.invoke(main, ["train", str(out), "--backed", "--condition", "batch", "--latent-dim", "3",
                                  "--hidden", "16", "--epochs", "2", "--batch-size", "64", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(run / "history.csv")) == 2


def test_simulate_bad_options_give_one_clean_line(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--cells", "0", "--out", str(tmp_path / "x.h5ad")])
    assert result.exit_code != 0 and "ConfigError" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--backed", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "backed" in result.output


def test_simulate_bad_numbers_are_named_by_their_option(tmp_path):
    """The simulator's checks reach the command line in its own terms: --seed, not numpy's traceback."""
    result = CliRunner().invoke(
        main, ["simulate", "--seed", "-1", "--n-cells", "50", "--n-genes", "60", "--out", str(tmp_path / "x.h5ad")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (
        "Error: ConfigError: --seed must be a whole number in [0, 9223372036854775808), got -1."
    )
    result = CliRunner().invoke(main, ["simulate", "--perturbation", "--drugs", "0", "--n-cells", "50",
                                       "--n-genes", "60", "--out", str(tmp_path / "x.h5ad")])  # fmt: skip
    assert result.exit_code == 2 and "--drugs must be a whole number >= 1, got 0." in result.output
    assert not (tmp_path / "x.h5ad").exists()


def test_output_files_must_be_named_for_what_is_written(tmp_path):
    """An h5ad written under notes.csv (or over a file of another kind) would be a lost file."""
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes\n")
    result = CliRunner().invoke(main, ["simulate", "--n-cells", "50", "--n-genes", "60", "--out", str(notes)])
    assert result.exit_code == 2 and f"--out {notes} must end in .h5ad" in result.output
    assert notes.read_text() == "my notes\n"
    result = CliRunner().invoke(main, ["simulate", "--n-cells", "50", "--n-genes", "60", "--out", str(tmp_path / "s.H5AD")])
    assert result.exit_code == 0, result.output


def test_convert_reads_a_genes_x_cells_table_with_transpose(tmp_path):
    """A genes x cells table (GEO's usual layout) trained with genes as cells and exit 0: no command
    could transpose it. `convert --transpose` writes it the right way round."""
    counts = np.random.default_rng(0).poisson(2.0, size=(6, 4))  # 6 cells x 4 genes
    table = pd.DataFrame(counts.T, index=[f"g{j}" for j in range(4)], columns=[f"c{i}" for i in range(6)])
    table.to_csv(tmp_path / "genes_x_cells.csv")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "genes_x_cells.csv"), "--transpose", "--out",
                                       str(tmp_path / "cells.h5ad")])  # fmt: skip
    assert result.exit_code == 0 and "Wrote 6 cells x 4 genes" in result.output, result.output
    converted = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(converted.obs_names) == list(table.columns) and list(converted.var_names) == list(table.index)
    np.testing.assert_array_equal(converted.X, counts)
    as_is = CliRunner().invoke(main, ["convert", str(tmp_path / "genes_x_cells.csv"), "--out", str(tmp_path / "a.h5ad")])
    assert "as 4 cells x 6 genes (cells in rows); a genes x cells table needs transpose=True" in as_is.output
    assert ad.read_h5ad(tmp_path / "a.h5ad").shape == (4, 6)  # an unnamed index column writes a readable file
