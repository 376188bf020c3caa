"""Shared CLI helpers: reading data and turning library errors into clean messages."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from genailab.errors import GenailabError


def fail_cleanly(command):
    """Show genailab's own errors as one clear line (exit code 2) instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GenailabError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def read_data(path: Path, *, backed: bool = False):
    """Read an AnnData from any supported file (h5ad, 10x, loom, text tables); ``backed`` keeps an
    h5ad's matrix on disk."""
    from genailab.data.readers import read

    return read(path, backed=backed)
