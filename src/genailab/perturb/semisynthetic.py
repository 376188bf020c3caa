"""A second perturbation generator, built on real counts: PBMCs under known, made-up drugs.

:func:`semisynthetic` starts from :func:`genailab.data.pbmc68k_counts` (700 real PBMCs; the
largest ``n_cell_types`` annotated types are kept) and makes ``n_cells`` cells, each from one real
cell, which keeps its cell type, its library size and its expression profile:

1. **Expected expression of each real cell.** ``mu_i = L_i * p_i``, where ``L_i`` is the cell's
   real total count and ``p_i`` the average of the count proportions ``x_j / L_j`` of its
   ``n_neighbours`` nearest cells of the same type (itself included; PCA of log-normalised
   counts). Smoothing over a few neighbours keeps each cell's own state while removing most of
   its sampling noise.
2. **Known drug effects.** Each drug moves ``n_target_genes`` genes (drawn among genes detected
   in at least 10% of cells: a drug cannot visibly change a gene that is never seen) by a log
   fold change ``a_dg = ±max_log_fc * U(0.5, 1)``, scaled per cell type by ``s_dk ~ U(0.2, 1)``
   and by a Hill dose response ``hill_d(x) = x^h_d / (x^h_d + ec50_d^h_d)`` with ``ec50_d``
   log-uniform over the dose range and ``h_d ~ U(1, 2.5)``. Pairs get the sum of their drugs'
   effects, and ``interacting_pairs`` of them an extra effect on ``n_interaction_genes`` genes
   (:func:`genailab.data.simulate.draw_pair_interaction`, scaled by ``hill_a * hill_b``).
3. **Counts.** Every synthetic cell, control or treated, gets fresh counts
   ``Poisson(mu_i * exp(effect))``: the change is multiplicative on the cell's expected
   expression and the counts are resampled, so that treated and control cells share one noise
   model (keeping real counts for controls only would let a method tell the two apart by their
   noise). Over-dispersion comes from the real cell-to-cell variation of ``mu_i``. Binomial
   thinning of the real counts was not used: it can only lower expression, and up-regulation
   would need a second, different mechanism.

Each real cell is used about ``n_cells / n_real`` times, under different conditions; the
benchmark predicts held-out cells from control cells, which may come from the same real cells
as the held-out ones: this is the paired design of a real drug screen split from one sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from genailab.data.simulate import draw_pair_interaction, hill_response
from genailab.errors import ConfigError
from genailab.perturb.evaluate import log_normalize

_MIN_DETECTION = 0.1  # share of cells a target gene must be detected in


@dataclass(frozen=True)
class SemiSyntheticSpec:
    """Options of :func:`semisynthetic`; stored in ``uns['semisynthetic']``."""

    n_cells: int = 4000  # synthetic cells (each from one real cell)
    n_cell_types: int = 4  # the largest annotated types of pbmc68k
    n_drugs: int = 3
    doses: tuple[float, ...] = (0.1, 1.0, 10.0)
    control_fraction: float = 0.25
    pair_fraction: float = 0.2  # share of treated cells given two drugs
    interacting_pairs: int = 1  # pairs whose effect is not additive
    n_target_genes: int = 30
    n_interaction_genes: int = 10
    max_log_fc: float = 2.0
    n_neighbours: int = 10  # real cells averaged into each cell's expected expression
    seed: int = 0

    def __post_init__(self):
        n_pairs = self.n_drugs * (self.n_drugs - 1) // 2
        if self.n_cells < 1 or self.n_drugs < 1 or self.n_cell_types < 1 or not self.doses or min(self.doses) <= 0:
            raise ConfigError("SemiSyntheticSpec needs n_cells, n_drugs, n_cell_types >= 1 and positive doses.")
        if not 0 <= self.control_fraction < 1 or not 0 <= self.pair_fraction <= 1:
            raise ConfigError("control_fraction must be in [0, 1) and pair_fraction in [0, 1].")
        if not 0 <= self.interacting_pairs <= n_pairs or (self.pair_fraction and self.n_drugs < 2):
            raise ConfigError(f"interacting_pairs must be between 0 and {n_pairs}; pairs need n_drugs >= 2.")


def semisynthetic(spec: SemiSyntheticSpec | None = None, **options) -> AnnData:
    """Real PBMC counts under known drug effects (see the module docstring).

    Parameters
    ----------
    spec
        A :class:`SemiSyntheticSpec`; or pass its fields as keywords.

    Returns
    -------
    AnnData (n_cells, 765 genes): integer counts in ``X`` and ``layers['counts']`` (CSR float32);
    ``layers['true_mean']`` (the Poisson means); ``obs['cell_type']``, ``obs['drug']``
    (``control``, ``drug_d``, ``drug_a+drug_b``), ``obs['dose']`` (0 for controls),
    ``obs['source_cell']`` (the real cell); ``varm['true_drug_effect_drug_d']`` and
    ``varm['true_interaction_a+b']`` (genes x cell types, log fold change at saturating doses);
    ``uns['semisynthetic']`` (options, ``ec50``, ``hill``) and ``uns['interacting_pairs']``.
    """
    from genailab.data import pbmc68k_counts

    if spec is not None and options:
        raise ConfigError("Pass either a SemiSyntheticSpec or its fields as keywords, not both.")
    spec = spec if spec is not None else SemiSyntheticSpec(**options)
    real = pbmc68k_counts()
    kept = real.obs["cell_type"].value_counts().index[: spec.n_cell_types]
    real = real[real.obs["cell_type"].isin(kept).to_numpy()]
    counts = real.layers["counts"]
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    types = real.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(spec.seed)
    basal = _expected_expression(counts, types, spec.n_neighbours, spec.seed)  # (n_real, G)

    names = [f"drug_{d}" for d in range(spec.n_drugs)]
    type_names = sorted(set(types))
    effects, ec50, hill, interactions = _draw_effects(rng, counts, len(type_names), spec)
    source = rng.permutation(np.resize(np.arange(counts.shape[0]), spec.n_cells))
    type_code = np.array([type_names.index(t) for t in types[source]])
    drug_a, drug_b, dose = _draw_conditions(rng, spec)

    log_fc = np.zeros((spec.n_cells, counts.shape[1]))  # (n_cells, G)
    for slot in (drug_a, drug_b):
        rows = slot >= 0
        level = _hill(dose[rows], ec50[slot[rows]], hill[slot[rows]])
        log_fc[rows] += level[:, None] * effects[slot[rows], type_code[rows]]
    for (a, b), extra in interactions.items():
        rows = (drug_a == a) & (drug_b == b)
        both = _hill(dose[rows], ec50[a], hill[a]) * _hill(dose[rows], ec50[b], hill[b])
        log_fc[rows] += both[:, None] * extra[type_code[rows]]
    mean = basal[source] * np.exp(log_fc)
    sampled = rng.poisson(mean).astype(np.float32)

    labels = np.array(["control", *names], dtype=object)[drug_a + 1]
    pair = drug_b >= 0
    labels[pair] = [f"{names[a]}+{names[b]}" for a, b in zip(drug_a[pair], drug_b[pair])]
    obs = pd.DataFrame(index=[f"cell_{i}" for i in range(spec.n_cells)])
    obs["cell_type"] = pd.Categorical(types[source], categories=type_names)
    obs["drug"] = labels
    obs["dose"] = dose
    obs["source_cell"] = real.obs_names.to_numpy()[source]
    adata = AnnData(X=sp.csr_matrix(sampled), obs=obs, var=pd.DataFrame(index=real.var_names.copy()))
    adata.layers["counts"] = adata.X.copy()
    adata.layers["true_mean"] = mean.astype(np.float32)
    for d, name in enumerate(names):
        adata.varm[f"true_drug_effect_{name}"] = pd.DataFrame(effects[d].T, index=adata.var_names, columns=type_names)
    for (a, b), extra in interactions.items():
        adata.varm[f"true_interaction_{names[a]}+{names[b]}"] = pd.DataFrame(
            extra.T, index=adata.var_names, columns=type_names
        )
    params = asdict(spec)
    params["doses"] = list(spec.doses)
    params.update(ec50=dict(zip(names, ec50.tolist())), hill=dict(zip(names, hill.tolist())))
    adata.uns["semisynthetic"] = params
    adata.uns["interacting_pairs"] = [f"{names[a]}+{names[b]}" for a, b in interactions]
    return adata


def _hill(dose: np.ndarray, ec50, hill) -> np.ndarray:
    """Hill response per cell with per-cell (or scalar) EC50 and coefficient; 0 at dose 0."""
    with np.errstate(divide="ignore"):
        return np.where(dose > 0, 1.0 / (1.0 + np.exp(-hill * (np.log(np.maximum(dose, 1e-300)) - np.log(ec50)))), 0.0)


def _expected_expression(counts: np.ndarray, types: np.ndarray, k: int, seed: int) -> np.ndarray:
    """mu_i = L_i * mean proportions of the cell's k nearest same-type cells, (n, G)."""
    totals = counts.sum(1, keepdims=True)
    proportions = counts / totals
    embedding = PCA(n_components=20, random_state=seed).fit_transform(log_normalize(counts))
    smoothed = np.empty_like(proportions)
    for cell_type in np.unique(types):
        rows = np.flatnonzero(types == cell_type)
        n = min(k, rows.size)
        _, neighbours = NearestNeighbors(n_neighbors=n).fit(embedding[rows]).kneighbors(embedding[rows])
        smoothed[rows] = proportions[rows][neighbours].mean(1)
    return totals * smoothed


def _draw_effects(rng: np.random.Generator, counts: np.ndarray, n_types: int, spec: SemiSyntheticSpec):
    """Per drug (n_drugs, K, G) effects, EC50s, Hill coefficients; interactions (a, b) -> (K, G)."""
    n_genes = counts.shape[1]
    detected = np.flatnonzero((counts > 0).mean(0) >= _MIN_DETECTION)
    if detected.size < spec.n_target_genes:
        raise ConfigError(f"Only {detected.size} genes are detected in 10% of cells; lower n_target_genes.")
    per_gene = np.zeros((spec.n_drugs, n_genes))
    for d in range(spec.n_drugs):
        targets = rng.choice(detected, spec.n_target_genes, replace=False)
        per_gene[d, targets] = rng.choice([-1.0, 1.0], targets.size) * spec.max_log_fc * rng.uniform(0.5, 1.0, targets.size)
    sensitivity = rng.uniform(0.2, 1.0, (spec.n_drugs, n_types))
    effects = sensitivity[:, :, None] * per_gene[:, None, :]
    ec50 = np.exp(rng.uniform(np.log(min(spec.doses)), np.log(max(spec.doses)), spec.n_drugs))
    hill = rng.uniform(1.0, 2.5, spec.n_drugs)
    pairs = [(a, b) for a in range(spec.n_drugs) for b in range(a + 1, spec.n_drugs)]
    chosen = sorted(rng.permutation(len(pairs))[: spec.interacting_pairs]) if spec.pair_fraction else []
    interactions = {
        pairs[i]: draw_pair_interaction(
            rng, per_gene[list(pairs[i])], sensitivity[list(pairs[i])], spec.n_interaction_genes, spec.max_log_fc
        )
        for i in chosen
    }
    return effects, ec50, hill, interactions


def _draw_conditions(rng: np.random.Generator, spec: SemiSyntheticSpec):
    """Drug slots (-1 empty; drug_b only for pairs, drug_a < drug_b) and dose per cell."""
    n = spec.n_cells
    treated = rng.random(n) >= spec.control_fraction
    pair = treated & (rng.random(n) < spec.pair_fraction) if spec.n_drugs > 1 else np.zeros(n, dtype=bool)
    first = rng.integers(spec.n_drugs, size=n)
    other = (first + 1 + rng.integers(max(spec.n_drugs - 1, 1), size=n)) % spec.n_drugs
    dose = np.asarray(spec.doses, dtype=np.float64)[rng.integers(len(spec.doses), size=n)]
    drug_a = np.where(treated, np.where(pair, np.minimum(first, other), first), -1)
    drug_b = np.where(pair, np.maximum(first, other), -1)
    return drug_a, drug_b, np.where(treated, dose, 0.0)


def true_log_fc(adata: AnnData, drug: str, dose: float) -> pd.DataFrame:
    """Ground-truth log fold change (genes x cell types) of ``drug`` (``"drug_0"`` or ``"a+b"``) at ``dose``."""
    params = adata.uns["semisynthetic"]
    total, levels = 0.0, []
    for name in drug.split("+"):
        if name not in params["ec50"]:
            raise ConfigError(f"unknown drug {name!r}; drugs: {list(params['ec50'])}.")
        levels.append(float(hill_response(dose, params["ec50"][name], params["hill"][name])))
        total = total + adata.varm[f"true_drug_effect_{name}"] * levels[-1]
    if f"true_interaction_{drug}" in adata.varm:
        total = total + adata.varm[f"true_interaction_{drug}"] * float(np.prod(levels))
    return total


def true_counterfactual(control: AnnData, *, drug: str, dose: float, seed: int = 0) -> np.ndarray:
    """Counts the generator would draw for these control cells under ``drug`` at ``dose``,
    ``Poisson(true_mean * exp(true log fold change))``, (n_cells, n_genes): the benchmark's oracle."""
    log_fc = true_log_fc(control, drug, dose)
    types = control.obs["cell_type"].astype(str).to_numpy()
    mean = np.asarray(control.layers["true_mean"], dtype=np.float64) * np.exp(log_fc[types].to_numpy().T)
    return np.random.default_rng(seed).poisson(mean).astype(np.float32)
