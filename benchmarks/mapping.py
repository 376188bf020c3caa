"""Reference mapping (issue 14): map a held-out batch onto a trained reference and transfer its labels.

Two splits, each with a reference (labelled) and a query (a batch the reference never saw):

1. simulated: ``genailab.data.simulate`` with 4 batches and 6 known cell types; the query is the
   last batch, with its own batch effect (per-gene logit shifts of sd 1.0) and library shift (its
   log library moved by a draw of sd 1.0: the query's median count is 0.51 of the reference's at
   seed 0), and weak markers (5 per type at log fold change 1), so that no method labels every cell;
2. PBMC: ``genailab.data.pbmc68k_counts()`` (700 cells, 10 labels) split at random into two
   pseudo-batches; the query's counts get a simulated batch effect (a log-normal factor per gene
   and a library shift, then Poisson noise).

For each split, with the same architecture everywhere:

* ``mapping``: genailab's reference model, then ``VAE.map_query(query).fit()`` with its defaults
  (only the new batch's parameters learn: the decoder's, then the encoder's; the reference model
  holds its cells, so the new encoder column starts from its mutual nearest reference cells,
  refined in the latent, and then held there, when the query spreads less than the reference in
  the latent; a column not so held is pulled toward its start during the encoder stage); the time
  is building the query model and its fit;
* ``mapping_unanchored``: the default with ``encoder_anchor=0`` (the encoder stage trains the
  column by the ELBO alone, without the pull toward its start: the default before); only where the
  default pulls (a neighbours start with an encoder stage);
* ``mapping_neighbours_start``: the default with ``encoder_start="neighbours"`` (never refined in the
  latent, both stages trained);
* ``mapping_held``: the default with ``encoder_stage=False`` (the new encoder column held at its
  start; only the decoder's new column learns);
* ``mapping_mean_start``: the same with ``encoder_start="mean"`` (the new encoder column starts at
  the mean of the reference's, as without the reference's cells);
* ``mapping_encoder``: the default with ``unfreeze="encoder"`` (the encoder stage trains the whole
  encoder, the decoder staying the reference's);
* ``mapping_batch_norm_start``: the default with ``encoder_start="batch_norm"`` (the new encoder
  column starts where it centres the query's first-layer activations on the reference's
  batch-norm mean);
* ``mapping_latent_start``: the default with ``encoder_start="latent"`` (the neighbours start, then
  the shift refined until each reference cluster's query cells have its mean in the latent, and
  the encoder column held there);
* ``untrained_query``: the default query model before ``fit()`` (its new columns at their start),
  i.e. what the query training adds;
* ``from_scratch``: one genailab model trained on reference + query together;
* ``corrected_query`` / ``corrected_query_scratch``: no mapping: the query's own cells without
  their batch effect, encoded by the reference (and the from-scratch) model as a reference batch;
  the simulated query is drawn again with the states, types and libraries of its cells in each
  reference batch in turn (from the simulator's true means; rows average the reference batches),
  the PBMC query is its counts before the simulated effect. What perfect batch correction through
  that model's encoder would label: the ceiling of any mapping that keeps the reference encoder;
* ``pca_knn``: no model: 10 principal components of the log-normalised counts of both datasets
  (what a method that ignores the batch effect gets);
* ``scvi_query`` / ``scvi_scratch``: scvi-tools' ``SCVI.load_query_data`` + ``train`` and an SCVI
  model on both, when scvi-tools is importable (rows skipped otherwise).

Scores: label-transfer accuracy and macro-F1 against the true labels of the query
(``genailab.apps.transfer_labels``, 15 neighbours, no "unknown" call), and batch mixing of query
and reference in the shared latent (``genailab.eval.knn_batch_entropy`` with dataset as the batch,
50 neighbours; 1 = every neighbourhood holds both datasets in equal parts).

Run (a few minutes on 2 CPU cores; the scvi-tools rows need an environment where it is installed):

    python benchmarks/mapping.py --threads 1
    .venv-scvi/bin/python benchmarks/mapping.py --threads 1 --splits simulated --json mapping.json
    python benchmarks/mapping.py --threads 1 --epochs default   # every model at its own default epochs

By default the reference and from-scratch models (genailab's and scvi-tools') train up to 100
epochs with early stopping; ``--epochs default`` lets each choose: genailab's data-size rule with
its one-cycle schedule, scvi-tools' ``max_epochs`` rule without early stopping. Query models
always run at their defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score

from genailab import VAE
from genailab.apps import transfer_labels
from genailab.data import pbmc68k_counts, simulate
from genailab.eval import knn_batch_entropy

LATENT = "X_genailab"
LABEL = "cell_type"


def simulated_split(args) -> tuple[anndata.AnnData, anndata.AnnData, list[anndata.AnnData]]:
    """Reference (all batches but the last), query (the last) and the query re-drawn in each reference batch."""
    options = dict(n_cell_types=args.cell_types, n_batches=args.batches, seed=args.seed, n_markers=args.markers,
                   marker_log_fc=args.marker_log_fc)  # fmt: skip
    sim = simulate(args.cells, args.genes, batch_effect_scale=args.batch_effect, **options)
    held_out = f"batch_{args.batches - 1}"
    query = sim[sim.obs["batch"] == held_out]
    if args.query_cell_types:
        query = query[query.obs["cell_type"].astype(str).isin(args.query_cell_types).to_numpy()]
    reference = sim[sim.obs["batch"] != held_out].copy()
    # The same seed without batch effects draws the same states, types and libraries (each draw
    # consumes the random streams alike), so its means are the cells' means without their batch.
    plain = simulate(args.cells, args.genes, batch_effect_scale=0.0, **options)
    corrected = [redrawn_in_batch(query.copy(), plain, sim, str(batch), seed=args.seed) for batch in reference.obs["batch"].cat.categories
                 if (reference.obs["batch"] == batch).any()]  # fmt: skip
    return reference, query.copy(), corrected


def redrawn_in_batch(query: anndata.AnnData, plain: anndata.AnnData, sim: anndata.AnnData, batch: str, *, seed: int) -> anndata.AnnData:
    """``query`` with new NB counts drawn from its cells' true means moved into ``batch``: the per-gene
    log effect and library factor of ``batch`` (read from one of its cells in ``sim`` against the
    batch-free ``plain`` simulation of the same seed) replace those of the query's own batch."""
    cell = sim.obs_names[np.flatnonzero(sim.obs["batch"].astype(str) == batch)[0]]
    log_ratio = np.log(sim[cell].layers["true_mean"].astype(np.float64)) - np.log(plain[cell].layers["true_mean"].astype(np.float64))
    effect = np.exp(log_ratio - log_ratio.mean())  # (1, G) the batch's per-gene factor, up to a constant
    library = float(sim.obs.loc[cell, "library_size"] / plain.obs.loc[cell, "library_size"])  # the batch's library factor
    mean = plain[query.obs_names].layers["true_mean"].astype(np.float64)  # (n, G) the query cells without a batch
    moved = mean * effect
    moved *= library * mean.sum(1, keepdims=True) / moved.sum(1, keepdims=True)
    theta = sim.var["theta"].to_numpy(np.float64)
    rng = np.random.default_rng([seed, 1])
    counts = sp.csr_matrix(rng.poisson(rng.gamma(theta, moved / theta)).astype(np.float32))
    query.layers["counts"], query.X = counts, counts.copy()
    query.obs["batch"] = pd.Categorical([batch] * query.n_obs, categories=sim.obs["batch"].cat.categories)
    return query


def pbmc_split(args) -> tuple[anndata.AnnData, anndata.AnnData, list[anndata.AnnData]]:
    """Reference (pseudo-batch a), query (pseudo-batch b with a simulated effect) and the query before the effect."""
    pbmc = pbmc68k_counts()
    rng = np.random.default_rng(args.seed)
    in_query = rng.random(pbmc.n_obs) < 0.5
    reference, query = pbmc[~in_query].copy(), pbmc[in_query].copy()
    factors = np.exp(rng.normal(0.0, args.pbmc_batch_effect, pbmc.n_vars))  # per-gene batch effect
    factors *= args.pbmc_library_shift / factors.mean()
    counts = query.layers["counts"].toarray() * factors[None, :]
    query.layers["counts"] = sp.csr_matrix(rng.poisson(counts).astype(np.float32))
    query.X = query.layers["counts"].copy()
    reference.obs["batch"], query.obs["batch"] = "pbmc_a", "pbmc_b"
    keep = np.asarray(query.layers["counts"].sum(1)).ravel() > 0
    corrected = pbmc[in_query][keep].copy()
    corrected.obs["batch"] = "pbmc_a"
    return reference, query[keep].copy(), [corrected]


def scores(reference: anndata.AnnData, query: anndata.AnnData, seconds: float) -> dict[str, float]:
    """Label transfer from reference to query and mixing of the two, both from obsm[LATENT]."""
    predicted = transfer_labels(query, reference, label_key=LABEL, latent_key=LATENT, unknown_threshold=1.0)
    truth = query.obs[LABEL].astype(str).to_numpy()
    latent = np.concatenate([reference.obsm[LATENT], query.obsm[LATENT]])
    dataset = np.r_[np.zeros(reference.n_obs), np.ones(query.n_obs)]
    return {
        "accuracy": accuracy_score(truth, predicted.astype(str)),
        "macro_f1": f1_score(truth, predicted.astype(str), average="macro"),
        "mixing": knn_batch_entropy(latent, dataset, k=50),
        "train_seconds": seconds,
    }


def genailab_rows(reference, query, corrected, args) -> dict[str, dict]:
    options = dict(likelihood="nb", layer="counts", condition_keys=["batch"], latent_dim=args.latent_dim,
                   hidden_dims=(args.hidden,))  # fmt: skip
    fit = dict(epochs=args.epochs, seed=args.seed, progress=False)
    started = time.perf_counter()
    model = VAE(reference, **options).fit(**fit)
    reference_seconds = time.perf_counter() - started
    reference.obsm[LATENT] = model.get_latent(reference)

    query.obsm[LATENT] = model.map_query(query).get_latent()
    rows = {"untrained_query": {**scores(reference, query, 0.0), "epochs": 0}}
    print(f"  reference model: {len(model.history)} epochs in {reference_seconds:.0f} s", flush=True)
    variants = [("new_categories", "auto", None, "mapping"), ("new_categories", "neighbours", None, "mapping_neighbours_start"),
                ("new_categories", "auto", False, "mapping_held"), ("new_categories", "mean", None, "mapping_mean_start")]  # fmt: skip
    variants += [(unfreeze, "auto", None, f"mapping_{unfreeze}") for unfreeze in args.unfreeze if unfreeze != "new_categories"]
    variants += [("new_categories", "batch_norm", None, "mapping_batch_norm_start"), ("new_categories", "latent", None, "mapping_latent_start")]
    variants = [(*variant, None) for variant in variants]
    if model.map_query(query).mapping["encoder_anchor"]:  # the default pulls the encoder column toward its start
        variants.insert(1, ("new_categories", "auto", None, "mapping_unanchored", 0.0))
    for unfreeze, start, stage, name, anchor in variants:
        started = time.perf_counter()
        mapped = model.map_query(query, unfreeze=unfreeze, encoder_start=start, encoder_stage=stage, encoder_anchor=anchor)
        mapped.fit(seed=args.seed, progress=False)
        map_seconds = time.perf_counter() - started  # building the query model and its fit
        query.obsm[LATENT] = mapped.get_latent()
        rows[name] = {**scores(reference, query, map_seconds), "epochs": len(mapped.history)}
        stages = {stage: int(n) for stage, n in pd.Series([r["stage"] for r in mapped.history]).value_counts(sort=False).items()}
        spreads = mapped.mapping.get("start_latent_spread", [])  # the query's latent spread after the first-layer offset
        spread = ", latent spread " + "/".join("-" if v is None else f"{v:.2f}" for v in spreads) if spreads else ""
        print(f"  {name}: {mapped.mapping['encoder_start']} start{spread}, query fit {stages} epochs in {map_seconds:.0f} s", flush=True)

    both = anndata.concat([reference, query], label="dataset", keys=["reference", "query"], index_unique="-")
    started = time.perf_counter()
    scratch = VAE(both, **options).fit(**fit)
    scratch_seconds = time.perf_counter() - started
    latent = scratch.get_latent(both)
    reference_again, query_again = reference.copy(), query.copy()
    reference_again.obsm[LATENT], query_again.obsm[LATENT] = latent[: reference.n_obs], latent[reference.n_obs :]
    rows["from_scratch"] = {**scores(reference_again, query_again, scratch_seconds), "epochs": len(scratch.history)}
    rows["corrected_query"] = corrected_row(model, reference, query, corrected)
    rows["corrected_query_scratch"] = corrected_row(scratch, reference_again, query_again, corrected)
    rows["pca_knn"] = pca_row(reference_again, query_again, args)
    return rows


def corrected_row(model, reference, query, corrected) -> dict[str, float]:
    """Scores of ``model`` on each batch-corrected copy of the query (its latent in reference batches), averaged."""
    rows = []
    for copy in corrected:
        query.obsm[LATENT] = model.get_latent(copy)
        rows.append(scores(reference, query, 0.0))
    return {**pd.DataFrame(rows).mean().to_dict(), "epochs": 0}


def pca_row(reference, query, args) -> dict[str, float]:
    """Label transfer and mixing in 10 principal components of log1p(counts per 10,000), both datasets together."""
    started = time.perf_counter()
    counts = sp.vstack([sp.csr_matrix(reference.layers["counts"]), sp.csr_matrix(query.layers["counts"])]).tocsr()
    scaled = sp.diags(1e4 / np.asarray(counts.sum(1)).ravel()) @ counts
    logged = np.log1p(scaled.toarray())
    pcs = PCA(args.latent_dim, random_state=args.seed).fit_transform(logged)
    reference.obsm[LATENT], query.obsm[LATENT] = pcs[: reference.n_obs], pcs[reference.n_obs :]
    return {**scores(reference, query, time.perf_counter() - started), "epochs": 0}


def scvi_rows(reference, query, args) -> dict[str, dict]:
    """scvi-tools' query mapping and its from-scratch model on the same split and sizes."""
    import scvi

    scvi.settings.seed = args.seed
    reference, query = reference.copy(), query.copy()
    scvi.model.SCVI.setup_anndata(reference, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(reference, n_latent=args.latent_dim, n_hidden=args.hidden, n_layers=1)
    # at a given epoch count both tools stop early on their validation loss; at 'default' scvi-tools
    # runs its own rule (max_epochs from the data size, no early stopping)
    schedule = {} if args.epochs is None else {"max_epochs": args.epochs, "early_stopping": True}
    model.train(**schedule, enable_progress_bar=False)
    reference.obsm[LATENT] = model.get_latent_representation(reference)
    started = time.perf_counter()
    mapped = scvi.model.SCVI.load_query_data(query, model)
    mapped.train(**schedule, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    query_seconds = time.perf_counter() - started
    query.obsm[LATENT] = mapped.get_latent_representation(query)
    rows = {"scvi_query": scores(reference, query, query_seconds)}

    both = anndata.concat([reference, query], index_unique="-")
    scvi.model.SCVI.setup_anndata(both, layer="counts", batch_key="batch")
    started = time.perf_counter()
    scratch = scvi.model.SCVI(both, n_latent=args.latent_dim, n_hidden=args.hidden, n_layers=1)
    scratch.train(**schedule, enable_progress_bar=False)
    scratch_seconds = time.perf_counter() - started
    latent = scratch.get_latent_representation(both)
    reference.obsm[LATENT], query.obsm[LATENT] = latent[: reference.n_obs], latent[reference.n_obs :]
    rows["scvi_scratch"] = scores(reference, query, scratch_seconds)
    return rows


def benchmark(name: str, reference, query, corrected, args) -> pd.DataFrame:
    library = np.median(np.asarray(query.layers["counts"].sum(1))) / np.median(np.asarray(reference.layers["counts"].sum(1)))
    print(f"{name}: reference {reference.n_obs} cells ({', '.join(sorted(set(reference.obs['batch'])))}), "
          f"query {query.n_obs} cells ({', '.join(sorted(set(query.obs['batch'])))}), {reference.n_vars} genes; "
          f"query / reference median count {library:.2f}", flush=True)  # fmt: skip
    rows = genailab_rows(reference, query, corrected, args)
    if importlib.util.find_spec("scvi") is not None:
        rows.update(scvi_rows(reference, query, args))
    else:
        print("  scvi-tools is not importable: its rows are skipped")
    table = pd.DataFrame(rows).T
    scratch = table.loc["from_scratch"]
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for name in [row for row in table.index if row.startswith("mapping")]:
        mapping = table.loc[name]
        print(f"  {name} - from scratch: accuracy {mapping['accuracy'] - scratch['accuracy']:+.3f} (target >= -0.02), "
              f"mixing {mapping['mixing'] - scratch['mixing']:+.3f} (target >= -0.05), "
              f"time {mapping['train_seconds'] / scratch['train_seconds']:.2f} of from scratch", flush=True)  # fmt: skip
    print()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=3000, help="Simulated cells (all batches).")
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--cell-types", type=int, default=6)
    parser.add_argument("--batches", type=int, default=4, help="Simulated batches; the last one is the query.")
    parser.add_argument("--batch-effect", type=float, default=1.0,
                        help="Simulated batch effect scale: sd of the per-gene logit shifts and of the log-library shift per batch.")
    parser.add_argument("--markers", type=int, default=5, help="Simulated marker genes per cell type.")
    parser.add_argument("--marker-log-fc", type=float, default=1.0, help="Log fold change of the simulated markers.")
    parser.add_argument("--pbmc-batch-effect", type=float, default=0.5, help="sd of the log factor per gene on the PBMC query.")
    parser.add_argument("--pbmc-library-shift", type=float, default=0.7, help="Library-size factor of the PBMC query.")
    parser.add_argument("--epochs", type=lambda text: None if text == "default" else int(text), default=100,
                        help="Epochs of the reference and from-scratch models ('default': each model's own choice).")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unfreeze", type=lambda text: text.split(","), default=["encoder"],
                        help="Comma-separated unfreeze options of map_query beside the default, one mapping row each.")
    parser.add_argument("--query-cell-types", type=lambda text: text.split(","), default=None,
                        help="Keep only these cell types in the simulated query (e.g. type_0,type_1,type_2), to see "
                             "a query whose composition differs from the reference's.")
    parser.add_argument("--threads", type=int, help="torch threads (fewer avoids thrashing on a busy shared machine).")
    parser.add_argument("--splits", type=lambda text: text.split(","), default=["simulated", "pbmc"],
                        help="Comma-separated splits to run (simulated, pbmc).")
    parser.add_argument("--json", type=Path, help="Also write the tables to this JSON file.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = {
        "simulated": lambda: benchmark(
            f"simulated (batch effect {args.batch_effect}, {args.markers} markers at log FC {args.marker_log_fc})",
            *simulated_split(args), args,
        ),
        "pbmc": lambda: benchmark("pbmc68k", *pbmc_split(args), args),
    }
    unknown = sorted(set(args.splits) - set(splits))
    if unknown:
        parser.error(f"unknown splits {unknown}; choose from {sorted(splits)}")
    tables = {name: splits[name]() for name in args.splits}
    print(f"Total {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({k: json.loads(t.to_json(orient="index")) for k, t in tables.items()}, indent=1))


if __name__ == "__main__":
    main()
