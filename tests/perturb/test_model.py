"""The tensor model: dose response, combinations, loss terms, config round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genailab.errors import ConfigError, InputDataError
from genailab.model.config import ModelConfig
from genailab.model.perturbation import DoseResponse, PerturbationConfig, PerturbationVAE


def _model(**options) -> PerturbationVAE:
    vae = ModelConfig(input_dim=30, latent_dim=4, hidden_dims=(16,), likelihood="nb", inject_condition="none")
    return PerturbationVAE(PerturbationConfig(vae=vae, n_drugs=3, covariate_sizes=(2,), **options))


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
    model = _model()
    #           drug codes    doses       cell type
    c = torch.tensor([
        [-1, -1, 0.0, 0.0, 1],   # control
        [0, -1, 2.0, 0.0, 1],    # drug 0
        [2, -1, 2.0, 0.0, 1],    # drug 2
        [0, 2, 2.0, 2.0, 1],     # drug 0 + drug 2
    ])  # fmt: skip
    control, a, b, both = model.perturbation_shift(c)
    torch.testing.assert_close(both - control, (a - control) + (b - control))
    assert not torch.allclose(a, control)


def test_loss_returns_the_basal_latent_and_trains_drug_parameters():
    torch.manual_seed(0)
    model = _model()
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
    config = _model(max_drugs=3, dose_scale=2.5).config
    assert PerturbationConfig.from_dict(config.to_dict()) == config
    vae = ModelConfig(input_dim=30, condition_dim=2)
    with pytest.raises(ConfigError, match="unconditional"):
        PerturbationConfig(vae=vae, n_drugs=1)
    with pytest.raises(ConfigError, match="dose_scale"):
        PerturbationConfig(vae=ModelConfig(input_dim=30), n_drugs=1, dose_scale=0.0)
    assert np.isclose(_model().config.condition_dim, 2 * 2 + 1)
