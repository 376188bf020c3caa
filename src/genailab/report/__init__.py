"""Evaluation of a fitted model: likelihood and generation metrics, protocols that train models,
figures, run folders and one self-contained HTML page per model.

* :mod:`~genailab.report.model_metrics`: held-out ELBO, marginal likelihood, reconstruction;
* :mod:`~genailab.report.model_generation`: generated cells vs real ones (fidelity per condition,
  posterior predictive checks, DE agreement);
* :mod:`~genailab.report.protocols`: masked-count imputation and the latent-size sweep (they train);
* :mod:`~genailab.report.evaluate`: ``genailab evaluate``: metrics.json, figures and the page.

>>> from genailab.report import write_report
>>> write_report(adata, model, "reports/nb", label_key="cell_type", batch_key="batch")  # doctest: +SKIP
"""

from __future__ import annotations

from genailab.report.evaluate import write_report
from genailab.report.model_generation import (
    de_agreement,
    generate_like,
    generation_fidelity,
    log_fold_change,
    posterior_predictive_check,
    replicate_from_posterior,
)
from genailab.report.model_metrics import heldout_marginal_ll, reconstruction_error, validation_elbo
from genailab.report.protocols import imputation_benchmark, latent_dim_sweep, masked_anndata
from genailab.report.run_folder import write_run

__all__ = [
    "de_agreement",
    "generate_like",
    "generation_fidelity",
    "heldout_marginal_ll",
    "imputation_benchmark",
    "latent_dim_sweep",
    "log_fold_change",
    "masked_anndata",
    "posterior_predictive_check",
    "reconstruction_error",
    "replicate_from_posterior",
    "validation_elbo",
    "write_report",
    "write_run",
]
