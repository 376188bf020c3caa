"""Saved models: a folder with ``genailab.json`` (configs, schema, provenance) and ``model.pt``.

``model.pt`` holds tensors only and is read with ``torch.load(weights_only=True)``, so loading a
model never runs code from the file; its SHA-256 is recorded in the JSON, and the JSON carries a
SHA-256 of its own canonical form, both checked on load, so a tampered or truncated weights file or
an edited description (swapped gene names, a changed category list) is refused with a clear error.
The pair is written as one unit (see :func:`save_model_files`); every file goes through
:mod:`genailab.safe_write`, so links planted in the folder are never followed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from genailab.data.backed import row_blocks
from genailab.data.perturbation_schema import ObsKeys, PerturbationSchema
from genailab.data.schema import DataSchema
from genailab.errors import CheckpointError
from genailab.model.adversary import AdversaryConfig
from genailab.model.config import ModelConfig
from genailab.model.perturbation import PerturbationConfig
from genailab.safe_write import FolderLock, check_output_folder, refuse_link, user_path, write_text
from genailab.train.checkpoint import atomic_torch_save, safe_torch_load
from genailab.train.config import TrainConfig

logger = logging.getLogger(__name__)

MODEL_FORMAT = "genailab-model"
FORMAT_VERSION = 2  # bump when the layout changes; loaders keep reading older versions (1: no description hash)
CONFIG_FILE = "genailab.json"
WEIGHTS_FILE = "model.pt"
PENDING_WEIGHTS_FILE = "model.pending.pt"  # new weights, until the description naming them is in place
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, PENDING_WEIGHTS_FILE)
CHECKPOINT_FILE = "checkpoint.pt"  # the resumable checkpoint that fit(checkpoint_dir=...) writes beside them


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a trained model's numbers."""
    versions = {"python": platform.python_version()}
    for name in ("genailab", "torch", "numpy", "scipy", "anndata", "scanpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def data_fingerprint(matrix, conditions: np.ndarray | None, gene_names: tuple[str, ...]) -> str:
    """SHA-256 of the training matrix, conditions and gene names.

    The matrix (dense, CSR or backed on disk) is hashed in row blocks, so the same values give the
    same hash in memory and on disk, without reading a backed matrix whole.
    """
    digest = hashlib.sha256()
    digest.update("\n".join(gene_names).encode())
    for block in row_blocks(matrix):
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            digest.update(np.diff(block.indptr).astype(np.int64).tobytes())
            digest.update(block.indices.astype(np.int64).tobytes())
            digest.update(block.data.astype(np.float32).tobytes())
        else:
            digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    if conditions is not None:
        digest.update(np.ascontiguousarray(conditions, dtype=np.float32).tobytes())
    return digest.hexdigest()


def warn_if_reference_changed(record: dict | None) -> None:
    """Log a warning when a query model's recorded reference (``genailab.json``'s ``reference``) is
    still at its folder but its weights are no longer the ones the query was mapped onto: latents of
    the two models then live in different spaces. A moved or deleted reference is fine (the query
    model holds every weight it needs)."""
    if not record or not record.get("path") or not record.get("model_pt_sha256"):
        return
    weights = Path(record["path"]) / WEIGHTS_FILE
    if weights.is_file() and _sha256(weights) != record["model_pt_sha256"]:
        logger.warning(
            "The reference this query model was mapped onto, %s, has changed since (its %s differs): its latent "
            "space is no longer the query's, so embed the reference with the query model (or map again) before "
            "comparing or transferring labels.", record["path"], WEIGHTS_FILE,
        )


def saved_file_hashes(directory: Path) -> dict[str, str] | None:
    """SHA-256 of a saved folder's two files, as a query model records its reference; None when
    either is missing."""
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        return None
    return {"genailab_json_sha256": _sha256(directory / CONFIG_FILE), "model_pt_sha256": _sha256(directory / WEIGHTS_FILE)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(directory: str | os.PathLike) -> str:
    """SHA-256 of a saved model's ``genailab.json``; it records the weights' hash, so this names
    the model exactly (for provenance in outputs made with it)."""
    return _sha256(Path(directory) / CONFIG_FILE)


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before long work starts
    (a uniquely named probe; a folder that is a link, or model file names that are links, are refused)."""
    return check_output_folder(directory, names=(*MODEL_FILES, CHECKPOINT_FILE))


def check_model_folder(directory: str | os.PathLike, *, overwrite: bool, option: str = "overwrite=True") -> Path:
    """:func:`check_writable`, and refuse a folder that already holds a saved model unless
    ``overwrite`` (``option`` names the switch in the error: ``--overwrite`` on the command line)."""
    directory = check_writable(directory)  # links first: a planted link must not pass for a saved model
    if (directory / CONFIG_FILE).exists() and not overwrite:
        raise CheckpointError(
            f"{directory} already holds a saved model; pass {option} to replace it, or choose another folder."
        )
    return directory


def description_hash(document: dict) -> str:
    """SHA-256 of a model description in canonical JSON (sorted keys, no spaces), without its own
    ``description_sha256`` field."""
    body = {k: v for k, v in document.items() if k != "description_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_model_files(directory: str | os.PathLike, *, metadata: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``metadata`` (plus format, versions and both hashes) as one unit.

    The weights go to ``model.pending.pt`` first; the description naming their hash then replaces
    ``genailab.json`` (the moment the new model counts as saved), and the weights finally take the
    name ``model.pt``. A crash at any point leaves a loadable model: the previous one before the
    description is replaced, the new one after (:func:`load_model_files` also accepts the pending
    weights when they are the ones the description names).
    """
    directory = check_writable(directory)
    with FolderLock(directory):
        pending = directory / PENDING_WEIGHTS_FILE
        atomic_torch_save({k: v.detach().cpu() for k, v in tensors.items()}, pending)
        document = {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": package_versions(),
            "weights_sha256": _sha256(pending),
            **metadata,
        }
        document["description_sha256"] = description_hash(document)
        write_text(directory / CONFIG_FILE, json.dumps(document, indent=2))
        refuse_link(directory / WEIGHTS_FILE)
        os.replace(pending, directory / WEIGHTS_FILE)
    return directory


def load_model_files(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a saved model folder; returns (metadata, tensors).

    Checked: the format and its version, the description's own hash (format 2 and later), the
    weights' hash, that the file holds tensors only and that they are finite, and that the
    description agrees with itself (gene names vs input size, categories vs condition widths,
    no unknown option names).
    """
    directory = user_path(directory)
    config_path = directory / CONFIG_FILE
    weights_present = (directory / WEIGHTS_FILE).is_file() or (directory / PENDING_WEIGHTS_FILE).is_file()
    if not config_path.is_file() or not weights_present:  # pending weights: a first save stopped before its rename
        raise CheckpointError(
            f"{directory} is not a saved genailab model: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by model.save(dir) or `genailab train --out dir`)."
        )
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the file is corrupt.") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{config_path} is not a genailab model description.")
    format_version = metadata.get("format_version")
    if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
        raise CheckpointError(f"{config_path} has no valid format_version; the file is damaged.")
    hashed = format_version >= 2 or "description_sha256" in metadata  # format 1 never wrote one
    if not hashed:
        logger.warning("%s was saved in model format 1, before descriptions carried a hash, so edits to it cannot "
                       "be detected; save the model again to write the current format.", config_path)
    if format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} uses model format {format_version}, newer than this genailab reads "
            f"({FORMAT_VERSION}); upgrade genailab."
        )
    if hashed and metadata.get("description_sha256") != description_hash(metadata):
        raise CheckpointError(
            f"{config_path} does not match the hash recorded in it (description_sha256): the description (gene "
            "names, categories, options...) was edited or damaged. Restore it from a backup or retrain."
        )
    weights = _weights_named_by(directory, metadata.get("weights_sha256"))
    tensors = safe_torch_load(weights)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{weights} does not hold a dictionary of tensors; it is not a genailab weights file.")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{weights} holds NaN or infinite weights ({', '.join(bad[:3])}); retrain the model.")
    problems = description_problems(metadata)
    if problems:
        raise CheckpointError(
            f"{config_path} is damaged or incomplete: {'; '.join(problems)}. Restore it from a backup or retrain."
        )
    return metadata, tensors


def _weights_named_by(directory: Path, sha256: object) -> Path:
    """The weights file whose hash the description records: model.pt, or the pending weights of a
    save interrupted after its description was written."""
    for name in (WEIGHTS_FILE, PENDING_WEIGHTS_FILE):
        path = directory / name
        if path.is_file() and _sha256(path) == sha256:
            return path
    raise CheckpointError(
        f"{directory / WEIGHTS_FILE} does not match the hash recorded in {CONFIG_FILE}: the file was modified or "
        "truncated. Restore it from a backup or retrain."
    )


def description_problems(metadata: dict) -> list[str]:
    """What is inconsistent in a model description: option names no config knows, gene names
    that do not fit the input size, category lists that do not fit the condition widths."""
    perturbation = "perturbation_schema" in metadata
    problems = []
    nested = [("model_config", PerturbationConfig if perturbation else ModelConfig), ("train_config", TrainConfig),
              ("adversary_config", AdversaryConfig)]  # fmt: skip
    if perturbation:
        nested += [("perturbation_schema", PerturbationSchema)]
    else:
        nested += [("schema", DataSchema)]
    for field, config_class in nested:
        value = metadata.get(field)
        if value is not None and not isinstance(value, dict):
            problems.append(f"{field} is not a mapping")
        elif value is not None:
            problems += _unknown_keys(value, config_class, field)
    if problems:
        return problems
    try:
        if perturbation:
            schema, model = metadata["perturbation_schema"]["data"], metadata["model_config"]["vae"]
            if len(metadata["perturbation_schema"]["drugs"]) != metadata["model_config"]["n_drugs"]:
                problems.append("the drug list does not have n_drugs entries")
        else:
            schema, model = metadata["schema"], metadata["model_config"]
        genes, categories = list(schema["gene_names"]), [list(c) for c in schema.get("categories", [])]
        if len(genes) != model["input_dim"]:
            problems.append(f"{len(genes)} gene names for a model of input_dim {model['input_dim']}")
        if len(set(genes)) != len(genes):
            problems.append("the gene names are not unique")
        if len(categories) != len(schema.get("categorical_keys", [])):
            problems.append("the category lists do not match the categorical keys")
        sizes, n_continuous = [len(c) for c in categories], len(schema.get("continuous_keys", []))
        if perturbation:
            if sizes != list(metadata["model_config"].get("covariate_sizes", [])):
                problems.append(f"covariate categories of sizes {sizes} do not match covariate_sizes")
        elif schema.get("encoding") == "embedding" and sizes:
            if sizes != list(model.get("categorical_sizes", [])) or n_continuous != model.get("n_continuous", 0):
                problems.append(f"categories of sizes {sizes} do not match the model's categorical_sizes")
        elif sum(sizes) + n_continuous != model.get("condition_dim", 0):
            problems.append(
                f"{sum(sizes)} categories and {n_continuous} continuous columns for condition_dim "
                f"{model.get('condition_dim', 0)}"
            )
    except (KeyError, TypeError) as exc:
        problems.append(f"an entry is missing or of the wrong type ({type(exc).__name__}: {exc})")
    return problems


def _unknown_keys(value: dict, config_class, field: str) -> list[str]:
    known = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "MOVED_OPTIONS", ()))
    problems = [f"{field} has unknown entries {sorted(set(value) - known)}"] if set(value) - known else []
    for (outer, name), inner_class in _NESTED.items():
        if outer is config_class and isinstance(value.get(name), dict):
            problems += _unknown_keys(value[name], inner_class, f"{field}.{name}")
    return problems


_NESTED = {(PerturbationConfig, "vae"): ModelConfig, (PerturbationSchema, "data"): DataSchema,
           (PerturbationSchema, "keys"): ObsKeys}  # fmt: skip
