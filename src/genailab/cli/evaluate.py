"""The evaluate command: metrics, figures and an HTML report for a trained run."""

from __future__ import annotations

from pathlib import Path

import click

from genailab.cli import main
from genailab.cli.options import device_option, hidden_alias
from genailab.cli.common import fail_cleanly, output_folder, read_data
from genailab.safe_write import FolderLock, check_output_folder


def _sizes(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated latent sizes like 2,5,10, got {value!r}",
                                 param_hint="'--latent-sweep'") from exc
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"latent sizes must be positive whole numbers, got {value!r}", param_hint="'--latent-sweep'")
    return sizes


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder to write.")
@click.option("--labels-key", "label_key", default=None, help="obs column of known cell types (ARI/NMI, silhouette, DE check).")
@hidden_alias("--label-key", "label_key")
@click.option("--batch-key", default=None, help="obs column of batches (kNN batch entropy, iLISI, batch silhouette).")
@click.option("--latent-sweep", "latent_dims", default=None, callback=_sizes,
              help="Latent sizes to retrain and compare, e.g. 2,5,10.")
@click.option("--sweep-epochs", default=None, type=click.IntRange(min=1), help="Epochs per retrained model (default: the run's).")
@click.option("--imputation", is_flag=True, help="Also run scVI's imputation protocol (hide 10% of counts, retrain).")
@click.option("--n-samples", default=100, show_default=True, type=click.IntRange(min=1),
              help="Importance samples K for the held-out marginal log-likelihood.")
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@fail_cleanly
def evaluate(run_dir, data, out, label_key, batch_key, latent_dims, sweep_epochs, imputation, n_samples, seed, device):
    """Evaluate the model in RUN_DIR on DATA: metrics.json, PNG figures and index.html in --out."""
    from genailab import VAE
    from genailab.report import write_report
    from genailab.report.evaluate import REPORT_FILES

    with output_folder(out), FolderLock(check_output_folder(out, names=REPORT_FILES)):  # fail before the work
        adata = read_data(data)
        model = VAE.load(run_dir, adata, device=device)
        metrics = write_report(
            adata, model, out, label_key=label_key, batch_key=batch_key, latent_dims=latent_dims,
            sweep_epochs=sweep_epochs, imputation=imputation, n_samples=n_samples, seed=seed, data_path=data,
        )
    likelihood = metrics["likelihood"]
    click.echo(
        f"Held-out ({metrics['run']['held_out_cells']}, {metrics['run']['n_held_out']}): negative ELBO "
        f"{likelihood['negative_elbo']:.2f}, log-likelihood (IWAE, K={n_samples}) {likelihood['marginal_ll']:.2f} per cell."
    )
    if "ari" in metrics["latent"]:
        latent = metrics["latent"]
        click.echo(f"Leiden on the latent vs {label_key}: ARI {latent['ari']:.3f}, NMI {latent['nmi']:.3f} at resolution "
                   f"{latent['resolution']:g}; best of scIB's sweep: ARI {latent['best_ari']:.3f}, NMI "
                   f"{latent['best_nmi']:.3f} at resolution {latent['best_resolution']:g}.")  # fmt: skip
    click.echo(f"Report in {out}: index.html, metrics.json and PNG figures.")
