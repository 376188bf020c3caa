"""Commands of the applications: denoise, generate, integrate, cluster, de (thin over genailab.apps)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from genailab.cli import main
from genailab.cli.common import (
    CHECKPOINT_FILE, INTEGRATED_FILE, check_output_file, fail_cleanly, read_data, run_folder, unfinished_run,
    write_csv, write_h5ad,
)
from genailab.apps.integrate import check_scorable, integrate as integrate_batches
from genailab.cli.options import (
    adversary_options,
    architecture_options,
    argument_default,
    device_option,
    hidden_alias,
    likelihood_option,
    train_options,
)
from genailab.report.run_folder import RUN_FILES, write_run
from genailab.errors import ConfigError, SchemaMismatchError

_RUN = click.Path(exists=True, file_okay=False, path_type=Path)
_DATA = click.Path(exists=True, dir_okay=True, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


def _conditions(pairs: tuple[str, ...], model) -> dict[str, object]:
    """``("batch=b0", "dose=1")`` -> ``{"batch": "b0", "dose": 1.0}`` (continuous conditions as numbers)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--condition takes KEY=VALUE, got {pair!r}.")
        if key in values:
            raise ConfigError(f"--condition gives {key} twice ({key}={values[key]} and {pair}); give each key once "
                              "(one value per run: run the command again for another).")  # fmt: skip
        try:
            values[key] = float(value) if key in model.schema.continuous_keys else value
        except ValueError as exc:
            raise ConfigError(f"--condition {pair!r}: {key} is continuous and needs a number.") from exc
    return values


def _load(run_dir: Path, data: Path | None, device: str = "auto"):
    """The saved model and (optionally) the data subset to the model's genes in the model's order."""
    from genailab import VAE

    adata = None if data is None else read_data(data)
    model = VAE.load(run_dir, adata, device=device)
    if adata is not None and list(map(str, adata.var_names)) != list(model.schema.gene_names):
        missing = sorted(set(model.schema.gene_names) - set(map(str, adata.var_names)))
        if missing:
            raise SchemaMismatchError(f"{len(missing)} of the model's genes are not in {data} (e.g. {missing[:5]}).")
        extra = adata.n_vars - len(model.schema.gene_names)
        if extra:
            click.echo(f"Warning: {extra} of {data}'s {adata.n_vars} genes are not the model's and are left out of "
                       f"--out (it holds the model's {len(model.schema.gene_names)} genes).", err=True)  # fmt: skip
        adata = adata[:, list(model.schema.gene_names)].copy()
        model.adata = adata
    return model, adata


def _library(value: str) -> float | str:
    if value == "observed":
        return value
    try:
        return float(value)
    except ValueError as exc:
        raise ConfigError(f"--library-size takes 'observed' or a number, got {value!r}.") from exc


@main.command()
@click.argument("run_dir", type=_RUN)
@click.argument("data", type=_DATA)
@click.option("--out", required=True, type=_OUT, help="h5ad to write.")
@click.option("--key", "key_added", default="genailab_denoised", show_default=True, help="Layer for the denoised expression.")
@click.option(
    "--library-size",
    default="observed",
    show_default=True,
    help="'observed' (each cell's total) or a number, e.g. 10000.",
)
@click.option("--include-dropout", is_flag=True, help="ZINB: include the dropout probability in the mean.")
@click.option(
    "--condition", "conditions", multiple=True, help="KEY=VALUE: decode every cell under this condition (repeatable)."
)
@click.option(
    "--n-samples", default=1, show_default=True, type=int, help="Posterior draws averaged (1: the posterior mean)."
)
@device_option
@fail_cleanly
def denoise(run_dir, data, out, key_added, library_size, include_dropout, conditions, n_samples, device):
    """Write the model's expected expression of DATA's cells to a layer of --out."""
    from genailab.apps import denoise as denoise_cells

    check_output_file(out, suffix=".h5ad", data=data)  # fail before the work, not after
    model, adata = _load(run_dir, data, device)
    denoise_cells(adata, model, key_added=key_added, library_size=_library(library_size), include_dropout=include_dropout,
                  conditions=_conditions(conditions, model) or None, n_samples=n_samples)  # fmt: skip
    write_h5ad(adata, out)
    click.echo(f"Wrote denoised expression of {adata.n_obs} cells x {adata.n_vars} genes to layers[{key_added!r}] of {out}")


@main.command()
@click.argument("run_dir", type=_RUN)
@click.option("--n-cells", "n_cells", type=int, help="Cells to generate.  [required]")
@hidden_alias("--n", "n_cells", type=int)
@click.option("--condition", "conditions", multiple=True, help="KEY=VALUE condition of the new cells (repeatable).")
@click.option("--out", required=True, type=_OUT, help="h5ad to write.")
@click.option(
    "--source",
    type=click.Choice(["prior", "posterior"]),
    default="prior",
    show_default=True,
    help="Draw z from the prior, or from the posteriors of real cells matching the conditions (needs --data).",
)
@click.option("--data", type=_DATA, help="Real cells: posterior latents and library sizes.")
@click.option(
    "--library-size",
    type=float,
    help="Total count per new cell (default: resampled from --data, else the training median).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@fail_cleanly
def generate(run_dir, n_cells, conditions, out, source, data, library_size, seed, device):
    """Generate --n-cells cells with the given conditions from a trained model; counts in X of --out."""
    if n_cells is None:
        raise click.UsageError("Missing option '--n-cells'.")
    from genailab.apps import generate as generate_cells

    if source == "posterior" and data is None:
        raise ConfigError("--source posterior encodes real cells; pass them with --data DATA.h5ad.")
    check_output_file(out, suffix=".h5ad", data=data)
    model, adata = _load(run_dir, data, device)
    generated = generate_cells(adata, model, n_cells=n_cells, conditions=_conditions(conditions, model), source=source,
                               library_size=library_size, seed=seed)  # fmt: skip
    write_h5ad(generated, out)
    click.echo(f"Wrote {generated.n_obs} generated cells x {generated.n_vars} genes ({source}) to {out}")


@main.command()
@fail_cleanly
@click.argument("data", type=_DATA)
@click.option("--batch-key", "batch_key", help="obs column of the batch to correct.  [required]")
@hidden_alias("--batch", "batch_key")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder: model and integrated.h5ad.")
@click.option("--layer", default=None, help="adata.layers key with the raw counts (default: X).")
@likelihood_option(integrate_batches)
@click.option(
    "--covariate-key", "covariate_keys", multiple=True, help="Further categorical obs column to condition on (repeatable)."
)
@hidden_alias("--covariate", "covariate_keys", multiple=True)
@adversary_options(argument_default(integrate_batches, "adversary"))
@click.option("--reference-batch", default=None, help="Batch every cell is decoded into (default: the largest).")
@click.option("--labels-key", "label_key", default=None, help="obs column of known cell types: also report their conservation.")
@hidden_alias("--labels", "label_key")
@architecture_options("latent_dim", "hidden_dims")
@functools.partial(train_options, checkpoints=False)  # integrate writes no checkpoint to resume from
@click.option("--overwrite", is_flag=True, help="Replace the model already saved in --out.")
def integrate(data, batch_key, out, layer, likelihood, covariate_keys, adversary, reference_batch, label_key, model_options,
              train_options, overwrite):
    """Batch-correct DATA with an adversarial CVAE; model, corrected latent and expression in --out."""
    if batch_key is None:
        raise click.UsageError("Missing option '--batch-key'.")
    from genailab.apps import integration_scores
    from genailab.train.config import TrainConfig

    with run_folder(out, overwrite=overwrite, names=(*RUN_FILES, INTEGRATED_FILE, CHECKPOINT_FILE)):
        stale = unfinished_run(out, resume_from=None, overwrite=overwrite)
        adata = read_data(data)
        check_scorable(adata, batch_key=batch_key, label_key=label_key)  # before training: the scores come after it
        if stale is not None:  # integrate writes no checkpoint: another run's would be taken for this one's
            stale.unlink(missing_ok=True)
        model = integrate_batches(
            adata, batch_key=batch_key, layer=layer, likelihood=likelihood, covariate_keys=list(covariate_keys),
            adversary=adversary, reference_batch=reference_batch, train=TrainConfig(**train_options), **model_options,
        )  # fmt: skip
        write_run(model, out)
        write_h5ad(adata, out / INTEGRATED_FILE)
        scores = integration_scores(adata, batch_key=batch_key, label_key=label_key, seed=train_options["seed"])
        click.echo(f"Trained {len(model.history)} epochs; corrected latent in obsm['X_genailab_integrated'], expression "
                   f"decoded into batch {adata.uns['X_genailab_integrated']['params']['reference_batch']!r} in "
                   f"layers['genailab_corrected'] of {out / 'integrated.h5ad'}")  # fmt: skip
        click.echo("Scores (1 best): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))


@main.command()
@click.argument("run_dir", type=_RUN)
@click.argument("data", type=_DATA)
@click.option("--out", required=True, type=_OUT, help="h5ad to write.")
@click.option("--resolution", default=1.0, show_default=True, type=float, help="Leiden resolution.")
@click.option("--n-neighbors", default=15, show_default=True, type=int)
@click.option("--labels-key", "labels_key", default=None, help="obs column of known cell types: plotted, and ARI/NMI reported.")
@hidden_alias("--labels", "labels_key")
@click.option("--plot", type=_OUT, help="UMAP PNG to write (default: next to --out, <name>_umap.png).")
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@fail_cleanly
def cluster(run_dir, data, out, resolution, n_neighbors, labels_key, plot, seed, device):
    """Latent, neighbours, UMAP, Leiden clusters and marker genes of DATA's cells, written to --out."""
    import scanpy as sc

    from genailab.apps import cluster as cluster_cells

    plot = plot or out.with_name(f"{out.stem}_umap.png")
    check_output_file(out, suffix=".h5ad", data=data)
    check_output_file(plot, suffix=".png", option="--plot")
    model, adata = _load(run_dir, data, device)
    cluster_cells(adata, model, resolution=resolution, n_neighbors=n_neighbors, plot=plot,
                  color=[labels_key] if labels_key else (), labels_key=labels_key, seed=seed)  # fmt: skip
    write_h5ad(adata, out)
    markers = sc.get.rank_genes_groups_df(adata, group=None)
    click.echo(f"{adata.obs['leiden'].nunique()} Leiden clusters in obs['leiden'] of {out}; UMAP in {plot}")
    for group, table in markers.groupby("group", observed=True):
        click.echo(
            f"  cluster {group} ({int((adata.obs['leiden'] == group).sum())} cells): {', '.join(table['names'][:5])}"
        )
    if labels_key:
        scores = adata.uns["leiden"]["scores"]
        click.echo(f"Against obs[{labels_key!r}]: ARI {scores['ari']:.3f}, NMI {scores['nmi']:.3f} at resolution "
                   f"{scores['resolution']:g}; best of scIB's sweep 0.1..2.0: ARI {scores['best_ari']:.3f}, NMI "
                   f"{scores['best_nmi']:.3f} at resolution {scores['best_resolution']:g} "
                   f"({scores['best_n_clusters']} clusters)")  # fmt: skip


@main.command()
@click.argument("run_dir", type=_RUN)
@click.argument("data", type=_DATA)
@click.option("--groupby", required=True, help="obs column of the groups.")
@click.option("--group", required=True, help="Group of interest (positive LFC = higher here).")
@click.option("--reference", default="rest", show_default=True, help="Group to compare against, or 'rest'.")
@click.option("--out", required=True, type=_OUT, help="CSV table to write.")
@click.option("--delta", default=0.25, show_default=True, type=float, help="Smallest |log2 fold change| that counts.")
@click.option("--fdr", "fdr_target", default=0.05, show_default=True, type=float, help="Posterior expected FDR of the call list.")
@click.option(
    "--level",
    type=click.Choice(["cell", "group"]),
    default="cell",
    show_default=True,
    help="LFC between random pairs of single cells (scVI change mode) or between the groups' mean expression.",
)
@click.option("--n-samples", "n_samples_per_cell", type=int,
              help="Posterior draws per cell (default 5 for cell, 100 for group level).")
@click.option("--max-cells", default=500, show_default=True, type=int, help="Cells drawn per group at most.")
@click.option("--n-pairs", default=5000, show_default=True, type=int, help="Random pairs of draws across the groups.")
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@fail_cleanly
def de(run_dir, data, groupby, group, reference, out, delta, fdr_target, level, n_samples_per_cell, max_cells, n_pairs,
       seed, device):
    """Differential expression of --group vs --reference from the model's posterior (scVI change mode)."""
    from genailab.apps import differential_expression

    check_output_file(out, suffix=".csv", data=data)
    model, adata = _load(run_dir, data, device)
    table = differential_expression(adata, model, groupby=groupby, group=group, reference=reference, delta=delta,
                                    fdr_target=fdr_target, level=level, n_samples_per_cell=n_samples_per_cell,
                                    max_cells=max_cells,
                                    n_pairs=n_pairs, seed=seed)  # fmt: skip
    write_csv(table, out)
    called = table[table["is_de_fdr"]]
    click.echo(
        f"{len(called)} of {len(table)} genes differ by |log2 FC| > {delta} at expected FDR {fdr_target}; table in {out}"
    )
    for gene, row in called.head(10).iterrows():
        click.echo(f"  {gene}: log2 FC {row['lfc_mean']:+.2f}, P(DE) {row['proba_de']:.3f}")
