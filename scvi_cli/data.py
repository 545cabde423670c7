"""From an .h5ad file to what training consumes: validated CSR counts, category codes, library
priors, a train/validation split and minibatches of tensors.

This module knows nothing of models. Everything that can be wrong with the input is found here,
up front, and reported as one DataError line naming the file, the key and the offending value.
Counts stay sparse (CSR) from the file to the minibatch: only the B rows of a minibatch are
ever made dense, so memory follows the number of non-zeros, not cells x genes.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scvi_cli.errors import DataError, SpecError, first_line
from scvi_cli.minibatch import Minibatch, MinibatchSource  # noqa: F401  (MinibatchSource: CSRMinibatches implements it)
from scvi_cli.nn.sparse_input import SparseRows

# The single category every cell falls into when no obs key is given (batch, labels). It is "0"
# because that is what scvi-tools records for a model set up without the key (its mapping is
# [0]), so models move between the two tools without a special case.
NO_KEY_CATEGORY = "0"

# Elements of .data inspected per vectorised step: bounds the temporaries of the value checks
# (a few bytes per element) on matrices with 10^8 and more non-zeros.
_CHUNK = 1 << 22

_MAX_LISTED = 10


# --------------------------------------------------------------------------------------------
# Reading


def read_h5ad(path: str | os.PathLike, backed: bool = False):
    """Read an .h5ad file; every way it can fail becomes one DataError line naming the file.

    With backed=True the counts stay on disk (anndata's read-only backed mode).
    """
    import anndata
    import h5py

    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{name}: no such file")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, not an .h5ad file (zarr stores are not supported)")
    if not os.access(p, os.R_OK):
        raise DataError(f"{name}: cannot read the file (permission denied)")
    if p.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError as e:
        raise DataError(f"{name}: cannot read the file ({first_line(e)})") from e
    if not is_hdf5:
        raise DataError(f"{name}: not an HDF5 (.h5ad) file")

    # Open once with h5py: a truncated or foreign HDF5 file is reported by what it is, not by
    # whatever anndata trips over first.
    try:
        with h5py.File(p, "r") as f:
            top = sorted(f.keys())
    except OSError as e:
        msg = first_line(e)
        if "truncated" in msg:
            raise DataError(f"{name}: the file is truncated (incomplete copy or download?)") from e
        raise DataError(f"{name}: corrupt HDF5 file ({msg})") from e
    if "obs" not in top or "var" not in top:
        hint = " (looks like a 10x Genomics .h5 file; convert it to .h5ad first)" if "matrix" in top else ""
        shown = ", ".join(repr(k) for k in top[:_MAX_LISTED]) or "none"
        raise DataError(f"{name}: an HDF5 file but not an AnnData .h5ad (top-level keys: {shown}){hint}")

    try:
        with warnings.catch_warnings():
            # anndata's notes on old file versions are not the user's problem.
            warnings.simplefilter("ignore", category=FutureWarning)
            return anndata.read_h5ad(p, backed="r" if backed else None)
    except MemoryError:
        raise
    except Exception as e:  # h5py/anndata raise many types for damaged files; report them all alike
        raise DataError(f"{name}: cannot read as .h5ad, the file looks corrupt ({first_line(e)})") from e


# --------------------------------------------------------------------------------------------
# Counts


def _locate_counts(adata, layer: str | None, path: str):
    """The count matrix asked for, its gene names and how to call it in messages."""
    if layer is None:
        matrix, var_names, label = adata.X, adata.var_names, "X"
    elif layer == "raw":
        if adata.raw is None:
            raise DataError(f"{path}: data.layer is 'raw' but the file has no raw (adata.raw is empty)")
        matrix, var_names, label = adata.raw.X, adata.raw.var_names, "raw.X"
    else:
        if layer not in adata.layers:
            keys = list(adata.layers.keys())
            have = ("available layers: " + ", ".join(repr(k) for k in keys)) if keys else "the file has no layers"
            close = difflib.get_close_matches(layer, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"{path}: no layer {layer!r} (data.layer); {have}{hint}")
        matrix, var_names, label = adata.layers[layer], adata.var_names, f"layers[{layer!r}]"
    if matrix is None:
        raise DataError(f"{path}: {label} is empty (no count matrix stored)")
    return matrix, [str(g) for g in var_names], label


def _to_csr(matrix, path: str, label: str) -> sp.csr_matrix:
    """Any in-memory or backed matrix -> scipy CSR, without ever densifying a sparse one."""
    if hasattr(matrix, "to_memory"):  # anndata's backed sparse dataset
        matrix = matrix.to_memory()
    elif type(matrix).__module__.startswith("h5py"):  # backed dense dataset
        matrix = matrix[()]
    if sp.issparse(matrix):
        return matrix.tocsr() if matrix.format != "csr" else sp.csr_matrix(matrix)
    if not isinstance(matrix, np.ndarray):
        try:
            matrix = np.asarray(matrix)
        except Exception as e:
            raise DataError(f"{path}: {label} has an unsupported type {type(matrix).__name__}") from e
    if matrix.ndim != 2:
        raise DataError(f"{path}: {label} is not a 2-d matrix (shape {matrix.shape})")
    if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == np.bool_):
        raise DataError(f"{path}: {label} holds {matrix.dtype} values, not numbers")
    # Row blocks bound the temporaries of the dense -> sparse conversion.
    step = max(1, _CHUNK // max(1, matrix.shape[1]))
    if matrix.shape[0] <= step:
        return sp.csr_matrix(matrix)
    blocks = [sp.csr_matrix(matrix[i : i + step]) for i in range(0, matrix.shape[0], step)]
    return sp.vstack(blocks, format="csr")


def _check_not_empty(X: sp.csr_matrix, path: str, label: str) -> None:
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: {label} is empty ({X.shape[0]} cells x {X.shape[1]} genes)")


def _check_unique_genes(genes: Sequence[str], path: str, label: str) -> None:
    seen: set[str] = set()
    dups: dict[str, None] = {}  # ordered set: the first duplicates, in gene order
    for g in genes:
        if g in seen:
            dups[g] = None
        seen.add(g)
    dups = list(dups)
    if dups:
        shown = ", ".join(repr(g) for g in dups[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise DataError(
            f"{path}: gene names of {label} are not unique ({shown}{more}); make them unique first"
        )


def _validate_values(X: sp.csr_matrix, obs_names: Sequence[str], genes: Sequence[str], path: str, label: str) -> None:
    """Counts must be finite, non-negative integers; checked on the stored values only."""
    data = X.data[: X.indptr[-1]]
    kind = data.dtype
    if kind == np.bool_ or np.issubdtype(kind, np.unsignedinteger):
        return
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise DataError(f"{path}: {label} holds {kind} values, not counts")
    for start in range(0, data.size, _CHUNK):
        c = data[start : start + _CHUNK]
        if np.issubdtype(kind, np.integer):
            bad = c < 0
        else:
            bad = ~(np.isfinite(c) & (c >= 0) & (np.rint(c) == c))
        if bad.any():
            k = start + int(np.flatnonzero(bad)[0])
            value = data[k]
            row = int(np.searchsorted(X.indptr, k, side="right")) - 1
            if not np.isfinite(value):
                what = "non-finite values"
            elif value < 0:
                what = "negative counts"
            else:
                what = "non-integer counts"
            # numpy's shortest repr ("2.5", not float32's 2.5000000xx); whole numbers without ".0"
            shown = str(int(value)) if np.isfinite(value) and value == int(value) else str(value)
            where = f"first: {shown} at cell {obs_names[row]!r}, gene {genes[X.indices[k]]!r}"
            raise DataError(f"{path}: {label} holds {what} ({where}); scVI models need raw counts")


def _canonical_float32(X: sp.csr_matrix) -> sp.csr_matrix:
    """float32 CSR without duplicate entries (the minibatch gather assigns, it does not add)."""
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    return X


def row_sums(X: sp.csr_matrix) -> np.ndarray:
    """Total counts per cell as float64 (empty rows are 0), by scipy's compiled CSR matrix-vector
    product: one pass over .data, no copy (numpy's reduceat with a float64 accumulator took
    0.9 s on the first pass over 48M values, this 0.07 s). The products accumulate in X's
    dtype, float32 for CountData: exact for integer totals below 2**24 (16.7M counts per cell)."""
    ones = np.ones(X.shape[1], dtype=np.result_type(X.dtype, np.float32))
    return np.asarray(X @ ones, dtype=np.float64).reshape(-1)


def select_counts(adata, layer: str | None, path: str | os.PathLike) -> sp.csr_matrix:
    """The validated float32 CSR count matrix of X, raw.X or a layer (all cells, all genes).

    CSC and dense inputs are converted to CSR; values are checked without densifying.
    """
    X, _, _ = _validated_counts(adata, layer, str(path))
    return X


def _validated_counts(
    adata, layer: str | None, path: str, gene_names: Sequence[str] | None = None, allow_missing_genes: bool = False
) -> tuple[sp.csr_matrix, list[str], str]:
    """(float32 CSR counts, their gene names, the matrix's label), checked without densifying.

    With ``gene_names`` the columns are those genes, matched by name; otherwise all genes, which
    must then be unique.
    """
    matrix, genes, label = _locate_counts(adata, layer, path)
    X = _to_csr(matrix, path, label)
    _check_not_empty(X, path, label)
    if gene_names is not None:
        X = _select_genes(X, genes, gene_names, allow_missing_genes, path, label)
        genes = [str(g) for g in gene_names]
    else:
        _check_unique_genes(genes, path, label)
    _validate_values(X, [str(o) for o in adata.obs_names], genes, path, label)
    return _canonical_float32(X), genes, label


def _select_genes(
    X: sp.csr_matrix, genes: list[str], wanted: Sequence[str], allow_missing: bool, path: str, label: str
) -> sp.csr_matrix:
    """Columns of X reordered to `wanted` by name, on the CSR arrays; extra genes are dropped.

    Missing genes are an error, or zero columns with a warning when allow_missing is set.
    """
    wanted = [str(g) for g in wanted]
    position = {g: i for i, g in enumerate(wanted)}
    # Only genes the model uses have to be unambiguous.
    _check_unique_genes([g for g in genes if g in position], path, label)
    present = set(genes)
    missing = [g for g in wanted if g not in present]
    if len(missing) == len(wanted):
        raise DataError(f"{path}: none of the model's {len(wanted)} genes are in {label} (wrong file or gene ids?)")
    if missing:
        shown = ", ".join(repr(g) for g in missing[:_MAX_LISTED])
        more = f", ... ({len(missing)} in all)" if len(missing) > _MAX_LISTED else ""
        if not allow_missing:
            raise DataError(
                f"{path}: {len(missing)} of the model's {len(wanted)} genes are missing from {label}: "
                f"{shown}{more}; allow missing genes to fill them with zeros"
            )
        warnings.warn(
            f"{path}: {len(missing)} of the model's {len(wanted)} genes are missing; filled with zeros",
            UserWarning,
            stacklevel=3,
        )
    column_of = {g: j for j, g in enumerate(genes)}
    dest = np.array([i for i, g in enumerate(wanted) if g in column_of], dtype=np.int64)
    src = np.array([column_of[wanted[i]] for i in dest], dtype=np.int64)
    if len(wanted) == len(genes) and np.array_equal(src, np.arange(len(genes))):
        return X  # already the model's genes, in its order
    out = X[:, src]  # scipy's compiled column gather: present genes, in the model's order
    if missing:
        # Spread the present columns to their places among the model's genes; dest is
        # increasing, so the remap keeps each row's indices in order.
        out = sp.csr_matrix((out.data, dest[out.indices], out.indptr), shape=(X.shape[0], len(wanted)))
    out.sort_indices()
    return out


# --------------------------------------------------------------------------------------------
# Obs columns -> codes


def _obs_column(obs, key: str, spec_field: str, path: str):
    if key not in obs.columns:
        cols = [str(c) for c in obs.columns]
        close = difflib.get_close_matches(key, cols, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif cols:
            hint = "available: " + ", ".join(repr(c) for c in cols[:_MAX_LISTED]) + (
                ", ..." if len(cols) > _MAX_LISTED else ""
            )
        else:
            hint = "obs has no columns"
        raise DataError(f"{path}: obs has no column {key!r} ({spec_field}); {hint}")
    return obs[key]


def _categorical_codes(
    column, key: str, path: str, training: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """int64 codes of an obs column: its values in sorted order, or the positions of their
    string forms in `training` (the categories a model was trained with).

    Values are sorted as values, as pandas orders categories (numbers numerically: 1, 2, 10, not
    1, 10, 2), so codes agree with scvi-tools' registry; mixed types fall back to string order.
    """
    import pandas as pd

    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    n_missing = int((codes < 0).sum())
    if n_missing:
        raise DataError(f"{path}: obs[{key!r}] has {n_missing} missing (NaN) values; fill or drop those cells")
    names = [str(u) for u in uniques]
    if training is None:
        try:
            ordered = sorted(set(np.asarray(uniques).tolist()))
        except TypeError:  # mixed types (e.g. str and int) have no order of their own
            ordered = sorted(set(names))
        categories = list(dict.fromkeys(str(value) for value in ordered))
    else:
        categories = list(training)
        known = set(categories)
        unknown = list(dict.fromkeys(n for n in names if n not in known))  # in order of appearance
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:_MAX_LISTED])
            more = f", ... ({len(unknown)} in all)" if len(unknown) > _MAX_LISTED else ""
            raise DataError(f"{path}: obs[{key!r}] has categories not seen in training: {shown}{more}")
    lookup = {c: i for i, c in enumerate(categories)}
    remap = np.array([lookup[n] for n in names], dtype=np.int64)
    return remap[codes], categories


def _key_codes(
    obs, key: str | None, role: str, spec_field: str, path: str, training: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Codes for batch or labels; a single pseudo-category when there is no key."""
    n = len(obs)
    if key is None:
        if training is not None and len(training) > 1:
            raise DataError(
                f"{path}: the model was trained with {len(training)} {role} categories but "
                f"{spec_field} is not set; give the obs key it was trained with"
            )
        categories = list(training) if training is not None else [NO_KEY_CATEGORY]
        return np.zeros(n, dtype=np.int64), categories
    return _categorical_codes(_obs_column(obs, key, spec_field, path), key, path, training)


def _continuous(obs, key: str, path: str) -> np.ndarray:
    import pandas as pd

    column = _obs_column(obs, key, "data.continuous_covariate_keys", path)
    if not (pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype)):
        raise DataError(
            f"{path}: obs[{key!r}] is not numeric (dtype {column.dtype}); "
            "list it under data.categorical_covariate_keys instead"
        )
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{path}: obs[{key!r}] has {int(bad.sum())} missing or non-finite values")
    return values.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The loaded data set


@dataclass
class CountData:
    """Everything training and inference need from a data set, free of AnnData.

    `kept_cells` is a boolean mask over the cells of the input file: cells with zero total counts
    are dropped, and outputs written back next to the input must be aligned with this mask.
    """

    X: sp.csr_matrix  # (n, G) float32 counts
    obs_names: list[str]
    gene_names: list[str]
    batch_codes: np.ndarray  # (n,) int64
    label_codes: np.ndarray  # (n,) int64
    cat_cov_codes: np.ndarray | None  # (n, K) int64
    cont_covs: np.ndarray | None  # (n, M) float32
    categories: dict[str, list[str]]  # "batch", "labels", each categorical covariate key
    cat_cov_keys: list[str] = field(default_factory=list)
    cont_cov_keys: list[str] = field(default_factory=list)
    source: str = "<memory>"
    kept_cells: np.ndarray | None = None  # (n_input,) bool

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def n_batch(self) -> int:
        return len(self.categories["batch"])

    @property
    def n_labels(self) -> int:
        return len(self.categories["labels"])

    @property
    def n_cats_per_cov(self) -> list[int]:
        return [len(self.categories[k]) for k in self.cat_cov_keys]


_RESERVED = ("batch", "labels")


def _spec_keys(data_spec) -> tuple[str | None, str | None, str | None, list[str], list[str]]:
    layer = getattr(data_spec, "layer", None)
    batch_key = getattr(data_spec, "batch_key", None)
    labels_key = getattr(data_spec, "labels_key", None)
    cat_keys = list(getattr(data_spec, "categorical_covariate_keys", None) or [])
    cont_keys = list(getattr(data_spec, "continuous_covariate_keys", None) or [])
    for name, keys in (("categorical_covariate_keys", cat_keys), ("continuous_covariate_keys", cont_keys)):
        dups = sorted({k for k in keys if keys.count(k) > 1})
        if dups:
            raise SpecError(f"data.{name} lists {', '.join(repr(k) for k in dups)} more than once")
    clash = [k for k in cat_keys if k in _RESERVED]
    if clash:
        raise SpecError(
            f"data.categorical_covariate_keys may not hold {clash[0]!r}: the name is reserved for "
            "the batch/labels categories; use data.batch_key or copy the column under another name"
        )
    return layer, batch_key, labels_key, cat_keys, cont_keys


def count_data_from_anndata(
    adata,
    data_spec: Any,
    source: str = "<memory>",
    *,
    categories: dict[str, list[str]] | None = None,
    gene_names: Sequence[str] | None = None,
    allow_missing_genes: bool = False,
) -> CountData:
    """Validated counts and codes from an AnnData; `source` names it in messages.

    With `categories` (from a trained model) obs values are coded as in training, and unknown
    values are an error. With `gene_names` (the model's genes) columns are matched by name.
    """
    path = source
    layer, batch_key, labels_key, cat_keys, cont_keys = _spec_keys(data_spec)
    obs = adata.obs
    # Fail on a misspelled key before touching the counts.
    for key, spec_field in (
        [(batch_key, "data.batch_key"), (labels_key, "data.labels_key")]
        + [(k, "data.categorical_covariate_keys") for k in cat_keys]
        + [(k, "data.continuous_covariate_keys") for k in cont_keys]
    ):
        if key is not None:
            _obs_column(obs, key, spec_field, path)
    if categories is not None:
        for key in ["batch", "labels", *cat_keys]:
            if key not in categories:
                raise DataError(f"{path}: the model has no categories for {key!r}; it was trained without it")

    X, genes, label = _validated_counts(adata, layer, path, gene_names, allow_missing_genes)
    obs_names = [str(o) for o in adata.obs_names]

    totals = row_sums(X)
    kept = totals > 0
    n_dropped = int((~kept).sum())
    if n_dropped == X.shape[0]:
        raise DataError(f"{path}: all {n_dropped} cells have zero total counts in {label}")
    if n_dropped:
        warnings.warn(f"{path}: dropped {n_dropped} cells with zero total counts", UserWarning, stacklevel=2)
        X = X[kept]
        obs = obs.iloc[np.flatnonzero(kept)]
        obs_names = [o for o, k in zip(obs_names, kept) if k]

    def trained(key: str) -> list[str] | None:
        return None if categories is None else [str(c) for c in categories[key]]

    cats: dict[str, list[str]] = {}
    batch_codes, cats["batch"] = _key_codes(obs, batch_key, "batch", "data.batch_key", path, trained("batch"))
    label_codes, cats["labels"] = _key_codes(
        obs, labels_key, "labels", "data.labels_key", path, trained("labels")
    )
    cat_cov_codes = None
    if cat_keys:
        columns = []
        for key in cat_keys:
            codes, cats[key] = _categorical_codes(obs[key], key, path, trained(key))
            columns.append(codes)
        cat_cov_codes = np.stack(columns, axis=1)
    cont_covs = np.stack([_continuous(obs, k, path) for k in cont_keys], axis=1) if cont_keys else None

    return CountData(
        X=X,
        obs_names=obs_names,
        gene_names=genes,
        batch_codes=batch_codes,
        label_codes=label_codes,
        cat_cov_codes=cat_cov_codes,
        cont_covs=cont_covs,
        categories=cats,
        cat_cov_keys=cat_keys,
        cont_cov_keys=cont_keys,
        source=source,
        kept_cells=kept,
    )


def load_count_data(
    path: str | os.PathLike,
    data_spec: Any,
    *,
    categories: dict[str, list[str]] | None = None,
    gene_names: Sequence[str] | None = None,
    allow_missing_genes: bool = False,
) -> CountData:
    """read_h5ad + count_data_from_anndata: the one call the CLI makes for its input file."""
    adata = read_h5ad(path)
    return count_data_from_anndata(
        adata,
        data_spec,
        str(path),
        categories=categories,
        gene_names=gene_names,
        allow_missing_genes=allow_missing_genes,
    )


# --------------------------------------------------------------------------------------------
# Facts the models need


def library_log_priors(X: sp.spmatrix, batch_codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch: mean and population variance (ddof 0) of log total counts; each (1, n_batch)
    float32. These are the Normal prior of a latent library size."""
    X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
    codes = np.asarray(batch_codes, dtype=np.int64).reshape(-1)
    if codes.shape[0] != X.shape[0]:
        raise ValueError(f"batch_codes has {codes.shape[0]} entries for {X.shape[0]} cells")
    totals = row_sums(X)
    if (totals <= 0).any():
        raise DataError(f"{int((totals <= 0).sum())} cells have zero total counts; cannot take the log library size")
    if codes.size and (codes.min() < 0 or codes.max() >= n_batch):
        raise ValueError(f"batch codes must lie in [0, {n_batch})")
    log_lib = np.log(totals)
    n = np.bincount(codes, minlength=n_batch).astype(np.float64)
    empty = np.flatnonzero(n == 0)
    if empty.size:
        raise DataError(
            f"batch code(s) {', '.join(str(int(b)) for b in empty[:_MAX_LISTED])} have no cells; "
            "cannot compute their library size prior"
        )
    means = np.bincount(codes, weights=log_lib, minlength=n_batch) / n
    variances = np.bincount(codes, weights=(log_lib - means[codes]) ** 2, minlength=n_batch) / n
    return means.astype(np.float32).reshape(1, -1), variances.astype(np.float32).reshape(1, -1)


def train_validation_split(
    n_cells: int, train_size: float, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 (train_idx, val_idx) over range(n_cells); the same seed gives the same split.

    As in scvi-tools: n_train = ceil(train_size * n_cells), the rest is validation, and when
    the last training minibatch would hold 1 or 2 cells (BatchNorm fails on a single cell)
    those cells move to validation, also when train_size is 1. The ceil allows 1e-9 of float
    error, so 0.7 * 10 cells gives 7, not 8. Cells are assigned by
    np.random.default_rng(seed).permutation(n_cells): validation first, then training.
    """
    if not 0.0 < train_size <= 1.0:
        raise SpecError(f"train.train_size must be in (0, 1], got {train_size}")
    if batch_size < 1:
        raise SpecError(f"train.batch_size must be at least 1, got {batch_size}")
    n_train = min(n_cells, math.ceil(train_size * n_cells - 1e-9))
    remainder = n_train % batch_size
    if 0 < remainder < 3:
        n_train -= remainder
    if n_train <= 0:
        raise DataError(
            f"{n_cells} cells leave no training cells at train_size {train_size} and batch_size "
            f"{batch_size} (a last minibatch of 1-2 cells goes to validation)"
        )
    n_val = n_cells - n_train
    order = np.random.default_rng(seed).permutation(n_cells)
    val_idx = np.sort(order[:n_val]).astype(np.int64)
    train_idx = np.sort(order[n_val:]).astype(np.int64)
    return train_idx, val_idx


# --------------------------------------------------------------------------------------------
# Minibatches




def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch, a function of (seed, epoch) only: a run resumed at epoch k sees
    the same minibatches as an uninterrupted one without saving any RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(n)


LAYOUTS = ("dense", "sparse")


class CSRMinibatches:
    """Minibatches of `indices` (rows of data.X): only the B selected rows are gathered.

    ``layout`` says how the counts come: ``dense`` (x, a (B, G) tensor) or ``sparse`` (rows, CSR;
    x is densified only if a step reads it).
    """

    def __init__(
        self,
        data: CountData,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        layout: str = "dense",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= data.n_cells):
            raise ValueError(f"indices must lie in [0, {data.n_cells})")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.layout = layout
        self.epoch = 0
        X = data.X if data.X.dtype == np.float32 else data.X.astype(np.float32)
        # The compiled kernels want one index dtype for indptr and indices.
        index_dtype = np.promote_types(X.indptr.dtype, X.indices.dtype)
        self._indptr = X.indptr.astype(index_dtype, copy=False)
        self._indices = X.indices.astype(index_dtype, copy=False)
        self._data = X.data
        self._n_genes = X.shape[1]
        self._batch = torch.from_numpy(np.ascontiguousarray(data.batch_codes, dtype=np.int64).reshape(-1, 1))
        self._labels = torch.from_numpy(np.ascontiguousarray(data.label_codes, dtype=np.int64).reshape(-1, 1))
        self._cat = None if data.cat_cov_codes is None else torch.from_numpy(
            np.ascontiguousarray(data.cat_cov_codes, dtype=np.int64)
        )
        self._cont = None if data.cont_covs is None else torch.from_numpy(
            np.ascontiguousarray(data.cont_covs, dtype=np.float32)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_cells(self) -> np.ndarray:
        """The cells of this epoch in their order (shuffled by (seed, epoch) when shuffling)."""
        return self.indices[epoch_order(self.indices.size, self.seed, self.epoch)] if self.shuffle else self.indices

    def __iter__(self) -> Iterator[Minibatch]:
        order = self.epoch_cells()
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._minibatch(rows)

    def _minibatch(self, rows: np.ndarray) -> Minibatch:
        t = torch.from_numpy(rows)
        sub = _row_subset(self._indptr, self._indices, self._data, rows)
        x = csr_rows = None
        if self.layout == "dense":
            x = torch.from_numpy(_densify(*sub, self._n_genes))
        else:
            csr_rows = SparseRows(*(torch.from_numpy(a) for a in sub), self._n_genes, check=False)
        return Minibatch(
            x=x,
            batch_index=self._batch[t],
            labels=self._labels[t],
            cat_covs=None if self._cat is None else self._cat[t],
            cont_covs=None if self._cont is None else self._cont[t],
            rows=csr_rows,
        )


class DeviceCSRMinibatches(CSRMinibatches):
    """The minibatches of CSRMinibatches (same order, same values, dense x) gathered on ``device``
    from a copy of X kept there, for GPU training when the matrix fits.

    Per step nothing dense crosses from the host: the epoch's order moves to the device once, and
    each minibatch is a gather of its rows' stored entries (their count, needed to size the gather,
    comes from the host's copy of indptr, so the device is never asked for a number).
    """

    def __init__(
        self,
        data: CountData,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cuda",
    ):
        super().__init__(data, indices, batch_size, shuffle, seed, drop_last, layout="dense")
        self.device = torch.device(device)
        self._n_cells = data.n_cells
        self._host_indptr = self._indptr.astype(np.int64, copy=False)
        move = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        self._on_device = dict(
            indptr=move(torch.from_numpy(self._host_indptr)),
            indices=move(torch.from_numpy(self._indices.astype(np.int32, copy=False))),
            data=move(torch.from_numpy(self._data)),
            batch=move(self._batch),
            labels=move(self._labels),
            cat=move(self._cat),
            cont=move(self._cont),
        )

    def sharing(self, indices: np.ndarray | Sequence[int], batch_size: int, shuffle: bool) -> "DeviceCSRMinibatches":
        """Minibatches of other cells of the same data, reading the same device copy (e.g. the
        validation cells beside the training cells), not a second one."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        other = copy.copy(self)
        other.batch_size = int(batch_size)
        other.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if other.indices.size and (other.indices.min() < 0 or other.indices.max() >= self._n_cells):
            raise ValueError(f"indices must lie in [0, {self._n_cells})")
        other.shuffle, other.epoch = shuffle, 0
        return other

    @staticmethod
    def device_bytes(data: CountData) -> int:
        """Bytes the device copy of ``data`` takes (float32 values, int32 indices, int64 indptr and codes)."""
        X = data.X
        covariates = 0 if data.cat_cov_codes is None else data.cat_cov_codes.size * 8
        covariates += 0 if data.cont_covs is None else data.cont_covs.size * 4
        return X.nnz * 8 + (X.shape[0] + 1) * 8 + X.shape[0] * 16 + covariates

    def __iter__(self) -> Iterator[Minibatch]:
        order = self.epoch_cells()
        order_on_device = torch.from_numpy(np.ascontiguousarray(order)).to(self.device)
        for b in range(len(self)):
            span = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._gather(order[span], order_on_device[span])

    def _gather(self, rows: np.ndarray, rows_on_device: torch.Tensor) -> Minibatch:
        d = self._on_device
        total = int((self._host_indptr[rows + 1] - self._host_indptr[rows]).sum())
        starts = d["indptr"][rows_on_device]
        lengths = d["indptr"][rows_on_device + 1] - starts
        offsets = torch.cumsum(lengths, 0) - lengths  # where each row starts within the minibatch
        n = rows.size
        row_of_entry = torch.repeat_interleave(torch.arange(n, device=self.device), lengths, output_size=total)
        source = torch.arange(total, device=self.device) + torch.repeat_interleave(starts - offsets, lengths, output_size=total)
        x = torch.zeros((n, self._n_genes), dtype=torch.float32, device=self.device)
        x.index_put_((row_of_entry, d["indices"][source].long()), d["data"][source])
        pick = lambda t: None if t is None else t[rows_on_device]  # noqa: E731
        return Minibatch(
            x=x,
            batch_index=pick(d["batch"]),
            labels=pick(d["labels"]),
            cat_covs=pick(d["cat"]),
            cont_covs=pick(d["cont"]),
        )


def _row_subset_numpy(indptr, indices, data, rows: np.ndarray):
    """(sub_indptr, sub_indices, sub_data): the CSR arrays of X[rows], by vectorised numpy."""
    starts = indptr[rows].astype(np.int64)
    lengths = (indptr[rows + 1] - starts).astype(np.int64)
    sub_indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=sub_indptr[1:])
    total = int(sub_indptr[-1])
    # src[p] = position in .data of the p-th gathered entry: its row's start plus a running offset
    src = np.arange(total, dtype=np.int64) + np.repeat(starts - sub_indptr[:-1], lengths)
    return sub_indptr, indices[src].astype(np.int64), data[src]


def _row_subset_sparsetools(indptr, indices, data, rows: np.ndarray):
    """The same with scipy's compiled csr_row_index kernel, called directly: X[rows] through the
    public API costs mostly Python-level index checking at B=128."""
    from scipy.sparse import _sparsetools

    rows = rows.astype(indptr.dtype, copy=False)
    sub_indptr = np.empty(rows.size + 1, dtype=np.int64)
    sub_indptr[0] = 0
    np.cumsum(indptr[rows + 1] - indptr[rows], out=sub_indptr[1:])
    nnz = int(sub_indptr[-1])
    sub_indices = np.empty(nnz, dtype=indices.dtype)
    sub_data = np.empty(nnz, dtype=data.dtype)
    _sparsetools.csr_row_index(rows.size, rows, indptr, indices, data, sub_indices, sub_data)
    return sub_indptr, sub_indices.astype(np.int64, copy=False), sub_data


def _densify_numpy(sub_indptr, sub_indices, sub_data, n_genes: int) -> np.ndarray:
    """(B, G) float32 from CSR arrays with one numpy scatter (duplicate entries summed, as scipy does)."""
    n = sub_indptr.size - 1
    out = np.zeros((n, n_genes), dtype=np.float32)
    flat = np.repeat(np.arange(n, dtype=np.int64) * n_genes, np.diff(sub_indptr)) + sub_indices
    np.add.at(out.reshape(-1), flat, sub_data)
    return out


def _densify_sparsetools(sub_indptr, sub_indices, sub_data, n_genes: int) -> np.ndarray:
    """The same with scipy's compiled csr_todense (which sums duplicates, as scipy does)."""
    from scipy.sparse import _sparsetools

    n = sub_indptr.size - 1
    out = np.zeros((n, n_genes), dtype=np.float32)
    _sparsetools.csr_todense(n, n_genes, sub_indptr, sub_indices, sub_data, out)
    return out


def _gather_rows_numpy(indptr, indices, data, n_genes: int, rows: np.ndarray) -> np.ndarray:
    """(B, G) float32 rows of X with numpy only."""
    return _densify_numpy(*_row_subset_numpy(indptr, indices, data, rows), n_genes)


def _gather_rows_sparsetools(indptr, indices, data, n_genes: int, rows: np.ndarray) -> np.ndarray:
    """(B, G) float32 rows of X with scipy's compiled kernels: about 2-3x faster than numpy
    and than X[rows].toarray()."""
    return _densify_sparsetools(*_row_subset_sparsetools(indptr, indices, data, rows), n_genes)


def _pick_kernels():
    """scipy's private kernels when they behave as expected on a probe, else numpy."""
    probe = sp.random(7, 5, density=0.5, format="csr", dtype=np.float32, random_state=0)
    rows = np.array([3, 0, 3, 6], dtype=np.int64)
    try:
        if np.array_equal(_gather_rows_sparsetools(probe.indptr, probe.indices, probe.data, 5, rows), probe[rows].toarray()):
            return _row_subset_sparsetools, _densify_sparsetools, _gather_rows_sparsetools
    except Exception:  # a scipy without these kernels or with other signatures: use numpy
        pass
    return _row_subset_numpy, _densify_numpy, _gather_rows_numpy


_row_subset, _densify, _gather_rows = _pick_kernels()


def iterate_in_order(
    data: CountData, batch_size: int, indices: np.ndarray | None = None, layout: str = "dense"
) -> CSRMinibatches:
    """All cells (or `indices`) in their order, for inference: no shuffle, nothing dropped."""
    if indices is None:
        indices = np.arange(data.n_cells, dtype=np.int64)
    return CSRMinibatches(data, indices, batch_size, shuffle=False, layout=layout)
