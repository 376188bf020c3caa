"""The ``genailab`` command line: one module per group of commands, all thin over the library."""

from __future__ import annotations

import logging

import click

from genailab import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genailab")
@click.option("-v", "--verbose", is_flag=True, help="Log progress per epoch.")
def main(verbose: bool) -> None:
    """Conditional VAEs for gene-expression and count data (AnnData / h5ad)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


from genailab.cli import core  # noqa: E402  (registers commands on main)
from genailab.cli import data  # noqa: E402
from genailab.cli import evaluate  # noqa: E402
from genailab.cli import perturb  # noqa: E402
from genailab.cli import apps  # noqa: E402

__all__ = ["main", "core", "data"]
