"""Training's hot path: the NB / ZINB negative log-likelihood per cell straight from the decoder's
logits, with hand-derived gradients.

With mu = library * softmax(logits) (B, G), inverse dispersion theta and dropout logits z,
:func:`count_nll` returns the same value as
``-ZeroInflatedNegativeBinomial(mu, theta, z).log_prob(x).sum(-1)`` (exactly, without the ``eps``
that guards ``log(mu)`` there, since log mu comes from ``log_softmax``). Autograd through that
expression keeps some forty (B, G) intermediates and visits each again backwards; on the CPU
those elementwise passes, not the matrix products, dominated a training step. Here the dense part
computes its derivatives alongside the value, in place, and on the CPU the terms that vanish at
zero counts (lgamma and its digamma gradient) run on the non-zero counts only: with a dispersion
per gene they depend on (gene, count) alone, so counts up to 32 are looked up in a (33, G) table
built once per step from 32 logarithms per gene; larger or non-whole counts take lgamma.

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

from genailab.likelihood.distributions import FLOAT64_FROM, count_terms
from genailab.likelihood.sparse_counts import SparseCounts

_TINY_LIBRARY = 1e-30  # log(library) stays finite for an all-zero cell, whose likelihood is then 0
_TABLE_COUNTS = 32  # counts 0..32 of genes with one dispersion each are looked up, not computed


def count_nll(
    x: torch.Tensor,
    logits: torch.Tensor,
    library: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None,
    *,
    x_sparse: SparseCounts | None = None,
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
    x_sparse
        Optional: the same counts in sparse row form (the loaders provide it); found in x when
        not given.

    Returns
    -------
    (B,) negative log-likelihood of each cell.
    """
    dtype = out_dtype = torch.promote_types(logits.dtype, torch.float32)  # bfloat16 logits (autocast): float32
    if dtype == torch.float32 and x.device.type == "cpu" and _has_bulk_counts(x, x_sparse):
        dtype = torch.float64  # as log_nb: large terms cancel, float32 lost 47 nats and 27% of d/dtheta at 1e6
    x, logits, theta = x.to(dtype), logits.to(dtype), theta.to(dtype)
    zi_logits = None if zi_logits is None else zi_logits.to(dtype)
    log_library = torch.log(library.detach().to(dtype).clamp_min(_TINY_LIBRARY))
    dense = _DenseCountNLL.apply(x, logits, log_library, theta, zi_logits)
    return (dense - _count_terms_per_cell(x, theta, x_sparse)).to(out_dtype)


def _has_bulk_counts(x: torch.Tensor, x_sparse: SparseCounts | None) -> bool:
    """Whether a count exceeds ``FLOAT64_FROM`` (read from the stored entries when given)."""
    values = x_sparse.counts if x_sparse is not None else x
    return bool(values.numel()) and bool(values.max() > FLOAT64_FROM)


def _count_terms_per_cell(x: torch.Tensor, theta: torch.Tensor, x_sparse: SparseCounts | None) -> torch.Tensor:
    """(B,) sum over genes of lgamma(x + theta) - lgamma(theta) - x log(theta) - lgamma(x + 1)."""
    if x.device.type != "cpu":  # accelerators: the dense form, which needs no host synchronisation
        return count_terms(x, theta, include_constant=True).sum(-1)
    if x_sparse is None:
        x_sparse = SparseCounts.from_dense(x)
    if theta.dim() == 1 or (theta.dim() == 2 and theta.shape[0] == 1):  # one dispersion per gene
        return _TabulatedCountTerms.apply(theta.reshape(-1), *x_sparse)
    positions = x_sparse.rows() * x.shape[-1] + x_sparse.genes
    return count_terms(x, theta, include_constant=True, nonzero=positions).sum(-1)


class _DenseCountNLL(torch.autograd.Function):
    """The count likelihood's terms that are not exactly zero at x = 0, negated and summed over
    genes; the forward pass computes the derivatives too (:func:`_dense_terms`), the backward
    pass only scales them by each cell's incoming gradient."""

    @staticmethod
    def forward(ctx, x, logits, log_library, theta, zi_logits):
        wanted = (ctx.needs_input_grad[1], ctx.needs_input_grad[3], zi_logits is not None and ctx.needs_input_grad[4])
        nll, g_logits, g_theta, g_zi = _dense_terms(x, logits, log_library, theta, zi_logits, wanted)
        ctx.save_for_backward(g_logits, g_theta, g_zi)
        ctx.theta_shape = theta.shape
        return nll

    @staticmethod
    def backward(ctx, grad):
        g_logits, g_theta, g_zi = ctx.saved_tensors
        grad = -grad  # d loss / d ll, (B,)
        column = grad.unsqueeze(-1)
        if g_theta is not None:
            if ctx.theta_shape == g_theta.shape:  # one theta per cell and gene
                g_theta = g_theta * column
            else:  # per gene: a weighted sum over cells
                g_theta = torch.mv(g_theta.t(), grad).view(ctx.theta_shape)
        return (None, None if g_logits is None else g_logits * column, None, g_theta,
                None if g_zi is None else g_zi * column)


def _dense_terms(x, logits, log_library, theta, zi_logits, wanted: tuple[bool, bool, bool]):
    """-(log-likelihood without the count terms) per cell (B,), and the derivatives of the
    log-likelihood per entry (B, G) in logits, theta and the dropout logits where ``wanted``
    (else None); they share most intermediates with the value.

    Zero counts are selected by arithmetic with the 0/1 indicator ``1 - sign(x)`` rather than by
    ``torch.where``, which is several times slower on the CPU; intermediates are updated in place
    to keep the number of (B, G) buffers small.
    """
    p = torch.softmax(logits, dim=-1)  # (B, G) proportions
    ll = torch.log_softmax(logits, dim=-1).add_(log_library)  # log mu
    mu = p * torch.exp(log_library)
    ratio = mu / theta
    log1p_ratio = torch.log1p(ratio)  # log((theta + mu) / theta)
    ll.sub_(log1p_ratio).mul_(x)  # x (log mu - log(theta + mu) + log theta)
    log_nb_zero = log1p_ratio * -theta
    ll.add_(log_nb_zero)  # log NB(x) without the count terms
    keep = None  # A: sigmoid(gap) at zero counts of the ZINB, else 1
    if zi_logits is not None:
        zero = 1.0 - torch.sign(x)  # 1 where x == 0
        gap = log_nb_zero.sub_(zi_logits)  # log NB(0) - z
        # x = 0: log(pi + (1 - pi) NB(0)) = z + softplus(gap) - softplus(z); else log(1 - pi) + log NB(x)
        ll.lerp_(F.softplus(gap).add_(zi_logits), zero).sub_(F.softplus(zi_logits))
        if any(wanted):
            dropped = torch.sigmoid(gap.neg()).mul_(zero)  # 1 - A, exact also where A is within rounding of 1
            keep = 1.0 - dropped
    nll = -ll.sum(-1)
    if not any(wanted):
        return nll, None, None, None
    mu_share = mu.mul_(ratio.add_(1.0).reciprocal_().div_(theta))  # mu / (theta + mu)
    g_logits = g_theta = g_zi = None
    if wanted[0]:
        weighted_theta = theta if keep is None else keep * theta  # A theta
        g_logits = (x + weighted_theta).mul_(mu_share).neg_().add_(x)  # mu d ll / d mu
        g_logits.sub_(p.mul_(g_logits.sum(-1, keepdim=True)))
    if wanted[1]:
        g_theta = mu_share - log1p_ratio
        if keep is not None:
            g_theta.mul_(keep)
        g_theta.add_(mu_share.mul_(x).div_(theta))
    if wanted[2]:
        g_zi = dropped.sub_(torch.sigmoid(zi_logits))  # (1 - A) - sigmoid(z)
    return nll, g_logits, g_theta, g_zi


class _TabulatedCountTerms(torch.autograd.Function):
    """:func:`_count_terms_per_cell` for a dispersion per gene, from the stored counts only.

    T[k, g] = sum_{j<k} log1p(j / theta_g) - log1p(j) equals the terms for count k of gene g
    (without the cancellation of an lgamma difference at large theta); its theta-derivative
    is the running sum of -j / (theta_g (theta_g + j)). The gradient is the histogram of the
    cells' incoming gradients over (count, gene), times that derivative table. Counts above 32
    or not whole take lgamma and digamma in float64.
    """

    @staticmethod
    def forward(ctx, theta, row_starts, genes, counts):
        n_genes = theta.numel()
        capped = counts.clamp_max(_TABLE_COUNTS + 0.5)  # untabulated counts become non-whole
        odd = torch.frac(capped).nonzero().squeeze(1)  # (n_odd,) positions of untabulated counts
        key = (capped.int() * n_genes).add_(genes).index_fill_(0, odd, (_TABLE_COUNTS + 1) * n_genes)
        values = _count_table(theta, _log_rising_steps).index_select(0, key)
        odd_genes = genes.index_select(0, odd)
        odd_counts = counts.index_select(0, odd).double()
        odd_theta = theta.index_select(0, odd_genes).double()
        if odd.numel():
            odd_terms = (torch.lgamma(odd_counts + odd_theta) - torch.lgamma(odd_theta)
                         - odd_counts * torch.log(odd_theta) - torch.lgamma(odd_counts + 1))
            values.index_copy_(0, odd, odd_terms.to(values.dtype))
        running = values.new_empty(values.numel() + 1, dtype=torch.float64)
        running[0] = 0.0
        torch.cumsum(values, 0, dtype=torch.float64, out=running[1:])  # per-row sums as differences
        ctx.save_for_backward(theta, row_starts, key, odd, odd_genes, odd_counts, odd_theta)
        return (running.index_select(0, row_starts[1:]) - running.index_select(0, row_starts[:-1])).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad):
        theta, row_starts, key, odd, odd_genes, odd_counts, odd_theta = ctx.saved_tensors
        slope = _count_table(theta, _log_rising_slopes)
        low, high = torch.aminmax(grad)
        if bool(low == high):  # one weight for every cell (a mean over cells): a plain count
            histogram = torch.bincount(key, minlength=slope.numel()).to(slope.dtype) * high
            odd_weights = high.expand(odd.numel())
        else:
            weights = torch.repeat_interleave(grad, row_starts.diff(), output_size=key.numel())  # (nnz,)
            histogram = torch.bincount(key, weights=weights, minlength=slope.numel())
            odd_weights = weights.index_select(0, odd)
        g_theta = (histogram * slope)[:-1].view(_TABLE_COUNTS + 1, -1).sum(0)
        if odd.numel():
            slopes = torch.digamma(odd_counts + odd_theta) - torch.digamma(odd_theta) - odd_counts / odd_theta
            g_theta.index_add_(0, odd_genes, (odd_weights * slopes).to(g_theta.dtype))
        return g_theta, None, None, None


def _log_rising_steps(theta: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """log1p(j / theta) - log1p(j), (K, G): the step from count j to j + 1 of the count terms."""
    return torch.log1p(steps / theta) - torch.log1p(steps)


def _log_rising_slopes(theta: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """d/dtheta of :func:`_log_rising_steps`, (K, G)."""
    return -steps / (theta * (theta + steps))


def _count_table(theta: torch.Tensor, step) -> torch.Tensor:
    """Running sums over counts k = 0..32 of ``step(theta, j)``, j < k, flattened count-major
    ((33 * G + 1,), entry k * G + g), with a final zero entry for untabulated counts."""
    n_genes = theta.numel()
    steps = torch.arange(_TABLE_COUNTS, dtype=theta.dtype, device=theta.device).unsqueeze(1)  # (K, 1)
    table = theta.new_empty((_TABLE_COUNTS + 1) * n_genes + 1)
    table[:n_genes] = 0.0  # count 0
    table[-1] = 0.0
    torch.cumsum(step(theta, steps), 0, out=table[n_genes:-1].view(_TABLE_COUNTS, n_genes))
    return table
