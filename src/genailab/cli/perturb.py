"""Commands of perturbation prediction: ``genailab perturb train | predict | evaluate``."""

from __future__ import annotations

import functools
from pathlib import Path

import click
import pandas as pd

from genailab.cli import main
from genailab.cli.common import (
    CHECKPOINT_FILE, check_output_file, fail_cleanly, read_data, run_folder, unfinished_run, write_csv, write_h5ad,
)
from genailab.anndata_models.perturbation import PerturbationModel
from genailab.cli.options import (
    adversary_options,
    architecture_options,
    argument_default,
    config_option,
    device_option,
    hidden_alias,
    likelihood_option,
    patience_option,
    sizes_option,
    train_options,
)
from genailab.train.config import TrainConfig

HISTORY_FILE = "history.csv"  # per-epoch losses, beside the saved model


def _obs_options(command):
    """--drug-key, --dose-key, --cell-type-key and --control-value, passed on as ``keys`` (an ObsKeys)."""

    @click.option("--drug-key", default="drug", show_default=True, help="obs column of drug labels ('A', 'A+B', control).")
    @click.option("--dose-key", default="dose", show_default=True, help="obs column of doses (>= 0).")
    @click.option("--cell-type-key", default="cell_type", show_default=True, help="obs column of cell types ('' for none).")
    @click.option("--control-value", default="control", show_default=True, help="Drug label of control cells.")
    @functools.wraps(command)
    def wrapper(*args, drug_key, dose_key, cell_type_key, control_value, **kwargs):
        from genailab.perturb import ObsKeys

        keys = ObsKeys(drug=drug_key, dose=dose_key, cell_type=cell_type_key or None, control=control_value)
        return command(*args, keys=keys, **kwargs)

    return wrapper


@main.group()
def perturb() -> None:
    """Predict perturbed expression of control cells under drugs and doses (counterfactuals)."""


@perturb.command("train")
@fail_cleanly
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@_obs_options
@click.option("--covariate-key", "covariate_keys", multiple=True, help="Further categorical obs column (repeatable).")
@hidden_alias("--covariate", "covariate_keys", multiple=True)
@click.option("--layer", default=None, help="adata.layers key with the values to model (default: X).")
@likelihood_option(PerturbationModel.__init__)
@architecture_options("latent_dim", "hidden_dims",
                      defaults={"hidden_dims": argument_default(PerturbationModel.__init__, "hidden_dims")})
@adversary_options(argument_default(PerturbationModel.__init__, "adversary"))
@train_options
@click.option("--overwrite", is_flag=True, help="Replace the model already saved in --out.")
def train_command(data, out, keys, covariate_keys, layer, likelihood, model_options, adversary, train_options, overwrite):
    """Train a perturbation model on DATA (control and treated cells) and save it to --out.

    The adversary keeps the drug out of the basal latent (``--adversary-weight 0`` trains without it).
    """
    with run_folder(out, overwrite=overwrite, names=(HISTORY_FILE, CHECKPOINT_FILE)):
        stale = unfinished_run(out, resume_from=None, overwrite=overwrite)
        adata = read_data(data)
        model = PerturbationModel(
            adata, drug_key=keys.drug, dose_key=keys.dose, cell_type_key=keys.cell_type, control_value=keys.control,
            covariate_keys=list(covariate_keys), layer=layer, likelihood=likelihood, adversary=adversary, **model_options,
        )  # fmt: skip
        config = TrainConfig(**train_options)
        if stale is not None:  # the new run is built: the old run's checkpoint goes
            stale.unlink(missing_ok=True)
        model.fit(config, checkpoint_dir=out if config.checkpoint_every else None)
        model.save(out, overwrite=True)  # the model first: a full disk at the history loses nothing else
        write_csv(pd.DataFrame(model.history), out / HISTORY_FILE, index=False)
    click.echo(f"Trained {len(model.history)} epochs on {adata.n_obs} cells; drugs: {', '.join(model.drugs)}")
    click.echo(f"Model and history.csv in {out}")


@perturb.command("predict")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--drug", required=True, help="Drug, or combination 'A+B', to apply.")
@click.option("--dose", required=True, type=float, help="Dose given to each drug (>= 0).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="h5ad to write.")
@click.option("--cell-type", "cell_types", multiple=True, help="Only control cells of this cell type (repeatable).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampled counts.")
@click.option("--align-genes", is_flag=True, help="Fill genes missing from DATA with zeros instead of failing.")
@device_option
@fail_cleanly
def predict_command(run_dir, data, drug, dose, out, cell_types, seed, align_genes, device):
    """Write the counterfactual expression of DATA's control cells under --drug at --dose.

    Only control cells are read (their obs drug label equals the model's control value); the
    result has one predicted cell per control cell: X the expected expression,
    layers['sampled'] one draw, obs the drug, dose and cell type.
    """
    from genailab.data.perturbation_schema import require_control_labels
    from genailab.errors import InputDataError

    check_output_file(out, suffix=".h5ad", data=data)  # fail before the work, not after
    model = PerturbationModel.load(run_dir, device=device)
    adata = read_data(data)
    keys = model.keys
    require_control_labels(adata.obs, keys)
    adata = adata[keys.is_control(adata.obs)]
    if cell_types:
        adata = adata[adata.obs[keys.cell_type].astype(str).isin(cell_types).to_numpy()]
    if adata.n_obs == 0:
        where = f" of cell type {', '.join(cell_types)}" if cell_types else ""
        raise InputDataError(
            f"{data} has no control cells{where} (obs[{keys.drug!r}] == {keys.control!r}); "
            "predictions perturb control cells."
        )
    predicted = model.predict(adata, drug=drug, dose=dose, seed=seed, align_genes=align_genes)
    write_h5ad(predicted, out)
    click.echo(f"Wrote {predicted.n_obs} counterfactual cells ({drug} at dose {dose:g}) to {out}")


@perturb.command("evaluate")
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV of per-group scores; the summary goes beside it as *_summary.csv. Both are rewritten "
                   "as each protocol finishes.")
@_obs_options
@click.option("--layer", default=None, help="adata.layers key with raw counts (default: X).")
@click.option("--protocol", "protocols", multiple=True,
              type=click.Choice(["combination", "dose", "dose_extrapolation", "pair", "cell_type"]),
              help="Held-out protocol (repeatable; default every one the data allow).")
@click.option("--n-groups", default=None, type=int, help="Drugs (or pairs) to hold out per protocol (default all).")
@click.option("--latent-dim", default=10, show_default=True, type=int)
@click.option("--hidden", "hidden_dims", default=None, callback=sizes_option,
              help="Hidden layer sizes, comma-separated (default: the model's).")
@click.option("--likelihood", type=click.Choice(["nb", "zinb"]), show_default=True,
              default=argument_default(PerturbationModel.__init__, "likelihood"), help="Count likelihood of the neural methods.")
@click.option("--epochs", default=100, show_default=True, type=int)
@config_option("--batch-size", config=TrainConfig, field="batch_size", help="Cells per minibatch.")
@config_option("--lr", config=TrainConfig, field="lr", help="Learning rate.")
@patience_option()
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@fail_cleanly
def evaluate_command(data, out, keys, layer, protocols, n_groups, latent_dim, hidden_dims, likelihood, epochs, batch_size, lr,
                     early_stopping_patience, seed, device):
    """Hold out groups of DATA, retrain the model and the baselines without them, and score each method.

    Protocols: combination (unseen cell type x drug, every dose), dose (unseen middle dose),
    dose_extrapolation (unseen highest dose), pair (unseen drug pairs), cell_type (unseen cell
    type). Baselines: no change, perturbed mean, additive shift, matching mean (pairs), ridge on
    covariates, scGen latent arithmetic. A seeded third of each cell type's control cells is kept
    as the reference: no method trains on it or perturbs it, and the true change of a held-out
    group is measured from its mean (a prediction's change from the controls it was made from), so
    that no method shares the truth's control-sample error. Every split is checked before any training.
    """
    from genailab.checks import check_number
    from genailab.errors import ConfigError
    from genailab.perturb import compare_methods, default_methods, format_table, holdout_split, summarize

    # checked once here: each protocol's split would refuse it, and without --protocol be skipped
    check_number("n_groups", n_groups, integer=True, ge=1, allow_none=True, hint="Leave it out to hold out every group.")
    check_output_file(out, suffix=".csv")  # fail before the work, not after
    summary_path = check_output_file(out.with_name(out.stem + "_summary.csv"))
    adata = read_data(data)
    splits = []
    for protocol in protocols or ("combination", "dose", "dose_extrapolation", "pair", "cell_type"):
        try:
            splits.append(holdout_split(adata.obs, protocol, keys=keys, n_groups=n_groups, seed=seed))
        except ConfigError as exc:
            if protocols:  # asked for by name: a real error, raised before anything is trained
                raise
            click.echo(f"Skipping protocol {protocol!r}: {exc}")
    if not splits:
        raise ConfigError("No protocol applies to these data; see `genailab perturb evaluate --help`.")
    train_options = dict(epochs=epochs, batch_size=batch_size, lr=lr, early_stopping_patience=early_stopping_patience,
                         seed=seed, progress=False, device=device)
    tables = []
    for split in splits:
        methods = default_methods(latent_dim=latent_dim, hidden_dims=hidden_dims, likelihood=likelihood, train_options=train_options,
                                  pairs=split.protocol == "pair")  # fmt: skip
        tables.append(compare_methods(adata, split, keys=keys, layer=layer, methods=methods, seed=seed))
        table = pd.concat(tables, ignore_index=True)
        write_csv(table, out, index=False)
        write_csv(summarize(table), summary_path)
        click.echo(f"{split.protocol}: {len(split.groups)} groups held out; scores so far in {out}", err=True)
    click.echo(format_table(table))
    click.echo(f"Per-group scores in {out}")
