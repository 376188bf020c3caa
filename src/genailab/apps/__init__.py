"""Applications of a trained VAE to AnnData, scanpy style (``f(adata, model, *, key_added=...)``).

* :func:`denoise` (and :func:`denoising_error` against known true means);
* :func:`generate` cells for chosen conditions (and :func:`generated_vs_real` against real cells);
* :func:`integrate` batches with an adversarial discriminator (and :func:`integration_scores`);
* :func:`cluster`: latent, neighbours, UMAP, Leiden and marker genes;
* :func:`differential_expression` from posterior samples (scVI's change mode between single cells, or
  between group means), with calls at a posterior expected false discovery rate;
* :func:`transfer_labels` from a reference to a query mapped into its latent (kNN vote).
"""

from __future__ import annotations

from genailab.apps.augment import generate, generated_vs_real
from genailab.apps.cluster import cluster
from genailab.apps.de import differential_expression
from genailab.apps.denoise import denoise, denoising_error
from genailab.apps.integrate import integrate, integration_scores
from genailab.apps.transfer import transfer_labels

__all__ = [
    "cluster",
    "denoise",
    "denoising_error",
    "differential_expression",
    "generate",
    "generated_vs_real",
    "integrate",
    "integration_scores",
    "transfer_labels",
]
