"""Commands of the core library: train, embed, demo."""

from __future__ import annotations

from pathlib import Path

import click
from genailab.cli import main
from genailab.cli.common import fail_cleanly, read_data
from genailab.report.run_folder import write_run
from genailab.errors import ConfigError
from genailab.train.distributed import distributed_context


def _hidden(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated sizes like 128,128, got {value!r}") from exc
    if not dims:
        raise click.BadParameter("give at least one hidden size")
    return dims


@main.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--model", "likelihood", type=click.Choice(["gaussian", "nb", "zinb"]), default="nb", show_default=True,
              help="Decoder likelihood: gaussian for log-normalised data, nb/zinb for raw counts.")
@click.option("--layer", default=None, help="adata.layers key with the values to model (default: X).")
@click.option("--condition", "condition_keys", multiple=True, help="Categorical obs column to condition on (repeatable).")
@click.option("--continuous", "continuous_keys", multiple=True, help="Numeric obs column to condition on (repeatable).")
@click.option("--latent-dim", default=10, show_default=True, type=int)
@click.option("--hidden", "hidden_dims", default="128,128", show_default=True, help="Hidden layer sizes, comma-separated.")
@click.option("--dispersion", type=click.Choice(["gene", "gene-condition", "gene-cell"]), default="gene", show_default=True)
@click.option("--epochs", default=100, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--beta", default=1.0, show_default=True, type=float, help="Weight of the KL term (beta-VAE).")
@click.option("--kl-warmup", "kl_warmup_epochs", default=10.0, show_default=True, type=float, help="Epochs of linear KL warm-up.")
@click.option("--kl-schedule", type=click.Choice(["constant", "linear", "cyclical"]), default="linear", show_default=True)
@click.option("--validation-fraction", default=0.1, show_default=True, type=float)
@click.option("--patience", "early_stopping_patience", default=20, show_default=True, type=click.IntRange(min=0),
              help="Stop after this many epochs without validation improvement; 0 disables early stopping.")
@click.option("--checkpoint-every", default=0, show_default=True, type=int, help="Write a resumable checkpoint every N epochs.")
@click.option("--resume", "resume_from", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Checkpoint to resume from.")
@click.option("--empty-cells", type=click.Choice(["error", "drop", "warn"]), default="error", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--backed", is_flag=True, help="Keep an h5ad's X on disk and stream it in chunks (data larger than memory; layers are read whole).")
@fail_cleanly
def train(data, out, likelihood, layer, condition_keys, continuous_keys, latent_dim, hidden_dims, dispersion, epochs,
          batch_size, lr, beta, kl_warmup_epochs, kl_schedule, validation_fraction, early_stopping_patience,
          checkpoint_every, resume_from, empty_cells, seed, device, backed):
    """Train a conditional VAE on DATA (h5ad, 10x, loom, csv) and save it to --out."""
    from genailab import VAE, TrainConfig
    from genailab.anndata_models.files import check_writable

    check_writable(out)  # fail before training, not after
    adata = read_data(data, backed=backed)
    model = VAE(adata, likelihood=likelihood, layer=layer, condition_keys=list(condition_keys),
                continuous_keys=list(continuous_keys), latent_dim=latent_dim, hidden_dims=_hidden(hidden_dims),
                dispersion=dispersion, beta=beta, empty_cells=empty_cells)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, kl_warmup_epochs=kl_warmup_epochs,
                         kl_schedule=kl_schedule, validation_fraction=validation_fraction,
                         early_stopping_patience=early_stopping_patience or None,  # the API's None disables
                         checkpoint_every=checkpoint_every,
                         seed=seed, device=device)
    model.fit(config, checkpoint_dir=out, resume_from=resume_from)
    if not distributed_context().is_main:
        return  # under torchrun, rank 0 alone writes the run
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
@fail_cleanly
def embed(run_dir, data, out, key, align_genes):
    """Write the latent posterior means of DATA's cells to obsm[KEY] of --out."""
    from genailab import VAE

    adata = read_data(data)
    model = VAE.load(run_dir, adata)
    adata.obsm[key] = model.get_latent(adata, align_genes=align_genes)
    adata.write_h5ad(out)
    click.echo(f"Wrote {adata.n_obs} x {adata.obsm[key].shape[1]} latent to obsm[{key!r}] of {out}")


@main.command()
@click.option("--out", "out", default="genailab_runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", default=150, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@fail_cleanly
def demo(out, epochs, seed):
    """Train an NB model on the embedded PBMC counts, embed, cluster, and report."""
    from genailab.cli.demo import run_demo

    if epochs < 1:
        raise ConfigError("--epochs must be positive.")
    summary = run_demo(out, epochs=epochs, seed=seed)
    for line in summary:
        click.echo(line)
