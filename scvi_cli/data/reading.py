"""Reading an .h5ad file and its count matrix: validated float32 CSR counts, checked up front.

Everything that can be wrong with the input is found here and reported as one DataError line
naming the file, the key and the offending value. Counts stay sparse: nothing is densified.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scvi_cli.errors import DataError, first_line

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
            return anndata.read_h5ad(p, backed="r") if backed else _read_in_memory(p)
    except MemoryError:
        raise
    except Exception as e:  # h5py/anndata raise many types for damaged files; report them all alike
        raise DataError(f"{name}: cannot read as .h5ad, the file looks corrupt ({first_line(e)})") from e


def _read_in_memory(path: Path):
    """anndata.read_h5ad, with the sparse matrices (the counts) read by data/inflate.py on the
    command's threads (torch's count, which --threads sets; on one thread inflate.py leaves every
    array to h5py). Files older than anndata 0.8's layout (no root encoding, or legacy raw.X /
    structured obs) go to anndata.read_h5ad whole."""
    import anndata
    import h5py
    import torch
    from anndata.experimental import read_dispatched

    from scvi_cli.data.inflate import read_sparse_group

    threads = torch.get_num_threads()
    with h5py.File(path, "r") as f:
        modern = f.attrs.get("encoding-type") == "anndata" and isinstance(f["obs"], h5py.Group) and "raw.X" not in f
        if not modern:
            return anndata.read_h5ad(path)

        def callback(read_func, elem_name: str, elem, iospec):
            if iospec.encoding_type in ("csr_matrix", "csc_matrix") and isinstance(elem, h5py.Group):
                return read_sparse_group(elem, iospec.encoding_type, threads)
            return read_func(elem)

        return read_dispatched(f, callback=callback)


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


def counts_hint(adata) -> str:
    """Where the file keeps counts when X does not (X log-normalised is the commonest mistake):
    '; the file's layers['counts'] holds counts: select it with ...', or '' when nothing does.
    A layer named like counts (or raw.X) qualifies when its first rows hold integers."""
    options = [(f"layers[{k!r}]", k, adata.layers[k]) for k in adata.layers.keys()
               if "count" in k.lower() or k.lower() == "raw"]
    if adata.raw is not None:
        options.append(("raw.X", "raw", adata.raw.X))
    for label, layer, matrix in options:
        try:
            block = matrix[: min(500, matrix.shape[0])]
            values = np.asarray(block.data if sp.issparse(block) else block).ravel()
        except Exception:  # an unreadable layer gives no hint, not a second error
            continue
        if values.size and np.isfinite(values).all() and (values >= 0).all() and (np.rint(values) == values).all() and values.any():
            return f"; the file's {label} holds counts: select it with --set data.layer={layer} (data.layer: {layer} in the spec)"
    return ""


def _validate_values(
    X: sp.csr_matrix, obs_names: Sequence[str], genes: Sequence[str], path: str, label: str, adata=None
) -> None:
    """Counts must be finite, non-negative integers; checked on the stored values only. For X,
    ``adata`` lets the error point at a layer that holds the counts."""
    data = X.data[: X.indptr[-1]]
    kind = data.dtype
    if kind == np.bool_ or np.issubdtype(kind, np.unsignedinteger):
        return
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise DataError(f"{path}: {label} holds {kind} values, not counts")
    for start in range(0, data.size, _CHUNK):
        c = data[start : start + _CHUNK]
        # the common case, a clean chunk, in reductions (NaN fails min >= 0); the mask only to point at the culprit
        if np.issubdtype(kind, np.integer):
            if c.min() >= 0:
                continue
            bad = c < 0
        else:
            if c.min() >= 0 and c.max() < np.inf and (np.rint(c) == c).all():
                continue
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
            hint = counts_hint(adata) if adata is not None and label == "X" else ""
            raise DataError(f"{path}: {label} holds {what} ({where}); scVI models need raw counts{hint}")


def _canonical_float32(X: sp.csr_matrix) -> sp.csr_matrix:
    """float32 CSR without duplicate entries (the minibatch gather assigns, it does not add)."""
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.dtype != np.float32:  # a new data array only: indices and indptr are shared, not copied
        X = sp.csr_matrix((X.data.astype(np.float32), X.indices, X.indptr), shape=X.shape)
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
    _validate_values(X, [str(o) for o in adata.obs_names], genes, path, label, adata)
    return _canonical_float32(X), genes, label


def _select_genes(
    X: sp.csr_matrix, genes: list[str], wanted: Sequence[str], allow_missing: bool, path: str, label: str
) -> sp.csr_matrix:
    """Columns of X reordered to `wanted` by name, on the CSR arrays; extra genes are dropped.

    Missing genes are an error, or zero columns with a warning when allow_missing is set.
    """
    return gene_selector(genes, wanted, allow_missing, path, label)(X)


def gene_selector(genes: list[str], wanted: Sequence[str], allow_missing: bool, path: str, label: str):
    """A function CSR (cells x `genes`) -> CSR (cells x `wanted`), columns matched by name; the
    checks (and the warning about missing genes) happen here, once, so that a matrix read in
    chunks is mapped chunk by chunk alike."""
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
            stacklevel=4,
        )
    column_of = {g: j for j, g in enumerate(genes)}
    dest = np.array([i for i, g in enumerate(wanted) if g in column_of], dtype=np.int64)
    src = np.array([column_of[wanted[i]] for i in dest], dtype=np.int64)
    if len(wanted) == len(genes) and np.array_equal(src, np.arange(len(genes))):
        return lambda X: X  # already the model's genes, in its order

    def select(X: sp.csr_matrix) -> sp.csr_matrix:
        out = X[:, src]  # scipy's compiled column gather: present genes, in the model's order
        if missing:
            # Spread the present columns to their places among the model's genes; dest is
            # increasing, so the remap keeps each row's indices in order.
            out = sp.csr_matrix((out.data, dest[out.indices], out.indptr), shape=(X.shape[0], len(wanted)))
        out.sort_indices()
        return out

    return select
