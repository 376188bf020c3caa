"""Nonsense option values are a ConfigError naming the argument, in the API and the CLI alike;
the CLI speaks its own option names and exits 2 for an invalid option, 1 for anything else."""

from __future__ import annotations

import json
import math
import re

import click
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from genailab import VAE, ModelConfig, TrainConfig
from genailab.checks import FLOAT32_MAX, check_number
from genailab.cli import main
from genailab.cli.common import fail_cleanly, in_option_terms
from genailab.data.simulate import simulate
from genailab.errors import ConfigError, InputDataError, TrainingDivergedError
from genailab.model.adversary import AdversaryConfig

NAN, INF = float("nan"), float("inf")

BAD_TRAIN = [
    ("lr", INF, "lr must be a positive finite number, got inf"),
    ("lr", 0.0, "lr must be a positive number, got 0"),
    ("lr", 1e39, "lr=1e+39 overflows float32"),
    ("weight_decay", -1e-4, "weight_decay must be a non-negative number"),
    ("grad_clip", 0.0, "grad_clip must be a positive number, got 0. None disables clipping."),
    ("grad_clip", -5.0, "grad_clip must be a positive number, got -5"),
    ("grad_clip", NAN, "grad_clip is NaN"),
    ("kl_warmup_epochs", NAN, "kl_warmup_epochs is NaN"),
    ("kl_warmup_epochs", -1.0, "kl_warmup_epochs must be a non-negative number, got -1"),
    ("kl_cycles", 0, "kl_cycles must be a whole number >= 1, got 0"),
    ("validation_fraction", 1.0, "validation_fraction must be a number in [0, 1), got 1"),
    ("validation_fraction", NAN, "validation_fraction is NaN"),
    ("early_stopping_patience", 0, "early_stopping_patience must be a whole number >= 1, got 0. None disables"),
    ("early_stopping_patience", 2.5, "early_stopping_patience must be a whole number >= 1, got 2.5"),
    ("early_stopping_min_delta", -0.1, "early_stopping_min_delta must be a non-negative number"),
    ("lr_plateau_patience", -1, "lr_plateau_patience must be a non-negative whole number"),
    ("lr_factor", 1.0, "lr_factor must be a number in (0, 1), got 1"),
    ("lr_factor", 0.0, "lr_factor must be a number in (0, 1), got 0"),
    ("min_lr", -1e-6, "min_lr must be a non-negative number"),
    ("min_lr", 0.1, "min_lr=0.1 is above lr=0.001"),
    ("lr", 1e-9, "lr=1e-09 is below the learning-rate floor min_lr=1e-06; give lr >= 1e-06"),
    ("epochs", 2.0, "epochs must be a whole number >= 1, got 2.0"),
    ("epochs", "3", "epochs must be a whole number >= 1, got '3' (str)"),
    ("batch_size", True, "batch_size must be a whole number >= 1, got True (bool)"),
    ("seed", -1, "seed must be a whole number in [0, 4294967295], got -1"),
    ("seed", 2**32, "seed must be a whole number in [0, 4294967295]"),
    ("checkpoint_every", -2, "checkpoint_every must be a non-negative whole number"),
    ("deterministic", "yes", "deterministic must be True or False"),
]


@pytest.mark.parametrize("name, value, message", BAD_TRAIN, ids=[f"{n}={v!r}" for n, v, _ in BAD_TRAIN])
def test_train_config_refuses_nonsense(name, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        TrainConfig(**{name: value})
    assert info.value.argument == name


BAD_MODEL = [
    ("beta", NAN, "beta is NaN; give a non-negative number"),
    ("beta", INF, "beta must be a non-negative finite number, got inf"),
    ("beta", 1e39, "beta=1e+39 overflows float32"),
    ("beta", -0.5, "beta must be a non-negative number, got -0.5"),
    ("dropout", 1.0, "dropout must be a number in [0, 1), got 1"),
    ("dropout", NAN, "dropout is NaN"),
    ("latent_dim", 0, "latent_dim must be a whole number >= 1, got 0"),
    ("latent_dim", 4.0, "latent_dim must be a whole number >= 1, got 4.0"),
    ("embedding_dim", 0, "embedding_dim must be a whole number >= 1"),
    ("hidden_dims", "128", "hidden_dims must be a list of whole numbers like"),
    ("hidden_dims", (64, 0), "hidden_dims must be a list of whole numbers >= 1; item 1 is 0"),
    ("hidden_dims", (64, 2.5), "item 1 is 2.5"),
    ("hidden_dims", (), "hidden_dims must hold at least one size"),
]


@pytest.mark.parametrize("name, value, message", BAD_MODEL, ids=[f"{n}={v!r}" for n, v, _ in BAD_MODEL])
def test_model_config_refuses_nonsense(name, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        ModelConfig(input_dim=20, **{name: value})
    assert info.value.argument == name


@pytest.mark.parametrize("options, message", [
    (dict(weight=-1.0), "adversary_weight must be a non-negative number, got -1"),
    (dict(weight=NAN), "adversary_weight is NaN"),
    (dict(warmup_epochs=INF), "adversary_warmup_epochs must be a non-negative finite number"),
    (dict(lr=0.0), "adversary_lr must be a positive number, got 0"),
    (dict(hidden_dims=(0,)), "adversary_hidden_dims must be a list of whole numbers >= 1"),
])
def test_adversary_config_refuses_nonsense(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        AdversaryConfig(**options)


def test_valid_numbers_become_plain_python_and_round_trip_through_json():
    config = TrainConfig(lr=np.float32(0.01), epochs=np.int64(3), grad_clip=None, early_stopping_patience=None)
    assert type(config.lr) is float and type(config.epochs) is int
    assert config.lr == pytest.approx(0.01) and config.grad_clip is None and config.early_stopping_patience is None
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = ModelConfig(input_dim=np.int64(30), beta=np.float64(0.5), hidden_dims=np.array([16, 8]))
    assert model.hidden_dims == (16, 8) and type(model.input_dim) is int and model.beta == 0.5


def test_float32_overflow_is_named_as_such_not_as_infinite():
    just_fits = float(np.float32(FLOAT32_MAX))
    assert check_number("beta", just_fits, ge=0) == just_fits
    with pytest.raises(ConfigError, match="overflows float32") as info:
        check_number("beta", 1e39, ge=0)
    assert "infinite" not in str(info.value) and "NaN" not in str(info.value)
    with np.errstate(over="ignore"):
        assert math.isinf(np.float32(1e39))  # what the model would have computed with it


@pytest.fixture(scope="module")
def counts():
    """200 cells x 30 genes of simulated NB counts (X), 2 batches."""
    adata = simulate(200, 30, n_cell_types=2, n_batches=2, seed=0)
    adata.X = adata.layers["counts"].copy()
    return adata


@pytest.fixture(scope="module")
def counts_file(counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("options") / "counts.h5ad"
    counts.write_h5ad(path)
    return path


def test_patience_means_the_same_in_the_api_and_the_cli(counts, counts_file, tmp_path):
    # API: >= 1 epochs without improvement, None disables; 0 is refused instead of stopping after one epoch
    with pytest.raises(ConfigError, match="None disables early stopping"):
        TrainConfig(early_stopping_patience=0)
    # lr so small the validation loss cannot improve by min_delta: patience 1 stops at epoch 2
    stalled = dict(epochs=5, lr=1e-9, min_lr=0.0, early_stopping_min_delta=1e6, seed=0, progress=False)
    model = VAE(counts, likelihood="nb", latent_dim=4, hidden_dims=(16,)).fit(early_stopping_patience=1, **stalled)
    assert len(model.history) == 2 and model.training_info["stopped_early"]
    model = VAE(counts, likelihood="nb", latent_dim=4, hidden_dims=(16,)).fit(early_stopping_patience=None, **stalled)
    assert len(model.history) == 5
    # CLI: --patience 0 is the API's None (documented in --help), negative values are usage errors
    result = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(tmp_path / "run"), "--epochs", "3",
                                       "--patience", "0", "--latent-dim", "4", "--hidden", "16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "genailab.json").read_text())
    assert saved["train_config"]["early_stopping_patience"] is None and len(saved["history"]) == 3
    assert "0 never stops early" in " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    result = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(tmp_path / "r2"), "--patience", "-1"])
    assert result.exit_code == 2 and "--patience" in result.output


def test_negative_grad_clip_no_longer_trains_uphill():
    with pytest.raises(ConfigError, match="grad_clip must be a positive number, got -1"):
        TrainConfig(grad_clip=-1.0)


@pytest.mark.parametrize("options, message", [
    (["--lr", "-1"], "ConfigError: --lr must be a positive number, got -1."),
    (["--beta", "nan"], "ConfigError: --beta is NaN; give a non-negative number."),
    (["--beta", "1e39"], "ConfigError: --beta 1e+39 overflows float32"),
    (["--kl-warmup", "-2"], "ConfigError: --kl-warmup must be a non-negative number, got -2."),
    (["--kl-warmup", "inf"], "ConfigError: --kl-warmup must be a non-negative finite number, got inf."),
    (["--validation-fraction", "1.5"], r"ConfigError: --validation-fraction must be a number in [0, 1), got 1.5."),
    (["--latent-dim", "100"], "ConfigError: --latent-dim 100 is larger than the number of genes (30)"),
    (["--epochs", "0"], "ConfigError: --epochs must be a whole number >= 1, got 0."),
    (["--seed", "-3"], "ConfigError: --seed must be a whole number in [0, 4294967295], got -3."),
    (["--lr", "1e-9"], "ConfigError: --lr 1e-09 is below the learning-rate floor min_lr=1e-06; give --lr >= 1e-06"),
])
def test_cli_option_errors_name_the_option_and_exit_2(counts_file, tmp_path, options, message):
    result = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(tmp_path / "run"), *options])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "run" / "genailab.json").exists()


def test_cli_data_errors_speak_options_and_exit_1(counts, tmp_path):
    empty = counts.copy()
    dense = empty.X.toarray()
    dense[:5] = 0
    empty.X = sp.csr_matrix(dense)
    path = tmp_path / "empty.h5ad"
    empty.write_h5ad(path)
    result = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert "InputDataError" in result.output and "pass --empty-cells drop to drop them" in result.output
    assert "empty_cells=" not in result.output
    with pytest.raises(InputDataError, match="pass empty_cells='drop' to drop them"):  # the API keeps its names
        VAE(empty, likelihood="nb").fit(epochs=1, progress=False)


def test_embed_speaks_of_align_genes_as_its_flag(counts, counts_file, tmp_path):
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(run), "--epochs", "1",
                                        "--latent-dim", "4", "--hidden", "16"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    query = counts[:, 1:].copy()  # one model gene missing
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    result = CliRunner().invoke(main, ["embed", str(run), str(path), "--out", str(tmp_path / "e.h5ad")])
    assert result.exit_code == 1 and "--align-genes" in result.output and "align_genes=True" not in result.output


def test_evaluate_and_embed_name_their_options_and_the_way_to_new_batches(counts, counts_file, tmp_path):
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(run), "--epochs", "1", "--latent-dim",
                                        "4", "--hidden", "16", "--condition", "batch"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    for option in ("--labels-key", "--batch-key"):
        result = CliRunner().invoke(main, ["evaluate", str(run), str(counts_file), "--out", str(tmp_path / "report"),
                                           option, "kind"])  # fmt: skip
        assert result.exit_code == 2 and f"obs has no column 'kind' (given as {option})" in result.output
    result = CliRunner().invoke(main, ["evaluate", str(run), str(counts_file), "--out", str(tmp_path / "report"),
                                       "--latent-sweep", "0,2"])  # fmt: skip
    assert result.exit_code == 2 and "Invalid value for '--latent-sweep'" in result.output
    n_genes = counts.n_vars  # a size at or above the genes failed after the first sections were written
    for sweep, message in ((f"2,{n_genes}", f"--latent-sweep must be a whole number in [1, {n_genes}), got {n_genes}"),
                           ("2,2", "--latent-sweep 2,2 gives a size more than once")):  # fmt: skip
        result = CliRunner().invoke(main, ["evaluate", str(run), str(counts_file), "--out", str(tmp_path / "sweep"),
                                           "--latent-sweep", sweep])  # fmt: skip
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "sweep").exists()
    new_batch = counts.copy()
    new_batch.obs["batch"] = "batch_9"
    new_batch.write_h5ad(tmp_path / "new.h5ad")
    result = CliRunner().invoke(main, ["embed", str(run), str(tmp_path / "new.h5ad"), "--out", str(tmp_path / "e.h5ad")])
    assert result.exit_code == 1 and "['batch_9']" in result.output and "genailab map" in result.output


def test_option_table_comes_from_the_command_itself():
    @click.command()
    @click.option("--kl-warmup", "kl_warmup_epochs", type=float)
    @click.option("--align-genes", is_flag=True)
    @click.option("--min-lr", "min_lr", type=float)
    @click.option("--lr", type=float)
    def command(kl_warmup_epochs, align_genes, min_lr, lr):
        pass

    message = in_option_terms(
        "kl_warmup_epochs=-1 clashes with min_lr=0.1 and lr; pass align_genes=True or check `lr`.",
        command, argument="lr",
    )  # fmt: skip
    assert message == "--kl-warmup -1 clashes with --min-lr 0.1 and --lr; pass --align-genes or check --lr."
    assert in_option_terms("grad_clip=0 is not an option here", command, argument="grad_clip") == (
        "grad_clip=0 is not an option here"
    )
    assert in_option_terms("name a layer, or lr=None (the default)", command) == "name a layer, or no --lr (the default)"


def test_mapping_arguments_and_a_none_default_are_spelled_as_options():
    @click.command()
    @click.option("--condition", "conditions", multiple=True)
    @click.option("--library-size", "library_size", type=float)
    def command(conditions, library_size):
        pass

    assert in_option_terms("conditions['batch'] = 'b9' is a category the model has not seen", command) == (
        "--condition batch=b9 is a category the model has not seen"
    )
    assert in_option_terms("library_size must be positive. Give a total count or None (the default).", command,
                           argument="library_size") == (  # fmt: skip
        "--library-size must be positive. Give a total count or no --library-size (the default)."
    )


def test_fail_cleanly_exit_codes_follow_the_error_type():
    @click.command()
    @click.option("--kind")
    @fail_cleanly
    def command(kind):
        raise {"config": ConfigError("bad option", argument="kind"), "data": InputDataError("bad data")}[kind]

    assert CliRunner().invoke(command, ["--kind", "config"]).exit_code == 2
    assert CliRunner().invoke(command, ["--kind", "data"]).exit_code == 1


def test_a_nan_loss_from_a_huge_beta_blames_beta_not_the_learning_rate(counts, counts_file, tmp_path):
    model = VAE(counts, likelihood="nb", latent_dim=4, hidden_dims=(16,), beta=1e38)
    with pytest.raises(TrainingDivergedError) as info:
        model.fit(epochs=2, kl_schedule="constant", seed=0, progress=False)
    assert "beta=1e+38" in str(info.value) and "Lower the learning rate" not in str(info.value)
    result = CliRunner().invoke(main, ["train", str(counts_file), "--out", str(tmp_path / "run"), "--epochs", "2",
                                       "--beta", "1e38", "--kl-schedule", "constant"])  # fmt: skip
    assert result.exit_code == 1 and "lower --beta" in result.output and "--beta 1e+38" in result.output


def test_non_integer_counts_name_layer_and_likelihood_as_options(counts, tmp_path):
    fractional = counts.copy()
    fractional.X = fractional.X * 0.5
    path = tmp_path / "fractional.h5ad"
    fractional.write_h5ad(path)
    result = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert "Point --layer at the raw-count layer" in result.output and "--likelihood gaussian" in result.output
    assert "`layer`" not in result.output and "likelihood='gaussian'" not in result.output
    with pytest.raises(InputDataError, match=r"Point `layer` at the raw-count layer.*likelihood='gaussian'"):
        VAE(fractional, likelihood="nb").fit(epochs=1, progress=False)


@pytest.fixture(scope="module")
def fitted(counts):
    return VAE(counts, likelihood="nb", latent_dim=4, hidden_dims=(16,)).fit(epochs=2, seed=0, progress=False)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.sample(0), "n must be a whole number >= 1, got 0."),
    (lambda m: m.sample(2.5), "n must be a whole number >= 1, got 2.5."),
    (lambda m: m.sample(5, library_size=INF), "library_size must be a positive finite number, got inf."),
    (lambda m: m.sample(5, library_size=NAN), "library_size is NaN"),
    (lambda m: m.sample(5, library_size=-10.0), "library_size must be a positive number, got -10."),
    (lambda m: m.sample(5, library_size=1e39), "library_size=1e+39 overflows float32"),
    (lambda m: m.get_normalized_expression(library_size=INF), "library_size must be a positive finite number, got inf."),
    (lambda m: m.get_normalized_expression(library_size=True), "library_size must be a positive number"),
    (lambda m: m.get_normalized_expression(library_size="total"), "or 'observed' (each cell's own total), got 'total'."),
    (lambda m: m.get_normalized_expression(n_samples=0), "n_samples must be a whole number >= 1, got 0."),
    (lambda m: m.get_latent(n_samples=-2), "n_samples must be a non-negative whole number, got -2."),
    (lambda m: m.get_marginal_ll(n_samples=0), "n_samples must be a whole number >= 1, got 0."),
])
def test_model_methods_refuse_nonsense(fitted, call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call(fitted)


def test_valid_library_sizes_scale_the_expression_exactly(fitted):
    """The checks leave valid input alone: expression at library L is L/1e4 times that at 1e4."""
    base = fitted.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(fitted.get_normalized_expression(library_size=np.float32(250.0)), base * 0.025,
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(base.sum(axis=1), 1e4, rtol=1e-4)
