"""Held-out split protocols on a small simulated screen with pairs."""

from __future__ import annotations

import pytest

from genailab.data.simulate import PerturbationSpec, simulate
from genailab.errors import ConfigError
from genailab.perturb import ObsKeys, holdout_split

DOSES = (0.1, 1.0, 10.0)


@pytest.fixture(scope="module")
def screen():
    spec = PerturbationSpec(n_drugs=3, doses=DOSES, pair_fraction=0.3, interacting_pairs=1, n_target_genes=5)
    return simulate(1500, 40, n_cell_types=3, n_batches=1, n_markers=3, perturbation=spec, seed=0).obs


def test_unseen_cell_type_and_drug_holds_out_every_dose_and_its_pairs(screen):
    split = holdout_split(screen, "combination", n_groups=1, seed=0)
    (cell_type,) = {t for t, _, _ in split.groups}
    drug = next(d for _, d, _ in split.groups if "+" not in d)
    assert {x for _, d, x in split.groups if d == drug} == set(DOSES)
    pairs = {d for _, d, _ in split.groups if "+" in d}
    assert pairs == {p for p in screen["drug"].unique() if "+" in p and drug in p.split("+")}
    held = split.test_mask(screen, ObsKeys())
    # the drug is still seen in another cell type, the cell type under another drug
    rest = screen[~held]
    assert ((rest["drug"] == drug) & (rest["cell_type"] != cell_type)).any()
    assert ((rest["cell_type"] == cell_type) & ~rest["drug"].isin(["control", drug])).any()
    assert not ((rest["drug"] == drug) & (rest["cell_type"] == cell_type)).any()


def test_dose_protocols_hold_out_the_middle_or_the_highest_dose_everywhere(screen):
    middle = holdout_split(screen, "dose")
    assert {x for _, _, x in middle.groups} == {1.0}
    assert len(middle.groups) == 3 * 6  # 3 cell types x (3 drugs + 3 pairs)
    top = holdout_split(screen, "dose_extrapolation")
    assert {x for _, _, x in top.groups} == {10.0} and len(top.groups) == 18


def test_pair_and_cell_type_protocols(screen):
    split = holdout_split(screen, "pair", pairs=["drug_0+drug_1"])
    assert {d for _, d, _ in split.groups} == {"drug_0+drug_1"} and len(split.groups) == 9
    with pytest.raises(ConfigError, match="not drug pairs"):
        holdout_split(screen, "pair", pairs=["drug_0+drug_9"])
    unseen = holdout_split(screen, "cell_type", seed=1)
    assert len({t for t, _, _ in unseen.groups}) == 1 and len(unseen.groups) == 6 * 3
    singles = screen[~screen["drug"].astype(str).str.contains("+", regex=False)]
    with pytest.raises(ConfigError, match="nothing to hold out"):
        holdout_split(singles, "pair")


def test_every_group_is_held_out_once():
    """A pair whose two drugs are both held out in one cell type is one group, scored once."""
    spec = PerturbationSpec(n_drugs=3, doses=(1.0, 10.0), pair_fraction=0.5, interacting_pairs=1)
    obs = simulate(1500, 100, n_cell_types=2, n_batches=1, perturbation=spec, seed=0).obs
    split = holdout_split(obs, "combination", seed=0)
    assert {("type_1", "drug_0", 1.0), ("type_1", "drug_1", 1.0)} <= set(split.groups)  # both drugs of the pair
    assert len(split.groups) == len(set(split.groups)) == 16
    assert split.groups.count(("type_1", "drug_0+drug_1", 1.0)) == 1


def test_split_arguments_are_checked():
    from genailab.errors import SchemaMismatchError

    obs = simulate(300, 40, n_cell_types=2, n_batches=1, n_markers=3, perturbation=PerturbationSpec(), seed=0).obs
    with pytest.raises(ConfigError, match="n_groups must be a whole number >= 1"):
        holdout_split(obs, "pair", n_groups=-1)
    with pytest.raises(SchemaMismatchError, match=r"obs has no column 'drug' \(given as `drug_key`\)"):
        holdout_split(obs.rename(columns={"drug": "compound"}), "combination")


def test_a_pair_may_be_named_in_either_order(screen):
    pair = next(drug for drug in screen["drug"].astype(str).unique() if "+" in drug)
    first, second = pair.split("+")
    assert holdout_split(screen, "pair", pairs=[f"{second}+{first}"]).groups == holdout_split(screen, "pair", pairs=[pair]).groups


@pytest.mark.parametrize("seed", range(12))
def test_unseen_cell_type_and_drug_never_holds_a_whole_cell_type_out(screen, seed):
    """Seed 4 of the benchmark's simulator held drug_0, drug_1 and drug_2 all out of type_2: the
    cell_type protocol under another name (about one seed in nine with 3 types and 3 drugs)."""
    split = holdout_split(screen, "combination", seed=seed)
    held = {(t, d) for t, d, _ in split.groups if "+" not in d}
    for cell_type in {t for t, _ in held}:
        drugs = set(screen.loc[(screen["cell_type"] == cell_type) & (screen["drug"] != "control"), "drug"])
        singles = {d for d in drugs if "+" not in d}
        assert singles - {d for t, d in held if t == cell_type}, (cell_type, held)
