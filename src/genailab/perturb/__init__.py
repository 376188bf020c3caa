"""Perturbation and drug-response prediction: counterfactual expression of control cells under
unseen cell type x drug x dose combinations, with honest baselines and held-out protocols.

* :class:`PerturbationModel` (:mod:`~genailab.anndata_models.perturbation`, re-exported here): fit on an AnnData, ``predict`` the
  counterfactual of given control cells under a drug (or ``"A+B"``) at a dose;
* :mod:`~genailab.model.perturbation`: the tensor model (basal latent, per-gene drug response, dose curves);
* :mod:`~genailab.perturb.baselines`: no change, perturbed mean, additive shift, matching mean, ridge,
  scGen latent arithmetic, and the generator's oracle;
* :mod:`~genailab.perturb.evaluate`: metrics, the reference controls changes are measured from, and
  the five held-out split protocols;
* :mod:`~genailab.perturb.benchmark`: all methods on one split, the table and (ours - best baseline)
  with paired bootstrap intervals;
* :mod:`~genailab.perturb.datasets`: sciplex / Norman layouts mapped to genailab's columns;
* :mod:`~genailab.perturb.semisynthetic`: a screen built on real PBMC counts with known drug effects.
"""

from genailab.anndata_models.perturbation import PerturbationModel
from genailab.perturb.baselines import (
    AdditiveShift, LatentArithmetic, MatchingMean, NoChange, Oracle, PerturbedMean, RidgeCovariates,
)  # fmt: skip
from genailab.perturb.benchmark import (
    CounterfactualVAE, compare_methods, contrast, default_methods, format_table, summarize,
)  # fmt: skip
from genailab.perturb.datasets import standardize_obs
from genailab.perturb.evaluate import (
    HoldoutSplit, holdout_split, log_normalize, perturbation_metrics, r2_score, reference_controls,
)  # fmt: skip
from genailab.model.perturbation import DoseResponse, PerturbationConfig, PerturbationVAE
from genailab.data.perturbation_schema import ObsKeys, PerturbationSchema

__all__ = [
    "AdditiveShift",
    "CounterfactualVAE",
    "DoseResponse",
    "HoldoutSplit",
    "LatentArithmetic",
    "MatchingMean",
    "NoChange",
    "ObsKeys",
    "Oracle",
    "PerturbationConfig",
    "PerturbationModel",
    "PerturbationSchema",
    "PerturbationVAE",
    "PerturbedMean",
    "RidgeCovariates",
    "compare_methods",
    "contrast",
    "default_methods",
    "format_table",
    "holdout_split",
    "log_normalize",
    "perturbation_metrics",
    "r2_score",
    "reference_controls",
    "standardize_obs",
    "summarize",
]
