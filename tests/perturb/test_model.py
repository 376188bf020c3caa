"""The tensor model: dose response, combinations, loss terms, config round trip."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from genailab.errors import ConfigError, InputDataError
from genailab.model.config import ModelConfig
from genailab.model.perturbation import (
    _RESPONSE_SCALE, DoseResponse, GeneDoseResponse, PerturbationConfig, PerturbationVAE, shift_counts,
)  # fmt: skip


def _model(**options) -> PerturbationVAE:
    vae = ModelConfig(input_dim=30, latent_dim=4, hidden_dims=(16,), likelihood="nb", inject_condition="none")
    return PerturbationVAE(PerturbationConfig(vae=vae, n_drugs=3, covariate_sizes=(2,), **options))


def _randomise(response) -> None:
    """Standard normal parameters, with sensitivities exp(N(0, 0.5^2)) (stored divided by the scale)."""
    with torch.no_grad():
        for p in response.parameters():
            p.normal_()
        response.log_sensitivity.normal_(0.0, 0.5 / _RESPONSE_SCALE)


#                 drug codes    doses       cell type
CONDITIONS = torch.tensor([
    [-1, -1, 0.0, 0.0, 1],   # control
    [0, -1, 2.0, 0.0, 1],    # drug 0
    [2, -1, 2.0, 0.0, 1],    # drug 2
    [0, 2, 2.0, 2.0, 1],     # drug 0 + drug 2
])  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_dose_response_is_monotone_for_random_parameters(seed):
    torch.manual_seed(seed)
    response = DoseResponse(4, dose_scale=float(torch.rand(()) * 10 + 0.01))
    with torch.no_grad():
        response.slope_logit.normal_(0.0, 3.0)
        response.shift.normal_(0.0, 5.0)
    doses = torch.cat([torch.zeros(1), 10 ** torch.linspace(-8, 5, 400), torch.rand(200) * 100]).sort().values
    for drug in range(4):
        levels = response(torch.full_like(doses, drug, dtype=torch.long), doses)
        assert levels[0] == 0.0  # dose 0: no effect
        assert torch.all(levels.diff() >= 0)
        assert torch.all((levels >= 0) & (levels <= 1))
        assert levels[-1] > levels[1]  # it does rise


def test_combination_adds_the_drug_terms():
    torch.manual_seed(0)
    model = _model(response="latent")
    control, a, b, both = model.perturbation_shift(CONDITIONS)
    torch.testing.assert_close(both - control, (a - control) + (b - control))
    assert not torch.allclose(a, control)


def test_loss_returns_the_basal_latent_and_trains_drug_parameters():
    torch.manual_seed(0)
    model = _model(response="latent")
    x = torch.poisson(torch.full((8, 30), 3.0))
    c = torch.tensor([[1, -1, 1.0, 0.0, 0]] * 8, dtype=torch.float32)
    out = model.loss(x, c)
    assert out.z.shape == (8, 4) and out.reconstruction.shape == (8,) and out.kl.shape == (8,)
    out.loss.backward()
    assert model.drug_embedding.weight.grad[1].abs().sum() > 0
    assert model.drug_embedding.weight.grad[0].abs().sum() == 0  # drug 0 was not given
    assert model.dose_response.shift.grad[1] != 0


def test_wrong_condition_width_is_refused():
    model = _model()
    with pytest.raises(InputDataError, match="expected"):
        model.loss(torch.ones(2, 30), torch.zeros(2, 3))


def test_config_round_trip_and_checks():
    config = _model(max_drugs=3, dose_scale=2.5, interaction_rank=3, per_gene_dose=True).config
    assert PerturbationConfig.from_dict(config.to_dict()) == config
    later = ("response", "interaction_rank", "interaction_l2", "per_gene_dose", "unseen_interaction", "unseen_scale",
             "effect_l2")  # fmt: skip
    saved_before = {k: v for k, v in config.to_dict().items() if k not in later}
    assert PerturbationConfig.from_dict(saved_before).response == "latent"  # older files hold CPA models
    assert PerturbationConfig.from_dict(saved_before).unseen_scale == 1.0  # and the unscaled average effect
    assert PerturbationConfig.from_dict(saved_before).effect_l2 == 0.0  # and were trained without the penalty
    assert config.unseen_scale is None  # the default: estimated
    with pytest.raises(ConfigError, match="response"):
        _model(response="genes")
    vae = ModelConfig(input_dim=30, condition_dim=2)
    with pytest.raises(ConfigError, match="unconditional"):
        PerturbationConfig(vae=vae, n_drugs=1)
    with pytest.raises(ConfigError, match="dose_scale"):
        PerturbationConfig(vae=ModelConfig(input_dim=30), n_drugs=1, dose_scale=0.0)
    assert np.isclose(_model().config.condition_dim, 2 * 2 + 1)


@pytest.mark.parametrize("seed", range(3))
def test_gene_dose_response_is_monotone_in_dose_for_every_gene(seed):
    torch.manual_seed(seed)
    response = GeneDoseResponse(2, 7, dose_scale=1.0, per_gene=True)
    with torch.no_grad():
        response.slope_logit.normal_(0.0, 0.3)
        response.shift.normal_(0.0, 0.3)
        response.gene_shift.normal_(0.0, 0.1)
    doses = torch.cat([torch.zeros(1), 10 ** torch.linspace(-6, 4, 300)]).reshape(-1, 1)
    for drug in range(2):
        levels = response(torch.full_like(doses, drug, dtype=torch.long), doses)[:, 0, :]  # (n_doses, G)
        assert torch.all(levels[0] == 0) and torch.all(levels.diff(dim=0) >= 0)


def test_gene_response_adds_drug_terms_and_is_zero_for_controls():
    torch.manual_seed(0)
    model = _model(interaction_rank=2)
    _randomise(model.gene_response)
    control, a, b, both = model.gene_shift(CONDITIONS)
    assert torch.all(control == 0)
    torch.testing.assert_close(both, a + b)
    # the same drug acts differently in the other cell type through the interaction term
    other = CONDITIONS.clone()
    other[:, -1] = 0
    assert not torch.allclose(model.gene_shift(other)[1], a)
    assert _model(interaction_rank=0).gene_response.type_factor is None


def test_gene_response_loss_trains_effects_and_decode_shifts_the_logits():
    torch.manual_seed(0)
    model = _model()
    x = torch.poisson(torch.full((4, 30), 3.0))
    out = model.loss(x, CONDITIONS)
    out.loss.backward()
    grad = model.gene_response.effect.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0  # drug 1 not given
    model.eval()
    with torch.no_grad():
        model.gene_response.effect[0, 3] = 1.0 / _RESPONSE_SCALE  # log fold change 1 on gene 3 at full level
        z = torch.zeros(4, 4)
        library = torch.full((4, 1), 100.0)
        mean = model.decode(z, CONDITIONS, library).mean
        level = model.gene_response.dose_response(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 2.0))[0, 0, 0]
    log_ratio = torch.log(mean[1] / mean[0])
    assert torch.allclose(log_ratio[3] - log_ratio[4], level, atol=1e-5)  # softmax: gene 3 gains exactly Delta


def test_shift_counts_has_the_expected_mean():
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((4000, 3), 5.0))
    ratio = torch.tensor([0.3, 1.0, 2.5]).expand(4000, 3)
    moved = shift_counts(counts, ratio, torch.full_like(counts, 5.0))
    torch.testing.assert_close(moved.mean(0), torch.tensor([1.5, counts[:, 1].mean(), 12.5]), rtol=0.03, atol=0)
    assert torch.equal(moved[:, 1], counts[:, 1])  # ratio 1 changes nothing
    assert (moved[:, 0] <= counts[:, 0]).all() and (moved[:, 2] >= counts[:, 2]).all()


def test_counterfactual_counts_of_a_control_under_no_drug_are_its_own_counts():
    torch.manual_seed(0)
    model = _model().eval()
    with torch.no_grad():
        model.gene_response.effect.normal_(0.0, 0.1)
    x = torch.poisson(torch.full((4, 30), 4.0))
    control = model.without_drugs(CONDITIONS)
    assert torch.all(control[:, :2] == -1) and torch.all(control[:, 2:4] == 0) and torch.all(control[:, 4] == 1)
    torch.testing.assert_close(model.counterfactual_counts(x, control), x)
    moved = model.counterfactual_counts(x, CONDITIONS)
    assert torch.equal(moved[0], x[0]) and not torch.equal(moved[1], x[1])


def _three_type_model(unseen_interaction: float, unseen_scale: float | None = 1.0) -> PerturbationVAE:
    vae = ModelConfig(input_dim=30, latent_dim=4, hidden_dims=(16,), likelihood="nb", inject_condition="none")
    config = PerturbationConfig(
        vae=vae, n_drugs=2, covariate_sizes=(3,), unseen_interaction=unseen_interaction, unseen_scale=unseen_scale
    )
    torch.manual_seed(0)
    model = PerturbationVAE(config)
    _randomise(model.gene_response)
    # training cells: drug 0 in types 0, 1, 2; drug 1 in types 1 and 2 (and in a pair in type 1)
    drugs = torch.tensor([[0, -1], [0, -1], [0, -1], [1, -1], [1, 0], [-1, -1]])
    types = torch.tensor([0, 1, 2, 2, 1, 0])
    model.gene_response.set_seen(types, drugs)
    return model


def _effect(model: PerturbationVAE, drug: int, cell_type: int) -> torch.Tensor:
    c = torch.tensor([[drug, -1, 1.0, 0.0, cell_type]], dtype=torch.float32)
    return model.gene_shift(c)[0]


@pytest.mark.parametrize(("unseen_interaction", "unseen_scale"), [(0.0, 1.0), (0.3, 1.0), (1.0, 1.0), (0.0, 0.4)])
def test_an_unseen_pair_shrinks_its_interaction_and_sensitivity_toward_the_drugs_seen_cell_types(
    unseen_interaction, unseen_scale
):
    model = _three_type_model(unseen_interaction, unseen_scale)
    response = model.gene_response
    assert response.seen.tolist() == [[True, False], [True, True], [True, True]]
    u, v = response.type_factor.detach(), _RESPONSE_SCALE * response.drug_factor[1].detach()  # (3, r), (r, G)
    sensitivity = torch.exp(_RESPONSE_SCALE * response.log_sensitivity.detach()[:, 1])  # (3,)
    level = response.dose_response(torch.tensor([[1]]), torch.tensor([[1.0]]))[0, 0].detach()  # (G,)
    base = _RESPONSE_SCALE * response.effect[1].detach()
    ubar, sbar = (u[1] + u[2]) / 2, (sensitivity[1] + sensitivity[2]) / 2  # the types that saw drug 1
    expected = level * unseen_scale * sbar * (base + (ubar + unseen_interaction * (u[0] - ubar)) @ v)
    torch.testing.assert_close(_effect(model, 1, 0), expected)
    torch.testing.assert_close(_effect(model, 1, 2), level * sensitivity[2] * (base + u[2] @ v))  # seen: its own


def _scaled_profiles(sensitivity: list[list[float]]) -> PerturbationVAE:
    """The three-type model with E_kd = s_kd * a_d exactly (no interaction) for the given s (3, 2)."""
    model = _three_type_model(0.0, None)
    with torch.no_grad():
        model.gene_response.drug_factor.zero_()
        model.gene_response.log_sensitivity.copy_(torch.log(torch.tensor(sensitivity)) / _RESPONSE_SCALE)
    return model


def test_the_unseen_scale_is_the_leave_one_type_out_fit_in_relative_error():
    # drug 0 seen in types 0, 1, 2 with sensitivities 1, 2, 4; drug 1 in types 1, 2 with 1, 3 (type 0: unseen)
    model = _scaled_profiles([[1.0, 5.0], [2.0, 1.0], [4.0, 3.0]])
    # each seen s_k against the mean m_k of its drug's other seen types: sum (m/s) / sum (m/s)^2
    ratios = np.array([3.0 / 1.0, 2.5 / 2.0, 1.5 / 4.0, 3.0 / 1.0, 1.0 / 3.0])
    expected = ratios.sum() / np.square(ratios).sum()
    rho = model.gene_response.unseen_scale()
    assert np.isclose(float(rho), expected, rtol=1e-5) and 0.4 < expected < 0.5
    level = model.gene_response.dose_response(torch.tensor([[1]]), torch.tensor([[1.0]]))[0, 0].detach()
    a = _RESPONSE_SCALE * model.gene_response.effect[1].detach()
    torch.testing.assert_close(_effect(model, 1, 0), level * rho * 2.0 * a)  # rho x the seen types' mean, 2
    torch.testing.assert_close(_effect(model, 1, 1), level * 1.0 * a)  # a seen pair is not scaled
    # types that respond alike leave the drug's average effect as it is
    assert np.isclose(float(_scaled_profiles([[2.0, 5.0], [2.0, 3.0], [2.0, 3.0]]).gene_response.unseen_scale()), 1.0)


def test_the_effect_penalty_is_the_mean_over_seen_types_of_each_drugs_squared_full_dose_change():
    model = _three_type_model(0.0, None)
    response = model.gene_response
    a = _RESPONSE_SCALE * response.effect.detach().double()  # (2, G)
    u, v = response.type_factor.detach().double(), _RESPONSE_SCALE * response.drug_factor.detach().double()
    s = torch.exp(_RESPONSE_SCALE * response.log_sensitivity.detach().double())  # (3, 2)
    squared = [[float(((s[k, d] * (a[d] + u[k] @ v[d])) ** 2).sum()) for d in range(2)] for k in range(3)]
    expected = np.mean([squared[k][0] for k in range(3)]) + np.mean([squared[1][1], squared[2][1]])  # type 0: unseen
    assert np.isclose(response.effect_penalty().item(), expected, rtol=1e-5)
    # sensitivities that grow while the profiles shrink leave the applied changes, and so the penalty, unchanged
    with torch.no_grad():
        response.effect /= 3.0
        response.drug_factor /= 3.0
        response.log_sensitivity += math.log(3.0) / _RESPONSE_SCALE
    assert np.isclose(response.effect_penalty().item(), expected, rtol=1e-5)
    # in the loss it is weighted by effect_l2 (the same reparameterisation draw for both)
    x, c = torch.poisson(torch.full((2, 30), 3.0)), torch.tensor([[0, -1, 1.0, 0.0, 1], [-1, -1, 0.0, 0.0, 0]])
    losses = []
    for weight in (0.0, 0.25):
        weighted = PerturbationVAE(replace(model.config, effect_l2=weight))
        weighted.load_state_dict(model.state_dict())
        torch.manual_seed(1)
        losses.append(weighted.loss(x, c).loss.item())
    assert np.isclose(losses[1] - losses[0], 0.25 * expected, rtol=1e-4)
    with pytest.raises(ConfigError, match="effect_l2"):
        _model(effect_l2=-1.0)


def test_the_seen_mask_is_saved_and_older_weights_load_as_all_seen():
    model = _three_type_model(0.0)
    state = model.state_dict()
    fresh = _three_type_model(1.0)
    fresh.gene_response.seen.fill_(True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gene_response.seen, model.gene_response.seen)
    older = {k: v for k, v in state.items() if not k.endswith((".seen", ".log_sensitivity"))}
    fresh.load_state_dict(older)
    assert bool(fresh.gene_response.seen.all())
    assert torch.equal(fresh.gene_response.sensitivities(), torch.ones(3, 2))  # saved before sensitivities: 1
    with pytest.raises(ConfigError, match="unseen_interaction"):
        _three_type_model(1.5)
    with pytest.raises(ConfigError, match="unseen_scale"):
        _three_type_model(0.0, 1.5)
