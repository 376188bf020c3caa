"""Options the commands share, read from the one place each default lives.

Defaults, choice lists and help texts come from the config dataclasses
(:class:`~genailab.model.config.ModelConfig`, :class:`~genailab.train.config.TrainConfig`,
:class:`~genailab.model.adversary.AdversaryConfig` and its presets) and from the signatures of the
AnnData models, so the command line and the Python API build the same model for the same request.
Each option's destination is the Python argument it sets, so an error naming ``kl_warmup_epochs``
can be shown as ``--kl-warmup``. Old spellings stay as hidden aliases for one release.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable

import click
from click.core import ParameterSource

from genailab.data.validation import EMPTY_CELL_ACTIONS
from genailab.model.adversary import ADVERSARY_MODES, AdversaryConfig
from genailab.model.config import DISPERSIONS, LIKELIHOODS, ModelConfig
from genailab.train.config import TrainConfig
from genailab.train.schedules import KL_SCHEDULES

CHOICES = {
    "likelihood": LIKELIHOODS,
    "dispersion": DISPERSIONS,
    "kl_schedule": KL_SCHEDULES,
    "mode": ADVERSARY_MODES,
    "empty_cells": EMPTY_CELL_ACTIONS,
}


def field_default(config_class, name: str):
    """The default of a config dataclass field."""
    field = {f.name: f for f in dataclasses.fields(config_class)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


@functools.cache
def _field_comments(config_class) -> dict[str, str]:
    """The why-comment written beside each field of a config dataclass, by field name."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def field_help(config_class, name: str) -> str:
    """The field's own comment, as help text."""
    text = _field_comments(config_class).get(name, "")
    return text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")


def argument_default(function: Callable, name: str):
    """The default of a keyword argument of ``function`` (e.g. ``VAE.__init__``'s likelihood)."""
    return inspect.signature(function).parameters[name].default


def sizes(value: str | tuple[int, ...]) -> tuple[int, ...]:
    """``"128,128"`` as (128, 128); layer sizes of an option."""
    if isinstance(value, tuple):
        return value
    try:
        dims = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated sizes like 128,128, got {value!r}") from exc
    if not dims or min(dims) < 1:
        raise click.BadParameter("give at least one positive size, e.g. 128,128")
    return dims


def sizes_option(ctx, param, value):
    """Click callback: an option's layer sizes (None, the option left out, stays None)."""
    return None if value is None else sizes(value)


def _patience(ctx, param, value):
    return None if value == 0 else value  # 0 on the command line is the API's None: never stop early


def _field_type(config_class, name: str):
    """int, float, bool or str from the field's annotation (``"int | None"`` gives int)."""
    annotation = str({f.name: f for f in dataclasses.fields(config_class)}[name].type)
    for kind in (bool, int, float):
        if re.search(rf"\b{kind.__name__}\b", annotation):
            return kind
    return str


def config_option(*flags: str, config, field: str, help: str | None = None, **extra):
    """A click option for one config field: its default, type, choices and help from the dataclass.

    A field whose default is None (e.g. epochs chosen from the data size) keeps None as the option's
    default, shown as "auto"."""
    default = extra.pop("default", field_default(config, field))
    settings = {"default": default, "show_default": True if default is not None else "auto",
                "help": help or field_help(config, field)}  # fmt: skip
    kind = _field_type(config, field)
    if field in CHOICES:
        settings["type"] = click.Choice(CHOICES[field])
    elif isinstance(default, tuple):
        settings.update(default=",".join(map(str, default)), callback=sizes_option)
    elif kind is bool:
        settings["is_flag"] = True
    elif kind in (int, float):
        settings["type"] = kind
    settings.update(extra)
    return click.option(*flags, field, **settings)


def hidden_alias(old_flag: str, dest: str, **settings):
    """Accept ``old_flag`` (a spelling of an earlier release) for the option whose destination is
    ``dest``; hidden from ``--help``."""

    def decorate(command):
        @click.option(old_flag, f"_alias_{dest}", hidden=True, default=None, **settings)
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(f"_alias_{dest}")
            if value not in (None, ()) and not isinstance(value, tuple):
                context = click.get_current_context()
                if context.get_parameter_source(dest) is ParameterSource.COMMANDLINE and kwargs[dest] != value:
                    flag = next(max(p.opts, key=len) for p in context.command.params if p.name == dest)
                    raise click.UsageError(f"{old_flag} {value} and {flag} {kwargs[dest]} disagree; give {flag} alone.")
            if value not in (None, ()):
                kwargs[dest] = (*kwargs[dest], *value) if isinstance(value, tuple) else value
            return command(*args, **kwargs)

        return wrapper

    return decorate


def _collected(names: tuple[str, ...], into: str):
    """Move the options ``names`` into one dict argument ``into`` of the command."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            kwargs[into] = {name: kwargs.pop(name) for name in names}
            return command(*args, **kwargs)

        return wrapper

    return decorate


def _stack(*decorators):
    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


TRAIN_FIELDS = (
    "epochs", "batch_size", "lr", "kl_warmup_epochs", "kl_schedule", "validation_fraction",
    "early_stopping_patience", "checkpoint_every", "seed", "device",
)  # fmt: skip


def patience_option():
    """``--patience``: TrainConfig's early_stopping_patience, 0 on the command line for None."""
    return config_option(
        "--patience", config=TrainConfig, field="early_stopping_patience", type=click.IntRange(min=0),
        callback=_patience, help="Stop after this many epochs without validation improvement; 0 never stops early.",
    )


_KL_SHARE = f"{field_default(TrainConfig, 'kl_warmup_fraction'):.0%}"


def train_options(command, *, checkpoints: bool = True):
    """The training options every model-training command takes, as ``train_options`` (TrainConfig
    fields); ``checkpoints=False`` leaves out ``--checkpoint-every`` (a command that writes none)."""
    names = TRAIN_FIELDS if checkpoints else tuple(f for f in TRAIN_FIELDS if f != "checkpoint_every")
    checkpoint = [config_option("--checkpoint-every", config=TrainConfig, field="checkpoint_every")] if checkpoints else []
    return _stack(
        config_option("--epochs", config=TrainConfig, field="epochs", help="Most epochs to train."),
        config_option("--batch-size", config=TrainConfig, field="batch_size", help="Cells per minibatch (per process)."),
        config_option("--lr", config=TrainConfig, field="lr", help="Learning rate."),
        config_option("--kl-warmup", config=TrainConfig, field="kl_warmup_epochs",
                      help=f"Epochs over which the KL weight rises to 1 (auto: {_KL_SHARE} of the run without "
                           f"--epochs, else 10, or {_KL_SHARE} of a shorter run)."),
        config_option("--kl-schedule", config=TrainConfig, field="kl_schedule"),
        config_option("--validation-fraction", config=TrainConfig, field="validation_fraction"),
        patience_option(),
        *checkpoint,
        config_option("--seed", config=TrainConfig, field="seed"),
        config_option("--device", config=TrainConfig, field="device", help="auto, cpu, cuda or cuda:N."),
        _collected(names, "train_options"),
    )(command)


def architecture_options(*fields: str, defaults: dict | None = None):
    """Architecture options (ModelConfig fields among latent_dim, hidden_dims, dispersion, beta),
    as ``model_options``; ``defaults`` replaces ModelConfig's where a model's constructor has its own."""
    flags = {"latent_dim": "--latent-dim", "hidden_dims": "--hidden", "dispersion": "--dispersion", "beta": "--beta"}
    helps = {"hidden_dims": "Encoder layer sizes, comma-separated; the decoder mirrors them."}
    own = {f: {"default": v} for f, v in (defaults or {}).items()}
    return _stack(
        *(config_option(flags[f], config=ModelConfig, field=f, help=helps.get(f), **own.get(f, {})) for f in fields),
        _collected(fields, "model_options"),
    )


def likelihood_option(function: Callable):
    """``--likelihood`` with the default of ``function`` (the model's constructor); ``--model`` is its old name."""
    return _stack(
        config_option(
            "--likelihood", config=ModelConfig, field="likelihood", default=argument_default(function, "likelihood"),
            help="Decoder likelihood: gaussian for log-normalised data, nb or zinb for raw counts.",
        ),
        hidden_alias("--model", "likelihood", type=click.Choice(LIKELIHOODS)),
    )


def adversary_options(preset: AdversaryConfig | None):
    """--adversary-weight/-mode/-warmup defaulting to ``preset``, as ``adversary`` (an AdversaryConfig or None)."""
    preset = preset or AdversaryConfig()

    def decorate(command):
        @click.option("--adversary-weight", default=preset.weight, show_default=True, type=float,
                      help=field_help(AdversaryConfig, "weight").rstrip(".") + "; 0 trains without the adversary.")
        @click.option("--adversary-mode", default=preset.mode, show_default=True, type=click.Choice(ADVERSARY_MODES),
                      help=field_help(AdversaryConfig, "mode"))
        @click.option("--adversary-warmup", "adversary_warmup_epochs", default=preset.warmup_epochs, show_default=True,
                      type=float,
                      help=field_help(AdversaryConfig, "warmup_epochs"))
        @functools.wraps(command)
        def wrapper(*args, adversary_weight, adversary_mode, adversary_warmup_epochs, **kwargs):
            kwargs["adversary"] = (
                dataclasses.replace(preset, weight=adversary_weight, mode=adversary_mode,
                                    warmup_epochs=adversary_warmup_epochs)
                if adversary_weight != 0  # 0 disables it; AdversaryConfig refuses a negative or NaN weight
                else None
            )
            return command(*args, **kwargs)

        return wrapper

    return decorate


def device_option(command):
    """``--device`` for commands that run a trained model."""
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(command)
