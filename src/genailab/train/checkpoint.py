"""Atomic checkpoint files that load without executing code (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from genailab.errors import CheckpointError
from genailab.safe_write import atomic_file, write_error


def atomic_torch_save(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` through a uniquely named temporary file and a rename, so a crash
    never leaves a half-written file under the final name and a link planted at ``path`` is never
    followed (see :mod:`genailab.safe_write`). A failed write (disk full, folder gone) raises
    :class:`CheckpointError` and leaves any earlier file at ``path`` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from exc
    with atomic_file(path) as handle:
        torch.save(obj, handle)  # torch's writer reports a full disk as RuntimeError: atomic_file maps both


def safe_torch_load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a file written by :func:`atomic_torch_save` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {path}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text would advise weights_only=False, the unsafe step
        raise CheckpointError(
            f"Could not read {path}: it is truncated, corrupt or not a genailab file, or it holds objects other "
            "than tensors, which are never loaded (loading them could run code). Use an earlier checkpoint or retrain."
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError... on bad files
        raise CheckpointError(
            f"Could not read {path}: it is truncated, corrupt or not a genailab file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Use an earlier checkpoint or retrain."
        ) from exc


# -- checking a checkpoint before resuming from it --------------------------------------------
_REQUIRED = {"format": str, "version": int, "epoch": int, "model": dict, "optimizer": dict, "history": list,
             "train_config": dict, "model_config": dict, "rng_cpu": torch.Tensor, "extra": dict}  # fmt: skip
_OPTIONAL = {"scheduler": dict, "early_stopping": dict, "adversary": dict, "adversary_optimizer": dict,
             "rng_cuda": list}  # fmt: skip
# Options that fix the data split and order or the optimiser's state: a resumed run must keep them.
FIXED_ON_RESUME = ("seed", "batch_size", "validation_fraction", "optimizer")


def check_checkpoint(state: object, path: str | os.PathLike) -> dict:
    """Check that ``state`` has every entry of a trainer checkpoint, of the right type; returns it.

    Raises :class:`CheckpointError` naming ``path`` and what is missing or wrong.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dictionary; it is not a genailab training checkpoint.")
    missing = sorted(set(_REQUIRED) - set(state))
    if missing:
        raise CheckpointError(
            f"{path} lacks {missing}: it is damaged or not a complete genailab checkpoint. Use an earlier checkpoint "
            "or train afresh."
        )
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key in state and (not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool))):
            raise CheckpointError(
                f"{path}: {key!r} should be a {kind.__name__} but is a {type(state[key]).__name__}; the checkpoint "
                "is damaged. Use an earlier checkpoint or train afresh."
            )
    bad = [name for name, value in state["model"].items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the model weights {bad[:3]} are not tensors; the checkpoint is damaged.")
    if state["epoch"] < 0 or len(state["history"]) != state["epoch"]:
        raise CheckpointError(
            f"{path}: epoch {state['epoch']} with {len(state['history'])} history records; the checkpoint is damaged."
        )
    if state["rng_cpu"].dtype != torch.uint8:
        raise CheckpointError(f"{path}: the random-number state is not a byte tensor; the checkpoint is damaged.")
    return state


def check_weights_fit(saved: dict, expected: dict, path: str | os.PathLike, *, what: str = "model") -> None:
    """Raise :class:`CheckpointError` unless ``saved`` has exactly the tensors of ``expected``
    (a module's ``state_dict()``) with the same shapes, all finite."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the {what} weights do not fit this architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); build the model with the checkpoint's options or train afresh."
        )
    for name, tensor in expected.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: the {what} weight {name} has shape {tuple(saved[name].shape)}, the architecture needs "
                f"{tuple(tensor.shape)}; the checkpoint is damaged or from another model."
            )
        if saved[name].is_floating_point() and not torch.isfinite(saved[name]).all():
            raise CheckpointError(
                f"{path}: the {what} weight {name} holds NaN or infinite values; use an earlier checkpoint."
            )


def check_resume(state: dict, path: str | os.PathLike, *, model_config: dict, train_config: dict) -> None:
    """Refuse to resume from ``state`` with another architecture, other data-order options, or
    fewer epochs than it has finished. Other changed options are allowed (and applied by the trainer)."""
    differences = _differences(state["model_config"], model_config)
    if differences:
        raise CheckpointError(
            f"{path} was written for a different architecture ({differences}); build the model with the same "
            "options to resume, or train afresh."
        )
    previous = state["train_config"]
    fixed = [name for name in FIXED_ON_RESUME if name in previous and previous[name] != train_config.get(name)]
    if "seed" in fixed:
        raise CheckpointError(
            f"{path} was trained with seed {previous['seed']}, not {train_config['seed']}; resume with the same seed "
            "so the data split and order match."
        )
    if fixed:
        differences = _differences({k: previous[k] for k in fixed}, {k: train_config.get(k) for k in fixed})
        raise CheckpointError(
            f"{path} was trained with {differences}; resume with the "
            "checkpoint's values (they fix the data split, the data order and the optimiser's state), or train afresh."
        )
    if train_config["epochs"] is not None and train_config["epochs"] < state["epoch"]:  # None: chosen at fit
        raise CheckpointError(
            f"{path} has finished {state['epoch']} epochs, more than epochs={train_config['epochs']}; give at least "
            f"{state['epoch']} epochs to resume from it."
        )


def check_same_data(
    state: dict, path: str | os.PathLike, *, description: dict, data_sha256: str | None, model_type: str | None = None
) -> None:
    """Refuse to resume from ``state`` on data whose genes, conditions or cells differ from the
    checkpoint's, naming the difference. ``description`` holds the model's data schema as saved
    with it (``schema``, or a perturbation model's ``perturbation_schema``), compared with the
    checkpoint's ``extra``; ``data_sha256`` is compared with the data hash recorded there, and
    ``model_type`` (e.g. ``"genailab.VAE"``) with the type of model that wrote it."""
    extra = state["extra"]
    written_by = extra.get("model_type")
    if model_type is not None and written_by is not None and written_by != model_type:
        raise CheckpointError(f"{path} was written by a {written_by.removeprefix('genailab.')}, not a "
                              f"{model_type.removeprefix('genailab.')}; resume it with that model.")
    for key in ("schema", "perturbation_schema"):
        saved, current = extra.get(key), description.get(key)
        if isinstance(saved, dict) and isinstance(current, dict):
            if key == "perturbation_schema":
                saved, current = {**saved, **saved.get("data", {})}, {**current, **current.get("data", {})}
            saved, current = _without_measures(saved), _without_measures(current)
        if isinstance(saved, dict) and isinstance(current, dict) and saved != current:
            raise CheckpointError(f"{path} was written for other data: {_schema_difference(saved, current)}. "
                                  "Resume on the data the checkpoint was trained on, or train afresh.")  # fmt: skip
    saved_hash = extra.get("data_sha256")
    if saved_hash is not None and data_sha256 is not None and saved_hash != data_sha256:
        raise CheckpointError(
            f"{path} was written for other data: the genes and conditions agree, but the cells or their counts differ "
            "(the data hash does not match). Resume on the data the checkpoint was trained on, or train afresh."
        )


def _without_measures(schema: dict) -> dict:
    """A schema without what it measured on the data (``value_scale``; the data hash covers the
    data, and checkpoints written before it was kept lack it)."""
    return {k: (_without_measures(v) if isinstance(v, dict) else v) for k, v in schema.items() if k != "value_scale"}


def apply_resumed_options(state: dict, config, *, optimizer, scheduler, early_stopping) -> list[str]:
    """Make options that differ from the checkpoint's take effect in restored optimiser, plateau
    schedule and early stopping (their loaded states carry the old values; a run that stopped early
    trains on when the patience is now longer than its epochs without improvement); returns
    ``"name: old -> new"`` for each changed option."""
    previous = state["train_config"]
    changed = [f"{name}: {previous[name]} -> {value}" for name, value in config.to_dict().items()
               if name in previous and previous[name] != value]  # fmt: skip
    for group in optimizer.param_groups:
        if previous.get("lr") != config.lr:
            group["lr"] = config.lr
        group["weight_decay"] = config.weight_decay
    if scheduler is not None:
        scheduler.factor, scheduler.patience = config.lr_factor, config.lr_plateau_patience
        scheduler.min_lrs = [config.min_lr] * len(optimizer.param_groups)
    if early_stopping is not None:
        early_stopping.patience = config.early_stopping_patience
        early_stopping.min_delta = config.early_stopping_min_delta
        early_stopping.stopped = early_stopping.stopped and early_stopping.bad_epochs >= early_stopping.patience
    return changed


def _differences(saved: dict, current: dict) -> str:
    names = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in names[:5])


def _schema_difference(saved: dict, current: dict) -> str:
    old, new = list(saved.get("gene_names", [])), list(current.get("gene_names", []))
    if old != new:
        missing, extra = [g for g in old if g not in set(new)], [g for g in new if g not in set(old)]
        if not missing and not extra:
            return f"the same {len(old)} genes in another order"
        return (f"the genes differ ({len(missing)} of the checkpoint's genes are missing, e.g. {missing[:3]}; "
                f"{len(extra)} are new, e.g. {extra[:3]})")  # fmt: skip
    rest = {k: v for k, v in saved.items() if k not in ("gene_names", "data")}
    return f"the conditions differ ({_differences(rest, {k: v for k, v in current.items() if k in rest})})"
