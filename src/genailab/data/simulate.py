"""Simulated count data with known ground truth: latent cell states, true means, DE genes, drug effects.

The generative model, for cell ``i`` of type ``k`` in batch ``b`` and gene ``g``:

* latent state ``z_i = centre_k + eps_i`` with ``centre_k ~ N(0, I)`` and ``eps_i ~ N(0, 0.5^2 I)``;
* logits ``baseline_g + (z_i @ W)_g + marker_lfc_kg + batch_effect_bg`` with ``W ~ N(0, 0.25 / D)``,
  ``baseline ~ N(0, 1)``, ``batch_effect ~ N(0, batch_effect_scale^2)``; a softmax over genes
  gives the proportions ``p_ig``;
* library size ``L_i``: log-normal with mean ``library_mean`` and a per-batch shift of the log
  library drawn from ``N(0, batch_effect_scale^2)``;
* drug shift ``s_ig`` (perturbation arm only), added to the log mean (see :class:`PerturbationSpec`);
* true mean ``mu_ig = L_i * p_ig * exp(s_ig)``; counts ``~ NB(mu_ig, theta_g)`` drawn as a
  Gamma-Poisson mixture; under ZINB each count is then set to zero with probability ``dropout``.

Cells are drawn in blocks of :data:`CELL_BLOCK` with one random stream per block, so row ``i``
of :func:`simulate` equals row ``i`` of :func:`write_simulated_h5ad` for the same seed and
settings, however the writer chunks its work.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.special import expit, logsumexp

from genailab.checks import check_number
from genailab.errors import ConfigError

logger = logging.getLogger(__name__)

CELL_BLOCK = 1024  # cells per random stream; fixes each row independently of how work is chunked
LATENT_NOISE = 0.5  # sd of a cell's latent state around its cell-type centre (centres have sd 1)
LOADING_SCALE = 0.5  # sd of (centre @ W) per gene, so cell types differ in every gene a little
LIKELIHOODS = ("nb", "zinb")
MAX_LIBRARY_MEAN = 1e9  # largest library_mean: far above any real cell, far below the sampler's limit
MAX_RATE = 1e18  # largest Poisson rate numpy can draw from (about 9.2e18), with room to spare


@dataclass(frozen=True)
class PerturbationSpec:
    """Drug arm of the simulator: which drugs, doses and effects.

    A drug ``d`` given at dose ``x`` to a cell of type ``k`` shifts the log mean of gene ``g`` by
    ``effect_dkg * hill(x)`` with ``hill(x) = x^h / (x^h + ec50_d^h)``, a sigmoid in log dose.
    ``effect_dkg = a_dg * sensitivity_dk``: each drug moves ``n_target_genes`` random genes by
    ``a_dg = ±max_log_fc * U(0.5, 1)``, scaled per cell type by ``sensitivity_dk ~ U(0.2, 1)``.
    ``ec50_d`` is drawn log-uniformly between the smallest and largest dose. Pairs of drugs are
    given at the same dose; their shifts add, except for ``interacting_pairs`` of them (chosen at
    random), which move ``n_interaction_genes`` genes further by
    ``b_pg * sqrt(sensitivity_ak * sensitivity_bk) * hill_a(x) * hill_b(x)``, with
    ``b_pg = ±max_log_fc * U(0.5, 1)`` on genes drawn half from the two drugs' targets
    (synergy or buffering there) and half from the rest (new genes). The interaction is not a
    function of the single drugs' effects: no method can learn it without seeing the pair.
    """

    n_drugs: int = 3
    doses: tuple[float, ...] = (0.1, 1.0, 10.0)
    control_fraction: float = 0.25  # share of cells that get no drug
    pair_fraction: float = 0.0  # share of treated cells that get two different drugs
    n_target_genes: int = 20  # genes each drug moves
    max_log_fc: float = 2.0  # largest |natural-log fold change| at a saturating dose
    hill: float = 1.5  # Hill coefficient: steepness of the dose response in log dose
    interacting_pairs: int = 0  # drug pairs whose effect is not the sum of their drugs'
    n_interaction_genes: int = 10  # genes each interacting pair moves beyond the sum

    def __post_init__(self):
        check_number("n_drugs", self.n_drugs, integer=True, ge=1)
        object.__setattr__(self, "doses", _check_doses(self.doses))
        check_number("control_fraction", self.control_fraction, ge=0, lt=1)
        check_number("pair_fraction", self.pair_fraction, ge=0, le=1)
        for name in ("n_target_genes", "n_interaction_genes"):
            check_number(name, getattr(self, name), integer=True, ge=0)
        check_number("max_log_fc", self.max_log_fc, ge=0)
        check_number("hill", self.hill, gt=0, hint="It is the steepness of the dose response, e.g. 1.5.")
        if self.pair_fraction > 0 and self.n_drugs < 2:
            raise ConfigError("`pair_fraction` > 0 needs `n_drugs` >= 2.", argument="n_drugs")
        n_pairs = self.n_drugs * (self.n_drugs - 1) // 2
        check_number("interacting_pairs", self.interacting_pairs, integer=True, ge=0, le=n_pairs,
                     hint=f"{self.n_drugs} drugs form {n_pairs} pair{'s' * (n_pairs != 1)}.")  # fmt: skip
        if self.interacting_pairs and not self.pair_fraction:
            raise ConfigError("`interacting_pairs` > 0 needs `pair_fraction` > 0.", argument="pair_fraction")

    @property
    def drug_names(self) -> list[str]:
        return [f"drug_{d}" for d in range(self.n_drugs)]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every pair of drug indices (a < b), in label order."""
        return [(a, b) for a in range(self.n_drugs) for b in range(a + 1, self.n_drugs)]

    @property
    def labels(self) -> list[str]:
        """Categories of ``obs['drug']``: control, single drugs, then pairs when any are given."""
        names = self.drug_names
        pairs = [f"{names[a]}+{names[b]}" for a, b in self.pairs] if self.pair_fraction else []
        return ["control", *names, *pairs]


def _check_doses(doses) -> tuple[float, ...]:
    """``doses`` as a tuple of positive finite floats."""
    if isinstance(doses, (str, bytes)) or not hasattr(doses, "__iter__"):
        raise ConfigError(
            f"doses must be a list of positive doses like (0.1, 1.0, 10.0), got {doses!r}.", argument="doses"
        )
    doses = tuple(check_number(f"doses[{i}]", dose, gt=0) for i, dose in enumerate(doses))
    if not doses:
        raise ConfigError("doses must hold at least one dose, e.g. (0.1, 1.0, 10.0).", argument="doses")
    return doses


@dataclass(frozen=True)
class _Settings:
    """Every simulation option, validated once; stored in ``uns['simulation']``."""

    n_cell_types: int = 5
    n_batches: int = 2
    latent_dim: int = 5
    likelihood: str = "nb"
    theta: float = 5.0
    theta_log_sd: float = 0.0
    dropout: float = 0.1
    library_mean: float = 2000.0
    library_log_sd: float = 0.3
    batch_effect_scale: float = 0.3
    n_markers: int = 10
    marker_log_fc: float = 2.0
    perturbation: PerturbationSpec | None = None
    seed: int = 0

    def check(self, n_cells: int, n_genes: int) -> None:
        check_number("n_cells", n_cells, integer=True, ge=1)
        check_number("n_genes", n_genes, integer=True, ge=1)
        check_number("seed", self.seed, integer=True, ge=0, lt=2**63)  # h5ad stores it as int64
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood={self.likelihood!r} is not one of {LIKELIHOODS}.", argument="likelihood")
        for name in ("n_cell_types", "n_batches", "latent_dim"):
            check_number(name, getattr(self, name), integer=True, ge=1)
        check_number("n_markers", self.n_markers, integer=True, ge=0)
        if self.n_cell_types * self.n_markers > n_genes:
            raise ConfigError(
                f"{self.n_cell_types} cell types x {self.n_markers} markers per type need at least "
                f"{self.n_cell_types * self.n_markers} genes; raise `n_genes` or lower `n_cell_types`.",
                argument="n_genes",
            )
        check_number("theta", self.theta, gt=0)
        for name in ("theta_log_sd", "library_log_sd", "batch_effect_scale"):
            check_number(name, getattr(self, name), ge=0)
        check_number("library_mean", self.library_mean, gt=0, le=MAX_LIBRARY_MEAN)
        check_number("marker_log_fc", self.marker_log_fc)
        check_number("dropout", self.dropout, ge=0, lt=1)
        if self.perturbation is not None and self.perturbation.n_target_genes > n_genes:
            raise ConfigError(
                f"PerturbationSpec.n_target_genes={self.perturbation.n_target_genes} is larger than "
                f"n_genes={n_genes}; lower it or raise `n_genes`.",
                argument="n_genes",
            )

    def to_uns(self, n_cells: int, n_genes: int) -> dict:
        params = dataclasses.asdict(self)
        params.update(n_cells=n_cells, n_genes=n_genes, cell_block=CELL_BLOCK)
        if self.perturbation is None:
            del params["perturbation"]  # h5ad cannot store None
        else:
            params["perturbation"]["doses"] = list(self.perturbation.doses)
        return params


def _settings(perturbation, **options) -> _Settings:
    if isinstance(perturbation, dict):
        try:
            perturbation = PerturbationSpec(**perturbation)
        except TypeError as err:
            message = f"perturbation has an unknown PerturbationSpec field: {err}"
            raise ConfigError(message, argument="perturbation") from None
    elif perturbation is not None and not isinstance(perturbation, PerturbationSpec):
        raise ConfigError(
            f"perturbation must be a PerturbationSpec, a dict of its fields or None, got {perturbation!r}.",
            argument="perturbation",
        )
    try:
        return _Settings(perturbation=perturbation, **options)
    except TypeError as err:
        raise ConfigError(f"unknown simulation option: {err}") from None


@dataclass
class _Truth:
    """Parameters shared by all cells, drawn once from the seed."""

    centres: np.ndarray  # (K, D)
    loadings: np.ndarray  # (D, G)
    baseline: np.ndarray  # (G,)
    batch_gene: np.ndarray  # (B, G) additive logit shifts
    batch_library: np.ndarray  # (B,) shifts of the log library size
    theta: np.ndarray  # (G,)
    marker_of: np.ndarray  # (G,) cell-type index whose marker the gene is, -1 if none
    drug_effect: np.ndarray  # (n_drugs, K, G) log fold change at a saturating dose
    ec50: np.ndarray  # (n_drugs,)
    interaction: dict = dataclasses.field(default_factory=dict)  # (a, b) -> (K, G) extra log fold change


def _draw_truth(n_genes: int, s: _Settings) -> _Truth:
    rng = np.random.default_rng([s.seed, 0])
    K, D = s.n_cell_types, s.latent_dim
    marker_of = np.full(n_genes, -1)
    chosen = rng.permutation(n_genes)[: K * s.n_markers]
    marker_of[chosen] = np.repeat(np.arange(K), s.n_markers)
    truth = _Truth(
        centres=rng.normal(0.0, 1.0, (K, D)),
        loadings=rng.normal(0.0, LOADING_SCALE / np.sqrt(D), (D, n_genes)),
        baseline=rng.normal(0.0, 1.0, n_genes),
        batch_gene=rng.normal(0.0, s.batch_effect_scale, (s.n_batches, n_genes)),
        batch_library=rng.normal(0.0, s.batch_effect_scale, s.n_batches),
        theta=s.theta * np.exp(rng.normal(0.0, s.theta_log_sd, n_genes)),
        marker_of=marker_of,
        drug_effect=np.zeros((0, K, n_genes)),
        ec50=np.zeros(0),
    )
    p = s.perturbation
    if p is not None:
        per_gene = np.zeros((p.n_drugs, n_genes))
        for d in range(p.n_drugs):
            targets = rng.choice(n_genes, p.n_target_genes, replace=False)
            sign = rng.choice([-1.0, 1.0], p.n_target_genes)
            per_gene[d, targets] = sign * p.max_log_fc * rng.uniform(0.5, 1.0, p.n_target_genes)
        sensitivity = rng.uniform(0.2, 1.0, (p.n_drugs, K))
        truth.drug_effect = sensitivity[:, :, None] * per_gene[:, None, :]
        truth.ec50 = np.exp(rng.uniform(np.log(min(p.doses)), np.log(max(p.doses)), p.n_drugs))
        if p.interacting_pairs:
            chosen = rng.permutation(len(p.pairs))[: p.interacting_pairs]
            for a, b in (p.pairs[i] for i in sorted(chosen)):
                truth.interaction[(a, b)] = draw_pair_interaction(
                    rng, per_gene[[a, b]], sensitivity[[a, b]], p.n_interaction_genes, p.max_log_fc
                )
    return truth


def draw_pair_interaction(
    rng: np.random.Generator, effects: np.ndarray, sensitivity: np.ndarray, n_genes_moved: int, max_log_fc: float
) -> np.ndarray:
    """(K, G) extra log fold change of one interacting pair at saturating doses of both drugs.

    ``effects`` (2, G): the two drugs' per-gene effects (non-zero on their targets); ``sensitivity``
    (2, K): their cell-type scalings. Half of the ``n_genes_moved`` genes are among the targets.
    """
    n_genes = effects.shape[1]
    targets = np.flatnonzero((effects != 0).any(0))
    others = np.setdiff1d(np.arange(n_genes), targets)
    n_shared = min(n_genes_moved // 2, targets.size)
    n_new = min(n_genes_moved - n_shared, others.size)
    genes = np.concatenate([rng.choice(targets, n_shared, replace=False), rng.choice(others, n_new, replace=False)])
    per_gene = np.zeros(n_genes)
    per_gene[genes] = rng.choice([-1.0, 1.0], genes.size) * max_log_fc * rng.uniform(0.5, 1.0, genes.size)
    return np.sqrt(sensitivity[0] * sensitivity[1])[:, None] * per_gene[None, :]


def _marker_lfc(truth: _Truth, s: _Settings) -> np.ndarray:
    """(K, G) logit shift of each cell type's marker genes."""
    lfc = np.zeros((s.n_cell_types, truth.marker_of.size))
    genes = np.flatnonzero(truth.marker_of >= 0)
    lfc[truth.marker_of[genes], genes] = s.marker_log_fc
    return lfc


def hill_response(dose, ec50, hill: float) -> np.ndarray:
    """Fraction of the saturating effect reached at ``dose``: ``x^h / (x^h + ec50^h)``, 0 at dose 0."""
    dose = np.asarray(dose, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(dose > 0, expit(hill * (np.log(dose) - np.log(ec50))), 0.0)


def _draw_block(truth: _Truth, s: _Settings, block: int) -> dict[str, np.ndarray]:
    """All cell-level draws for cells ``block * CELL_BLOCK`` onwards."""
    rng = np.random.default_rng([s.seed, block + 1])
    n = CELL_BLOCK
    cell_type = rng.integers(s.n_cell_types, size=n)
    batch = rng.integers(s.n_batches, size=n)
    z = truth.centres[cell_type] + rng.normal(0.0, LATENT_NOISE, (n, s.latent_dim))  # (n, D)
    logits = truth.baseline + z @ truth.loadings + _marker_lfc(truth, s)[cell_type] + truth.batch_gene[batch]
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)  # (n, G)
    log_lib_mean = np.log(s.library_mean) - s.library_log_sd**2 / 2 + truth.batch_library[batch]
    library = np.exp(rng.normal(log_lib_mean, s.library_log_sd))  # (n,)
    cells = dict(cell_type=cell_type, batch=batch, z=z, library=library)
    log_mu = np.log(library)[:, None] + log_p
    if s.perturbation is not None:
        cells.update(_draw_drugs(rng, s.perturbation, n))
        for column in ("drug_a", "drug_b"):
            treated = cells[column] >= 0
            d = cells[column][treated]
            level = hill_response(cells["dose"][treated], truth.ec50[d], s.perturbation.hill)
            log_mu[treated] += level[:, None] * truth.drug_effect[d, cell_type[treated]]
        for (a, b), extra in truth.interaction.items():
            rows = (cells["drug_a"] == a) & (cells["drug_b"] == b)
            levels = [hill_response(cells["dose"][rows], truth.ec50[d], s.perturbation.hill) for d in (a, b)]
            log_mu[rows] += (levels[0] * levels[1])[:, None] * extra[cell_type[rows]]
    mu = np.exp(log_mu)
    rate = rng.gamma(truth.theta, mu / truth.theta)
    if not np.all(rate <= MAX_RATE):  # also NaN or infinite
        raise ConfigError(
            f"some simulated count rates are above {MAX_RATE:.0e} or not finite, more than the count sampler can "
            "draw; lower `library_mean`, `library_log_sd`, `batch_effect_scale`, `theta_log_sd` or the drug arm's "
            "`max_log_fc`."
        )
    counts = rng.poisson(rate).astype(np.float32)
    if s.likelihood == "zinb":
        counts[rng.random(counts.shape) < s.dropout] = 0.0
    cells.update(mean=mu.astype(np.float32), counts=sp.csr_matrix(counts))
    return cells


def _draw_drugs(rng: np.random.Generator, p: PerturbationSpec, n: int) -> dict[str, np.ndarray]:
    """Drug indices (-1 for none; drug_b >= 0 only for pairs) and dose per cell."""
    treated = rng.random(n) >= p.control_fraction
    pair = treated & (rng.random(n) < p.pair_fraction)
    drug_a = rng.integers(p.n_drugs, size=n)
    other = (drug_a + 1 + rng.integers(max(p.n_drugs - 1, 1), size=n)) % p.n_drugs
    dose = np.asarray(p.doses, dtype=np.float64)[rng.integers(len(p.doses), size=n)]
    first, second = np.minimum(drug_a, other), np.maximum(drug_a, other)
    return dict(
        drug_a=np.where(treated, np.where(pair, first, drug_a), -1),
        drug_b=np.where(pair, second, -1),
        dose=np.where(treated, dose, 0.0),
    )


def _draw_cells(truth: _Truth, s: _Settings, start: int, stop: int, *, with_mean: bool = True) -> dict:
    """Cells ``start:stop``, drawn from the blocks that cover them; counts as CSR."""
    first = start // CELL_BLOCK
    blocks = []
    for b in range(first, (stop - 1) // CELL_BLOCK + 1):
        cells = _draw_block(truth, s, b)
        if not with_mean:
            del cells["mean"]  # the writer keeps only CSR counts in memory
        blocks.append(cells)
    rows = slice(start - first * CELL_BLOCK, stop - first * CELL_BLOCK)
    joined = {key: np.concatenate([blk[key] for blk in blocks]) for key in blocks[0] if key != "counts"}
    joined["counts"] = sp.vstack([blk["counts"] for blk in blocks], format="csr")
    return {key: value[rows] for key, value in joined.items()}


def _obs(cells: dict[str, np.ndarray], s: _Settings, start: int) -> pd.DataFrame:
    n = cells["library"].size
    obs = pd.DataFrame(index=[f"cell_{i}" for i in range(start, start + n)])
    obs["cell_type"] = pd.Categorical.from_codes(cells["cell_type"], [f"type_{k}" for k in range(s.n_cell_types)])
    obs["batch"] = pd.Categorical.from_codes(cells["batch"], [f"batch_{b}" for b in range(s.n_batches)])
    obs["library_size"] = cells["library"].astype(np.float32)
    p = s.perturbation
    if p is not None:
        names = np.array(["control", *p.drug_names], dtype=object)
        label = names[cells["drug_a"] + 1]
        pair = cells["drug_b"] >= 0
        label[pair] = [f"{a}+{b}" for a, b in zip(label[pair], names[cells["drug_b"][pair] + 1])]
        obs["drug"] = pd.Categorical(label, categories=p.labels)
        obs["dose"] = cells["dose"]
        obs["is_control"] = cells["drug_a"] < 0
    return obs


def _var_and_varm(truth: _Truth, s: _Settings) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    types = [f"type_{k}" for k in range(s.n_cell_types)]
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(truth.baseline.size)])
    var["theta"] = truth.theta.astype(np.float32)
    var["marker_of"] = pd.Categorical.from_codes(truth.marker_of, types)  # NaN for non-markers
    logits = truth.baseline + truth.centres @ truth.loadings + _marker_lfc(truth, s)  # (K, G) at the centres
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    K = s.n_cell_types
    rest = (log_p.sum(0) - log_p) / max(K - 1, 1) if K > 1 else log_p
    varm = {"true_cell_type_log_fc": pd.DataFrame((log_p - rest).T, index=var.index, columns=types)}
    if s.perturbation is not None:
        for d, drug in enumerate(s.perturbation.drug_names):
            varm[f"true_drug_effect_{drug}"] = pd.DataFrame(truth.drug_effect[d].T, index=var.index, columns=types)
        names = s.perturbation.drug_names
        for (a, b), extra in truth.interaction.items():
            varm[f"true_interaction_{names[a]}+{names[b]}"] = pd.DataFrame(extra.T, index=var.index, columns=types)
    return var, varm


def _uns(truth: _Truth, s: _Settings, n_cells: int, n_genes: int) -> dict:
    uns = s.to_uns(n_cells, n_genes)
    if s.perturbation is not None:
        names = s.perturbation.drug_names
        uns["perturbation"]["ec50"] = {drug: float(e) for drug, e in zip(names, truth.ec50)}
        uns["perturbation"]["interacting_pairs"] = [f"{names[a]}+{names[b]}" for a, b in truth.interaction]
    return uns


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_cell_types: int = 5,
    n_batches: int = 2,
    latent_dim: int = 5,
    likelihood: str = "nb",
    theta: float = 5.0,
    theta_log_sd: float = 0.0,
    dropout: float = 0.1,
    library_mean: float = 2000.0,
    library_log_sd: float = 0.3,
    batch_effect_scale: float = 0.3,
    n_markers: int = 10,
    marker_log_fc: float = 2.0,
    perturbation: PerturbationSpec | dict | None = None,
    seed: int = 0,
) -> AnnData:
    """Simulate counts from a low-rank NB/ZINB model with known ground truth (see module docstring).

    Parameters
    ----------
    theta, theta_log_sd
        NB inverse dispersion; per gene ``theta * exp(N(0, theta_log_sd^2))`` (constant when 0).
    dropout
        ZINB zero-inflation probability (ignored for ``likelihood="nb"``).
    library_mean, library_log_sd
        Mean library size (at most :data:`MAX_LIBRARY_MEAN`, 1e9) and the sd of its log per cell.
    batch_effect_scale
        Sd of the batch shifts of the logits and of the log library size (0: no batch effect).
    n_markers, marker_log_fc
        Each cell type gets ``n_markers`` marker genes (disjoint sets) whose logit is raised by
        ``marker_log_fc`` (natural log) in that type.
    perturbation
        A :class:`PerturbationSpec` (or a dict of its fields) to add a drug/dose arm.
    seed
        Seed of every random draw, a whole number in [0, 2**63).

    Returns
    -------
    AnnData with integer counts as float32 CSR in ``X`` and ``layers['counts']``;
    ``layers['true_mean']`` (dense NB means; the ZINB mean is ``(1 - dropout)`` times this);
    ``obs['cell_type']``, ``obs['batch']`` (categoricals ``type_k``, ``batch_b``) and
    ``obs['library_size']`` (the true size factor ``L``; a control cell's expected total);
    ``obsm['X_true_latent']``; ``var['theta']``; ``var['marker_of']`` (cell type of each marker
    gene, NaN otherwise); ``varm['true_cell_type_log_fc']`` (genes x cell types: log mean
    proportion of a type at its centre minus the average over the other types; every gene
    differs through the shared low-rank structure, and a type's markers gain exactly
    ``marker_log_fc`` over genes that are no type's marker); and ``uns['simulation']`` (all
    options). With ``perturbation``: ``obs['drug']`` (``control``, ``drug_d``, ``drug_a+drug_b``), ``obs['dose']`` (0 for
    control), ``obs['is_control']``, ``varm['true_drug_effect_drug_d']`` (genes x cell types
    log fold change at a saturating dose), ``varm['true_interaction_a+b']`` for interacting pairs,
    ``uns['simulation']['perturbation']['ec50']`` and, with pairs, ``uns['interacting_pairs']``;
    :func:`true_drug_log_fc` turns these into the effect at any dose.

    Examples
    --------
    >>> adata = simulate(300, 100, n_cell_types=3, seed=1)
    >>> adata.layers["counts"].shape
    (300, 100)
    """
    s = _settings(
        perturbation,
        n_cell_types=n_cell_types, n_batches=n_batches, latent_dim=latent_dim, likelihood=likelihood,
        theta=theta, theta_log_sd=theta_log_sd, dropout=dropout, library_mean=library_mean,
        library_log_sd=library_log_sd, batch_effect_scale=batch_effect_scale, n_markers=n_markers,
        marker_log_fc=marker_log_fc, seed=seed,
    )  # fmt: skip
    s.check(n_cells, n_genes)
    truth = _draw_truth(n_genes, s)
    cells = _draw_cells(truth, s, 0, n_cells)
    var, varm = _var_and_varm(truth, s)
    counts = cells["counts"]
    adata = AnnData(X=counts.copy(), obs=_obs(cells, s, 0), var=var)
    adata.layers["counts"] = counts
    adata.layers["true_mean"] = cells["mean"]
    adata.obsm["X_true_latent"] = cells["z"].astype(np.float32)
    adata.varm.update(varm)
    adata.uns["simulation"] = _uns(truth, s, n_cells, n_genes)
    if s.perturbation is not None and s.perturbation.pair_fraction:
        adata.uns["interacting_pairs"] = list(adata.uns["simulation"]["perturbation"]["interacting_pairs"])
    return adata


def true_drug_log_fc(adata: AnnData, drug: str, dose: float) -> pd.DataFrame:
    """Ground-truth log fold change (genes x cell types) of ``drug`` at ``dose`` vs control.

    ``drug`` is a single drug (``"drug_0"``) or a pair (``"drug_0+drug_1"``: the drugs' effects
    add, plus the pair's interaction when it is one of ``uns['interacting_pairs']``).
    """
    params = adata.uns["simulation"].get("perturbation")
    if params is None:
        raise ConfigError("this AnnData was simulated without a perturbation arm.")
    total, levels = 0.0, []
    for name in drug.split("+"):
        key = f"true_drug_effect_{name}"
        if key not in adata.varm:
            raise ConfigError(f"unknown drug {name!r}; simulated drugs: {list(params['ec50'])}.")
        levels.append(float(hill_response(dose, params["ec50"][name], params["hill"])))
        total = total + adata.varm[key] * levels[-1]
    if f"true_interaction_{drug}" in adata.varm:
        total = total + adata.varm[f"true_interaction_{drug}"] * float(np.prod(levels))
    return total


def true_counterfactual(control: AnnData, *, drug: str, dose: float, seed: int = 0) -> np.ndarray:
    """Counts the simulator would draw for these simulated control cells under ``drug`` at ``dose``.

    Each cell's ``layers['true_mean']`` times ``exp(true log fold change)`` of its cell type is the
    NB mean (inverse dispersion ``var['theta']``; ZINB dropout as simulated), (n_cells, n_genes).
    This is the oracle of the perturbation benchmark: the true effect on the given cells.
    """
    settings = control.uns["simulation"]
    log_fc = true_drug_log_fc(control, drug, dose)
    types = control.obs["cell_type"].astype(str).to_numpy()
    mean = np.asarray(control.layers["true_mean"], dtype=np.float64) * np.exp(log_fc[types].to_numpy().T)
    rng = np.random.default_rng(seed)
    theta = control.var["theta"].to_numpy(dtype=np.float64)
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    if settings["likelihood"] == "zinb":
        counts[rng.random(counts.shape) < settings["dropout"]] = 0.0
    return counts


def write_simulated_h5ad(
    path: str | Path, n_cells: int, n_genes: int, *, chunk_size: int = 50_000, **sim_kwargs
) -> Path:
    """Write a large simulated dataset to an h5ad file chunk by chunk, never holding all counts.

    Takes the options of :func:`simulate`; row ``i`` equals row ``i`` of ``simulate`` with the
    same options. ``chunk_size`` (cells per write) is rounded up to a multiple of
    :data:`CELL_BLOCK`. The counts are in ``X`` only (no ``layers``, no ``true_mean``), so that
    ``anndata.read_h5ad(path, backed="r")`` keeps them on disk; obs, var, obsm, varm and uns are
    as in :func:`simulate`.

    Examples
    --------
    >>> import anndata
    >>> path = write_simulated_h5ad(tmp_path / "big.h5ad", 5000, 200, chunk_size=2048)  # doctest: +SKIP
    >>> anndata.read_h5ad(path, backed="r").shape  # doctest: +SKIP
    (5000, 200)
    """
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    s = _settings(sim_kwargs.pop("perturbation", None), **sim_kwargs)
    s.check(n_cells, n_genes)
    check_number("chunk_size", chunk_size, integer=True, ge=1)
    truth = _draw_truth(n_genes, s)
    path = Path(path)
    obs_parts, latent_parts = [], []
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 16,))
        indices = x.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 16,))
        indptr = [np.zeros(1, dtype=np.int64)]
        step = -(-chunk_size // CELL_BLOCK) * CELL_BLOCK  # whole blocks, so none is drawn twice
        for start in range(0, n_cells, step):
            stop = min(start + step, n_cells)
            cells = _draw_cells(truth, s, start, stop, with_mean=False)
            chunk = cells["counts"]
            nnz = data.shape[0]
            data.resize((nnz + chunk.nnz,))
            data[nnz:] = chunk.data
            indices.resize((nnz + chunk.nnz,))
            indices[nnz:] = chunk.indices
            indptr.append(chunk.indptr[1:].astype(np.int64) + nnz)
            obs_parts.append(_obs(cells, s, start))
            latent_parts.append(cells["z"].astype(np.float32))
            logger.info("wrote cells %d-%d of %d to %s", start, stop, n_cells, path)
        x.create_dataset("indptr", data=np.concatenate(indptr))
        var, varm = _var_and_varm(truth, s)
        write_elem(f, "obs", pd.concat(obs_parts))
        write_elem(f, "var", var)
        write_elem(f, "obsm", {"X_true_latent": np.concatenate(latent_parts)})
        write_elem(f, "varm", varm)
        for empty in ("layers", "obsp", "varp"):
            write_elem(f, empty, {})
        write_elem(f, "uns", {"simulation": _uns(truth, s, n_cells, n_genes)})
    return path
