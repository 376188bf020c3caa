"""A saved model is checked whole on load: the description's own hash, its consistency with the
weights and with itself, and finite weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import genailab
from genailab.anndata_models.files import description_hash
from genailab.data import simulate
from genailab.errors import CheckpointError

FIXTURE = Path(__file__).parent / "fixtures" / "model_v1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small NB model conditioned on the batch (one-hot), saved."""
    counts = simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)
    model = genailab.VAE(counts, layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
    model.fit(epochs=2, batch_size=32, progress=False, seed=0)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _edit(copy: Path, change, *, rehash: bool) -> None:
    """Apply ``change`` to the description; with ``rehash`` also forge its hash, as a careful editor would."""
    metadata = json.loads((copy / "genailab.json").read_text())
    change(metadata)
    if rehash:
        metadata["description_sha256"] = description_hash(metadata)
    (copy / "genailab.json").write_text(json.dumps(metadata, indent=2))


def _swap_two_genes(metadata):
    genes = metadata["schema"]["gene_names"]
    genes[0], genes[1] = genes[1], genes[0]


def _rename_a_batch(metadata):
    metadata["schema"]["categories"][0][0] = "batch_renamed"


def test_the_description_carries_a_hash_of_itself(saved):
    metadata = json.loads((saved / "genailab.json").read_text())
    body = {k: v for k, v in metadata.items() if k != "description_sha256"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert metadata["format_version"] == 2 and metadata["description_sha256"] == expected


@pytest.mark.parametrize("change", [_swap_two_genes, _rename_a_batch], ids=["swapped genes", "edited categories"])
def test_an_edited_description_is_refused(saved, tmp_path, change):
    copy = _copy(saved, tmp_path)
    _edit(copy, change, rehash=False)
    with pytest.raises(CheckpointError, match="description_sha256.*edited or damaged") as info:
        genailab.VAE.load(copy)
    assert str(copy / "genailab.json") in str(info.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m["schema"]["gene_names"].pop(), "29 gene names for a model of input_dim 30"),
        (lambda m: m["schema"]["categories"][0].append("batch_9"), "3 categories and 0 continuous columns for condition_dim 2"),
        (lambda m: m["schema"]["gene_names"].__setitem__(1, m["schema"]["gene_names"][0]), "gene names are not unique"),
        (lambda m: m["model_config"].__setitem__("secret_option", 1), "model_config has unknown entries ['secret_option']"),
        (lambda m: m["train_config"].__setitem__("lr_typo", 1), "train_config has unknown entries ['lr_typo']"),
        (lambda m: m["schema"].__setitem__("extra", 1), "schema has unknown entries ['extra']"),
        (lambda m: m.__setitem__("adversary_config", {"weight": 1.0, "bogus": 2}), "adversary_config has unknown entries ['bogus']"),
        (lambda m: m.__setitem__("model_config", [1, 2]), "model_config is not a mapping"),
    ],
    ids=["genes vs input_dim", "categories vs condition width", "duplicate genes", "unknown model option",
         "unknown train option", "unknown schema entry", "unknown adversary option", "wrong type"],
)  # fmt: skip
def test_a_consistently_forged_description_that_contradicts_itself_is_refused(saved, tmp_path, change, problem):
    copy = _copy(saved, tmp_path)
    _edit(copy, change, rehash=True)
    with pytest.raises(CheckpointError, match="damaged or incomplete") as info:
        genailab.VAE.load(copy)
    assert problem in str(info.value) and str(copy / "genailab.json") in str(info.value)


def test_non_finite_weights_are_refused(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    tensors = torch.load(copy / "model.pt", weights_only=True)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    torch.save(tensors, copy / "model.pt")
    digest = hashlib.sha256((copy / "model.pt").read_bytes()).hexdigest()
    _edit(copy, lambda m: m.__setitem__("weights_sha256", digest), rehash=True)
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights \\({name}"):
        genailab.VAE.load(copy)


def test_format_1_files_still_load_and_are_checked_for_consistency(tmp_path):
    genailab.VAE.load(FIXTURE)  # the saved-format fixture (no description hash) keeps loading
    copy = _copy(FIXTURE, tmp_path)
    _edit(copy, lambda m: m["schema"]["gene_names"].pop(), rehash=False)
    with pytest.raises(CheckpointError, match="11 gene names for a model of input_dim 12"):
        genailab.VAE.load(copy)


def test_a_description_relabelled_to_an_older_format_is_named(saved, tmp_path, caplog):
    """Relabelling a format-2 folder as format 1 skips the hash: the load says so; format 0 is refused."""
    copy = _copy(saved, tmp_path)

    def relabel(version):
        def change(metadata):
            metadata["format_version"] = version
            metadata.pop("description_sha256", None)
        return change

    _edit(copy, relabel(0), rehash=False)
    with pytest.raises(CheckpointError, match="no valid format_version"):
        genailab.VAE.load(copy)
    _edit(copy, relabel(1), rehash=False)
    with caplog.at_level("WARNING", logger="genailab.anndata_models.files"):
        genailab.VAE.load(copy)
    assert "saved in model format 1" in caplog.text


def test_a_hash_in_a_description_labelled_format_1_is_still_checked(saved, tmp_path):
    """Setting format_version to 1 after editing the genes skipped the hash the file still carried."""
    copy = _copy(saved, tmp_path)

    def edit(metadata):
        metadata["format_version"] = 1
        metadata["schema"]["gene_names"][0] = "XXX"

    _edit(copy, edit, rehash=False)
    with pytest.raises(CheckpointError, match="does not match the hash recorded in it"):
        genailab.VAE.load(copy)


def test_home_paths_expand_and_an_empty_path_is_refused(tmp_path, monkeypatch):
    """save('~/x') wrote a folder literally named '~' in the working folder, and save('') wrote the
    model files into the working folder itself."""
    from genailab.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = genailab.VAE(simulate(60, 12, n_cell_types=2, n_markers=3, seed=0), latent_dim=2, hidden_dims=(8,))
    assert model.save("~/models/m") == tmp_path / "home" / "models" / "m" and not (tmp_path / "~").exists()
    assert genailab.VAE.load("~/models/m").schema.gene_names == model.schema.gene_names
    for call in (lambda: model.save(""), lambda: genailab.VAE.load(" ")):
        with pytest.raises(ConfigError, match="The path is empty"):
            call()
    assert not (tmp_path / "genailab.json").exists()
