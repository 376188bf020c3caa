"""Writes never follow a planted symbolic link: someone who can write into a shared output folder
must not be able to make genailab overwrite another of the user's files.

Links are planted at every name a command writes in its output folder (and at the fixed names
older versions used for the write probe and the description's temporary file), each pointing at
a file outside the folder; the command must refuse, name the link and leave every outside file
byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from genailab.cli import main
from genailab.data import simulate
from genailab.data.simulate import PerturbationSpec
from genailab.errors import CheckpointError
from genailab.safe_write import atomic_file, write_text

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")

MODEL_NAMES = ("genailab.json", "model.pt", "model.pending.pt", ".genailab-write-test", ".genailab.json.tmp",
               ".genailab.lock")  # fmt: skip
OLD_FIXED_NAMES = (".genailab-write-test", ".genailab.json.tmp")  # the probe and temporary file before unique names
TRAIN_NAMES = (*MODEL_NAMES, "checkpoint.pt", "history.csv", "training_curves.png")
REPORT_NAMES = ("metrics.json", "index.html", "training_curves.png", "latent_umap.png", "gene_agreement.png",
                ".genailab-write-test", ".genailab.lock")  # fmt: skip
TINY = ["--latent-dim", "3", "--hidden", "16", "--epochs", "2", "--batch-size", "32", "--seed", "0"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant(folder: Path, names, victims: Path) -> dict[Path, str]:
    """A link at each of ``names`` in ``folder`` to its own file in ``victims``; returns the victims' hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    victims.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for i, name in enumerate(names):
        victim = victims / f"precious_{i}.txt"
        victim.write_text(f"the user's own file number {i}\n")
        (folder / name).symlink_to(victim)
        hashes[victim] = _digest(victim)
    return hashes


def _assert_untouched(hashes: dict[Path, str], victims: Path) -> None:
    assert {p: _digest(p) for p in hashes} == hashes
    assert sorted(victims.iterdir()) == sorted(hashes)  # nothing new appeared beside them either


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("symlink_data")
    counts = folder / "counts.h5ad"
    simulate(120, 30, n_cell_types=3, n_batches=2, seed=0).write_h5ad(counts)
    drugs = folder / "drugs.h5ad"
    spec = PerturbationSpec(n_drugs=2, doses=(1.0, 10.0), n_target_genes=5)
    simulate(200, 30, n_cell_types=2, n_batches=1, perturbation=spec, seed=0).write_h5ad(drugs)
    run = folder / "run"
    result = CliRunner().invoke(main, ["train", str(counts), "--layer", "counts", "--out", str(run), *TINY])
    assert result.exit_code == 0, result.output
    return counts, drugs, run


def _refused(result, link: Path) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "symbolic link" in result.output, result.output
    assert str(link.parent) in result.output and "Remove the link" in result.output


def test_train_refuses_links_planted_in_its_run_folder(tmp_path, data):
    counts, _, _ = data
    run, victims = tmp_path / "shared" / "run", tmp_path / "home"
    hashes = _plant(run, TRAIN_NAMES, victims)
    result = CliRunner().invoke(main, ["train", str(counts), "--layer", "counts", "--out", str(run), *TINY])
    _refused(result, run / "genailab.json")
    _assert_untouched(hashes, victims)


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_train_refuses_each_single_planted_link(tmp_path, data, name):
    counts, _, _ = data
    run, victims = tmp_path / "run", tmp_path / "home"
    hashes = _plant(run, [name], victims)
    result = CliRunner().invoke(main, ["train", str(counts), "--layer", "counts", "--out", str(run), *TINY])
    if name in OLD_FIXED_NAMES:  # no longer written: the run succeeds around the link
        assert result.exit_code == 0, result.output
        assert (run / name).is_symlink() and (run / "model.pt").is_file() and not (run / "model.pt").is_symlink()
    else:
        _refused(result, run / name)
        assert name in result.output
    _assert_untouched(hashes, victims)


def test_a_run_folder_that_is_itself_a_link_is_refused(tmp_path, data):
    counts, _, _ = data
    elsewhere = tmp_path / "home" / "important"
    elsewhere.mkdir(parents=True)
    (elsewhere / "genailab.json").write_text("{}")
    before = _digest(elsewhere / "genailab.json")
    (tmp_path / "run").symlink_to(elsewhere)
    result = CliRunner().invoke(main, ["train", str(counts), "--layer", "counts", "--out", str(tmp_path / "run"),
                                       "--overwrite", *TINY])  # fmt: skip
    _refused(result, tmp_path / "run")
    assert _digest(elsewhere / "genailab.json") == before and sorted(p.name for p in elsewhere.iterdir()) == ["genailab.json"]


def test_evaluate_refuses_links_planted_in_its_report_folder(tmp_path, data):
    counts, _, run = data
    report, victims = tmp_path / "report", tmp_path / "home"
    hashes = _plant(report, REPORT_NAMES, victims)
    result = CliRunner().invoke(main, ["evaluate", str(run), str(counts), "--out", str(report), "--n-samples", "2"])
    _refused(result, report / "metrics.json")
    _assert_untouched(hashes, victims)


def test_embed_refuses_a_link_at_its_output_file(tmp_path, data):
    counts, _, run = data
    victims = tmp_path / "home"
    hashes = _plant(tmp_path / "out", ["embedded.h5ad"], victims)
    result = CliRunner().invoke(main, ["embed", str(run), str(counts), "--out", str(tmp_path / "out" / "embedded.h5ad")])
    _refused(result, tmp_path / "out" / "embedded.h5ad")
    _assert_untouched(hashes, victims)


def test_perturb_train_refuses_links_planted_in_its_run_folder(tmp_path, data):
    _, drugs, _ = data
    run, victims = tmp_path / "prun", tmp_path / "home"
    hashes = _plant(run, (*MODEL_NAMES, "history.csv"), victims)
    result = CliRunner().invoke(main, ["perturb", "train", str(drugs), "--out", str(run), "--layer", "counts", *TINY])
    _refused(result, run / "genailab.json")
    _assert_untouched(hashes, victims)


def test_a_link_planted_after_the_checks_is_still_not_followed(tmp_path):
    """Between the check and the final rename the write itself refuses a link at the name."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    with pytest.raises(CheckpointError, match="symbolic link"):
        with atomic_file(target, "w") as handle:
            handle.write("new contents")
            target.symlink_to(victim)  # planted while the file is being written
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # only the link; no temporary left
    with pytest.raises(CheckpointError, match="symbolic link"):
        write_text(target, "again")
    assert victim.read_text() == "keep me"
