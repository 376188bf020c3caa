"""``genailab map``: put a query dataset into a trained model's latent space and transfer its labels."""

from __future__ import annotations

from pathlib import Path

import click

from genailab.anndata_models.mapping import ENCODER_ANCHOR, ENCODER_STARTS, START_LATENT_SPREAD, aligned_query, map_query
from genailab.apps.transfer import reference_labels, transfer_labels
from genailab.cli import main
from genailab.cli.common import (
    CHECKPOINT_FILE, MAPPED_FILE, UMAP_FILE, check_output_file, fail_cleanly, fit_in_run_folder, is_same_file,
    read_data, run_folder, unfinished_run, write_h5ad,
)
from genailab.cli.options import argument_default, hidden_alias
from genailab.errors import ConfigError, InputDataError
from genailab.model.surgery import UNFREEZE

LATENT_KEY = "X_genailab"


@main.command(name="map")
@fail_cleanly
@click.argument("ref_run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("query", type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder: query model, query.h5ad, umap.png.")
@click.option("--reference-data", type=click.Path(exists=True, dir_okay=True, path_type=Path),
              help="The reference's cells: drawn beside the query and, with --labels-key, the labels to transfer.")
@click.option("--labels-key", "label_key", default=None,
              help="obs column of --reference-data with the labels (cell types) to transfer.")
@hidden_alias("--label-key", "label_key")
@click.option("--unfreeze", type=click.Choice(UNFREEZE), default=argument_default(map_query, "unfreeze"), show_default=True,
              help="What learns: the new categories' parameters, also the encoder's first layer, also the whole encoder, or everything.")
@click.option("--encoder-start", type=click.Choice(ENCODER_STARTS), default=argument_default(map_query, "encoder_start"),
              show_default=True,
              help="Where the new batch's encoder column starts: shifted onto the reference clusters of its mutual nearest reference cells (neighbours, "
                   "needs --reference-data), the same then matched per cluster in the latent (latent, for a query that spreads less, "
                   "e.g. shallower), the mean of the reference's, or the reference's batch-norm mean; auto: "
                   f"neighbours with --reference-data, refined as latent when the query spreads in the latent under "
                   f"{START_LATENT_SPREAD:.2g} times as much as the reference; else mean.")
@click.option("--encoder-stage/--no-encoder-stage", default=None,
              help="Train the new encoder columns after the decoder's, or hold them at their start (default: train them, "
                   "except after a latent start).")
@click.option("--encoder-anchor", type=click.FloatRange(min=0), default=argument_default(map_query, "encoder_anchor"),
              help="How strongly the encoder stage pulls a column started from the reference's cells back toward its start, "
                   f"in units of a Gaussian prior with the start's standard error; 0: the ELBO alone (default: {ENCODER_ANCHOR:g} "
                   "where it applies).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Fine-tuning epochs of each stage (default: from the query size).")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the query model's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-missing-fraction", type=click.FloatRange(0, 1), show_default=True,
              default=argument_default(map_query, "max_missing_fraction"),
              help="Largest share of the reference's genes the query may lack (they are filled with zeros).")
@click.option("--n-neighbors", type=click.IntRange(min=1), show_default=True,
              default=argument_default(transfer_labels, "n_neighbors"), help="Reference cells voting for each query cell.")
@click.option("--unknown-threshold", type=click.FloatRange(0, 1), show_default=True,
              default=argument_default(transfer_labels, "unknown_threshold"),
              help="Cells whose label uncertainty is above this are called 'unknown'.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace the query model already saved in --out.")
def map_command(ref_run, query, out, reference_data, label_key, unfreeze, encoder_start, encoder_stage, encoder_anchor, epochs, lr, seed,
                max_missing_fraction, n_neighbors, unknown_threshold, device, overwrite):
    """Map QUERY onto the model in REF_RUN: train only the query's new batches, embed, transfer labels.

    The new batches' decoder parameters learn first, then (unless held at their start) their encoder
    parameters (--epochs each).

    Writes the query model to --out (it records REF_RUN and the hashes of its files; REF_RUN is never
    modified), --out/query.h5ad with obsm['X_genailab'] (and the transferred labels), and with
    --reference-data --out/umap.png of both datasets.
    """
    from genailab import VAE
    from genailab.report.figures import plot_latent_umap
    from genailab.report.run_folder import RUN_FILES, write_run

    if label_key is not None and reference_data is None:
        raise ConfigError("`label_key` needs the reference's cells: pass `reference_data` (REF.h5ad) as well.")
    if out.resolve() == ref_run.resolve() or ref_run.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} is REF_RUN or inside it; the reference run is never modified: choose "
                          "another --out folder.")  # fmt: skip
    for name, data in (("QUERY", query), ("--reference-data", reference_data)):
        if data is not None and is_same_file(out / MAPPED_FILE, data):
            raise ConfigError(f"{name} {data} is the file --out {out} writes the mapped query to ({MAPPED_FILE}); "
                              "choose another --out folder (the input is never replaced).")
    with run_folder(out, overwrite=overwrite, names=(*RUN_FILES, MAPPED_FILE, UMAP_FILE, CHECKPOINT_FILE)):
        for name in (MAPPED_FILE, UMAP_FILE):
            check_output_file(out / name)
        stale = unfinished_run(out, resume_from=None, overwrite=overwrite)
        reference = VAE.load(ref_run, device=device)
        cells = read_data(reference_data) if reference_data is not None else None
        if label_key is not None and label_key not in cells.obs:  # before training: the labels come after it
            raise InputDataError(f"--reference-data {reference_data} has no obs column {label_key!r} (--labels-key); "
                                 f"choose one of {list(cells.obs.columns)}.")  # fmt: skip
        if label_key is not None:  # enough labelled reference cells for the vote, before training
            reference_labels(cells, label_key, n_neighbors=n_neighbors)
        mapped = read_data(query)  # written back with the latent and labels added, every field of its own kept
        model = map_query(mapped, reference, unfreeze=unfreeze, encoder_start=encoder_start, encoder_stage=encoder_stage,
                          encoder_anchor=encoder_anchor, epochs=epochs, reference_data=cells,
                          max_missing_fraction=max_missing_fraction)  # fmt: skip
        if stale is not None:  # the new query model is built: the old run's checkpoint goes
            stale.unlink(missing_ok=True)
        options = {"seed": seed, "device": device, **({"lr": lr} if lr is not None else {})}
        fit_in_run_folder(model, model.fit_config(**options), out=out, resume_from=None)
        write_run(model, out)
        mapped.obsm[LATENT_KEY] = model.get_latent()  # the query model's data: the same cells, genes aligned
        stages = ", ".join(f"{name} {sum(r['stage'] == name for r in model.history)}" for name in model.mapping["stages"])
        click.echo(f"Trained the query model ({unfreeze}), epochs per stage: {stages}; saved in {out}")
        if cells is not None:
            aligned, _ = aligned_query(cells, reference.schema, max_missing_fraction=max_missing_fraction)
            cells.obsm[LATENT_KEY] = reference.get_latent(aligned)
            if label_key is not None:
                transfer_labels(mapped, cells, label_key=label_key, latent_key=LATENT_KEY, n_neighbors=n_neighbors,
                                unknown_threshold=unknown_threshold)  # fmt: skip
                _report_labels(mapped, f"{label_key}_transferred")
            _plot_together(cells, mapped, label_key, out / UMAP_FILE, seed=seed, plot=plot_latent_umap)
            click.echo(f"UMAP of reference and query in {out / UMAP_FILE}")
        write_h5ad(mapped, out / MAPPED_FILE)
        click.echo(f"Query latent in obsm[{LATENT_KEY!r}] of {out / MAPPED_FILE}")


def _report_labels(mapped, key: str) -> None:
    counts = mapped.obs[key].value_counts()
    shown = ", ".join(f"{label} {n}" for label, n in counts.items() if n)
    click.echo(f"Transferred labels in obs[{key!r}] (uncertainty in obs['{key}_uncertainty']): {shown}")


def _plot_together(reference, query, label_key: str | None, path: Path, *, seed: int, plot) -> None:
    """UMAP of the reference's and the query's latents in one neighbour graph, by dataset and by label."""
    import anndata
    import numpy as np
    import pandas as pd
    import scanpy as sc

    latent = np.concatenate([reference.obsm[LATENT_KEY], query.obsm[LATENT_KEY]])
    obs = pd.DataFrame({"dataset": pd.Categorical(["reference"] * reference.n_obs + ["query"] * query.n_obs)})
    columns = ["dataset"]
    if label_key is not None:
        transferred = query.obs[f"{label_key}_transferred"].astype(str).to_numpy()
        obs[label_key] = pd.Categorical(np.concatenate([reference.obs[label_key].astype(str).to_numpy(), transferred]))
        columns.append(label_key)
    together = anndata.AnnData(obs=obs.set_index(pd.Index([f"cell_{i}" for i in range(len(obs))])))
    together.obsm[LATENT_KEY] = latent
    sc.pp.neighbors(together, use_rep=LATENT_KEY, random_state=seed)
    sc.tl.umap(together, random_state=seed)
    plot(together, columns, path)
