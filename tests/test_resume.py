"""Resume means the same run: a checkpoint resumes only on its own data and architecture, changed
options take effect or are refused, and a damaged checkpoint is a CheckpointError naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import genailab
from genailab.cli import main
from genailab.data import simulate
from genailab.errors import CheckpointError

TINY = dict(layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
RUN = dict(batch_size=32, progress=False, seed=0, checkpoint_every=1, early_stopping_patience=None)


@pytest.fixture(scope="module")
def counts():
    return simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def checkpoint(counts, tmp_path_factory):
    """The epoch-3 checkpoint of a run at lr 1e-3."""
    folder = tmp_path_factory.mktemp("ckpt")
    genailab.VAE(counts, **TINY).fit(epochs=3, lr=1e-3, checkpoint_dir=folder, **RUN)
    return folder / "checkpoint.pt"


def _resume(adata, checkpoint, tmp_path, **options):
    return genailab.VAE(adata, **TINY).fit(checkpoint_dir=tmp_path, resume_from=checkpoint, **{**RUN, "epochs": 5, **options})


def test_a_lower_lr_at_resume_takes_effect_and_is_recorded(counts, checkpoint, tmp_path):
    model = _resume(counts, checkpoint, tmp_path, lr=1e-4)
    assert [r["lr"] for r in model.history] == [1e-3] * 3 + [1e-4] * 2
    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "genailab.json").read_text())["train_config"]["lr"] == 1e-4


def test_an_unchanged_resume_keeps_the_checkpoints_learning_rate(counts, checkpoint, tmp_path):
    """With lr as before, the optimiser keeps the (possibly plateau-lowered) rate it had."""
    model = _resume(counts, checkpoint, tmp_path, lr=1e-3)
    assert [r["lr"] for r in model.history] == [1e-3] * 5


def test_fewer_epochs_than_the_checkpoint_has_done_is_an_error(counts, checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="has finished 3 epochs, more than epochs=2") as info:
        _resume(counts, checkpoint, tmp_path, epochs=2)
    assert str(checkpoint) in str(info.value)


@pytest.mark.parametrize(("option", "value"), [("batch_size", 16), ("validation_fraction", 0.2), ("seed", 4)])
def test_options_that_fix_the_data_order_are_refused(counts, checkpoint, tmp_path, option, value):
    with pytest.raises(CheckpointError, match=f"{option}|seed") as info:
        _resume(counts, checkpoint, tmp_path, **{option: value})
    assert str(checkpoint) in str(info.value)


def test_other_genes_are_refused_with_the_difference_named(counts, checkpoint, tmp_path):
    renamed = counts.copy()
    renamed.var_names = [f"other_{g}" if i < 2 else g for i, g in enumerate(counts.var_names)]
    with pytest.raises(CheckpointError, match="written for other data: the genes differ") as info:
        _resume(renamed, checkpoint, tmp_path)
    assert "other_gene" in str(info.value) or "other_" in str(info.value)
    reordered = counts[:, list(counts.var_names[::-1])].copy()
    with pytest.raises(CheckpointError, match="the same 30 genes in another order"):
        _resume(reordered, checkpoint, tmp_path)


def test_other_categories_are_refused(counts, checkpoint, tmp_path):
    relabelled = counts.copy()
    relabelled.obs["batch"] = relabelled.obs["batch"].cat.rename_categories(lambda c: f"site_{c}")
    with pytest.raises(CheckpointError, match="the conditions differ.*categories"):
        _resume(relabelled, checkpoint, tmp_path)


def test_other_cells_with_the_same_genes_are_refused(counts, checkpoint, tmp_path):
    other = simulate(120, 30, n_cell_types=3, n_batches=2, seed=7)
    other.var_names = counts.var_names
    other.obs["batch"] = counts.obs["batch"].to_numpy()
    with pytest.raises(CheckpointError, match="cells or their counts differ"):
        _resume(other, checkpoint, tmp_path)


def _damaged(checkpoint, tmp_path, change):
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    return path


def _wrong_shape(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(7, 3)


DAMAGE = {
    "wrong shape": (_wrong_shape, "has shape (7, 3), the architecture needs"),
    "missing optimiser": (lambda s: s.pop("optimizer"), "lacks ['optimizer']"),
    "epoch of the wrong type": (lambda s: s.__setitem__("epoch", "3"), "'epoch' should be a int but is a str"),
    "weights not tensors": (lambda s: s["model"].__setitem__(next(iter(s["model"])), [1.0]), "are not tensors"),
    "history cut": (lambda s: s["history"].pop(), "epoch 3 with 2 history records"),
    "NaN weights": (lambda s: next(iter(s["model"].values())).fill_(float("nan")), "NaN or infinite"),
    "missing weights": (lambda s: s["model"].pop(next(iter(s["model"]))), "do not fit this architecture (missing ["),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(counts, checkpoint, tmp_path, damage):
    change, problem = DAMAGE[damage]
    path = _damaged(checkpoint, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        _resume(counts, path, tmp_path)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_cli_resume_errors_name_the_file_and_the_option(counts, checkpoint, tmp_path):
    data = tmp_path / "counts.h5ad"
    counts.write_h5ad(data)
    args = ["train", str(data), "--layer", "counts", "--condition", "batch", "--latent-dim", "3", "--hidden", "16",
            "--batch-size", "32", "--patience", "0", "--out", str(tmp_path / "run"), "--resume", str(checkpoint)]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--epochs", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "has finished 3 epochs" in result.output and "--epochs" in result.output and str(checkpoint) in result.output
    damaged = _damaged(checkpoint, tmp_path, _wrong_shape)
    result = CliRunner().invoke(main, [*args[:-1], str(damaged), "--epochs", "5"])
    assert result.exit_code != 0 and "CheckpointError" in result.output and str(damaged) in result.output
    result = CliRunner().invoke(main, [*args, "--epochs", "5", "--lr", "0.0001"])
    assert result.exit_code == 0, result.output
    model = genailab.VAE.load(tmp_path / "run")
    assert model.train_config.lr == 1e-4 and [r["lr"] for r in model.history][-2:] == [1e-4, 1e-4]
    np.testing.assert_array_equal([r["epoch"] for r in model.history], [1, 2, 3, 4, 5])


def test_fit_refuses_to_write_over_another_runs_checkpoint(tmp_path):
    """fit(checkpoint_dir=...) replaced another run's checkpoint (epoch 2, latent 10) without a word."""
    from genailab.errors import CheckpointError

    adata = simulate(150, 40, n_cell_types=3, seed=0)
    first = genailab.VAE(adata, layer="counts", latent_dim=3, hidden_dims=(16,))
    first.fit(epochs=2, batch_size=32, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    other = genailab.VAE(adata, layer="counts", latent_dim=4, hidden_dims=(16,))
    with pytest.raises(CheckpointError, match="holds the checkpoint of another run; resume it with resume_from="):
        other.fit(epochs=1, batch_size=32, progress=False, seed=7, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    first.fit(epochs=3, batch_size=32, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1,
              resume_from=tmp_path / "checkpoint.pt")  # its own run continues
    assert len(first.history) == 3


def test_a_checkpoint_is_resumed_only_by_the_kind_of_model_that_wrote_it(tmp_path):
    """An adversary checkpoint resumed silently into a model without one; a perturbation model's
    checkpoint was refused as 'the cells or their counts differ' on the same data."""
    from genailab.model.adversary import BATCH_CORRECTION
    from genailab.perturb import PerturbationModel
    from genailab.data import PerturbationSpec

    adata = simulate(150, 40, n_cell_types=3, n_batches=2, seed=0)
    fit = dict(epochs=1, batch_size=32, progress=False, checkpoint_every=1)
    genailab.VAE(adata, layer="counts", condition_keys=["batch"], adversary=BATCH_CORRECTION, adversarial_key="batch",
                 latent_dim=3, hidden_dims=(16,)).fit(**fit, checkpoint_dir=tmp_path / "adversary")  # fmt: skip
    plain = genailab.VAE(adata, layer="counts", condition_keys=["batch"], latent_dim=3, hidden_dims=(16,))
    with pytest.raises(CheckpointError, match="was written with a batch adversary; resume it with a model built with one"):
        plain.fit(**{**fit, "epochs": 2, "checkpoint_every": 0}, resume_from=tmp_path / "adversary" / "checkpoint.pt")
    screen = simulate(300, 60, n_cell_types=2, perturbation=PerturbationSpec(n_drugs=2), seed=0)
    PerturbationModel(screen, layer="counts", latent_dim=3, hidden_dims=(16,)).fit(**fit, checkpoint_dir=tmp_path / "pert")
    with pytest.raises(CheckpointError, match="written by a PerturbationModel, not a VAE; resume it with that model"):
        genailab.VAE(screen, layer="counts", latent_dim=3, hidden_dims=(16,)).fit(
            **{**fit, "epochs": 2, "checkpoint_every": 0}, resume_from=tmp_path / "pert" / "checkpoint.pt")
