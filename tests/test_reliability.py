"""Bad input, numerical faults and untrusted files: every case gives one of genailab's own errors,
with a message that says what is wrong and how to fix it, and never loses a good checkpoint."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import json
import logging
import os
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

import genailab
from genailab.cli import main
from genailab.data import read, simulate
from genailab.errors import (
    CheckpointError,
    ConfigError,
    InputDataError,
    SchemaMismatchError,
    TrainingDivergedError,
)
from genailab.anndata_models.files import description_hash
from genailab.model.vae import ConditionalVAE
from genailab.train import TrainConfig, Trainer, load_checkpoint, seed_everything
from genailab.train.checkpoint import atomic_torch_save
from genailab.data.loader import MinibatchLoader


FAST = dict(epochs=2, batch_size=32, progress=False, seed=0)
TINY = dict(latent_dim=3, hidden_dims=(16,))


@pytest.fixture(scope="module")
def counts():
    """120 cells x 30 genes of NB counts (CSR in X and layers['counts']), cell types and batches."""
    return simulate(120, 30, n_cell_types=3, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def trained(counts, tmp_path_factory):
    """A small NB model conditioned on the batch, and the folder it is saved in."""
    model = genailab.VAE(counts, layer="counts", condition_keys=["batch"], **TINY).fit(**FAST)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    return model, folder


def _with_x(adata, matrix):
    out = adata.copy()
    out.X = matrix
    return out


# -- input values ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [np.asarray, sp.csr_matrix])
def test_non_integer_counts_suggest_gaussian_model_or_raw_layer(counts, layout):
    halves = _with_x(counts, layout(counts.X.toarray() / 2))
    with pytest.raises(InputDataError, match="non-integer") as info:
        genailab.VAE(halves, likelihood="nb", **TINY).fit(**FAST)
    assert "likelihood='gaussian'" in str(info.value) and "layers['counts']" in str(info.value)


def test_negative_counts_suggest_raw_layer_or_gaussian_model(counts):
    matrix = counts.X.toarray()
    matrix[3, 4] = -2
    with pytest.raises(InputDataError, match="negative values") as info:
        genailab.VAE(_with_x(counts, matrix), likelihood="zinb", **TINY).fit(**FAST)
    assert "raw-count layer" in str(info.value) and "Gaussian" in str(info.value)


@pytest.mark.parametrize(
    "where, value",
    [("X dense", np.nan), ("X csr", np.inf), ("layer", -np.inf), ("continuous", np.nan), ("continuous", np.inf)],
)
def test_nan_and_inf_are_refused_anywhere(counts, where, value):
    adata = counts.copy()
    options = dict(likelihood="gaussian", **TINY)
    if where.startswith("X"):
        matrix = adata.X.toarray()
        matrix[5, 7] = value
        adata.X = matrix if where == "X dense" else sp.csr_matrix(matrix)
    elif where == "layer":
        matrix = adata.layers["counts"].toarray()
        matrix[5, 7] = value
        adata.layers["counts"] = sp.csr_matrix(matrix)
        options["layer"] = "counts"
    else:
        adata.obs["dose"] = np.linspace(0, 1, adata.n_obs)
        adata.obs.loc[adata.obs_names[9], "dose"] = value
        options["continuous_keys"] = ["dose"]
    with pytest.raises(InputDataError, match="NaN|missing or non-numeric"):
        genailab.VAE(adata, **options).fit(**FAST)


def test_nan_in_new_data_is_refused_at_prediction(trained, counts):
    model, _ = trained
    bad = counts.copy()
    matrix = bad.layers["counts"].toarray()
    matrix[0, 0] = np.nan
    bad.layers["counts"] = matrix
    with pytest.raises(InputDataError, match="NaN"):
        model.get_latent(bad)


def test_zero_count_cells_error_drop_or_warn(counts, caplog):
    matrix = counts.X.toarray()
    matrix[:6] = 0
    adata = _with_x(counts, sp.csr_matrix(matrix))
    with pytest.raises(InputDataError, match="6 of 120 cells with zero total counts.*empty_cells='drop'"):
        genailab.VAE(adata, **TINY).fit(**FAST)
    with caplog.at_level(logging.WARNING, logger="genailab"):
        dropped = genailab.VAE(adata, empty_cells="drop", **TINY).fit(**FAST)
    assert "dropping them" in caplog.text
    used = np.concatenate([dropped._split["train"], dropped._split["validation"]])
    assert used.size == 114 and used.min() >= 6  # trained on the rest only
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genailab"):
        kept = genailab.VAE(adata, empty_cells="warn", **TINY).fit(**FAST)
    assert "keeping them" in caplog.text
    assert kept.training_info["n_train"] + kept.training_info["n_validation"] == 120
    with pytest.raises(ConfigError, match="empty_cells='skip'"):
        genailab.VAE(adata, empty_cells="skip", **TINY)


# -- conditions and genes -----------------------------------------------------------------------
def test_missing_condition_column_at_training(counts):
    with pytest.raises(SchemaMismatchError, match=r"\['donor'\] are not in adata.obs at training time"):
        genailab.VAE(counts, condition_keys=["batch", "donor"], **TINY)
    with pytest.raises(SchemaMismatchError, match=r"\['age'\].*training time"):
        genailab.VAE(counts, continuous_keys=["age"], **TINY)


def test_missing_category_values_at_training(counts):
    adata = counts.copy()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.loc[adata.obs_names[2], "batch"] = None
    with pytest.raises(InputDataError, match="obs\\['batch'\\] has 1 missing values"):
        genailab.VAE(adata, condition_keys=["batch"], **TINY)


def test_missing_condition_column_at_prediction(trained, counts):
    model, _ = trained
    no_batch = counts.copy()
    del no_batch.obs["batch"]
    with pytest.raises(SchemaMismatchError, match=r"\['batch'\] are not in adata.obs at prediction time"):
        model.get_latent(no_batch)
    with pytest.raises(SchemaMismatchError, match="Missing condition values for \\['batch'\\]"):
        model.sample(3)


def test_unknown_category_at_prediction(trained, counts):
    model, _ = trained
    new = counts.copy()
    new.obs["batch"] = "batch_9"
    with pytest.raises(SchemaMismatchError, match=r"not seen: \['batch_9'\]. Known categories: \['batch_0', 'batch_1'\]"):
        model.get_latent(new)
    with pytest.raises(SchemaMismatchError, match="batch_7"):
        model.get_normalized_expression(conditions={"batch": "batch_7"})
    with pytest.raises(SchemaMismatchError, match="batch_7"):
        model.sample(3, conditions={"batch": "batch_7"})


def test_genes_missing_from_new_data_are_named_and_can_be_aligned(trained, counts):
    model, folder = trained
    loaded = genailab.VAE.load(folder)
    fewer = counts[:, 3:].copy()
    with pytest.raises(SchemaMismatchError, match="3 of the model's 30 genes are missing") as info:
        loaded.get_latent(fewer)
    for gene in counts.var_names[:3]:
        assert gene in str(info.value)
    assert "align_genes=True" in str(info.value)
    aligned = loaded.get_latent(fewer, align_genes=True)
    zeroed = counts.copy()
    zeroed.layers["counts"] = zeroed.layers["counts"].toarray()
    zeroed.layers["counts"][:, :3] = 0
    np.testing.assert_array_equal(aligned, loaded.get_latent(zeroed))


def test_reordered_and_extra_genes_give_identical_results(trained, counts):
    model, folder = trained
    loaded = genailab.VAE.load(folder)
    order = np.random.default_rng(1).permutation(counts.n_vars)
    shuffled = counts[:, order].copy()
    padded = sp.hstack([shuffled.layers["counts"], sp.csr_matrix((counts.n_obs, 2), dtype=np.float32)]).tocsr()
    extra = ad.AnnData(obs=counts.obs.copy(), layers={"counts": padded}, var=pd.DataFrame(index=[*shuffled.var_names, "X1", "X2"]))
    reference = loaded.get_latent(counts)
    np.testing.assert_array_equal(loaded.get_latent(shuffled), reference)
    np.testing.assert_array_equal(loaded.get_latent(extra), reference)
    np.testing.assert_array_equal(model.get_latent(shuffled), reference)


# -- sizes -------------------------------------------------------------------------------------
def test_too_few_cells_for_a_split(counts):
    with pytest.raises(InputDataError, match="Only 6 usable cells"):
        genailab.VAE(counts[:6].copy(), **TINY).fit(**FAST)
    with pytest.raises(InputDataError, match="too few for validation_fraction=0.02.*validation_fraction=0"):
        genailab.VAE(counts[:12].copy(), **TINY).fit(**FAST, validation_fraction=0.02)


def test_latent_dim_larger_than_genes(counts):
    with pytest.raises(ConfigError, match="latent_dim=40 is larger than the number of genes \\(30\\)"):
        genailab.VAE(counts, latent_dim=40)


# -- files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty.h5ad", "empty.csv", "empty.h5"])
def test_empty_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(InputDataError, match="is empty"):
        read(path)


def _write_fake(path: Path, kind: str) -> Path:
    if kind == "text":
        path.write_text("gene,cell_1\nCD3E,4\n")
    elif kind == "binary":
        path.write_bytes(np.random.default_rng(0).bytes(512))
    elif kind == "other hdf5":
        import h5py

        with h5py.File(path, "w") as handle:
            handle["something"] = np.arange(4)
    return path


@pytest.mark.parametrize(
    "name, kind", [("data.h5ad", "text"), ("data.h5ad", "other hdf5"), ("data.h5", "text"), ("data.csv", "binary")]
)
def test_wrong_file_types(tmp_path, name, kind):
    with pytest.raises(InputDataError, match="data"):
        read(_write_fake(tmp_path / name, kind))


def test_truncated_h5ad(tmp_path, counts):
    good = tmp_path / "good.h5ad"
    counts.write_h5ad(good)
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputDataError, match="truncated, corrupt"):
        read(cut)


def test_cli_reports_a_bad_file_in_one_line(tmp_path):
    fake = _write_fake(tmp_path / "data.h5ad", "text")
    result = CliRunner().invoke(main, ["train", str(fake), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "InputDataError" in result.output and "Traceback" not in result.output


# -- output folders ----------------------------------------------------------------------------
@pytest.fixture
def h5ad(tmp_path, counts):
    path = tmp_path / "counts.h5ad"
    counts.write_h5ad(path)
    return path


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the output folder is unusable")

    monkeypatch.setattr(genailab.VAE, "fit", refuse)


def test_cli_unwritable_output_fails_before_training(tmp_path, h5ad, monkeypatch):
    _no_training(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["train", str(h5ad), "--layer", "counts", "--out", str(blocker / "run")])
    assert result.exit_code != 0
    assert "CheckpointError: Cannot write to" in result.output and "Traceback" not in result.output


def test_cli_full_disk_fails_before_training(tmp_path, h5ad, monkeypatch):
    _no_training(monkeypatch)

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)  # the writability probe writes 4 KiB with os.write
    result = CliRunner().invoke(main, ["train", str(h5ad), "--layer", "counts", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "No space left on device" in result.output and "free disk space" in result.output


def test_save_and_checkpoint_dir_refuse_unwritable_folders(tmp_path, trained, counts):
    model, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="Cannot write to"):
        model.save(blocker / "model")
    fresh = genailab.VAE(counts, **TINY)
    with pytest.raises(CheckpointError, match="Cannot write to"):
        fresh.fit(**FAST, checkpoint_every=1, checkpoint_dir=blocker / "ckpt")
    assert not fresh.is_trained


# -- numerical faults --------------------------------------------------------------------------
def test_nan_loss_stops_with_epoch_batch_and_keeps_last_checkpoint(tmp_path, counts, monkeypatch):
    """The loss turns NaN at the 2nd batch of epoch 3; the epoch-2 checkpoint stays intact."""
    original, calls = ConditionalVAE.loss, []

    def poisoned(self, x, c=None, **kwargs):
        out = original(self, x, c, **kwargs)
        calls.append(1)
        if self.training and len(calls) == 4 * 2 + 2:  # 4 batches per epoch, no validation
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(ConditionalVAE, "loss", poisoned)
    model = genailab.VAE(counts, **TINY)
    options = dict(FAST, epochs=5, validation_fraction=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match="epoch 3, batch 2 of 4") as info:
        model.fit(**options, checkpoint_dir=tmp_path)
    assert "Lower the learning rate" in str(info.value) and "checkpoint.pt" in str(info.value)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    monkeypatch.setattr(ConditionalVAE, "loss", original)
    resumed = genailab.VAE(counts, **TINY).fit(**options, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint.pt")
    assert len(resumed.history) == 5


def test_nan_weights_after_an_epochs_last_step_are_never_checkpointed(tmp_path):
    """Weights poisoned by the last step of epoch 2 stop training before the epoch-2 checkpoint."""
    seed_everything(0)
    matrix = sp.csr_matrix(np.random.default_rng(0).poisson(3.0, size=(64, 20)).astype(np.float32))
    model = ConditionalVAE.from_config(genailab.ModelConfig(input_dim=20, likelihood="nb", **TINY))
    config = TrainConfig(epochs=4, batch_size=32, progress=False, checkpoint_every=1, early_stopping_patience=None)
    trainer = Trainer(model, config, checkpoint_path=tmp_path / "checkpoint.pt")
    step, steps = trainer.optimizer.step, []

    def poisoning_step(*args, **kwargs):
        result = step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return result

    trainer.optimizer.step = poisoning_step
    with pytest.raises(TrainingDivergedError, match="NaN or infinite during epoch 2"):
        trainer.fit(MinibatchLoader(matrix, batch_size=32, seed=0))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_infinite_learning_rate_is_refused():
    with pytest.raises(ConfigError, match="lr must be a positive finite number"):
        TrainConfig(lr=float("inf"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_checkpoints_are_written_atomically(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's private 0600
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a file")
        raise failure

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match="(No space left|failed writing).*free disk space.*unchanged"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["epoch"] == 1


# -- untrusted files ---------------------------------------------------------------------------
def test_tampered_or_truncated_model_file(trained, tmp_path):
    _, folder = trained
    weights = (folder / "model.pt").read_bytes()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "genailab.json").write_text((folder / "genailab.json").read_text())
    (copy / "model.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="modified or truncated"):
        genailab.VAE.load(copy)
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="modified or truncated"):
        genailab.VAE.load(copy)
    (copy / "model.pt").write_bytes(weights)
    metadata = json.loads((folder / "genailab.json").read_text())
    del metadata["schema"]
    metadata["description_sha256"] = description_hash(metadata)  # rewritten with a matching hash: still refused
    (copy / "genailab.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        genailab.VAE.load(copy)
    (copy / "genailab.json").write_text((folder / "genailab.json").read_text()[:200])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        genailab.VAE.load(copy)


def test_truncated_checkpoint(tmp_path, counts, h5ad):
    genailab.VAE(counts, **TINY).fit(**FAST, checkpoint_every=1, checkpoint_dir=tmp_path)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupt"):
            load_checkpoint(tmp_path / "cut.pt")
    result = CliRunner().invoke(
        main, ["train", str(h5ad), "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "cut.pt")]
    )
    assert result.exit_code != 0
    assert "CheckpointError" in result.output and "Traceback" not in result.output


class _Payload:
    """Unpickling this object calls open(marker, "w"): code from the file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_loading_never_unpickles_code(trained, tmp_path, counts):
    _, folder = trained
    live = tmp_path / "live_marker"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: plain unpickling runs it
    assert live.exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"module.z_mean.weight": _Payload(marker)}, evil / "model.pt")
    metadata = json.loads((folder / "genailab.json").read_text())
    import hashlib

    metadata["weights_sha256"] = hashlib.sha256((evil / "model.pt").read_bytes()).hexdigest()  # a forged hash
    (evil / "genailab.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError):
        genailab.VAE.load(evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil / "model.pt")
    with pytest.raises(CheckpointError):
        genailab.VAE(counts, **TINY).fit(**FAST, resume_from=evil / "model.pt")
    assert not marker.exists()


# -- AnnData layouts and options that were misread ------------------------------------------------
def test_counts_only_in_a_layer_name_the_layer_option(counts, tmp_path):
    """X=None (a common h5ad layout) gave 'contains 1 NaN or infinite values', or a raw h5py KeyError backed."""
    layered = ad.AnnData(obs=counts.obs, var=counts.var, layers={"counts": counts.layers["counts"]})
    with pytest.raises(SchemaMismatchError, match=r"adata.X is empty \(None\).*\['counts'\].*`layer`"):
        genailab.VAE(layered)
    layered.write_h5ad(tmp_path / "layered.h5ad")
    with pytest.raises(SchemaMismatchError, match=r"adata.X is empty"):
        genailab.VAE(ad.read_h5ad(tmp_path / "layered.h5ad", backed="r"))
    assert genailab.VAE(layered, layer="counts").schema.layer == "counts"


def test_counts_a_few_float32_steps_off_whole_are_counts(counts):
    """expm1(log1p(x)) in float32 is up to 4 float32 steps off x (35.999996 for 36): refused as
    non-integer, with the example printed as '36'."""
    x = sp.csr_matrix(counts.layers["counts"], dtype=np.float32)
    x.data = x.data * 37.0  # counts of 37 and more, where float32 steps exceed 1e-6
    off = x.copy()
    off.data = np.nextafter(np.nextafter(off.data, np.float32(0)), np.float32(0))
    assert np.abs(off.data - np.round(off.data)).max() > 1e-6
    genailab.VAE(_with_x(counts, off), **TINY).fit(**FAST)
    off.data[0] += np.float32(0.25)
    with pytest.raises(InputDataError, match=r"1 non-integer values \(e.g. \d+\.2\d+\)"):
        genailab.VAE(_with_x(counts, off), **TINY).fit(**FAST)


def test_condition_columns_mixing_numbers_and_their_strings(counts):
    """An object column holding 1 and '1' gave the categories ('1', '1', '2') and a pandas reindexing error."""
    mixed = counts.copy()
    mixed.obs["plate"] = pd.Series([1, "1", 2] * (counts.n_obs // 3), index=counts.obs_names, dtype=object)
    model = genailab.VAE(mixed, layer="counts", condition_keys=["plate"], **TINY)
    assert model.schema.categories == (("1", "2"),) and model.config.condition_dim == 2
    with pytest.raises(ConfigError, match=r"condition_keys names \['batch'\] more than once"):
        genailab.VAE(counts, layer="counts", condition_keys=["batch", "batch"], **TINY)


@pytest.mark.parametrize(
    ("option", "hint"),
    [("batch_key", "condition_keys=\\['batch'\\]"), ("n_latent", "calls it latent_dim"), ("epochs", "give it to fit")],
)
def test_options_named_as_elsewhere_get_their_genailab_name(counts, option, hint):
    with pytest.raises(ConfigError, match=hint) as error:
        genailab.VAE(counts, layer="counts", **{option: 3})
    assert "input_dim" not in str(error.value) and "condition_dim" not in str(error.value)
