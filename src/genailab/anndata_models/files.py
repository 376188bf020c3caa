"""Saved models: a folder with ``genailab.json`` (configs, schema, provenance) and ``model.pt``.

``model.pt`` holds tensors only and is read with ``torch.load(weights_only=True)``, so loading a
model never runs code from the file; its SHA-256 is recorded in the JSON and checked on load, so a
tampered or truncated weights file is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from genailab.data.backed import row_blocks
from genailab.errors import CheckpointError
from genailab.train.checkpoint import atomic_torch_save, safe_torch_load

MODEL_FORMAT = "genailab-model"
FORMAT_VERSION = 1  # bump when the layout changes; loaders keep reading older versions
CONFIG_FILE = "genailab.json"
WEIGHTS_FILE = "model.pt"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before long work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".genailab-write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"Cannot write to {directory} ({exc.strerror or exc}); choose another output folder or free disk space."
        ) from exc
    return directory


def save_model_files(directory: str | os.PathLike, *, metadata: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` to model.pt and ``metadata`` (plus format, versions, weights hash) to JSON."""
    directory = check_writable(directory)
    weights = directory / WEIGHTS_FILE
    atomic_torch_save({k: v.detach().cpu() for k, v in tensors.items()}, weights)
    document = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": package_versions(),
        "weights_sha256": _sha256(weights),
        **metadata,
    }
    tmp = directory / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_model_files(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a saved model folder; returns (metadata, tensors)."""
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
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
    if not isinstance(metadata.get("format_version"), int):
        raise CheckpointError(f"{config_path} has no valid format_version; the file is damaged.")
    if metadata["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} uses model format {metadata['format_version']}, newer than this genailab reads "
            f"({FORMAT_VERSION}); upgrade genailab."
        )
    if _sha256(weights) != metadata.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match the hash recorded in {CONFIG_FILE}: the file was modified or "
            "truncated. Restore it from a backup or retrain."
        )
    tensors = safe_torch_load(weights)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{weights} does not hold a dictionary of tensors; it is not a genailab weights file.")
    return metadata, tensors
