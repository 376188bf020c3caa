"""Evaluate a fitted model on its data and write metrics.json, PNG figures and index.html."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from genailab import eval as metrics_lib
from genailab.checks import check_number
from genailab.errors import ConfigError, InputDataError
import genailab.report.model_generation as model_generation
import genailab.report.model_metrics as model_metrics
import genailab.report.protocols as protocols
from genailab.report.model_generation import generate_like
from genailab.anndata_models.files import data_fingerprint
from genailab.report.figures import plot_gene_agreement, plot_latent_sweep, plot_latent_umap, plot_training_curves
from genailab.report.metric_notes import NOTES
from genailab.report.page import Section, render_page
from genailab.safe_write import check_output_folder, write_text

logger = logging.getLogger(__name__)

REPORT_FILES = ("metrics.json", "index.html", "training_curves.png", "latent_umap.png", "gene_agreement.png",
                "latent_sweep.png")  # what write_report may write into its folder
MAX_LATENT_CELLS = 20_000  # cells (a seeded subsample) for the UMAP and the latent-space metrics
LATENT_NEIGHBOURS = 15  # neighbours of each cell in the latent graph of the UMAP and Leiden
_MIN_GROUP = 10  # cells a label needs in the held-out set to be contrasted in the DE check


def write_report(
    adata: AnnData,
    model,
    out: str | Path,
    *,
    label_key: str | None = None,
    batch_key: str | None = None,
    latent_dims: Sequence[int] = (),
    sweep_epochs: int | None = None,
    imputation: bool = False,
    n_samples: int = 100,
    seed: int = 0,
    data_path: str | Path | None = None,
    command: str | None = None,
) -> dict:
    """Score ``model`` on ``adata`` and write a report folder.

    Held-out metrics use the model's validation cells when ``adata`` is the data it was trained on
    (checked by the data hash saved with the model), and every cell of ``adata`` otherwise.

    Parameters
    ----------
    model
        A fitted :class:`~genailab.VAE` (e.g. from :meth:`~genailab.VAE.load`).
    adata
        The cells to evaluate, with the model's genes and condition columns.
    out
        Folder to write (created if needed).
    label_key
        ``obs`` column of known cell types: Leiden ARI/NMI (at resolution 1 and at the best of scIB's
        sweep 0.1..2.0), silhouette, cLISI, graph connectivity, UMAP colours, DE check. Cells without
        a label (NaN) are left out of these, with a warning, and counted in ``latent.n_cells_without_label``.
    batch_key
        ``obs`` column of batches: batch mixing (iLISI, kBET, kNN entropy, batch silhouette), UMAP colours.
        Cells without a batch are left out likewise (``latent.n_cells_without_batch``).
    latent_dims
        Latent sizes to retrain with the run's settings for the latent-dimension sweep (empty: none).
    sweep_epochs
        Epochs per sweep or imputation model; default the run's own.
    imputation
        Also run the masked-count imputation protocol (retrains once; count models only).
    n_samples
        Importance samples K for the held-out marginal log-likelihood.
    seed
        Random state of sampling, subsampling, UMAP and clustering.
    data_path
        The file (or folder) ``adata`` was read from, recorded with its SHA-256; None records an
        in-memory AnnData.
    command
        The command line to record; default this process's (``sys.argv``).

    Returns
    -------
    dict
        The metrics written to ``out/metrics.json``, after a ``provenance`` record (genailab's
        version, the UTC date, the data file and its SHA-256, the seed and the command). The page
        explains each metric in a line and says which cells each section was computed on; classifier
        AUCs below 0.5 are flagged. The folder also holds ``training_curves.png``,
        ``latent_umap.png``, ``gene_agreement.png``, ``latent_sweep.png`` (with ``latent_dims``) and
        ``index.html``, a self-contained page with every table and figure.
    """
    if adata.isbacked:
        raise InputDataError("write_report needs the data in memory; read the h5ad without backed='r' (or "
                             "adata.to_memory()).")
    for key, option in ((label_key, "label_key"), (batch_key, "batch_key")):
        if key is not None and key not in adata.obs.columns:
            raise ConfigError(f"obs has no column {key!r} (given as `{option}`); choose one of "
                              f"{list(adata.obs.columns)[:20]}.", argument=option)  # fmt: skip
        if key is not None and adata.obs[key].isna().all():
            raise InputDataError(f"{option}={key!r} is missing (NaN) in every cell; name an annotated obs column.",
                                 argument=option)  # fmt: skip
    if batch_key is not None and pd.api.types.is_float_dtype(adata.obs[batch_key]):
        raise ConfigError(f"batch_key={batch_key!r} holds numbers ({adata.obs[batch_key].nunique()} distinct values); "
                          "name a categorical obs column of batches.", argument="batch_key")  # fmt: skip
    _check_latent_dims(latent_dims, n_genes=model.schema.n_genes)
    indices, scored = _heldout(model, adata)
    _check_enough_cells(model, adata, indices, scored)
    out = check_output_folder(out, names=REPORT_FILES)
    metrics = {"provenance": _provenance(data_path, command=command, seed=seed)}
    metrics["run"] = _describe(model, adata, scored, indices)
    _stage(f"held-out likelihood on {indices.size} cells (IWAE, K={n_samples})")
    metrics["likelihood"] = _likelihood(model, adata, indices, n_samples=n_samples, seed=seed)
    figures: dict[str, list] = {}
    if model.history:
        figures["likelihood"] = [(plot_training_curves(model.history, out / "training_curves.png"), "Training curves")]
    _stage("latent space: UMAP, Leiden sweep, batch mixing and conservation")
    metrics["latent"], umap_png = _latent(model, adata, out, label_key=label_key, batch_key=batch_key, seed=seed)
    figures["latent"] = [(umap_png, "UMAP of the posterior means")]
    _stage("generated vs held-out cells, posterior predictive check")
    generation, gene_png = _generation(model, adata, indices, out, keys=(batch_key, label_key), seed=seed)
    metrics.update(generation)
    caption = "Per gene: generated vs held-out real cells; posterior predictive CV"
    figures["posterior_predictive"] = [(gene_png, caption)]
    if label_key is not None:
        _stage("differential expression, real vs generated")
        metrics["differential_expression"] = _de(model, adata, indices, label_key=label_key, seed=seed)
    rebuild = {k: v for k, v in model.constructor_options().items() if k != "latent_dim"}  # the sweep sets it
    retrain = {"model_options": rebuild, "train_options": _train_options(model, sweep_epochs)}
    if imputation:
        _stage("imputation protocol (retrains a model)")
        metrics["imputation"] = protocols.imputation_benchmark(adata, seed=seed, **retrain)
    if latent_dims:
        _stage(f"latent-dimension sweep over {list(latent_dims)} (retrains one model each)")
        metrics["latent_sweep"] = protocols.latent_dim_sweep(adata, list(latent_dims), **retrain)
        sweep_png = plot_latent_sweep(metrics["latent_sweep"], out / "latent_sweep.png")
        figures["latent_sweep"] = [(sweep_png, "Latent-dimension sweep")]
    metrics = _jsonable(metrics)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    cells = _cells_used(metrics)
    sections = [
        Section(_HEADINGS[key], value, figures.get(key, []), notes=NOTES.get(key, {}), cells=cells.get(key))
        for key, value in metrics.items()
    ]
    render_page(f"genailab evaluation: {model.config.likelihood} VAE", sections, out / "index.html")
    _stage(f"done: {out / 'index.html'}")
    return metrics


def _stage(description: str) -> None:
    """One log line per stage, so a run without a terminal shows how far it got."""
    logger.info("evaluate: %s", description)


_HEADINGS = {
    "provenance": "Provenance",
    "run": "Run",
    "likelihood": "Likelihood (held-out cells)",
    "latent": "Latent space",
    "generation": "Generation fidelity (generated vs held-out cells)",
    "posterior_predictive": "Posterior predictive check",
    "differential_expression": "Differential expression, real vs generated",
    "imputation": "Imputation (10% of non-zero counts hidden)",
    "latent_sweep": "Latent-dimension sweep",
}


def _provenance(data_path: str | Path | None, *, command: str | None, seed: int) -> dict:
    """What produced the report: genailab's version, the UTC date, the data and its hash, seed, command."""
    from genailab import __version__

    return {
        "genailab_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_file": str(Path(data_path).resolve()) if data_path is not None else "in-memory AnnData (no file given)",
        "data_sha256": _sha256(Path(data_path)) if data_path is not None else None,
        "seed": seed,
        "command": command if command is not None else shlex.join(sys.argv),
    }


def _sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; of a folder (e.g. zarr, 10x), of each file's relative path and
    SHA-256 in sorted order."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_sha256(file)}\n".encode())
    return digest.hexdigest()


def _cells_used(metrics: dict) -> dict[str, str]:
    """Per section, the cells its metrics were computed on."""
    run = metrics["run"]
    heldout = f"{run['n_held_out']} {run['held_out_cells']}"
    latent_cells = metrics["latent"]["n_cells"]
    subsample = "every cell" if latent_cells == run["n_cells"] else f"a seeded subsample of {latent_cells} cells"
    left_out = "".join(
        f"; {metrics['latent'][f'n_cells_without_{what}']} cells without a {what} left out of the {what} metrics"
        for what in ("label", "batch") if f"n_cells_without_{what}" in metrics["latent"]
    )
    return {
        "likelihood": heldout,
        "latent": f"the posterior means of {subsample} of the data ({run['n_cells']} cells){left_out}",
        "generation": f"{heldout}, each against one cell generated from the prior with its conditions",
        "posterior_predictive": f"{heldout}, each against one replicate drawn from its own posterior",
        "differential_expression": f"the two largest label groups among the {heldout}",
        "imputation": f"all {run['n_cells']} cells, 10% of their non-zero counts hidden, a model retrained on them",
        "latent_sweep": f"a model retrained per latent size on all {run['n_cells']} cells, scored on its "
        "validation cells",
    }


def _heldout(model, adata: AnnData) -> tuple[np.ndarray, str]:
    """The rows scored by held-out metrics and a description of them."""
    try:
        validation = model.validation_indices
    except ConfigError:  # never trained here: no split
        validation = np.array([], dtype=np.int64)
    trained_on = model.training_info.get("data_sha256")
    same_data = trained_on is not None and data_fingerprint(
        model.schema.expression(adata), model.schema.encode_obs(adata.obs), model.schema.gene_names) == trained_on
    if same_data and validation.size:
        return validation, "validation cells of the training data"
    if same_data:
        logger.warning("The model has no validation split: every cell scored is a training cell, not held out")
        return np.arange(adata.n_obs), "every cell, all of them training cells (the model has no validation split): not held out"
    logger.warning("adata is not the data the model was trained on; scoring every cell")
    return np.arange(adata.n_obs), "every cell of data other than the training data (its cells may still overlap them)"


def _check_latent_dims(latent_dims: Sequence[int], *, n_genes: int) -> None:
    """Refuse, before any work, sweep sizes the sweep's models would refuse after the report's first
    sections, and sizes given twice (the same model retrained)."""
    for dim in latent_dims:
        check_number("latent_dims", dim, integer=True, ge=1, lt=n_genes, hint=f"The model has {n_genes} genes.")
    if len(set(latent_dims)) < len(latent_dims):
        raise ConfigError(f"latent_dims={','.join(map(str, latent_dims))} gives a size more than once; give each once.",
                          argument="latent_dims")


def _check_enough_cells(model, adata: AnnData, indices: np.ndarray, scored: str) -> None:
    """Refuse, before any file is written, cells the report cannot score: too few for the latent
    graph or for the real-vs-generated classifier's folds, or held-out cells with no counts."""
    if adata.n_obs <= LATENT_NEIGHBOURS:
        raise InputDataError(f"The data has only {adata.n_obs} cell(s); the report's latent graph links each cell to its "
                             f"{LATENT_NEIGHBOURS} nearest, so it needs at least {LATENT_NEIGHBOURS + 1} cells.")
    n_folds = inspect.signature(metrics_lib.classifier_two_sample_auc).parameters["n_folds"].default
    if indices.size < n_folds:
        raise InputDataError(f"The report scores {indices.size} cells ({scored}); the real-vs-generated classifier's "
                             f"{n_folds}-fold cross-validation needs at least {n_folds}. Evaluate on more cells (a model "
                             "whose validation split is this small: pass data with more cells, scored as new data).")
    model_generation.observed_libraries(model, adata, indices)


def _describe(model, adata: AnnData, scored: str, indices: np.ndarray) -> dict:
    return {
        "likelihood": model.config.likelihood,
        "latent_dim": model.config.latent_dim,
        "hidden_dims": list(model.config.hidden_dims),
        "conditions": list(model.schema.categorical_keys + model.schema.continuous_keys),
        "epochs_trained": len(model.history),
        "n_cells": int(adata.n_obs),
        "n_genes": int(model.config.input_dim),
        "held_out_cells": scored,
        "n_held_out": int(indices.size),
    }


def _likelihood(model, adata: AnnData, indices: np.ndarray, *, n_samples: int, seed: int) -> dict:
    elbo = model_metrics.validation_elbo(adata, model, indices=indices, seed=seed)
    reconstruction = model_metrics.reconstruction_error(adata, model, indices=indices)
    iwae = model_metrics.heldout_marginal_ll(adata, model, indices=indices, n_samples=n_samples, seed=seed)
    return {
        "negative_elbo": elbo["negative_elbo"],
        "reconstruction": elbo["reconstruction"],
        "kl": elbo["kl"],
        "marginal_ll": iwae["mean"],
        "marginal_ll_samples": n_samples,
        "reconstruction_nll_at_mean": reconstruction["nll"],
        "reconstruction_mse": reconstruction["mse"],
    }


def _annotated(obs: pd.DataFrame, key: str, *, metrics: str) -> np.ndarray:
    """Which cells have a value in ``obs[key]``, (n_cells,) bool; a warning says how many do not."""
    present = obs[key].notna().to_numpy()
    n_missing = int((~present).sum())
    if n_missing:
        logger.warning("%d of %d cells have no %r (NaN) and are left out of the %s metrics",
                       n_missing, present.size, key, metrics)  # fmt: skip
    return present


def _label_scores(latent: np.ndarray, labels: np.ndarray, *, seed: int) -> dict:
    """Cell-type conservation of the latent (n_cells, n_latent) for labels (n_cells,), none missing."""
    n_cells = labels.size
    fixed = metrics_lib.leiden_ari_nmi(latent, labels, seed=seed)
    best = metrics_lib.leiden_ari_nmi_best_resolution(latent, labels, seed=seed)
    return {
        **fixed,  # ari, nmi, n_clusters, resolution
        **{f"best_{name}": value for name, value in best.items()},
        "label_silhouette": metrics_lib.label_silhouette(latent, labels),
        "clisi": metrics_lib.clisi(latent, labels, perplexity=min(30, n_cells // 3)),  # fewer on tiny data
        "graph_connectivity": metrics_lib.graph_connectivity(latent, labels, n_neighbors=min(15, n_cells)),
    }


def _batch_scores(latent: np.ndarray, batch: np.ndarray) -> dict:
    """Batch mixing of the latent (n_cells, n_latent) for batches (n_cells,), none missing."""
    n_cells = batch.size
    return {
        "ilisi": metrics_lib.ilisi(latent, batch, perplexity=min(30, n_cells // 3)),  # scIB's 30, fewer on tiny data
        "kbet": metrics_lib.kbet(latent, batch, n_neighbors=min(50, n_cells)),
        "batch_entropy": metrics_lib.knn_batch_entropy(latent, batch, k=min(50, n_cells - 1)),
        "knn_batch_inverse_simpson": metrics_lib.knn_batch_inverse_simpson(latent, batch, k=min(90, n_cells - 1)),
    }


def _latent(model, adata: AnnData, out: Path, *, label_key, batch_key, seed: int) -> tuple[dict, Path]:
    """Cell-type conservation and batch mixing of the posterior means, and their UMAP. Cells with no
    label (batch) are left out of the label (batch) metrics and counted in ``n_cells_without_label``
    (``n_cells_without_batch``)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(adata.n_obs)
    if rows.size > MAX_LATENT_CELLS:
        rows = np.sort(rng.choice(rows, MAX_LATENT_CELLS, replace=False))
    latent = model.get_latent(adata)[rows]
    obs = adata.obs.iloc[rows]
    scores: dict = {"n_cells": int(rows.size)}
    present = {}
    for what, key in (("label", label_key), ("batch", batch_key)):
        if key is not None:
            present[what] = _annotated(obs, key, metrics=what)
            if not present[what].all():
                scores[f"n_cells_without_{what}"] = int((~present[what]).sum())
    if label_key is not None:
        labelled, labels = present["label"], obs[label_key].astype(str).to_numpy()
        scores.update(_label_scores(latent[labelled], labels[labelled], seed=seed))
    if batch_key is not None:
        batched, batch = present["batch"], obs[batch_key].astype(str).to_numpy()
        scores.update(_batch_scores(latent[batched], batch[batched]))
    if label_key is not None and batch_key is not None:
        both = labelled & batched
        scores["batch_silhouette"] = metrics_lib.batch_silhouette(latent[both], batch[both], labels[both])
        scores["kbet_per_label"] = metrics_lib.kbet_per_label(
            latent[both], batch[both], labels[both], n_neighbors=min(50, int(both.sum()) - 1)
        )
    columns = [key for key in dict.fromkeys((label_key, batch_key)) if key is not None]
    colours = pd.DataFrame({key: _colours(obs[key]) for key in columns}, index=obs.index.astype(str))
    graph = AnnData(obs=colours, obsm={"X_latent": latent})
    sc.pp.neighbors(graph, use_rep="X_latent", n_neighbors=LATENT_NEIGHBOURS, random_state=seed, transformer="sklearn")
    sc.tl.umap(graph, random_state=seed)
    return scores, plot_latent_umap(graph, columns, out / "latent_umap.png")


def _colours(values: pd.Series) -> pd.Categorical:
    """An obs column as categories of its text, missing values kept missing (drawn grey, not as 'nan')."""
    return pd.Categorical(values.astype(str).where(values.notna()).to_numpy())


def _generation(model, adata: AnnData, indices: np.ndarray, out: Path, *, keys, seed: int) -> tuple[dict, Path]:
    """Generation fidelity (per condition when a key is a model condition), posterior predictive
    check, and the per-gene figure."""
    condition = next((k for k in keys if k is not None and k in model.schema.categorical_keys), None)
    fidelity = model_generation.generation_fidelity(adata, model, indices=indices, condition_key=condition, seed=seed)
    ppc = model_generation.posterior_predictive_check(adata, model, indices=indices, seed=seed)
    real = model.schema.expression(adata)[indices]
    generated = generate_like(adata, model, indices=indices, seed=seed).X
    real_mean, generated_mean = (np.asarray(m.mean(axis=0)).ravel() for m in (real, generated))
    real_zeros, generated_zeros = (1 - np.asarray((m != 0).mean(axis=0)).ravel() for m in (real, generated))
    png = plot_gene_agreement(
        out / "gene_agreement.png", real_mean=real_mean, generated_mean=generated_mean, real_zeros=real_zeros,
        generated_zeros=generated_zeros, observed_cv=ppc["cv_observed"], replicated_cv=ppc["cv_replicated"],
    )
    summary = {k: v for k, v in ppc.items() if np.isscalar(v)}
    return {"generation": fidelity, "posterior_predictive": summary}, png


def _de(model, adata: AnnData, indices: np.ndarray, *, label_key: str, seed: int) -> dict:
    """Top-k agreement of the fold changes between the two largest held-out label groups."""
    counts = adata.obs[label_key].iloc[indices].dropna().astype(str).value_counts()  # a missing label is no group
    groups = counts[counts >= _MIN_GROUP].index[:2]
    if len(groups) < 2:
        return {"skipped": f"fewer than two {label_key!r} groups with {_MIN_GROUP}+ held-out cells"}
    source = "prior" if label_key in model.schema.categorical_keys else "posterior"
    k = max(1, min(50, model.config.input_dim // 10))
    result = model_generation.de_agreement(
        adata, model, group_key=label_key, group_a=groups[0], group_b=groups[1], k=k, indices=indices,
        source=source, seed=seed,
    )
    return {
        "contrast": f"{groups[0]} vs {groups[1]}",
        "generated_from": source,
        "k": k,
        "top_k_overlap": result["top_k_overlap"],
        "chance_overlap": k / model.config.input_dim,
        "lfc_pearson": result["lfc_pearson"],
    }


def _train_options(model, epochs: int | None) -> dict:
    """The run's training options (no checkpoints, no progress bar), with ``epochs`` if given."""
    options = model.train_config.to_dict() if model.train_config is not None else {}
    options.update(checkpoint_every=0, progress=False)
    if epochs is not None:
        options["epochs"] = epochs
    return options


def _jsonable(value):
    """Metrics as plain JSON: numpy scalars to Python numbers, NaN to None, arrays dropped."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value
