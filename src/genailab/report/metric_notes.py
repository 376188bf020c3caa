"""One line per report metric: its range, which direction is better, and what it measures.

Keyed by report section, then metric name (as in ``metrics.json``); the page prints the line beside
the value. Which cells a section was computed on is written by :func:`~genailab.report.write_report`,
since it depends on the run.
"""

from __future__ import annotations

_GENERATION = {
    "mean_pearson": "-1..1, higher is better: Pearson correlation across genes of generated vs real gene means.",
    "variance_pearson": "-1..1, higher is better: the same for gene variances.",
    "zero_fraction_pearson": "-1..1, higher is better: the same for the share of zero counts per gene.",
    "zero_fraction_mae": "0..1, lower is better: mean over genes of |generated - real| zero fraction.",
    "energy_distance": "0 or more, lower is better (0 = same distribution): energy distance of generated vs real "
    "cells in a shared PCA of log-normalised expression.",
    "classifier_auc": "0..1, 0.5 is best (indistinguishable), 1 = fully told apart: cross-validated classifier "
    "of generated vs real cells; below 0.5 means something is off.",
    "n_cells": "real cells compared, each with one generated counterpart.",
}

NOTES: dict[str, dict[str, str]] = {
    "likelihood": {
        "negative_elbo": "nats per cell, lower is better: reconstruction + KL, the training objective.",
        "reconstruction": "nats per cell, lower is better: expected -log p(x | z) over the posterior.",
        "kl": "0 or more nats per cell: KL(q(z | x) || p(z)); not better either way on its own.",
        "marginal_ll": "log-likelihood per cell (at most 0 for counts), higher is better: importance-weighted "
        "(IWAE) estimate of log p(x).",
        "marginal_ll_samples": "importance samples K behind marginal_ll (more: tighter estimate).",
        "reconstruction_nll_at_mean": "nats per cell, lower is better: -log p(x | z = posterior mean).",
        "reconstruction_mse": "0 or more, lower is better: squared error of the decoded mean (log1p scale for counts).",
    },
    "latent": {
        "n_cells": "cells the latent-space metrics were computed on.",
        "n_cells_without_label": "cells with no label (NaN), left out of the label metrics.",
        "n_cells_without_batch": "cells with no batch (NaN), left out of the batch metrics.",
        "ari": "-0.5..1 (0 = chance), higher is better: adjusted Rand index of Leiden clusters at `resolution` "
        "vs the labels.",
        "nmi": "0..1, higher is better: normalised mutual information of those clusters vs the labels.",
        "n_clusters": "Leiden clusters at `resolution`.",
        "resolution": "the fixed Leiden resolution behind ari, nmi and n_clusters.",
        "best_ari": "-0.5..1, higher is better: ARI at best_resolution (scIB's sweep, picked with the labels, "
        "so optimistic).",
        "best_nmi": "0..1, higher is better: the highest NMI over scIB's Leiden resolutions 0.1, 0.2, ..., 2.0.",
        "best_n_clusters": "Leiden clusters at best_resolution.",
        "best_resolution": "the resolution of scIB's sweep with the highest NMI.",
        "label_silhouette": "0..1, higher is better (0.5 = no structure): (silhouette width of the labels + 1) / 2.",
        "clisi": "0..1, higher is better: scIB's cLISI, 1 = every neighbourhood (perplexity 30) holds one label.",
        "graph_connectivity": "0..1, higher is better: per label, share of its cells in the largest connected part "
        "of its 15-neighbour graph, averaged.",
        "ilisi": "0..1, higher is better: scIB's iLISI (Harmony's LISI at perplexity 30, scaled), 1 = batches "
        "evenly mixed in every neighbourhood.",
        "kbet": "0..1, higher is better: kBET acceptance rate, share of 50-cell neighbourhoods whose batch mix "
        "passes a chi-square test (alpha 0.05).",
        "kbet_per_label": "0..1, higher is better: scIB's kBET, the acceptance rate within each cell type "
        "(diffusion-map neighbourhoods), averaged over cell types.",
        "batch_entropy": "0..1, higher is better: entropy of the batch mix among 50 nearest neighbours / "
        "log(n_batches).",
        "knn_batch_inverse_simpson": "0..1, higher is better: inverse Simpson index of batch among 90 equally "
        "weighted neighbours, scaled (not scIB's iLISI).",
        "batch_silhouette": "0..1, higher is better: scIB's batch silhouette within each label, 1 = batches overlap.",
    },
    "generation": _GENERATION,
    "posterior_predictive": {
        "cv_pearson": "-1..1, higher is better: Pearson across genes of replicated vs observed coefficient of "
        "variation.",
        "cv_mae": "0 or more, lower is better: mean over genes of |replicated - observed| coefficient of variation.",
        "zero_fraction_pearson": "-1..1, higher is better: the same for the share of zeros per gene.",
        "zero_fraction_mae": "0..1, lower is better: mean over genes of |replicated - observed| zero fraction.",
    },
    "differential_expression": {
        "contrast": "the two largest label groups among the scored cells.",
        "generated_from": "prior: generated from the label as a condition; posterior: replicated from each cell.",
        "k": "top genes by |log fold change| compared.",
        "top_k_overlap": "0..1, higher is better: share of the real top-k genes also in the generated top k.",
        "chance_overlap": "k / n_genes: top_k_overlap expected by chance.",
        "lfc_pearson": "-1..1, higher is better: Pearson across genes of generated vs real log fold changes.",
    },
    "imputation": {
        "median_l1": "0 or more, lower is better: median |predicted - hidden count| over the hidden entries.",
        "median_l1_zero": "the same error when predicting 0 everywhere: the baseline to beat.",
        "n_masked": "hidden entries.",
        "fraction": "share of non-zero counts hidden.",
    },
    "latent_sweep": {
        "latent_dim": "latent dimensions of the retrained model.",
        "reconstruction_nll": "nats per cell, lower is better: -log p(x | z = posterior mean).",
        "reconstruction_mse": "0 or more, lower is better: squared error of the decoded mean.",
        "validation_reconstruction": "nats per cell, lower is better, on the validation cells.",
        "validation_kl": "0 or more nats per cell, on the validation cells.",
        "validation_negative_elbo": "nats per cell, lower is better, on the validation cells.",
        "epochs": "epochs trained.",
        "marginal_ll": "log-likelihood per cell, higher is better (IWAE).",
    },
}
