"""From an .h5ad file to what training consumes: validated CSR counts (reading), category codes
(categories), CountData with its library priors and split (counts), minibatches (minibatch,
sources).

This package knows nothing of models. Counts stay sparse (CSR) from the file to the minibatch.
"""

from scvi_cli.data.categories import NO_KEY_CATEGORY
from scvi_cli.data.counts import (
    CountData,
    count_data_from_anndata,
    library_log_priors,
    load_count_data,
    train_validation_split,
)
from scvi_cli.data.minibatch import Minibatch, MinibatchSource
from scvi_cli.data.reading import read_h5ad, row_sums, select_counts
from scvi_cli.data.sources import LAYOUTS, CSRMinibatches, DeviceCSRMinibatches, epoch_order, iterate_in_order

__all__ = [
    "LAYOUTS",
    "NO_KEY_CATEGORY",
    "CSRMinibatches",
    "CountData",
    "DeviceCSRMinibatches",
    "Minibatch",
    "MinibatchSource",
    "count_data_from_anndata",
    "epoch_order",
    "iterate_in_order",
    "library_log_priors",
    "load_count_data",
    "read_h5ad",
    "row_sums",
    "select_counts",
    "train_validation_split",
]
