"""The two adversary modes against hand-written gradients: gradient reversal hands the encoder the
discriminator's gradient with its sign flipped (times the weight); alternating mode gives the
encoder only the gradient of its fooling loss, and the discriminator's own update leaves the
encoder's gradients untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genailab.model.adversary import AdversaryConfig, BatchDiscriminator
from genailab.model.config import ModelConfig
from genailab.model.vae import ConditionalVAE
from genailab.train.config import TrainConfig
from genailab.train.trainer import Trainer


def _setup(mode: str):
    torch.manual_seed(0)
    discriminator = BatchDiscriminator(4, 3, AdversaryConfig(mode=mode, hidden_dims=(8,)))
    z = torch.randn(16, 4, requires_grad=True)
    labels = torch.randint(0, 3, (16,))
    return discriminator, z, labels


def _grad(loss, tensor):
    return torch.autograd.grad(loss, tensor, retain_graph=True)[0]


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_gradient_reversal_flips_the_encoders_gradient(weight):
    discriminator, z, labels = _setup("gradient_reversal")
    classification = F.cross_entropy(discriminator(z), labels)  # the discriminator's own objective
    expected = -weight * _grad(classification, z)
    got = _grad(discriminator.encoder_loss(z, labels, weight), z)
    torch.testing.assert_close(got, expected)
    # ...while the discriminator's parameters get the plain (unflipped, unweighted) gradient
    for p in discriminator.parameters():
        torch.testing.assert_close(_grad(discriminator.encoder_loss(z, labels, weight), p), _grad(classification, p))


def test_alternating_mode_gives_the_encoder_the_fooling_gradient():
    discriminator, z, labels = _setup("alternating")
    weight = 1.5
    target = (1 - F.one_hot(labels, 3).float()) / 2  # uniform over the other batches
    fooling = weight * -(target * F.log_softmax(discriminator(z), -1)).sum(-1).mean()
    got = _grad(discriminator.encoder_loss(z, labels, weight), z)
    torch.testing.assert_close(got, _grad(fooling, z))
    reversed_ = -weight * _grad(F.cross_entropy(discriminator(z), labels), z)
    assert not torch.allclose(got, reversed_)  # not the reversal


def test_alternating_discriminator_step_leaves_the_encoder_alone():
    """In alternating mode the trainer's discriminator update reads z detached: the VAE's gradients
    are exactly those of its own objective."""
    torch.manual_seed(0)
    vae = ConditionalVAE(ModelConfig(input_dim=12, latent_dim=4, hidden_dims=(8,), likelihood="nb"))
    discriminator = BatchDiscriminator(4, 2, AdversaryConfig(mode="alternating", hidden_dims=(8,)))
    trainer = Trainer(vae, TrainConfig(epochs=1, progress=False, device="cpu"), adversary=discriminator)
    x = torch.poisson(torch.full((10, 12), 3.0))
    labels = torch.tensor([0, 1] * 5)
    out = vae.loss(x, None)
    out.loss.backward()
    before = {name: p.grad.clone() for name, p in vae.named_parameters() if p.grad is not None}
    disc_before = [p.detach().clone() for p in discriminator.parameters()]
    trainer._adversary_step(out.z, labels)
    for name, p in vae.named_parameters():
        if name in before:
            torch.testing.assert_close(p.grad, before[name])
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, discriminator.parameters()))  # it learned
