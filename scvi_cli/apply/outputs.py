"""Write result matrices in the format the output's extension names, atomically.

Tables (latent, normalized expression, loadings) are rows x named columns, indexed by obs names
(or gene names). Large results are written block by block (`open_chunked_writer`), so 1M cells x
2k genes never needs the dense matrix in memory. Results that belong with the input AnnData go
into a copy of it (`write_h5ad_with_layer`, `..._with_obsm`, `..._with_sample_layers`).

Every writer checks the path first, writes to a hidden temporary file beside the target and renames
it only when complete: an error or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_cli.atomic import AtomicFile, as_output_error, atomic_write, check_writable, refuse_input_as_output
from scvi_cli.errors import OutputError, UsageError

SUPPORTED = (".h5ad", ".npy", ".csv", ".tsv", ".parquet")
_GZIP_TEXT = (".csv.gz", ".tsv.gz")
_PARQUET_HINT = "pip install 'scvi-cli[parquet]'"
# Rows per block when a whole matrix is written through a chunked writer: about 32 MiB each.
_BLOCK_BYTES = 32 * 2**20
# Parquet row groups are buffered to at least this size: one tiny row group per 128-cell
# minibatch would make the file slow to read and large.
_ROW_GROUP_BYTES = 64 * 2**20


def output_format(path: str | os.PathLike) -> str:
    """The output format of `path` from its extension: one of SUPPORTED, '.csv.gz' or '.tsv.gz'."""
    name = Path(path).name.lower()
    for fmt in _GZIP_TEXT + SUPPORTED:
        if name.endswith(fmt) and len(name) > len(fmt):
            return fmt
    supported = ", ".join(SUPPORTED + _GZIP_TEXT)
    raise UsageError(f"{path}: unsupported output extension; use one of {supported}")


def _require_pyarrow(path: str | os.PathLike) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise OutputError(f"{path}: writing .parquet needs pyarrow: {_PARQUET_HINT}") from exc
    return pyarrow


def check_output(path: str | os.PathLike, *inputs: str | os.PathLike) -> str:
    """Validate an output path before long work starts; returns its format (see output_format).

    ``inputs`` are the command's input files: writing over one of them is refused.
    """
    fmt = output_format(path)
    check_writable(path)
    refuse_input_as_output(path, *inputs)
    if fmt == ".parquet":
        _require_pyarrow(path)
    return fmt


def _check_key(path: str | os.PathLike, what: str, key: str) -> None:
    if not isinstance(key, str) or not key or "/" in key:
        raise UsageError(f"{path}: invalid {what} name {key!r} (must be a non-empty string without '/')")


def _dense_block(block: Any, dtype: np.dtype) -> np.ndarray:
    """A 2-D C-ordered numpy array of `dtype` from an array, sparse matrix or CPU tensor."""
    if sp.issparse(block):
        block = block.toarray()
    return np.ascontiguousarray(np.asarray(block), dtype=dtype)


class ChunkedWriter:
    """Writes a table of len(index) rows x len(columns) from consecutive row blocks.

    Call write(block) with consecutive blocks, then close() to commit the file atomically; abort()
    (or leaving a `with` block by an exception) removes the temporary and leaves the target as it
    was. Any exception inside write() aborts as well.
    """

    def __init__(self, path: str | os.PathLike, index: Sequence[str], columns: Sequence[str], dtype: Any):
        self.path = Path(path)
        self.index = [str(name) for name in index]
        self.columns = [str(name) for name in columns]
        self.dtype = np.dtype(dtype)
        self.n_rows = len(self.index)
        self.n_cols = len(self.columns)
        self.rows_written = 0
        self.closed = False
        self._file: AtomicFile | None = None

    # Format-specific parts: open the temporary, write a block at a row offset, finish, release.
    def _open(self, tmp: Path) -> None:
        raise NotImplementedError

    def _write(self, block: np.ndarray, start: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Close open handles after a failure; must not raise."""

    def _start(self) -> ChunkedWriter:
        self._file = AtomicFile(self.path)
        try:
            self._open(self._file.tmp_path)
        except BaseException as exc:
            self._release()
            self._file.discard()
            self.closed = True
            if isinstance(exc, OSError):
                raise as_output_error(self.path, exc) from exc
            raise
        return self

    def write(self, block: Any) -> None:
        """Append the next rows; `block` is (rows, n_cols): array, sparse matrix or CPU tensor."""
        if self.closed:
            raise ValueError(f"{self.path}: writer is already closed")
        try:
            block = _dense_block(block, self.dtype)
            if block.ndim != 2 or block.shape[1] != self.n_cols:
                raise ValueError(f"{self.path}: block of shape {block.shape}, expected (rows, {self.n_cols})")
            if self.rows_written + block.shape[0] > self.n_rows:
                raise ValueError(
                    f"{self.path}: block of {block.shape[0]} rows overruns the {self.n_rows} rows "
                    f"({self.rows_written} already written)"
                )
            if block.shape[0]:
                self._write(block, self.rows_written)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise as_output_error(self.path, exc) from exc
            raise
        self.rows_written += block.shape[0]

    def close(self) -> None:
        """Finish the file and rename it onto the target; all rows must have been written."""
        if self.closed:
            return
        if self.rows_written != self.n_rows:
            self.abort()
            raise ValueError(f"{self.path}: only {self.rows_written} of {self.n_rows} rows were written")
        try:
            self._finish()
            self._file.commit()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise as_output_error(self.path, exc) from exc
            raise
        self.closed = True

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        if self.closed:
            return
        self.closed = True
        try:
            self._release()
        finally:
            self._file.discard()

    def __enter__(self) -> ChunkedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _FileWriter(ChunkedWriter):
    """A writer that streams into one open file handle ``_fh``."""

    _fh = None

    def _finish(self) -> None:
        self._fh.close()
        self._fh = None

    def _release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(Exception):
                self._fh.close()
            self._fh = None


class _NpyWriter(_FileWriter):
    """A .npy file: the header, then each block's bytes appended (rows are consecutive in C
    order). Plain writes rather than a memory map, whose dirty pages would count as the job's
    resident memory (8 GB for 1M cells x 2k genes) with schedulers that police RSS."""

    def _open(self, tmp: Path) -> None:
        self._fh = open(tmp, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n_rows, self.n_cols),
        }
        np.lib.format.write_array_header_1_0(self._fh, header)

    def _write(self, block: np.ndarray, start: int) -> None:
        self._fh.write(memoryview(block).cast("B"))


class _TextWriter(_FileWriter):
    """CSV / TSV (optionally gzip-compressed): a header row, then rows led by their index."""

    def __init__(self, path, index, columns, dtype, *, sep: str, compressed: bool, index_name: str):
        super().__init__(path, index, columns, dtype)
        self.sep = sep
        self.compressed = compressed
        self.index_name = index_name
        self._fh: TextIO | None = None

    def _open(self, tmp: Path) -> None:
        if self.compressed:
            # Level 6: most of level 9's size at a fraction of its time.
            self._fh = gzip.open(tmp, "wt", compresslevel=6, newline="", encoding="utf-8")
        else:
            self._fh = open(tmp, "w", newline="", encoding="utf-8")
        csv.writer(self._fh, delimiter=self.sep, lineterminator="\n").writerow([self.index_name, *self.columns])

    def _write(self, block: np.ndarray, start: int) -> None:
        # pandas prints float32 in its shortest round-trip form ('0.1', not '0.10000000149').
        frame = pd.DataFrame(block, index=self.index[start : start + block.shape[0]])
        frame.to_csv(self._fh, sep=self.sep, header=False, lineterminator="\n")



class _ParquetWriter(ChunkedWriter):
    """Parquet: the index as a string column `index_name` (marked as the pandas index, so
    pandas.read_parquet restores it), then one column per name; blocks are buffered into row
    groups of at least _ROW_GROUP_BYTES."""

    def __init__(self, path, index, columns, dtype, *, index_name: str):
        super().__init__(path, index, columns, dtype)
        self.index_name = index_name
        self._writer = None
        self._pending: list[tuple[int, np.ndarray]] = []
        self._pending_bytes = 0

    def _open(self, tmp: Path) -> None:
        pa = _require_pyarrow(self.path)
        import pyarrow.parquet as pq

        seen: set[str] = {self.index_name}
        for name in self.columns:
            if name in seen:
                clash = "the index column" if name == self.index_name else "another column"
                raise OutputError(f"{self.path}: column name {name!r} repeats {clash}; parquet needs unique names")
            seen.add(name)
        template = pd.DataFrame(
            np.zeros((1, self.n_cols), dtype=self.dtype),
            index=pd.Index([""], name=self.index_name, dtype=object),
            columns=self.columns,
        )
        self._pa = pa
        schema = pa.Schema.from_pandas(template, preserve_index=True)
        # pandas puts index columns last; readers other than pandas expect the names first.
        position = schema.get_field_index(self.index_name)
        fields = [schema.field(position)] + [f for i, f in enumerate(schema) if i != position]
        self._schema = pa.schema(fields, metadata=schema.metadata)
        self._writer = pq.ParquetWriter(tmp, self._schema)

    def _flush(self) -> None:
        if not self._pending:
            return
        start = self._pending[0][0]
        values = np.concatenate([block for _, block in self._pending], axis=0)
        stop = start + values.shape[0]
        pa = self._pa
        # Columns of the transposed copy are contiguous, so each becomes an Arrow array cheaply.
        columns_major = np.ascontiguousarray(values.T)
        arrays = [pa.array(self.index[start:stop], type=pa.string())]
        arrays += [pa.array(columns_major[j]) for j in range(self.n_cols)]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._writer.write_table(table)
        self._pending = []
        self._pending_bytes = 0

    def _write(self, block: np.ndarray, start: int) -> None:
        self._pending.append((start, block))
        self._pending_bytes += block.nbytes
        if self._pending_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def _finish(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None

    def _release(self) -> None:
        self._pending = []
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None


@contextlib.contextmanager
def _withheld(mapping: MutableMapping, keys: Iterable[str]) -> Iterator[None]:
    """Take `keys` out of an AnnData mapping while it is written, then put them back, so an old
    entry of the same name is neither copied into the file (wasting space) nor lost for the caller."""
    saved = {key: mapping.pop(key) for key in list(keys) if key in mapping}
    try:
        yield
    finally:
        for key, value in saved.items():
            mapping[key] = value


def _write_anndata(adata: Any, tmp: Path, withheld: MutableMapping | None = None, keys: Iterable[str] = ()) -> None:
    if withheld is None:
        adata.write_h5ad(tmp)
        return
    with _withheld(withheld, keys):
        adata.write_h5ad(tmp)


class _H5adDenseWriter(ChunkedWriter):
    """A dense matrix filled block by block into an h5ad written by anndata: `X` of a new
    AnnData, or `layers/<name>` of a copy of the input. The dataset carries anndata's encoding
    attributes, so anndata.read_h5ad reads it like one of its own."""

    def __init__(self, path, index, columns, dtype, *, adata: Any, key: str, withheld=None, withheld_keys=()):
        super().__init__(path, index, columns, dtype)
        self.adata = adata
        self.key = key
        self.withheld = withheld
        self.withheld_keys = tuple(withheld_keys)
        self._h5 = None

    def _open(self, tmp: Path) -> None:
        import h5py

        _write_anndata(self.adata, tmp, self.withheld, self.withheld_keys)
        self._h5 = h5py.File(tmp, "r+")
        group_name, _, name = self.key.rpartition("/")
        group = self._h5
        if group_name:
            group = self._h5.require_group(group_name)
            if "encoding-type" not in group.attrs:
                group.attrs["encoding-type"] = "dict"
                group.attrs["encoding-version"] = "0.1.0"
        self._dataset = group.create_dataset(name, shape=(self.n_rows, self.n_cols), dtype=self.dtype)
        self._dataset.attrs["encoding-type"] = "array"
        self._dataset.attrs["encoding-version"] = "0.2.0"

    def _write(self, block: np.ndarray, start: int) -> None:
        self._dataset[start : start + block.shape[0]] = block

    def _finish(self) -> None:
        self._h5.close()
        self._h5 = None

    def _release(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None


def _table_anndata(index: Sequence[str], columns: Sequence[str], X: Any = None) -> Any:
    import anndata

    obs = pd.DataFrame(index=pd.Index([str(i) for i in index], dtype=object))
    var = pd.DataFrame(index=pd.Index([str(c) for c in columns], dtype=object))
    return anndata.AnnData(X=X, obs=obs, var=var)


def open_chunked_writer(
    path: str | os.PathLike,
    index: Sequence[str],
    columns: Sequence[str],
    dtype: Any = np.float32,
    index_name: str = "obs_names",
) -> ChunkedWriter:
    """Open a writer for a len(index) x len(columns) table in the format of `path`.

    .npy holds the values only; .csv/.tsv(.gz) a header and the index as first column;
    .parquet the index as a column named `index_name`; .h5ad a new AnnData with the values as X,
    `index` as obs names and `columns` as var names.
    """
    fmt = output_format(path)
    check_writable(path)
    if fmt == ".npy":
        writer: ChunkedWriter = _NpyWriter(path, index, columns, dtype)
    elif fmt in (".csv", ".tsv", ".csv.gz", ".tsv.gz"):
        sep = "\t" if fmt.startswith(".tsv") else ","
        writer = _TextWriter(path, index, columns, dtype, sep=sep, compressed=fmt.endswith(".gz"), index_name=index_name)
    elif fmt == ".parquet":
        _require_pyarrow(path)
        writer = _ParquetWriter(path, index, columns, dtype, index_name=index_name)
    else:  # .h5ad
        writer = _H5adDenseWriter(path, index, columns, dtype, adata=_table_anndata(index, columns), key="X")
    return writer._start()


def _row_blocks(values: Any, dtype: np.dtype) -> Iterator[Any]:
    """Row slices of about _BLOCK_BYTES each, densified one at a time."""
    n, g = values.shape
    step = max(1, _BLOCK_BYTES // max(1, g * np.dtype(dtype).itemsize))
    for start in range(0, n, step):
        yield values[start : start + step]


def _value_dtype(values: Any) -> np.dtype:
    dtype = np.dtype(values.dtype) if hasattr(values, "dtype") else np.dtype(np.float64)
    return dtype if dtype.kind in "biuf" else np.dtype(np.float64)


def write_table(
    path: str | os.PathLike,
    values: Any,
    index: Sequence[str],
    columns: Sequence[str],
    index_name: str = "obs_names",
) -> None:
    """Write a whole matrix (numpy array or scipy sparse) as a table in the format of `path`.

    Rows are `index` (obs names), columns `columns`; the values keep their numeric dtype. A sparse
    matrix stays sparse in .h5ad and is densified a block at a time for the other formats.
    """
    fmt = output_format(path)
    check_writable(path)
    if sp.issparse(values):
        values = sp.csr_matrix(values)
    elif not isinstance(values, np.ndarray):
        values = np.asarray(values)
    if values.ndim != 2 or values.shape != (len(index), len(columns)):
        raise ValueError(f"{path}: values of shape {values.shape} do not match {len(index)} rows x {len(columns)} columns")
    dtype = _value_dtype(values)
    if fmt == ".h5ad" and sp.issparse(values):
        adata = _table_anndata(index, columns, X=values.astype(dtype))
        with atomic_write(path) as tmp:
            adata.write_h5ad(tmp)
        return
    with open_chunked_writer(path, index, columns, dtype=dtype, index_name=index_name) as writer:
        for block in _row_blocks(values, dtype):
            writer.write(block)


def _require_h5ad(path: str | os.PathLike) -> None:
    if output_format(path) != ".h5ad":
        raise OutputError(f"{path}: this output is written into a copy of the input AnnData; use a .h5ad path")


def open_h5ad_layer_writer(path: str | os.PathLike, adata: Any, layer_name: str, dtype: Any = np.float32) -> ChunkedWriter:
    """Write `adata` (X, obs, var, obsm, ... as they are) to `path` with a new dense layer
    `layer_name` of shape adata.shape, filled by write(block) with consecutive row blocks.

    The AnnData is written when the writer opens (so its problems show before the blocks are
    computed); `adata` itself is left unchanged. A same-named layer of `adata` is replaced.
    """
    _require_h5ad(path)
    check_writable(path)
    _check_key(path, "layer", layer_name)
    writer = _H5adDenseWriter(
        path,
        adata.obs_names,
        adata.var_names,
        dtype,
        adata=adata,
        key=f"layers/{layer_name}",
        withheld=adata.layers,
        withheld_keys=(layer_name,),
    )
    return writer._start()


def write_h5ad_with_layer(
    path: str | os.PathLike, adata: Any, layer_name: str, blocks: Any, dtype: Any = np.float32
) -> None:
    """Write `adata` to `path` with the dense layer `layer_name` made of `blocks`.

    `blocks` is an iterable of consecutive row blocks (e.g. a generator over minibatches, so the
    dense matrix never sits in memory) or a whole array / sparse matrix of shape adata.shape.
    """
    if sp.issparse(blocks) or isinstance(blocks, np.ndarray):
        matrix = sp.csr_matrix(blocks) if sp.issparse(blocks) else blocks
        if matrix.shape != tuple(adata.shape):
            raise ValueError(f"{path}: layer of shape {matrix.shape} does not match the AnnData's {tuple(adata.shape)}")
        blocks = _row_blocks(matrix, np.dtype(dtype))
    with open_h5ad_layer_writer(path, adata, layer_name, dtype=dtype) as writer:
        for block in blocks:
            writer.write(block)


def _write_elements(path: str | os.PathLike, adata: Any, group: str, elements: dict[str, Any], withheld: MutableMapping) -> None:
    """Write `adata` with `elements` added under `group` ('obsm', 'layers') via anndata's own encoder."""
    import h5py
    from anndata.io import write_elem

    with atomic_write(path) as tmp:
        _write_anndata(adata, tmp, withheld, elements.keys())
        with h5py.File(tmp, "r+") as f:
            for key, value in elements.items():
                write_elem(f[group], key, value)


def write_h5ad_with_obsm(path: str | os.PathLike, adata: Any, key: str, values: Any, minimal: bool = False) -> None:
    """Write `adata` to `path` with `values` (n_obs x k) as obsm[key].

    minimal=True writes only what a downstream tool needs to use the embedding: obs names, obs
    columns, var names, the plain entries of uns (strings and numbers: the ids that evaluation
    harnesses pass from input to output) and the obsm entry (X an empty sparse matrix of the
    right shape), so a latent space of 1M cells does not drag a copy of the counts along.
    """
    _require_h5ad(path)
    check_writable(path)
    _check_key(path, "obsm", key)
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != adata.n_obs:
        raise ValueError(f"{path}: obsm values of shape {values.shape} do not match {adata.n_obs} cells")
    if minimal:
        import anndata

        small = anndata.AnnData(
            X=sp.csr_matrix(tuple(adata.shape), dtype=np.float32),
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=adata.var_names.copy()),
        )
        small.obsm[key] = values
        small.uns.update({k: v for k, v in adata.uns.items() if _plain_scalar(v)})
        with atomic_write(path) as tmp:
            small.write_h5ad(tmp)
        return
    _write_elements(path, adata, "obsm", {key: values}, adata.obsm)


def _plain_scalar(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "biufU"
    return isinstance(value, (str, bool, int, float, np.generic)) and not isinstance(value, np.void)


def write_h5ad_with_sample_layers(path: str | os.PathLike, adata: Any, layers: dict[str, Any]) -> None:
    """Write `adata` to `path` with each matrix of `layers` (sparse CSR, shape adata.shape) as a
    layer, e.g. posterior predictive samples; same-named layers of `adata` are replaced."""
    _require_h5ad(path)
    check_writable(path)
    elements = {}
    for name, matrix in layers.items():
        _check_key(path, "layer", name)
        if tuple(matrix.shape) != tuple(adata.shape):
            raise ValueError(f"{path}: layer {name!r} of shape {matrix.shape} does not match the AnnData's {tuple(adata.shape)}")
        elements[name] = sp.csr_matrix(matrix) if sp.issparse(matrix) else np.asarray(matrix)
    _write_elements(path, adata, "layers", elements, adata.layers)


def write_frame(path: str | os.PathLike, frame: pd.DataFrame, index_name: str = "obs_names") -> None:
    """Write a table of mixed columns (text and numbers: predictions, DE results) atomically.

    .csv/.tsv(.gz) with the index as first column named ``index_name``; .parquet the same (needs
    pyarrow); .h5ad an AnnData without values whose obs is the table (rows = its index). .npy
    holds one number type only and is refused.
    """
    fmt = output_format(path)
    check_writable(path)
    if fmt == ".npy":
        raise UsageError(f"{path}: this table mixes text and numbers; write .csv, .tsv, .parquet or .h5ad")
    table = frame.copy()
    table.index = pd.Index([str(i) for i in table.index], name=index_name)
    if fmt == ".parquet":
        _require_pyarrow(path)
        with atomic_write(path) as tmp:
            table.reset_index().to_parquet(tmp, index=False)
    elif fmt == ".h5ad":
        import anndata

        obs = table.copy()
        obs.index.name = None
        if index_name in obs.columns:
            raise UsageError(f"{path}: column {index_name!r} clashes with the index name")
        if not obs.index.is_unique:  # e.g. genes once per comparison: obs names must be unique
            obs = obs.reset_index(names=index_name)
            obs.index = obs.index.astype(str)
        adata = anndata.AnnData(obs=obs)
        with atomic_write(path) as tmp:
            adata.write_h5ad(tmp)
    else:
        sep = "\t" if fmt.startswith(".tsv") else ","
        with atomic_write(path) as tmp:
            table.to_csv(tmp, sep=sep, compression="gzip" if fmt.endswith(".gz") else None, lineterminator="\n")
