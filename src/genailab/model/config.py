"""The one frozen configuration of a conditional VAE, saved beside its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from genailab.checks import check_number, check_sizes
from genailab.errors import ConfigError

LIKELIHOODS = ("gaussian", "nb", "zinb")
DISPERSIONS = ("gene", "gene-condition", "gene-cell")
NORMS = ("batch", "layer", "none")
ACTIVATIONS = ("relu", "gelu", "elu", "leaky_relu", "silu", "tanh")
INJECTIONS = ("both", "encoder", "decoder", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`~genailab.model.vae.ConditionalVAE`.

    Every field is plain data so the config round-trips through JSON.
    """

    input_dim: int  # genes G
    latent_dim: int = 10  # size of z; small values give smoother, more interpretable latents
    condition_dim: int = 0  # width of the condition vector c the networks see (one-hot + continuous)
    hidden_dims: tuple[int, ...] = (128,)  # encoder layers; the decoder mirrors them (one layer of 128, as scVI)
    likelihood: str = "gaussian"  # "gaussian" for log-normalised data, "nb"/"zinb" for raw counts
    dispersion: str = "gene"  # NB theta / Gaussian variance: per gene, per gene and condition, per cell
    dropout: float = 0.1  # dropout after each hidden layer (regularisation)
    norm: str = "batch"  # normalisation layer after each linear layer
    activation: str = "relu"
    inject_condition: str = "both"  # where c enters: the encoder q(z|x,c), the decoder p(x|z,c), both
    categorical_sizes: tuple[int, ...] = ()  # categories per embedded condition column (learned embeddings)
    embedding_dim: int = 8  # size of each learned condition embedding
    n_continuous: int = 0  # continuous condition columns passed after the embedded codes
    beta: float = 1.0  # weight of the KL term (beta-VAE); the trainer may anneal it further

    def __post_init__(self) -> None:
        for name, rule in _NUMBERS.items():
            object.__setattr__(self, name, check_number(name, getattr(self, name), **rule))
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        object.__setattr__(self, "categorical_sizes", check_sizes("categorical_sizes", self.categorical_sizes, allow_empty=True))
        if self.categorical_sizes and self.condition_dim == 0:
            object.__setattr__(self, "condition_dim", self.embedded_condition_dim)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("dispersion", self.dispersion, DISPERSIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("inject_condition", self.inject_condition, INJECTIONS)
        if self.latent_dim > self.input_dim:
            raise ConfigError(
                f"latent_dim={self.latent_dim} is larger than the number of genes ({self.input_dim}); "
                "choose a latent_dim below the number of genes (10-30 is typical).",
                argument="latent_dim",
            )
        if self.categorical_sizes and self.condition_dim != self.embedded_condition_dim:
            raise ConfigError(
                f"condition_dim={self.condition_dim} does not match the embedded conditions "
                f"({len(self.categorical_sizes)} x {self.embedding_dim} + {self.n_continuous} continuous = "
                f"{self.embedded_condition_dim}); leave condition_dim to the embedding layout."
            )
        if self.dispersion == "gene-condition" and self.condition_dim == 0:
            raise ConfigError("dispersion='gene-condition' needs conditions; use dispersion='gene'.")

    @property
    def embedded_condition_dim(self) -> int:
        """Width of c after embedding: one embedding per categorical column plus continuous columns."""
        return len(self.categorical_sizes) * self.embedding_dim + self.n_continuous

    @property
    def raw_condition_dim(self) -> int:
        """Width of the condition input: codes + continuous when embedded, else ``condition_dim``."""
        if self.categorical_sizes:
            return len(self.categorical_sizes) + self.n_continuous
        return self.condition_dim

    @property
    def is_count_model(self) -> bool:
        return self.likelihood in ("nb", "zinb")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["hidden_dims"] = list(self.hidden_dims)
        data["categorical_sizes"] = list(self.categorical_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown model options {sorted(unknown)}; known options are {sorted(known)}.")
        return cls(**data)


# The numeric fields and their valid ranges (checked by genailab.checks.check_number).
_NUMBERS = {
    "input_dim": dict(integer=True, ge=1),
    "latent_dim": dict(integer=True, ge=1),
    "condition_dim": dict(integer=True, ge=0),
    "dropout": dict(ge=0, lt=1),
    "embedding_dim": dict(integer=True, ge=1),
    "n_continuous": dict(integer=True, ge=0),
    "beta": dict(ge=0, hint="(1 is the standard VAE; 0.1-10 is the usual range.)"),
}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.", argument=name)
