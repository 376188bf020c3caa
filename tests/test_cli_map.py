"""``genailab map`` end to end: train a reference, map a held-out batch, transfer labels, draw both."""

from __future__ import annotations

import hashlib
import json
import re

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import genailab
from genailab.cli import main
from genailab.data.simulate import simulate


def _invoke(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Reference (batch_0, batch_1) and query (batch_2) h5ads, and a reference run from ``genailab train``."""
    folder = tmp_path_factory.mktemp("map")
    sim = simulate(600, 80, n_cell_types=3, n_batches=3, n_markers=5, seed=0)
    sim[sim.obs["batch"] != "batch_2"].copy().write_h5ad(folder / "reference.h5ad")
    query = sim[sim.obs["batch"] == "batch_2"].copy()
    query[:, ::-1].copy().write_h5ad(folder / "query.h5ad")  # genes in another order
    _invoke("train", folder / "reference.h5ad", "--likelihood", "nb", "--layer", "counts", "--condition-key", "batch",
            "--latent-dim", "4", "--hidden", "32", "--epochs", "30", "--batch-size", "32", "--out", folder / "ref_run")  # fmt: skip
    return folder


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_map_writes_query_model_latent_labels_and_umap(files, tmp_path):
    before = _hashes(files / "ref_run")
    out = tmp_path / "mapped"
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--reference-data",
                     files / "reference.h5ad", "--labels-key", "cell_type", "--epochs", "40", "--device", "cpu")  # fmt: skip
    stages = re.search(r"Trained the query model \(new_categories\), epochs per stage: decoder (\d+), encoder (\d+)", output)
    assert stages is not None and all(1 <= int(n) <= 40 for n in stages.groups()), output[-2000:]
    assert _hashes(files / "ref_run") == before  # the reference run is never modified
    saved = json.loads((out / "genailab.json").read_text())
    assert saved["reference"]["path"] == str((files / "ref_run").resolve())
    assert saved["reference"]["model_pt_sha256"] == before["model.pt"]
    assert saved["mapping"]["new_categories"] == {"batch": ["batch_2"]}
    mapped = ad.read_h5ad(out / "query.h5ad")
    assert mapped.obsm["X_genailab"].shape == (mapped.n_obs, 4)
    query = ad.read_h5ad(files / "query.h5ad")  # the query's own fields are kept beside what map adds
    assert set(query.layers) <= set(mapped.layers) and set(query.obsm) < set(mapped.obsm) and set(query.uns) < set(mapped.uns)
    assert mapped.var.equals(query.var) and list(mapped.obs_names) == list(query.obs_names)
    model = genailab.VAE.load(out, device="cpu")
    np.testing.assert_allclose(model.get_latent(mapped), mapped.obsm["X_genailab"], rtol=1e-5, atol=1e-6)
    accuracy = np.mean(mapped.obs["cell_type_transferred"].astype(str) == mapped.obs["cell_type"].astype(str))
    assert accuracy > 0.9
    assert {"cell_type_transferred_uncertainty"} <= set(mapped.obs.columns)
    assert mapped.uns["cell_type_transferred"]["params"]["n_neighbors"] == 15
    with Image.open(out / "umap.png") as image:
        assert image.size[0] > 2 * image.size[1] * 0.9  # two panels side by side: dataset and label


@pytest.mark.parametrize(("options", "start"), [((), "mean"), (("--reference-data", "reference.h5ad"), "neighbours"),
                                               (("--encoder-start", "batch_norm"), "batch_norm")])  # fmt: skip
def test_map_encoder_start_is_recorded(files, tmp_path, options, start):
    out = tmp_path / "mapped"
    options = [files / o if o.endswith(".h5ad") else o for o in options]
    _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, *options, "--epochs", "2", "--device", "cpu")
    assert json.loads((out / "genailab.json").read_text())["mapping"]["encoder_start"] == start


def test_map_no_encoder_stage_trains_the_decoder_columns_only(files, tmp_path):
    out = tmp_path / "held"
    _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--reference-data", files / "reference.h5ad",
            "--no-encoder-stage", "--epochs", "2", "--device", "cpu")  # fmt: skip
    assert json.loads((out / "genailab.json").read_text())["mapping"]["stages"] == ["decoder"]


@pytest.mark.parametrize("options, anchor", [([], 1.0), (["--encoder-anchor", "0"], 0.0), (["--encoder-anchor", "2.5"], 2.5)])
def test_map_encoder_anchor_reaches_the_query_model(files, tmp_path, options, anchor):
    out = tmp_path / "anchored"
    _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--reference-data", files / "reference.h5ad",
            *options, "--epochs", "2", "--device", "cpu")  # fmt: skip
    assert json.loads((out / "genailab.json").read_text())["mapping"]["encoder_anchor"] == anchor
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", tmp_path / "refused", "--reference-data",
                     files / "reference.h5ad", "--encoder-anchor", "1", "--no-encoder-stage", code=2)  # fmt: skip
    assert "--encoder-anchor 1.0 pulls" in output


def test_map_refuses_what_it_cannot_do(files, tmp_path):
    for spelling in ("--labels-key", "--label-key"):  # the second: the hidden spelling of the previous release
        output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", tmp_path / "a", spelling,
                         "cell_type", code=2)  # fmt: skip
        assert "--labels-key needs the reference's cells: pass --reference-data" in output
    output = _invoke("map", files / "ref_run", files / "reference.h5ad", "--out", tmp_path / "b", code=2)
    assert "already in the reference" in output
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", tmp_path / "c", "--unfreeze", "decoder",
                     code=2)  # fmt: skip
    assert "Invalid value for '--unfreeze'" in output
    halved = ad.read_h5ad(files / "query.h5ad")
    halved.layers["counts"] = halved.layers["counts"] * 0.5
    halved.write_h5ad(tmp_path / "halved.h5ad")
    output = _invoke("map", files / "ref_run", tmp_path / "halved.h5ad", "--out", tmp_path / "d" / "run", code=1)
    assert "query.layers['counts'] has" in output and "Put the raw counts of `query` in layers['counts']" in output
    assert not (tmp_path / "d").exists()  # the folders it made for the run are gone with the refused query
    (tmp_path / "e").mkdir()
    _invoke("map", files / "ref_run", tmp_path / "halved.h5ad", "--out", tmp_path / "e", code=1)
    assert (tmp_path / "e").is_dir() and not any((tmp_path / "e").iterdir())  # a folder it did not make stays


def test_map_refuses_a_query_inside_its_output_folder(files, tmp_path):
    out = tmp_path / "mapped"
    out.mkdir()
    query = out / "query.h5ad"
    query.write_bytes((files / "query.h5ad").read_bytes())
    output = _invoke("map", files / "ref_run", query, "--out", out, "--overwrite", code=2)
    assert "QUERY" in output and "choose another --out folder" in output
    assert query.read_bytes() == (files / "query.h5ad").read_bytes()


def test_map_never_writes_into_its_reference_run(files, tmp_path):
    reference_run = tmp_path / "ref_copy"
    reference_run.mkdir()
    for path in (files / "ref_run").iterdir():
        (reference_run / path.name).write_bytes(path.read_bytes())
    before = _hashes(reference_run)
    for out in (reference_run, reference_run / "query"):
        output = _invoke("map", reference_run, files / "query.h5ad", "--out", out, "--overwrite", "--epochs", 1, code=2)
        assert "is REF_RUN or inside it" in output
    assert _hashes(reference_run) == before and not (reference_run / "query").exists()


def test_map_checks_the_labels_column_before_training(files, tmp_path):
    out = tmp_path / "mapped"
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--reference-data",
                     files / "reference.h5ad", "--labels-key", "nope", "--epochs", 1, code=1)  # fmt: skip
    assert "has no obs column 'nope' (--labels-key)" in output and not out.exists()


def test_map_checks_the_vote_has_enough_labelled_cells_before_training(files, tmp_path):
    """--n-neighbors above the labelled reference cells failed after the query model was trained and saved."""
    out = tmp_path / "mapped"
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--reference-data",
                     files / "reference.h5ad", "--labels-key", "cell_type", "--n-neighbors", 100000, "--epochs", 1,
                     code=2)  # fmt: skip
    labelled = ad.read_h5ad(files / "reference.h5ad").n_obs
    assert f"--n-neighbors 100000 must be between 1 and the {labelled} labelled reference cells" in output, output
    assert not out.exists()


def test_no_encoder_stage_refusal_names_the_flag_given(files, tmp_path):
    """The error named --encoder-stage, the opposite of the --no-encoder-stage given, and offered
    'no --encoder-stage (the default)'."""
    out = tmp_path / "mapped"
    output = _invoke("map", files / "ref_run", files / "query.h5ad", "--out", out, "--unfreeze", "encoder",
                     "--encoder-start", "batch_norm", "--no-encoder-stage", "--epochs", 1, code=2)  # fmt: skip
    assert output.startswith("Error: ConfigError: --no-encoder-stage holds the new encoder columns"), output
    assert "or leave --no-encoder-stage out (the default trains them)" in output and not out.exists()
