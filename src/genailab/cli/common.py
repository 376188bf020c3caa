"""Shared CLI helpers: reading data and turning library errors into clean messages."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from genailab.errors import ConfigError, GenailabError


def fail_cleanly(command):
    """Show genailab's own errors as one clear line instead of a traceback, in the command line's terms.

    The exit status is 2 for invalid options (:class:`~genailab.errors.ConfigError`, as click's own
    usage errors) and 1 for every other problem (data, schema, model files, training).
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GenailabError as exc:
            message = in_option_terms(str(exc), click.get_current_context().command, argument=exc.argument)
            error = click.ClickException(f"{type(exc).__name__}: {message}")
            error.exit_code = 2 if isinstance(exc, ConfigError) else 1
            raise error from exc

    return wrapper


def in_option_terms(message: str, command: click.Command, *, argument: str | None = None) -> str:
    """``message`` with the Python arguments it names spelled as ``command``'s options.

    The table comes from the command's own parameters (the parameter's name -> its long option),
    so an option is spelled in one place. ``name=value`` becomes ``--option value`` (``--flag`` for
    a flag), `` `name` `` becomes ``--option``, and ``argument`` (the argument an error is about)
    becomes ``--option`` wherever it stands as a word.
    """
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}

    def spelled(name: str) -> str:
        return max(options[name].opts, key=len)

    def assignment(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip("'\"")
        return spelled(name) if options[name].is_flag else f"{spelled(name)} {value}"

    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    if not names:
        return message
    message = re.sub(rf"(?<![\w.\-])({names})=('[^']*'|\"[^\"]*\"|[\w+\-.]*\w)", assignment, message)
    message = re.sub(rf"`({names})`", lambda m: spelled(m.group(1)), message)
    if argument in options:
        message = re.sub(rf"(?<![\w.\-`'\"])({re.escape(argument)})(?![\w`'\"])", lambda m: spelled(argument), message)
    return message


def read_data(path: Path, *, backed: bool = False):
    """Read an AnnData from any supported file (h5ad, 10x, loom, text tables); ``backed`` keeps an
    h5ad's matrix on disk."""
    from genailab.data.readers import read

    return read(path, backed=backed)
