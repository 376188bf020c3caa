"""Training's hot path: the NB / ZINB negative log-likelihood per cell straight from the decoder's
logits, with hand-derived gradients.

With mu = library * softmax(logits) (B, G), inverse dispersion theta and dropout logits z,
:func:`count_nll` returns the same value as
``-ZeroInflatedNegativeBinomial(mu, theta, z).log_prob(x).sum(-1)`` (exactly, without the ``eps``
that guards ``log(mu)`` there, since log mu comes from ``log_softmax``). Autograd through that
expression keeps some forty (B, G) intermediates and visits each again backwards; on the CPU
those elementwise passes, not the matrix products, dominated a training step. Here the dense part
costs a handful of passes each way, and the terms that vanish at zero counts
(:func:`genailab.distributions.count_terms`, lgamma and its digamma gradient) run on the non-zero
counts only.

Gradients, for one gene of one cell, with A = 1 for the NB and for counts x > 0, and
A = sigmoid(log NB(0) - z) (the posterior weight of "NB zero" against "dropout") at x = 0:

    mu * d/dmu   = x - mu (x + A theta) / (theta + mu)
    d/dtheta     = A (mu / (theta + mu) - log1p(mu / theta)) + x mu / (theta (theta + mu))   [+ count terms]
    d/dz         = [x = 0] (1 - A) - sigmoid(z)
    d/dlogits    = mu d/dmu - softmax(logits) * sum_genes(mu d/dmu)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genailab.distributions import count_terms

_TINY_LIBRARY = 1e-30  # log(library) stays finite for an all-zero cell, whose likelihood is then 0


def count_nll(
    x: torch.Tensor,
    logits: torch.Tensor,
    library: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None,
    *,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log NB(x; mu, theta) or -log ZINB(x; mu, theta, sigmoid(zi_logits)), summed over genes.

    Parameters
    ----------
    x
        Counts (B, G).
    logits
        Unnormalised log expression proportions (B, G); mu = library * softmax(logits).
    library
        Library sizes (B, 1), treated as data (no gradient).
    theta
        Inverse dispersions, broadcastable to (B, G): per gene (G,) or per cell and gene (B, G).
    zi_logits
        Dropout logits (B, G) for the ZINB; None for the NB.
    nonzero
        Optional (nnz,) row-major positions of the non-zero counts in x (stored zeros may be
        among them); found in x when not given.

    Returns
    -------
    (B,) negative log-likelihood of each cell.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bfloat16 logits (autocast) are computed in float32
    x, logits, theta = x.to(dtype), logits.to(dtype), theta.to(dtype)
    zi_logits = None if zi_logits is None else zi_logits.to(dtype)
    log_library = torch.log(library.detach().to(dtype).clamp_min(_TINY_LIBRARY))
    dense = _DenseCountNLL.apply(x, logits, log_library, theta, zi_logits)
    return dense - count_terms(x, theta, include_constant=True, nonzero=nonzero).sum(-1)


class _DenseCountNLL(torch.autograd.Function):
    """The count likelihood's terms that are not exactly zero at x = 0, negated and summed over genes.

    Zero counts are selected by arithmetic with the 0/1 indicator ``1 - sign(x)`` rather than by
    ``torch.where``, which is several times slower on the CPU.
    """

    @staticmethod
    def forward(ctx, x, logits, log_library, theta, zi_logits):
        p = torch.softmax(logits, dim=-1)  # (B, G) proportions
        log_mu = torch.log_softmax(logits, dim=-1).add_(log_library)
        mu = p * torch.exp(log_library)
        log1p_ratio = torch.log1p(mu / theta)  # log((theta + mu) / theta)
        log_nb_zero = -theta * log1p_ratio
        ll = log_nb_zero + x * log_mu.sub_(log1p_ratio)  # log NB(x) without the count terms
        zero = gap = None
        if zi_logits is not None:
            zero = 1.0 - torch.sign(x)  # 1 where x == 0
            gap = log_nb_zero.sub_(zi_logits)  # log NB(0) - z
            # x = 0: log(pi + (1 - pi) NB(0)) = z + softplus(gap) - softplus(z); else log(1 - pi) + log NB(x)
            ll = ll.lerp_(F.softplus(gap).add_(zi_logits), zero).sub_(F.softplus(zi_logits))
        ctx.save_for_backward(x, p, mu, theta, log1p_ratio, zi_logits, zero, gap)
        return -ll.sum(-1)

    @staticmethod
    def backward(ctx, grad):
        x, p, mu, theta, log1p_ratio, zi_logits, zero, gap = ctx.saved_tensors
        grad = -grad.unsqueeze(-1)  # (B, 1): d loss / d ll
        inverse = torch.reciprocal(theta + mu)
        dropout_share = None if zi_logits is None else torch.sigmoid(-gap).mul_(zero)  # 1 - A
        weighted_theta = theta if dropout_share is None else theta - dropout_share * theta  # A theta
        g_mu = x - mu * (x + weighted_theta) * inverse  # mu * d ll / d mu
        g_logits = g_mu.sub_(p * g_mu.sum(-1, keepdim=True)).mul_(grad)
        g_theta = None
        if ctx.needs_input_grad[3]:
            nb_part = mu * inverse - log1p_ratio
            if dropout_share is not None:
                nb_part.sub_(dropout_share * nb_part)
            g_theta = nb_part.add_(x * mu * inverse / theta).mul_(grad).sum_to_size(theta.shape)
        g_zi = None
        if zi_logits is not None and ctx.needs_input_grad[4]:
            g_zi = dropout_share.sub_(torch.sigmoid(zi_logits)).mul_(grad)
        return None, g_logits, None, g_theta, g_zi
