"""Model-independent evaluation metrics on arrays, sparse matrices and AnnData.

* :mod:`~genailab.eval.latent`: cell-type conservation and batch mixing of a latent space;
* :mod:`~genailab.eval.integration`: scIB's iLISI, cLISI, kBET (overall and per cell type) and graph connectivity;
* :mod:`~genailab.eval.generation`: generated vs real expression (gene statistics, distances, classifier test);
* :mod:`~genailab.eval.imputation`: scVI's masked-count imputation benchmark;
* :mod:`~genailab.eval.de`: agreement of differential-expression results.

Nothing here imports a model: arrays, sparse matrices or AnnData in, numbers out. Metrics of a
fitted model live in :mod:`genailab.report`.
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
from genailab.eval.integration import (
    clisi,
    diffusion_embedding,
    graph_connectivity,
    ilisi,
    kbet,
    kbet_label_table,
    kbet_per_label,
    lisi,
)
from genailab.eval.latent import (
    batch_silhouette,
    knn_batch_entropy,
    knn_batch_inverse_simpson,
    label_silhouette,
    leiden_ari_nmi,
    leiden_ari_nmi_best_resolution,
)

__all__ = [
    "batch_silhouette",
    "classifier_two_sample_auc",
    "clisi",
    "diffusion_embedding",
    "energy_distance",
    "gene_moment_agreement",
    "graph_connectivity",
    "ilisi",
    "imputation_median_l1",
    "imputation_score",
    "kbet",
    "kbet_label_table",
    "kbet_per_label",
    "knn_batch_entropy",
    "knn_batch_inverse_simpson",
    "label_silhouette",
    "leiden_ari_nmi",
    "leiden_ari_nmi_best_resolution",
    "lisi",
    "mask_counts",
    "mmd_rbf",
    "pca_distance",
    "per_condition",
    "posterior_predictive_gene_stats",
    "precision_recall",
    "top_k_overlap",
]
