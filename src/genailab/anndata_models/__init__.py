"""The AnnData-facing models: build from an AnnData, fit, infer, save and load.

* :mod:`~genailab.anndata_models.base`: the lifecycle both models share (validation, split,
  seeding, loaders, torchrun sharding, checkpoints, provenance, saving and loading);
* :class:`~genailab.anndata_models.vae.VAE`: the conditional VAE (:mod:`genailab.model.vae`);
* :class:`~genailab.anndata_models.perturbation.PerturbationModel`: counterfactual drug and dose
  response (:mod:`genailab.model.perturbation`);
* :mod:`~genailab.anndata_models.files`: the saved-model folder (JSON description + weights).
"""

from genailab.anndata_models.perturbation import PerturbationModel
from genailab.anndata_models.vae import VAE

__all__ = ["PerturbationModel", "VAE"]
