"""The ``genailab`` command line: one module per group of commands, all thin over the library.

Command modules load only when their command runs (or shows its own help), so ``genailab --help``
and ``--version`` answer without importing torch, anndata or scanpy. ``COMMANDS`` names each
command's module and its one-line summary (a test checks it against the command's docstring).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from genailab import __version__

# The commands write figures to files, never to a window: set before any command imports matplotlib.
os.environ.setdefault("MPLBACKEND", "Agg")

COMMANDS = {
    "simulate": ("genailab.cli.data", "Write simulated counts with known ground truth to --out."),
    "convert": (
        "genailab.cli.data",
        "Write DATA (10x folder or .h5, .loom, or a text table) as an h5ad that every command reads.",
    ),
    "train": ("genailab.cli.core", "Train a conditional VAE on DATA (h5ad, 10x, loom, csv) and save it to --out."),
    "embed": ("genailab.cli.core", "Write the latent posterior means of DATA's cells to obsm[KEY] of --out."),
    "demo": ("genailab.cli.core", "Train an NB model on the embedded PBMC counts, embed, cluster, and report."),
    "evaluate": (
        "genailab.cli.evaluate",
        "Evaluate the model in RUN_DIR on DATA: metrics.json, PNG figures and index.html in --out.",
    ),
    "denoise": ("genailab.cli.apps", "Write the model's expected expression of DATA's cells to a layer of --out."),
    "generate": (
        "genailab.cli.apps",
        "Generate --n-cells cells with the given conditions from a trained model; counts in X of --out.",
    ),
    "integrate": (
        "genailab.cli.apps",
        "Batch-correct DATA with an adversarial CVAE; model, corrected latent and expression in --out.",
    ),
    "cluster": (
        "genailab.cli.apps",
        "Latent, neighbours, UMAP, Leiden clusters and marker genes of DATA's cells, written to --out.",
    ),
    "de": (
        "genailab.cli.apps",
        "Differential expression of --group vs --reference from the model's posterior (scVI change mode).",
    ),
    "map": (
        "genailab.cli.mapping",
        "Map QUERY onto the model in REF_RUN: train only the query's new batches, embed, transfer labels.",
    ),
    "perturb": (
        "genailab.cli.perturb",
        "Predict perturbed expression of control cells under drugs and doses (counterfactuals).",
    ),
}


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        configure_logging(verbose=param.name == "verbose", quiet=param.name == "quiet")


def _verbosity_options() -> list[click.Option]:
    """-v/-q as options of every command too, so they work after the subcommand."""
    return [
        click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_set_verbosity,
                     help="Log progress per epoch and per stage."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_verbosity,
                     help="Only warnings and errors."),
    ]  # fmt: skip


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """INFO with ``verbose``, WARNING with ``quiet``; otherwise INFO when stderr is not a terminal (a
    log line per epoch and stage where no progress bar can show), WARNING when it is."""
    if quiet:
        level = logging.WARNING
    elif verbose or not sys.stderr.isatty():
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("genailab").setLevel(level)


class LazyGroup(click.Group):
    """A group whose commands are imported from their modules when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            importlib.import_module(COMMANDS[name][0])  # its decorators register the command on main
        command = self.commands.get(name)
        if command is not None:
            _add_verbosity(command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from ``COMMANDS``, without importing the command modules."""
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        rows += [(name, cmd.get_short_help_str()) for name, cmd in sorted(self.commands.items()) if name not in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _add_verbosity(command: click.Command) -> None:
    if not any(p.name == "verbose" for p in command.params):
        command.params.extend(_verbosity_options())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_verbosity(sub)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="genailab")
@click.option("-v", "--verbose", is_flag=True, help="Log progress per epoch and per stage.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: bool, quiet: bool) -> None:
    """Conditional VAEs for gene-expression and count data (AnnData / h5ad)."""
    configure_logging(verbose=verbose, quiet=quiet)


__all__ = ["COMMANDS", "configure_logging", "main"]
