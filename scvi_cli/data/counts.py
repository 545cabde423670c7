"""CountData: everything training and inference need from a data set, free of AnnData; its
library priors and the train / validation split."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from scvi_cli.data.categories import _categorical_codes, _continuous, _key_codes, _obs_column
from scvi_cli.data.reading import _MAX_LISTED, _validated_counts, read_h5ad, row_sums
from scvi_cli.errors import DataError, SpecError


@dataclass
class CountData:
    """Everything training and inference need from a data set, free of AnnData.

    `kept_cells` is a boolean mask over the cells of the input file: cells with zero total counts
    are dropped, and outputs written back next to the input must be aligned with this mask.
    """

    X: Any  # (n, G) float32 counts: a scipy CSR matrix, or BackedRows (on disk, see data/backed.py)
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
    def backed(self) -> bool:
        """Whether the counts stay on disk (X is a BackedRows, read by row ranges)."""
        return not sp.issparse(self.X)

    def cell_totals(self) -> np.ndarray:
        """(n,) float64 total count of every cell."""
        return self.X.totals if self.backed else row_sums(self.X)

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


# What each of CountsDigest's three streams hashes, from a block of CSR rows.
_STREAM_BYTES = (
    lambda indptr, indices, data: np.diff(indptr).astype(np.int64, copy=False),  # row lengths
    lambda indptr, indices, data: np.ascontiguousarray(indices.astype(np.int64, copy=False)),  # columns
    lambda indptr, indices, data: np.ascontiguousarray(data.astype(np.float32, copy=False)),  # values
)
# Below this many entries a second hashing thread costs more than it saves.
_THREADED_DIGEST_MIN_NNZ = 1 << 20


class CountsDigest:
    """sha256 of CSR counts fed in row chunks, whatever the chunking: the same counts give the
    same digest read whole in memory or chunk by chunk from disk, so a run's fingerprint does not
    depend on how it read its data. Row lengths, column indices (int64) and values (float32) are
    hashed in three streams and combined."""

    def __init__(self):
        self._streams = [hashlib.sha256() for _ in range(3)]
        self._rows = 0

    def update(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Add rows given as CSR arrays (``indptr`` may start past 0; indices/data are the rows' own)."""
        for stream, encode in zip(self._streams, _STREAM_BYTES):
            stream.update(encode(indptr, indices, data))
        self._rows += len(indptr) - 1

    def update_matrix(self, X: sp.csr_matrix, chunk_rows: int = 8192, threads: int = 1) -> None:
        """Add the rows of an in-memory CSR matrix, chunk by chunk through views of its buffers.

        With ``threads`` >= 2 the column stream (the int64 conversion and the larger hash) runs
        on a second thread beside the others; sha256 and numpy's casts release the GIL, and the
        digest is the same."""

        def feed(streams) -> None:
            for start in range(0, X.shape[0], chunk_rows):
                stop = min(start + chunk_rows, X.shape[0])
                first, last = int(X.indptr[start]), int(X.indptr[stop])
                rows = X.indptr[start : stop + 1], X.indices[first:last], X.data[first:last]
                for k in streams:
                    self._streams[k].update(_STREAM_BYTES[k](*rows))

        if threads >= 2 and X.nnz >= _THREADED_DIGEST_MIN_NNZ:
            with ThreadPoolExecutor(max_workers=1) as pool:
                columns = pool.submit(feed, (1,))
                feed((0, 2))
                columns.result()
        else:
            feed((0, 1, 2))
        self._rows += X.shape[0]

    def hexdigest(self) -> str:
        combined = hashlib.sha256(str(self._rows).encode())
        for stream in self._streams:
            combined.update(stream.digest())
        return combined.hexdigest()


def counts_digest(X: sp.csr_matrix, threads: int = 1) -> str:
    digest = CountsDigest()
    digest.update_matrix(X, threads=threads)
    return digest.hexdigest()


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
    consume: bool = False,
) -> CountData:
    """Validated counts and codes from an AnnData; `source` names it in messages.

    With `categories` (from a trained model) obs values are coded as in training, and unknown
    values are an error. With `gene_names` (the model's genes) columns are matched by name.
    With `consume` the AnnData's matrix may be reused in place (the caller drops the AnnData):
    dropping zero-count cells then compacts its arrays instead of copying them.
    """
    path = source
    layer, batch_key, labels_key, cat_keys, cont_keys = _spec_keys(data_spec)
    obs = adata.obs
    _check_obs_keys(obs, batch_key, labels_key, cat_keys, cont_keys, path, categories)

    X, genes, label = _validated_counts(adata, layer, path, gene_names, allow_missing_genes)
    obs_names = [str(o) for o in adata.obs_names]

    totals = row_sums(X)
    kept = totals > 0
    n_dropped = int((~kept).sum())
    if n_dropped == X.shape[0]:
        raise DataError(f"{path}: all {n_dropped} cells have zero total counts in {label}")
    if n_dropped:
        warnings.warn(f"{path}: dropped {n_dropped} cells with zero total counts", UserWarning, stacklevel=2)
        X = _drop_rows_in_place(X, kept) if consume else X[kept]
        obs = obs.iloc[np.flatnonzero(kept)]
        obs_names = [o for o, k in zip(obs_names, kept) if k]

    codes = _obs_codes(obs, batch_key, labels_key, cat_keys, cont_keys, path, categories)
    return CountData(
        X=X, obs_names=obs_names, gene_names=genes, **codes, cat_cov_keys=cat_keys, cont_cov_keys=cont_keys,
        source=source, kept_cells=kept,
    )


def _check_obs_keys(obs, batch_key, labels_key, cat_keys, cont_keys, path: str, categories) -> None:
    """Fail on a misspelled key (or one the model was trained without) before touching the counts."""
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


def _obs_codes(obs, batch_key, labels_key, cat_keys, cont_keys, path: str, categories) -> dict:
    """CountData's code fields for the cells of ``obs``: batch, label and covariate codes, categories."""

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
    return dict(
        batch_codes=batch_codes, label_codes=label_codes, cat_cov_codes=cat_cov_codes, cont_covs=cont_covs,
        categories=cats,
    )


def load_count_data(
    path: str | os.PathLike,
    data_spec: Any,
    *,
    categories: dict[str, list[str]] | None = None,
    gene_names: Sequence[str] | None = None,
    allow_missing_genes: bool = False,
    backed: bool = False,
) -> CountData:
    """read_h5ad + count_data_from_anndata: the one call the CLI makes for its input file. With
    ``backed`` the counts stay on disk, checked in one streaming pass (data/backed.py)."""
    if backed:
        from scvi_cli.data.backed import backed_count_data

        return backed_count_data(
            read_h5ad(path, backed=True), data_spec, str(path),
            categories=categories, gene_names=gene_names, allow_missing_genes=allow_missing_genes,
        )
    adata = read_h5ad(path)
    return count_data_from_anndata(
        adata,
        data_spec,
        str(path),
        categories=categories,
        gene_names=gene_names,
        allow_missing_genes=allow_missing_genes,
        consume=True,  # the AnnData is this function's own
    )


def _drop_rows_in_place(X: sp.csr_matrix, kept: np.ndarray, block_values: int = 1 << 20) -> sp.csr_matrix:
    """X[kept] made by moving the kept rows' entries forward in X's own arrays, a block of rows at
    a time (temporaries of about ``block_values`` entries), instead of a second copy of X. X's
    arrays are overwritten: only for a matrix nothing else will read."""
    indptr, indices, data = X.indptr, X.indices, X.data
    lengths = np.diff(indptr)
    new_indptr = np.zeros(int(kept.sum()) + 1, dtype=indptr.dtype)
    np.cumsum(lengths[kept], out=new_indptr[1:])
    rows_per_block = max(1, int(block_values // max(1, lengths.mean())))
    write = 0
    for start in range(0, X.shape[0], rows_per_block):
        stop = min(start + rows_per_block, X.shape[0])
        lo, hi = int(indptr[start]), int(indptr[stop])
        keep = np.repeat(kept[start:stop], lengths[start:stop])
        moved_indices, moved_data = indices[lo:hi][keep], data[lo:hi][keep]  # bounded temporaries
        indices[write : write + moved_data.size] = moved_indices
        data[write : write + moved_data.size] = moved_data
        write += moved_data.size
    return sp.csr_matrix((data[:write], indices[:write], new_indptr), shape=(int(kept.sum()), X.shape[1]))


# --------------------------------------------------------------------------------------------
# Facts the models need


def library_log_priors(X: sp.spmatrix, batch_codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch: mean and population variance (ddof 0) of log total counts; each (1, n_batch)
    float32. These are the Normal prior of a latent library size."""
    X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
    return library_log_priors_from_totals(row_sums(X), batch_codes, n_batch)


def library_log_priors_from_totals(totals: np.ndarray, batch_codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """library_log_priors from each cell's total count (e.g. CountData.cell_totals())."""
    codes = np.asarray(batch_codes, dtype=np.int64).reshape(-1)
    totals = np.asarray(totals, dtype=np.float64).reshape(-1)
    if codes.shape[0] != totals.shape[0]:
        raise ValueError(f"batch_codes has {codes.shape[0]} entries for {totals.shape[0]} cells")
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
