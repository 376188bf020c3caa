"""Commands of the data layer: simulate, convert."""

from __future__ import annotations

from pathlib import Path

import click

from genailab.cli import main
from genailab.cli.common import check_output_file, fail_cleanly, write_h5ad
from genailab.cli.options import argument_default, config_option, hidden_alias
from genailab.data.simulate import PerturbationSpec, simulate
from genailab.errors import ConfigError

IN_MEMORY_VALUES = 50_000_000  # cells x genes up to which the whole dataset (with true means) is built in memory


@main.command("simulate")
@click.option("--n-cells", "n_cells", default=argument_default(simulate, "n_cells"), show_default=True, type=int,
              help="Number of cells.")
@hidden_alias("--cells", "n_cells", type=int)
@click.option("--n-genes", "n_genes", default=argument_default(simulate, "n_genes"), show_default=True, type=int,
              help="Number of genes.")
@hidden_alias("--genes", "n_genes", type=int)
@click.option("--cell-types", "n_cell_types", default=argument_default(simulate, "n_cell_types"), show_default=True, type=int,
              help="Cell types (each with its own marker genes).")
@click.option("--batches", "n_batches", default=argument_default(simulate, "n_batches"), show_default=True, type=int,
              help="Batches (each with its own batch effect).")
@click.option("--likelihood", type=click.Choice(["nb", "zinb"]), default=argument_default(simulate, "likelihood"),
              show_default=True, help="Count noise: negative binomial, or NB with dropout (--dropout).")
@click.option("--dropout", default=argument_default(simulate, "dropout"), show_default=True, type=float,
              help="ZINB zero-inflation probability.")
@click.option("--perturbation", is_flag=True, help="Add a drug/dose arm: obs['drug'], obs['dose'], true drug effects.")
@config_option("--drugs", config=PerturbationSpec, field="n_drugs", help="Drugs of the perturbation arm.")
@config_option("--pair-fraction", config=PerturbationSpec, field="pair_fraction")
@config_option("--interacting-pairs", config=PerturbationSpec, field="interacting_pairs")
@click.option("--seed", default=argument_default(simulate, "seed"), show_default=True, type=int,
              help="Seed of every random draw.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="h5ad to write.")
@fail_cleanly
def simulate_command(n_cells, n_genes, n_cell_types, n_batches, likelihood, dropout, perturbation, n_drugs, pair_fraction,
                     interacting_pairs, seed, out):
    """Write simulated counts with known ground truth to --out.

    Counts come from a low-rank model with cell types, batch effects and NB/ZINB noise; the file
    holds the true latent (obsm['X_true_latent']), cell types and batches (obs), dispersions
    (var['theta']) and all settings (uns['simulation']). Up to 50 million cells x genes the true
    means are stored too (layers['true_mean'], counts also in layers['counts']); larger datasets are
    written chunk by chunk with the counts in X only, ready for `genailab train --backed`.
    """
    from genailab.data.simulate import write_simulated_h5ad
    from genailab.safe_write import atomic_path

    ctx = click.get_current_context()
    arm_options = [flag for name, flag in (("n_drugs", "--drugs"), ("pair_fraction", "--pair-fraction"),
                                           ("interacting_pairs", "--interacting-pairs"))
                   if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if arm_options and not perturbation:
        raise ConfigError(f"{', '.join(arm_options)} shape the drug arm; add --perturbation to simulate one.")
    options = dict(n_cell_types=n_cell_types, n_batches=n_batches, likelihood=likelihood, dropout=dropout, seed=seed,
                   perturbation=PerturbationSpec(n_drugs=n_drugs, pair_fraction=pair_fraction, interacting_pairs=interacting_pairs)
                   if perturbation else None)
    check_output_file(out, suffix=".h5ad")
    if n_cells * n_genes <= IN_MEMORY_VALUES:
        write_h5ad(simulate(n_cells, n_genes, **options), out)
        click.echo(f"Wrote {n_cells} cells x {n_genes} genes with true means to {out}")
    else:
        with atomic_path(out) as tmp:
            write_simulated_h5ad(tmp, n_cells, n_genes, **options)
        click.echo(f"Wrote {n_cells} cells x {n_genes} genes (counts in X, no true means) chunk by chunk to {out}")


@main.command("convert")
@click.argument("data", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="h5ad to write.")
@click.option("--transpose", is_flag=True, help="DATA is a text table with genes in rows and cells in columns.")
@fail_cleanly
def convert_command(data, out, transpose):
    """Write DATA (10x folder or .h5, .loom, or a text table) as an h5ad that every command reads.

    Text tables are read with cells in rows and genes in columns; --transpose reads a genes x cells
    table (the usual layout of a GEO supplementary file).
    """
    from genailab.data.readers import read

    check_output_file(out, suffix=".h5ad", data=data)
    adata = read(data, transpose=transpose)
    write_h5ad(adata, out)
    click.echo(f"Wrote {adata.n_obs} cells x {adata.n_vars} genes to {out} (cells e.g. {list(adata.obs_names[:3])}, "
               f"genes e.g. {list(adata.var_names[:3])})")
