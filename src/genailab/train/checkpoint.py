"""Atomic checkpoint files that load without executing code (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from genailab.errors import CheckpointError


def atomic_torch_save(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file and a rename, so a crash never leaves a
    half-written file under the final name. A failed write (disk full, folder gone) raises
    :class:`CheckpointError` and leaves any earlier file at ``path`` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, CheckpointError):  # torch's writer raises RuntimeError
            raise _write_error(path, exc) from exc
        raise


def _write_error(path: Path, exc: Exception) -> CheckpointError:
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    return CheckpointError(
        f"Could not write {path} ({reason}); free disk space or choose another folder. Any earlier "
        f"{path.name} there is unchanged."
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safe_torch_load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a file written by :func:`atomic_torch_save` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {path}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... on bad files
        raise CheckpointError(
            f"Could not read {path}: it is truncated, corrupt or not a genailab file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Use an earlier checkpoint or retrain."
        ) from exc
