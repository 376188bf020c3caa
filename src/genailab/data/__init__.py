"""Data layer: schema, validation, minibatches, readers, preprocessing, datasets and the simulator."""

from genailab.data.datasets import pbmc68k_counts
from genailab.data.loader import Batch, MinibatchLoader, gather_rows
from genailab.data.preprocess import prepare_counts
from genailab.data.readers import read, read_bulk_counts
from genailab.data.schema import DataSchema
from genailab.data.simulate import PerturbationSpec, simulate, true_drug_log_fc, write_simulated_h5ad
from genailab.data.validation import check_expression, empty_cells, is_integer_counts

__all__ = [
    "Batch",
    "DataSchema",
    "MinibatchLoader",
    "PerturbationSpec",
    "check_expression",
    "empty_cells",
    "gather_rows",
    "is_integer_counts",
    "pbmc68k_counts",
    "prepare_counts",
    "read",
    "read_bulk_counts",
    "simulate",
    "true_drug_log_fc",
    "write_simulated_h5ad",
]
