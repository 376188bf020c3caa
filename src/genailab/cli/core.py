"""Commands of the core library: train, embed, demo."""

from __future__ import annotations

from pathlib import Path

import click
from genailab.cli import main
from genailab.cli.common import (
    CHECKPOINT_FILE,
    KeepsArguments,
    check_output_file,
    fail_cleanly,
    fit_in_run_folder,
    read_data,
    run_folder,
    unfinished_run,
    write_h5ad,
)
from genailab import __version__
from genailab.apps._anndata import check_key_added
from genailab.anndata_models.base import storable_params
from genailab.anndata_models.files import model_fingerprint
from genailab.anndata_models.vae import VAE
from genailab.cli.options import (
    architecture_options,
    argument_default,
    device_option,
    hidden_alias,
    likelihood_option,
    train_options,
)
from genailab.data.validation import EMPTY_CELL_ACTIONS
from genailab.errors import ConfigError


@main.command(cls=KeepsArguments)
@fail_cleanly
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@likelihood_option(VAE.__init__)
@click.option("--layer", default=None, help="adata.layers key with the values to model (default: X).")
@click.option("--condition-key", "condition_keys", multiple=True, help="Categorical obs column to condition on (repeatable).")
@hidden_alias("--condition", "condition_keys", multiple=True)
@click.option("--continuous-key", "continuous_keys", multiple=True, help="Numeric obs column to condition on (repeatable).")
@hidden_alias("--continuous", "continuous_keys", multiple=True)
@architecture_options("latent_dim", "hidden_dims", "dispersion", "beta")
@train_options
@click.option("--resume", "resume_from", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Checkpoint to resume from.")
@click.option("--empty-cells", type=click.Choice(EMPTY_CELL_ACTIONS), default=argument_default(VAE.__init__, "empty_cells"), show_default=True,
              help="What to do with cells whose counts are all zero.")
@click.option("--backed", is_flag=True, help="Keep an h5ad's X on disk and stream it in chunks (data larger than memory; layers are read whole).")
@click.option("--overwrite", is_flag=True, help="Replace the model (and start afresh over a checkpoint) already in --out.")
def train(data, out, likelihood, layer, condition_keys, continuous_keys, model_options, train_options, resume_from,
          empty_cells, backed, overwrite):
    """Train a conditional VAE on DATA (h5ad, 10x, loom, csv) and save it to --out.

    Ctrl-C or SIGTERM keeps the last finished epoch as --out/checkpoint.pt and prints the command
    that resumes from it.
    """
    from genailab import TrainConfig
    from genailab.report.run_folder import RUN_FILES, write_run
    from genailab.train.distributed import distributed_context

    is_main = distributed_context().is_main  # under torchrun, rank 0 alone writes the run
    # resuming from the run folder's own checkpoint continues that run: its model is the one to replace
    continues_own_run = resume_from is not None and Path(resume_from).resolve() == (Path(out) / CHECKPOINT_FILE).resolve()
    with run_folder(out, overwrite=overwrite or continues_own_run, names=(*RUN_FILES, CHECKPOINT_FILE), lock=is_main):
        stale = unfinished_run(out, resume_from=resume_from, overwrite=overwrite) if is_main else None
        adata = read_data(data, backed=backed)
        model = VAE(adata, likelihood=likelihood, layer=layer, condition_keys=list(condition_keys),
                    continuous_keys=list(continuous_keys), empty_cells=empty_cells, **model_options)
        config = TrainConfig(**train_options)
        if stale is not None:  # the new run is built: the old run's checkpoint goes
            stale.unlink(missing_ok=True)
        fit_in_run_folder(model, config, out=out, resume_from=resume_from)
        if not is_main:
            return
        write_run(model, out)
        last = model.history[-1]
        monitored = last.get("val_elbo_loss", last["train_elbo_loss"])
        click.echo(f"Trained {len(model.history)} epochs; final negative ELBO {monitored:.2f} per cell.")
        click.echo(f"Model, history.csv and training_curves.png in {out}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="h5ad to write.")
@click.option("--key", default="X_genailab", show_default=True, help="obsm key for the latent.")
@click.option("--align-genes", is_flag=True, help="Fill genes missing from DATA with zeros instead of failing.")
@device_option
@fail_cleanly
def embed(run_dir, data, out, key, align_genes, device):
    """Write the latent posterior means of DATA's cells to obsm[KEY] of --out."""
    from genailab import VAE

    check_output_file(out, suffix=".h5ad", data=data)  # fail before the work, not after
    check_key_added(key, None, where="obsm", argument="key")
    adata = read_data(data)
    model = VAE.load(run_dir, adata, device=device)
    adata.obsm[key] = model.get_latent(adata, align_genes=align_genes)
    adata.uns[key] = {"params": storable_params({
        "model": str(Path(run_dir).resolve()), "model_sha256": model_fingerprint(run_dir), "latent": "posterior mean",
        "latent_dim": model.config.latent_dim, "likelihood": model.config.likelihood, "layer": model.schema.layer,
        "align_genes": align_genes, "genailab_version": __version__,
    })}  # fmt: skip
    write_h5ad(adata, out)
    click.echo(f"Wrote {adata.n_obs} x {adata.obsm[key].shape[1]} latent to obsm[{key!r}] of {out}")


@main.command()
@click.option("--out", "out", default="genailab_runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=150, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@click.option("--overwrite", is_flag=True, help="Replace the demo model already saved in --out/model.")
@fail_cleanly
def demo(out, epochs, seed, device, overwrite):
    """Train an NB model on the embedded PBMC counts, embed, cluster, and report."""
    from genailab.cli.demo import run_demo

    if epochs < 1:
        raise ConfigError("--epochs must be positive.")
    summary = run_demo(out, epochs=epochs, seed=seed, device=device, overwrite=overwrite)
    for line in summary:
        click.echo(line)
