"""Perturbation benchmark: the genailab model against the baselines, two data generators, five protocols.

    python benchmarks/perturbation.py             # default run: 236-394 s on a shared, loaded 2-core machine
    python benchmarks/perturbation.py --quick     # 1,500 cells, 20 epochs: a smoke run (pair groups get small)
    python benchmarks/perturbation.py --out scores.csv
    python benchmarks/perturbation.py --ceilings  # what counterfactuals that know the truth reach (20 s),
                                                  # and the unseen-pair scale from the true effects
    python benchmarks/perturbation.py --baselines-only  # no neural methods (35 s)

Generators: ``simulator`` (genailab.data.simulate with its drug arm: 200 genes, 3 cell types,
3 drugs at doses 0.1, 1 and 10, a fifth of treated cells on pairs, one pair interacting) and
``pbmc`` (genailab.perturb.semisynthetic: real PBMC counts, 765 genes, 4 cell types, the same
design). Protocols (genailab.perturb.holdout_split):
``combination`` unseen (cell type, drug) at every dose; ``dose`` an unseen middle dose;
``dose_extrapolation`` the highest dose unseen; ``pair`` one additive and the interacting pair
unseen (reported apart); ``cell_type`` every treated cell of one type unseen. Every method is
trained without the held-out cells and predicts them from control cells; the oracle moves those
control cells' counts by the generator's true fold change. A third of each cell type's controls
(about 250 of the 750) is the reference of the true change and is never trained on or predicted from
(genailab.perturb.evaluate's module docstring says why). Each table gives means over held-out
groups, and (ours - best baseline) with a paired bootstrap 95% interval (2,000 draws over groups).

Sizes of the default run: 3,000 cells per generator (about 750 controls; a (cell type, drug,
dose) group has 51-95 cells on the simulator and 20-102 on PBMC, a pair group 9-24 and 3-36
(median 17 and 11); groups under 10 cells are not scored), 40 epochs for
both neural methods (genailab and scGen, latent 10, each class's default hidden layers: two of 128
for genailab's PerturbationModel, one of 128 for scGen's VAE), one seed,
one torch thread. Each of the ten (generator, protocol) runs trains both neural methods once
on its own training cells (nothing held out is ever seen), so 20 fits make up nearly all of the
time. 40 epochs instead of the earlier 80 halved the run and moved genailab's top-50 delta R2
by less than the bootstrap intervals (measured before the reference controls: PBMC unseen (cell
type, drug), genailab - perturbed mean: -0.153 at 40 epochs, -0.159 at 80; PBMC middle dose at
1,500 cells: 0.232 at 40, 0.220 at 100).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from genailab.data.simulate import PerturbationSpec, simulate, true_counterfactual, true_drug_log_fc
from genailab.perturb import compare_methods, default_methods, format_table, holdout_split
from genailab.perturb import semisynthetic as pbmc
from genailab.data.perturbation_schema import ObsKeys
from genailab.perturb.baselines import Oracle
from genailab.perturb.evaluate import log_normalize, r2_score, reference_controls, top_de_genes

PROTOCOLS = ("combination", "dose", "dose_extrapolation", "pair", "cell_type")
DOSES = (0.1, 1.0, 10.0)


def make_data(generator: str, n_cells: int, seed: int):
    """The AnnData of one generator, its sampler of true counterfactual counts and its true log fold change."""
    if generator == "simulator":
        spec = PerturbationSpec(n_drugs=3, doses=DOSES, pair_fraction=0.2, interacting_pairs=1, n_target_genes=20)
        adata = simulate(n_cells, 200, n_cell_types=3, n_batches=1, perturbation=spec, seed=seed)
        return adata, true_counterfactual, true_drug_log_fc
    spec = pbmc.SemiSyntheticSpec(n_cells=n_cells, doses=DOSES, seed=seed)
    return pbmc.semisynthetic(spec), pbmc.true_counterfactual, pbmc.true_log_fc


def split_for(adata, protocol: str, seed: int):
    if protocol != "pair":
        return holdout_split(adata.obs, protocol, seed=seed)
    interacting = list(adata.uns["interacting_pairs"])
    additive = sorted(set(adata.obs["drug"][adata.obs["drug"].str.contains("+", regex=False)]) - set(interacting))
    return holdout_split(adata.obs, "pair", pairs=[additive[0], *interacting], seed=seed)


def ceilings(adata, truth, split, *, log_fc=None, draws: int = 5, min_cells: int = 10, seed: int = 0) -> pd.DataFrame:
    """Top-50 delta R2 of what a counterfactual of the control cells could reach, per held-out group.

    Scored as :func:`~genailab.perturb.compare_methods` scores: the control cells are the type's
    prediction inputs (a predicted change is measured from their mean), and the true change from
    the mean of its reference controls (:func:`~genailab.perturb.evaluate.reference_controls` with
    ``seed``), which nothing here uses.
    ``true fc``: the control cells' log-normalised counts plus the true change of their expected
    log-normalised expression (the truth function's draws under the drug minus those under no
    drug, averaged over ``draws``); ``true fc, seen doses``: the same with the true changes at
    the two seen doses around the held-out one interpolated in log dose (``dose`` protocol only);
    ``true mean``: the expected log-normalised expression of those control cells under the drug
    (no sampling error of the control sample left); ``true fc, average sensitivity`` (PBMC,
    ``combination``): the true effects with the held-out cell type's sensitivity replaced by the
    other types' average, the most a method can know there. Scored like the benchmark (the top-50
    genes of the true change from the reference mean). ``oracle, no interaction`` (``pair``, with
    ``log_fc`` the generator's true log fold change): the oracle row of the benchmark with the sum
    of the pair's single-drug effects, without the pair's interaction: the most a method that
    never saw the pair can know, since both generators draw the interaction's genes and signs at
    random. ``pair`` groups are reported as ``pair (additive)`` and ``pair (interacting)``.
    """
    obs, counts = adata.obs, adata.layers["counts"]
    reference, is_control = reference_controls(obs, seed=seed), (obs["drug"] == "control").to_numpy()
    rows = []
    for cell_type, drug, dose in split.groups:
        same_type = (obs["cell_type"] == cell_type).to_numpy()
        held = same_type & (obs["drug"] == drug).to_numpy() & (obs["dose"] == dose).to_numpy()
        if held.sum() < min_cells:
            continue
        control = adata[same_type & is_control & ~reference]
        control_mean = log_normalize(control.layers["counts"]).mean(0)
        reference_mean = log_normalize(counts[np.flatnonzero(same_type & is_control & reference)]).mean(0)
        true_mean = log_normalize(counts[np.flatnonzero(held)]).mean(0)
        top = top_de_genes(reference_mean, true_mean, 50)

        def expected(d: str, x: float) -> np.ndarray:
            return np.mean([log_normalize(truth(control, drug=d, dose=x, seed=k)).mean(0) for k in range(draws)], 0)

        basal, treated = expected(drug, 0.0), expected(drug, dose)
        predictions = {"true fc": control_mean + treated - basal, "true mean": treated}  # predicted means
        if split.protocol == "dose":
            low, high = max(x for x in DOSES if x < dose), min(x for x in DOSES if x > dose)
            weight = (np.log(dose) - np.log(low)) / (np.log(high) - np.log(low))
            interpolated = (1 - weight) * expected(drug, low) + weight * expected(drug, high)
            predictions["true fc, seen doses"] = control_mean + interpolated - basal
        if split.protocol == "combination" and "semisynthetic" in adata.uns:
            log_fc = pbmc.true_log_fc(adata, drug, dose)
            others = [t for t in log_fc.columns if t != cell_type]
            mean = np.asarray(control.layers["true_mean"], dtype=np.float64) * np.exp(log_fc[others].mean(1).to_numpy())
            rng = np.random.default_rng(0)
            average = np.mean([log_normalize(rng.poisson(mean).astype(np.float32)).mean(0) for _ in range(draws)], 0)
            predictions["true fc, average sensitivity"] = control_mean + average - basal
        protocol = split.protocol
        if protocol == "pair":
            interacting = drug in [str(p) for p in adata.uns.get("interacting_pairs", [])]
            protocol = "pair (interacting)" if interacting else "pair (additive)"
            if log_fc is not None:
                def additive(cells, label, x):
                    return sum(log_fc(cells, d, x) for d in label.split("+"))

                oracle = Oracle(additive, seed=seed).fit(control, keys=ObsKeys(), layer="counts")
                predictions["oracle, no interaction"] = oracle.predict(control, drug=drug, dose=dose).mean(0)
        true_delta = true_mean - reference_mean
        for name, predicted_mean in predictions.items():
            delta = predicted_mean - control_mean
            rows.append(dict(protocol=protocol, group=(cell_type, drug, dose), ceiling=name,
                             r2_delta_top_de=r2_score(true_delta[top], delta[top])))  # fmt: skip
    return pd.DataFrame(rows)


def true_unseen_scale(adata, split) -> tuple[float, dict]:
    """The unseen-pair scale rho of :mod:`genailab.model.perturbation` computed from the generator's
    true full-dose effects (``varm['true_drug_effect_*']``) of the (cell type, drug) pairs the split
    leaves seen, and each held-out pair's |true effect| / |mean true effect of its drug's seen types|.

    What the model's leave-one-type-out estimate would give if it had fitted every seen pair exactly.
    """
    held = {(t, d) for t, label, _ in split.groups for d in label.split("+")}
    if split.protocol == "combination":  # there a pair is held out by its singles; pairs with it follow
        held = {(t, label) for t, label, _ in split.groups if "+" not in label}
    types = list(adata.obs["cell_type"].cat.categories)
    fit = spread = 0.0
    ratios = {}
    for key in sorted(k for k in adata.varm if k.startswith("true_drug_effect_")):
        drug, effects = key[len("true_drug_effect_") :], adata.varm[key]
        seen = [t for t in types if (t, drug) not in held]
        for t in seen if len(seen) > 1 else []:
            own, others = effects[t].to_numpy(), np.mean([effects[o].to_numpy() for o in seen if o != t], 0)
            fit, spread = fit + own @ others / (own @ own), spread + others @ others / (own @ own)
        mean = np.mean([effects[o].to_numpy() for o in seen], 0)
        for t in types:
            if (t, drug) in held:
                ratios[(t, drug)] = float(np.linalg.norm(effects[t].to_numpy()) / np.linalg.norm(mean))
    return (fit / spread if spread > 0 else 1.0), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,500 cells and 20 epochs.")
    parser.add_argument("--cells", type=int, default=None, help="Cells per generator (default 3,000; quick 1,500).")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of the neural methods (default 40; quick 20).")
    parser.add_argument("--seeds", type=int, default=1, help="Seed ensemble size of the genailab model.")
    parser.add_argument("--generator", choices=["simulator", "pbmc"], action="append", help="Default both.")
    parser.add_argument("--protocol", choices=PROTOCOLS, action="append", help="Default all five.")
    parser.add_argument("--baselines-only", action="store_true", help="Skip both neural methods.")
    parser.add_argument("--ceilings", action="store_true",
                        help="Only what counterfactuals that know the truth reach (no training; see ceilings()).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; these small models are fastest on one.")
    parser.add_argument("--out", default=None, help="CSV for the per-group scores.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_cells = args.cells or (1500 if args.quick else 3000)
    epochs = args.epochs or (20 if args.quick else 40)

    started = time.perf_counter()
    tables, parts = [], []
    for generator in args.generator or ("simulator", "pbmc"):
        adata, truth, log_fc = make_data(generator, n_cells, args.seed)
        results = []
        for protocol in args.protocol or PROTOCOLS:
            split = split_for(adata, protocol, args.seed)
            if args.ceilings:
                results.append(ceilings(adata, truth, split, log_fc=log_fc, seed=args.seed))
                if protocol in ("combination", "cell_type"):
                    rho, ratios = true_unseen_scale(adata, split)
                    shown = ", ".join(f"{d} in {t} {r:.2f}" for (t, d), r in ratios.items())
                    print(f"{generator} {protocol}: unseen-pair scale from the true effects of the seen pairs "
                          f"{rho:.3f}; held-out |effect| / seen types' mean: {shown}")  # fmt: skip
                continue
            train_options = dict(epochs=epochs, seed=args.seed, progress=False)
            methods = default_methods(train_options=train_options, pairs=protocol == "pair")
            if args.baselines_only:
                methods = [m for m in methods if m.name not in ("scGen", "genailab")]
            else:
                next(m for m in methods if m.name == "genailab").n_seeds = args.seeds
            methods.append(Oracle(log_fc, seed=args.seed))
            results.append(compare_methods(adata, split, methods=methods, seed=args.seed))
            print(f"{generator} {protocol}: {len(split.groups)} groups held out, "
                  f"done at {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        table = pd.concat(results, ignore_index=True)
        if args.ceilings:
            means = table.pivot_table(index="protocol", columns="ceiling", values="r2_delta_top_de", sort=False)
            print(f"\n######## {generator}: top-50 delta R2 of counterfactuals that know the truth\n")
            print(means.to_string(float_format=lambda v: f"{v:.3f}"))
            continue
        parts.append((generator, table))
        tables.append(table.assign(generator=generator))
    if args.ceilings:
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return
    print(f"\n{n_cells} cells per generator, {epochs} epochs, {args.seeds} seed(s), seed {args.seed}, "
          f"{torch.get_num_threads()} torch thread(s); means over held-out groups "
          "(d: change from control, 50: top-50 DE genes; higher is better except energy):")  # fmt: skip
    for generator, table in parts:
        print(f"\n######## {generator}\n")
        print(format_table(table))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out:
        pd.concat(tables, ignore_index=True).to_csv(args.out, index=False)
        print(f"per-group scores in {args.out}")


if __name__ == "__main__":
    main()
