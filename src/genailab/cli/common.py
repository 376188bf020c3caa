"""Shared CLI helpers: reading data, writing outputs safely, and turning library errors into clean messages."""

from __future__ import annotations

import contextlib
import os
import functools
import re
import shlex
from pathlib import Path

import click

from genailab.errors import CheckpointError, ConfigError, GenailabError

CHECKPOINT_FILE = "checkpoint.pt"  # where `genailab train` keeps the resumable checkpoint of its run
INTEGRATED_FILE = "integrated.h5ad"  # `integrate`: the corrected latent and expression, beside the model
MAPPED_FILE = "query.h5ad"  # `map`: the query with its latent and transferred labels, beside the query model
UMAP_FILE = "umap.png"  # `map`: reference and query together, by dataset and by label
# Every file a command writes beside the model in a run folder (the report's RUN_FILES first): those an
# --overwrite run does not write again are the old run's, and go once the new run has finished.
COMMAND_OUTPUTS = ("history.csv", "training_curves.png", INTEGRATED_FILE, MAPPED_FILE, UMAP_FILE)


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
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not _out_of_memory(exc):
                raise
            raise click.ClickException(_memory_message(exc, click.get_current_context().command)) from exc

    return wrapper


SIZE_OPTIONS = ("n_cells", "hidden_dims", "batch_size", "n_samples", "latent_dim")  # what sets a command's memory


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether torch could not allocate (CPU allocator message, or CUDA's OutOfMemoryError)."""
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc)


def _memory_message(exc: BaseException, command: click.Command) -> str:
    """One line for an allocation that failed: how much was asked for, and the options that size it."""
    text = str(exc)
    asked = re.search(r"tried to allocate (\d+) bytes", text)  # torch's allocator
    if asked:
        what = f"an allocation of {int(asked.group(1)) / 2**30:.3g} GiB"
    elif text.startswith("Unable to allocate "):  # numpy's wording: "Unable to allocate 1.46 TiB for an array ..."
        what = f"an allocation of {text[len('Unable to allocate '):].split(' for ')[0]}"
    else:
        what = "an allocation"
    names = {p.name: max(p.opts, key=len) for p in command.params if isinstance(p, click.Option)}
    sizes = [names[name] for name in SIZE_OPTIONS if name in names]
    lower = f"lower {', '.join(sizes)} or " if sizes else ""
    return f"Out of memory: {what} failed; {lower}run the command on a machine with more memory."


def in_option_terms(message: str, command: click.Command, *, argument: str | None = None) -> str:
    """``message`` with the Python arguments it names spelled as ``command``'s options.

    The table comes from the command's own parameters (the parameter's name -> its long option),
    so an option is spelled in one place. ``name=value`` becomes ``--option value`` (``--flag`` for
    a flag, ``no --option`` for None), ``name['key'] = value`` becomes ``--option key=value`` (a repeatable KEY=VALUE option),
    `` `name` `` becomes ``--option``, and ``argument`` (the argument an error is about) becomes
    ``--option`` wherever it stands as a word (its default ``None``: no ``--option``).
    """
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}

    def spelled(name: str) -> str:
        return max(options[name].opts, key=len)

    def assignment(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip("'\"")
        if value == "None":  # an option's None is the option left out
            return f"no {spelled(name)}"
        if options[name].is_flag and value == "False" and options[name].secondary_opts:  # --x/--no-x given as --no-x
            return max(options[name].secondary_opts, key=len)
        return spelled(name) if options[name].is_flag else f"{spelled(name)} {value}"

    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    if not names:
        return message
    message = re.sub(rf"(?<![\w.\-])({names})\['([^']*)'\] ?= ?'?([^',;]*)'?", lambda m: f"{spelled(m.group(1))} "
                     f"{m.group(2)}={m.group(3)}", message)  # fmt: skip
    message = re.sub(rf"(?<![\w.\-])({names})=('[^']*'|\"[^\"]*\"|[\w+\-.]*\w)", assignment, message)
    message = re.sub(rf"`({names})`", lambda m: spelled(m.group(1)), message)
    if argument in options:
        message = message.replace("None (the default)", f"no {spelled(argument)} (the default)").replace(" (None)", "")
        message = re.sub(rf"(?<![\w.\-`'\"])({re.escape(argument)})(?![\w`'\"])", lambda m: spelled(argument), message)
    return message


def read_data(path: Path, *, backed: bool = False):
    """Read an AnnData from any supported file (h5ad, 10x, loom, text tables); ``backed`` keeps an
    h5ad's matrix on disk."""
    from genailab.data.readers import read

    return read(path, backed=backed)


def check_output_file(
    path: Path, *, suffix: str | None = None, option: str = "--out", data: Path | None = None
) -> Path:
    """Check, before the work, that ``path`` can be written as a file (see :mod:`genailab.safe_write`),
    with ``suffix`` that its name says what the command writes there (``.h5ad``, ``.csv``, ``.png``),
    and that it is not the input file ``data`` (a command never replaces its input)."""
    from genailab.safe_write import check_output_file as check

    if suffix is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{option} {path} must end in {suffix}: this command writes a {suffix[1:]} file there.")
    if data is not None and is_same_file(path, data):
        raise ConfigError(
            f"{option} {path} is the input file DATA; write to a new file (the input is never replaced), "
            f"e.g. {option} {path.with_name(path.stem + '_genailab' + path.suffix)}."
        )
    return check(path)


def is_same_file(path: Path, other: Path) -> bool:
    """Whether both paths exist and name the same file (through links and relative paths)."""
    return path.exists() and other.exists() and os.path.samefile(path, other)


def write_h5ad(adata, path: Path) -> Path:
    """Write ``adata`` to ``path`` atomically: never through a link, nothing half-written on failure."""
    from genailab.safe_write import atomic_path

    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def write_csv(table, path: Path, **options) -> Path:
    """``table.to_csv(path, **options)``, written atomically like :func:`write_h5ad`."""
    from genailab.safe_write import atomic_file

    with atomic_file(path, "w") as handle:
        table.to_csv(handle, **options)
    return path


@contextlib.contextmanager
def run_folder(out: Path, *, overwrite: bool, names: tuple[str, ...] = (), lock: bool = True):
    """Check a run folder before the work (writable, no links at ``names``, no saved model unless
    ``overwrite``) and hold its lock while the command runs (``lock=False``: other torchrun ranks).
    A command that fails before writing anything leaves no folder it created behind (folders that
    hold a file, e.g. a checkpoint, stay)."""
    from genailab.anndata_models.files import MODEL_FILES, check_model_folder
    from genailab.safe_write import FolderLock, check_output_folder

    from genailab.anndata_models.files import CONFIG_FILE

    with output_folder(out):
        check_output_folder(out, names=MODEL_FILES + names)
        check_model_folder(out, overwrite=overwrite, option="--overwrite")
        with FolderLock(out) if lock else contextlib.nullcontext():
            replaced = _stamps(out) if lock and overwrite and (out / CONFIG_FILE).exists() else {}
            yield out
            for path, stamp in replaced.items():  # the old run's outputs this run did not write again
                if _stamps(out).get(path) == stamp:
                    path.unlink(missing_ok=True)


def _stamps(out: Path) -> dict[Path, tuple[int, int, int]]:
    """(inode, mtime, size) of each command output in ``out``: a file written again (atomically,
    so under a new inode) has another stamp."""
    stamps = {}
    for name in COMMAND_OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            info = (out / name).lstat()
            stamps[out / name] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return stamps


@contextlib.contextmanager
def output_folder(out: Path):
    """Remove the folders on the way to ``out`` that this block created, when it fails and they
    are still empty: a command that fails before writing anything leaves no folder behind."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:
        yield out
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty (or gone): kept as it is
                folder.rmdir()
        raise


class KeepsArguments(click.Command):
    """A command that keeps the arguments it was given (``ctx.meta["genailab.args"]``), so that
    :func:`resume_command` can repeat them exactly."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["genailab.args"] = list(args)
        return super().parse_args(ctx, args)


def resume_command(ctx: click.Context, checkpoint: Path) -> str:
    """The shell command that runs ``ctx``'s command again as given, resuming from ``checkpoint``."""
    names, context = [], ctx
    while context.parent is not None:  # the subcommands' names (the program's own may read "python -m genailab")
        names.insert(0, context.info_name)
        context = context.parent
    args, kept = ctx.meta.get("genailab.args", []), []
    skip = False
    for arg in args:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        kept.append(arg)
    return shlex.join(["genailab", *names, *kept, "--resume", str(checkpoint)])


def fit_in_run_folder(model, config, *, out: Path, resume_from: Path | None) -> None:
    """``model.fit`` with checkpoints in ``out``; Ctrl-C or SIGTERM ends the command (exit 130) with
    the path of the checkpoint of the last finished epoch and the command that resumes from it."""
    from genailab.train import load_checkpoint

    checkpoint = out / CHECKPOINT_FILE
    try:
        model.fit(config, checkpoint_dir=out, resume_from=resume_from)
        finished = model.history[-1]["epoch"] if model.history else 0
        if checkpoint.is_file() and load_checkpoint(checkpoint)["epoch"] < finished:
            # e.g. resumed without --checkpoint-every: an earlier epoch's state must not outlive the run
            checkpoint.unlink()
            click.echo(f"Removed {checkpoint}: it held an earlier epoch than the finished model.", err=True)
    except KeyboardInterrupt:
        ctx = click.get_current_context()
        if checkpoint.is_file():
            epoch = load_checkpoint(checkpoint)["epoch"]
            click.echo(f"Interrupted: epoch {epoch} of {config.epochs} is saved in {checkpoint}. Resume with:\n"
                       f"  {resume_command(ctx, checkpoint)}", err=True)  # fmt: skip
        else:
            click.echo("Interrupted before the first epoch finished; there is nothing to resume.", err=True)
        ctx.exit(130)


def _epoch_of(checkpoint: Path) -> str:
    """The last finished epoch a checkpoint holds, or "unreadable"."""
    from genailab.train import load_checkpoint

    try:
        return str(load_checkpoint(checkpoint)["epoch"])
    except (CheckpointError, KeyError):
        return "unreadable"


def unfinished_run(out: Path, *, resume_from: Path | None, overwrite: bool) -> Path | None:
    """Refuse to start a new run over ``out``'s checkpoint of an unfinished one unless ``overwrite``;
    returns that checkpoint for the caller to delete once the new run's data and model are built
    (so it is never left beside the new model, and a typo in the command does not cost it)."""
    checkpoint = out / CHECKPOINT_FILE
    if not checkpoint.exists() or (resume_from is not None and Path(resume_from).resolve() == checkpoint.resolve()):
        return None
    if not overwrite:
        raise CheckpointError(
            f"{checkpoint} holds the checkpoint of an unfinished run (epoch {_epoch_of(checkpoint)}); resume it with "
            f"--resume {checkpoint}, pass --overwrite to start afresh (the checkpoint is then deleted), or choose "
            "another --out."
        )
    return checkpoint
