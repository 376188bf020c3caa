"""The adversary removes drug information from the basal latent."""

from __future__ import annotations

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from genailab.perturb import PerturbationModel


def _drug_predictability(model: PerturbationModel, labels) -> float:
    latent = model.get_basal_latent()
    classifier = LogisticRegression(max_iter=2000)
    return cross_val_score(classifier, latent, labels, cv=3, scoring="balanced_accuracy").mean()


def test_adversary_lowers_drug_predictability_of_the_basal_latent(perturb_adata, model_options):
    labels = perturb_adata.obs["drug"].astype(str).to_numpy()
    scores = {}
    for name, options in {"without": {"adversary": None}, "with": {}}.items():
        model = PerturbationModel(perturb_adata, **model_options, **options).fit(epochs=30, seed=0, progress=False)
        scores[name] = _drug_predictability(model, labels)
    assert scores["with"] < scores["without"] - 0.05, scores
