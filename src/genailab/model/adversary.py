"""An adversarial batch discriminator on the latent space, for batch correction.

The discriminator D(z) predicts each cell's batch from z. The VAE is pushed to make that
impossible, either by alternating updates (D learns to classify; the VAE minimises a "fooling"
loss, cross-entropy against the other batches, as in scVI's adversarial option) or by a gradient
reversal layer (Ganin & Lempitsky, 2015: one backward pass, D's gradient flipped into the encoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genailab.checks import check_number, check_sizes
from genailab.errors import ConfigError
from genailab.model.layers import MLP

ADVERSARY_MODES = ("alternating", "gradient_reversal")


@dataclass(frozen=True)
class AdversaryConfig:
    """How strongly and how the latent is made batch-free."""

    weight: float = 1.0  # multiplies the adversarial term in the VAE objective
    warmup_epochs: float = 5.0  # the weight rises linearly from 0 over these epochs, or over kl_warmup_fraction of a shorter run
    mode: str = "alternating"  # "alternating" updates or "gradient_reversal"
    hidden_dims: tuple[int, ...] = (64,)  # discriminator layers
    lr: float = 1e-3  # discriminator learning rate (alternating mode)

    def __post_init__(self) -> None:
        # named adversary_<field>, as the command line's options are, so that no message confuses them with lr & co.
        object.__setattr__(self, "weight", check_number("adversary_weight", self.weight, ge=0))
        object.__setattr__(self, "warmup_epochs", check_number("adversary_warmup_epochs", self.warmup_epochs, ge=0))
        object.__setattr__(self, "lr", check_number("adversary_lr", self.lr, gt=0))
        object.__setattr__(self, "hidden_dims", check_sizes("adversary_hidden_dims", self.hidden_dims))
        if self.mode not in ADVERSARY_MODES:
            raise ConfigError(f"adversary mode {self.mode!r} is not one of {ADVERSARY_MODES}.", argument="mode")

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_dims": list(self.hidden_dims)}

    def weight_at(self, progress: float, *, warmup_epochs: float | None = None) -> float:
        """Adversarial weight ``progress`` epochs into training, warmed up over ``warmup_epochs``
        (None: this config's; the trainer passes it cut to a short run, see
        :meth:`~genailab.train.config.TrainConfig.short_run_warmup`)."""
        warmup = self.warmup_epochs if warmup_epochs is None else warmup_epochs
        if warmup <= 0:
            return self.weight
        return self.weight * min(1.0, progress / warmup)


# Named presets: the one place these defaults are written (API, CLI and apps read them from here).
BATCH_CORRECTION = AdversaryConfig(weight=5.0, warmup_epochs=5.0, mode="alternating")  # weight 1 hardly mixes simulated batches
BASAL_LATENT = AdversaryConfig(weight=5.0, warmup_epochs=5.0, mode="gradient_reversal")  # drug-free basal state (CPA)
PRESETS = {"batch_correction": BATCH_CORRECTION, "basal_latent": BASAL_LATENT}


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class BatchDiscriminator(nn.Module):
    """Classifier D: z (B, L) -> batch logits (B, n_batches)."""

    def __init__(self, latent_dim: int, n_batches: int, config: AdversaryConfig):
        super().__init__()
        if n_batches < 2:
            raise ConfigError("Adversarial batch correction needs at least two batches.")
        self.config = config
        self.n_batches = n_batches
        self.body = MLP(latent_dim, config.hidden_dims, norm="none", activation="relu", dropout=0.0)
        self.out = nn.Linear(config.hidden_dims[-1], n_batches)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))

    def classification_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of D's prediction of the true batch (D's own objective)."""
        return F.cross_entropy(self(z), batch)

    def encoder_loss(self, z: torch.Tensor, batch: torch.Tensor, weight: float) -> torch.Tensor:
        """The adversarial term added to the VAE objective, already multiplied by ``weight``.

        Alternating mode: cross-entropy against a uniform target over the *other* batches, so the
        encoder is rewarded for making D predict a wrong batch. Gradient-reversal mode: D's own
        loss through a reversed gradient, which also trains D in the same backward pass.
        """
        if self.config.mode == "gradient_reversal":
            return F.cross_entropy(self(_ReverseGradient.apply(z, weight)), batch)
        target = (1.0 - F.one_hot(batch, self.n_batches).float()) / (self.n_batches - 1)
        return weight * -(target * F.log_softmax(self(z), dim=-1)).sum(-1).mean()
