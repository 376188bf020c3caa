"""Data layer: schema, validation, minibatches, readers, preprocessing, datasets and the simulator."""

from genailab.data.datasets import pbmc68k_counts
from genailab.data.loader import Batch, MinibatchLoader, gather_rows
from genailab.data.schema import DataSchema
from genailab.data.validation import check_expression, empty_cells, is_integer_counts

__all__ = [
    "Batch",
    "DataSchema",
    "MinibatchLoader",
    "check_expression",
    "empty_cells",
    "gather_rows",
    "is_integer_counts",
    "pbmc68k_counts",
]
