"""Model-independent evaluation metrics on arrays, sparse matrices and AnnData.

* :mod:`~genailab.eval.latent`: cell-type conservation and batch mixing of a latent space;
* :mod:`~genailab.eval.generation`: generated vs real expression (gene statistics, distances, classifier test);
* :mod:`~genailab.eval.imputation`: scVI's masked-count imputation benchmark;
* :mod:`~genailab.eval.de`: agreement of differential-expression results;
* :mod:`~genailab.eval.model_metrics`: likelihood metrics of a fitted :class:`~genailab.VAE` on
  held-out cells (ELBO, marginal likelihood, reconstruction);
* :mod:`~genailab.eval.model_generation`: its generated cells vs real ones (fidelity per condition,
  posterior predictive checks, DE agreement);
* :mod:`~genailab.eval.protocols`: protocols that train models (masked imputation, latent-size sweep).
"""

from __future__ import annotations

from genailab.eval.de import precision_recall, top_k_overlap
from genailab.eval.generation import (
    classifier_two_sample_auc,
    energy_distance,
    gene_moment_agreement,
    mmd_rbf,
    pca_distance,
    per_condition,
    posterior_predictive_gene_stats,
)
from genailab.eval.imputation import imputation_median_l1, imputation_score, mask_counts
from genailab.eval.latent import (
    batch_silhouette,
    ilisi,
    knn_batch_entropy,
    label_silhouette,
    leiden_ari_nmi,
    leiden_ari_nmi_best_resolution,
)
from genailab.eval.model_generation import (
    de_agreement,
    generate_like,
    generation_fidelity,
    log_fold_change,
    posterior_predictive_check,
    replicate_from_posterior,
)
from genailab.eval.model_metrics import heldout_marginal_ll, reconstruction_error, validation_elbo
from genailab.eval.protocols import imputation_benchmark, latent_dim_sweep, masked_anndata

__all__ = [
    "batch_silhouette",
    "classifier_two_sample_auc",
    "de_agreement",
    "energy_distance",
    "gene_moment_agreement",
    "generate_like",
    "generation_fidelity",
    "heldout_marginal_ll",
    "ilisi",
    "imputation_benchmark",
    "imputation_median_l1",
    "imputation_score",
    "knn_batch_entropy",
    "label_silhouette",
    "leiden_ari_nmi",
    "latent_dim_sweep",
    "leiden_ari_nmi_best_resolution",
    "log_fold_change",
    "mask_counts",
    "masked_anndata",
    "mmd_rbf",
    "pca_distance",
    "per_condition",
    "posterior_predictive_check",
    "posterior_predictive_gene_stats",
    "precision_recall",
    "reconstruction_error",
    "replicate_from_posterior",
    "validation_elbo",
]
