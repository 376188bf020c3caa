"""Count and Gaussian likelihoods of the decoders.

* :mod:`~genailab.likelihood.distributions`: the reference ``torch.distributions`` classes
  (negative binomial, zero inflation of any base, and their log-probabilities), tested against scipy;
* :mod:`~genailab.likelihood.fused_nll`: the fast training path, the NB/ZINB negative
  log-likelihood per cell straight from decoder logits with hand-derived gradients;
* :mod:`~genailab.likelihood.sparse_counts`: a minibatch's non-zero counts in CSR form, handed from
  the loader to the fast path.
"""

from genailab.likelihood.distributions import NegativeBinomial, ZeroInflatedDistribution, ZeroInflatedNegativeBinomial
from genailab.likelihood.fused_nll import count_nll
from genailab.likelihood.sparse_counts import SparseCounts

__all__ = ["NegativeBinomial", "SparseCounts", "ZeroInflatedDistribution", "ZeroInflatedNegativeBinomial", "count_nll"]
