"""The exception types genailab raises for problems a user can fix.

Every message says what is wrong and how to fix it. All derive from :class:`GenailabError`,
and each also derives from the closest built-in type so that ``except ValueError`` still works.
"""

from __future__ import annotations


class GenailabError(Exception):
    """Base class of every error genailab raises on purpose.

    ``argument`` names the Python argument at fault (e.g. ``"beta"``), when there is one, so that
    the command line can say its own option (``--beta``) instead.
    """

    def __init__(self, message: str = "", *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ConfigError(GenailabError, ValueError):
    """An option or combination of options is invalid (e.g. latent_dim larger than genes)."""


class InputDataError(GenailabError, ValueError):
    """Data values are unusable as given (NaN/Inf, negative or non-integer counts, empty cells)."""


class SchemaMismatchError(GenailabError, ValueError):
    """An AnnData does not match what a model expects (missing columns, unknown categories, genes)."""


class CheckpointError(GenailabError, OSError):
    """A model or checkpoint file is missing, truncated, tampered with or of an unknown version."""


class TrainingDivergedError(GenailabError, RuntimeError):
    """The loss became NaN or infinite during training."""
