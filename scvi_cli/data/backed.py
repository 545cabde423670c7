"""Counts that stay on disk: an .h5ad's matrix checked in one streaming pass, then read in
contiguous row ranges, so that memory does not grow with the number of cells' counts.

The pass (``backed_count_data``) reads the matrix once in chunks of CHUNK_ROWS rows: it maps
genes to the model's, validates the values, takes every cell's total (zero-count cells are
dropped, library priors come from these totals) and hashes the counts for the run fingerprint.
What stays in memory is per cell (codes, totals, names), never per count.

``BackedMinibatches`` is the MinibatchSource over such counts. Its epoch order:

* the cells (sorted) are cut into blocks of ``block_cells`` consecutive cells, each read as one
  contiguous range of rows;
* with shuffling, the blocks come in a random order (numpy's default_rng([seed, epoch])), taken
  ``buffer_blocks`` at a time into a window whose cells are shuffled together (cells left over
  when a window does not fill a whole minibatch join the next window). A cell's minibatch
  companions are thus drawn from ``block_cells * buffer_blocks`` cells (16,384 by default), not
  from all cells; every cell is seen exactly once per epoch, and the order is a function of
  (seed, epoch) only;
* without shuffling, cells come in their order: the same minibatches as CSRMinibatches;
* a training shard of a distributed run (``shard``) reads only every world_size-th block of the
  epoch's order, so each rank reads its own part of the file; all ranks take the same number of
  full minibatches (the smallest rank's), leaving out at most about a block's worth of cells.

A background thread reads the next window while the current one is consumed.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scvi_cli.data.counts import CountData, CountsDigest, _check_obs_keys, _obs_codes, _spec_keys
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.data.reading import (
    _canonical_float32,
    _check_not_empty,
    _check_unique_genes,
    _locate_counts,
    _validate_values,
    gene_selector,
    row_sums,
)
from scvi_cli.data.sources import CSRMinibatches, _row_subset, assemble_minibatch, checked_cells, covariate_tensors
from scvi_cli.errors import DataError

CHUNK_ROWS = 8192  # rows per read of the streaming pass and of in-order iteration
SPAN_ROWS = 4 * CHUNK_ROWS  # the most file rows one read of scattered cells spans


class BackedRows:
    """The validated count matrix of an .h5ad file on disk, read by ranges of rows.

    ``shape``: (kept cells, genes); ``file_rows``: the file row of each kept cell (increasing);
    ``totals``: each kept cell's total count; ``digest``: sha256 of the counts as read;
    ``row_nnz``: each kept cell's stored values (``nnz`` their sum).
    """

    def __init__(self, matrix, select, n_genes: int, file_rows: np.ndarray, totals: np.ndarray, digest: str, row_nnz: np.ndarray):
        self._matrix = matrix
        self._select = select
        self.n_genes = n_genes
        self.file_rows = file_rows
        self.totals = totals
        self.digest = digest
        self.row_nnz = row_nnz
        self.nnz = int(row_nnz.sum())
        self._lock = threading.Lock()  # one reader of the file at a time

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.file_rows.size), self.n_genes)

    def read_file_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """File rows [start, stop) as float32 CSR over the model's genes."""
        with self._lock:
            return _read_rows(self._matrix, self._select, start, stop)

    def read_cells(self, cells: np.ndarray) -> sp.csr_matrix:
        """The rows of ``cells`` (increasing positions among the kept cells): one contiguous read
        when they lie within SPAN_ROWS file rows, else one read per window of SPAN_ROWS rows that
        holds any of them (scattered cells, e.g. a sample of a large group, never pull in the
        rows between them all at once)."""
        rows = self.file_rows[cells]
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if stop - start <= SPAN_ROWS:
            block = self.read_file_rows(start, stop)
            return block if rows.size == stop - start else block[rows - start]
        windows = (rows - start) // SPAN_ROWS
        parts = []
        for window in np.unique(windows):
            picked = rows[windows == window]
            first = int(picked[0])
            parts.append(self.read_file_rows(first, int(picked[-1]) + 1)[picked - first])
        return sp.vstack(parts, format="csr")

    def read_into_memory(self, cells: np.ndarray) -> sp.csr_matrix:
        """The rows of ``cells`` (increasing positions) as one CSR matrix, filled window by window
        into arrays sized up front from ``row_nnz``: the peak is the result plus one window, not
        the pieces plus their stacked copy."""
        cells = np.asarray(cells, dtype=np.int64)
        indptr = np.zeros(cells.size + 1, dtype=np.int64)
        np.cumsum(self.row_nnz[cells], out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int32 if self.n_genes < 2**31 else np.int64)
        data = np.empty(int(indptr[-1]), dtype=np.float32)
        for start in range(0, cells.size, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, cells.size)
            block = self.read_cells(cells[start:stop])
            first, last = int(indptr[start]), int(indptr[stop])
            indices[first:last], data[first:last] = block.indices, block.data
        return sp.csr_matrix((data, indices, indptr), shape=(cells.size, self.n_genes))


def _read_rows(matrix, select, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop) of the on-disk ``matrix`` as float32 CSR, columns mapped by ``select``."""
    chunk = matrix[start:stop]
    chunk = chunk.tocsr() if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
    return _canonical_float32(select(chunk))


def _own_handle(path: str, layer):
    """The count matrix of the file at ``path`` through a read-only handle of our own: the
    AnnData's handle may be closed or moved by h5ad writers while the rows are still read."""
    import h5py
    from anndata.io import sparse_dataset

    key = "X" if layer is None else "raw/X" if layer == "raw" else f"layers/{layer}"
    element = h5py.File(path, "r")[key]
    return sparse_dataset(element) if isinstance(element, h5py.Group) else element


def _backed_matrix(adata, layer, path: str):
    """(the matrix on disk through our own handle, its gene names, its label); CSC is refused."""
    _, genes, label = _locate_counts(adata, layer, path)  # its checks and messages, and the genes
    matrix = _own_handle(path, layer)
    if getattr(matrix, "format", None) == "csc":
        raise DataError(
            f"{path}: {label} is stored by columns (CSC); backed mode reads cells (rows): rewrite it as CSR "
            "(adata.X = adata.X.tocsr()) or read it into memory (without --backed)"
        )
    return matrix, genes, label


def backed_count_data(
    adata,
    data_spec: Any,
    source: str,
    *,
    categories: dict[str, list[str]] | None = None,
    gene_names: Sequence[str] | None = None,
    allow_missing_genes: bool = False,
) -> CountData:
    """CountData over a backed (read-only, on disk) AnnData: the same checks, codes and dropped
    cells as count_data_from_anndata, in one streaming pass over the matrix."""
    path = source
    layer, batch_key, labels_key, cat_keys, cont_keys = _spec_keys(data_spec)
    obs = adata.obs
    _check_obs_keys(obs, batch_key, labels_key, cat_keys, cont_keys, path, categories)
    matrix, genes, label = _backed_matrix(adata, layer, path)
    n_file = int(matrix.shape[0])
    _check_not_empty(matrix, path, label)
    if gene_names is not None:
        select, genes = gene_selector(genes, gene_names, allow_missing_genes, path, label), [str(g) for g in gene_names]
    else:
        _check_unique_genes(genes, path, label)
        select = lambda X: X  # noqa: E731
    obs_names = [str(o) for o in adata.obs_names]
    totals = np.empty(n_file, dtype=np.float64)
    digest, nnz = CountsDigest(), np.zeros(n_file, dtype=np.int64)
    for start in range(0, n_file, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n_file)
        chunk = _read_rows(matrix, select, start, stop)
        _validate_values(chunk, obs_names[start:stop], genes, path, label, adata)
        totals[start:stop] = row_sums(chunk)
        nnz[start:stop] = np.diff(chunk.indptr)
        kept_here = totals[start:stop] > 0  # the digest is of the kept cells, as in memory
        kept_rows = chunk if kept_here.all() else chunk[kept_here]
        digest.update(kept_rows.indptr, kept_rows.indices, kept_rows.data)
    kept = totals > 0
    n_dropped = int((~kept).sum())
    if n_dropped == n_file:
        raise DataError(f"{path}: all {n_dropped} cells have zero total counts in {label}")
    if n_dropped:
        warnings.warn(f"{path}: dropped {n_dropped} cells with zero total counts", UserWarning, stacklevel=2)
        obs = obs.iloc[np.flatnonzero(kept)]
        obs_names = [o for o, k in zip(obs_names, kept) if k]
    rows = BackedRows(
        matrix, select, len(genes), file_rows=np.flatnonzero(kept).astype(np.int64), totals=totals[kept],
        digest=digest.hexdigest(), row_nnz=nnz[kept],
    )
    codes = _obs_codes(obs, batch_key, labels_key, cat_keys, cont_keys, path, categories)
    return CountData(
        X=rows, obs_names=obs_names, gene_names=genes, **codes, cat_cov_keys=cat_keys, cont_cov_keys=cont_keys,
        source=source, kept_cells=kept,
    )


def in_memory_share(data: CountData, cells: np.ndarray) -> CountData:
    """The rows and codes of ``cells`` (increasing positions among the kept cells) of backed
    ``data``, read into memory: what one process of a distributed in-memory run holds. The
    categories stay the whole data set's; outputs are never aligned to a share (no kept_cells)."""
    cells = np.asarray(cells, dtype=np.int64)

    def rows(array):
        return None if array is None else array[cells]

    return CountData(
        X=data.X.read_into_memory(cells), obs_names=[data.obs_names[i] for i in cells], gene_names=data.gene_names,
        batch_codes=data.batch_codes[cells], label_codes=data.label_codes[cells], cat_cov_codes=rows(data.cat_cov_codes),
        cont_covs=rows(data.cont_covs), categories=data.categories, cat_cov_keys=data.cat_cov_keys,
        cont_cov_keys=data.cont_cov_keys, source=data.source,
    )


class BackedMinibatches:
    """Minibatches of ``indices`` (cells of a backed CountData) read from disk; see the module
    docstring for the epoch order. ``layout`` as for CSRMinibatches."""

    def __init__(
        self,
        data: CountData,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        layout: str = "sparse",
        block_cells: int = 1024,
        buffer_blocks: int = 16,
        prefetch: bool = True,
    ):
        if not isinstance(data.X, BackedRows):
            raise TypeError("BackedMinibatches reads a backed CountData (load it with backed=True)")
        if block_cells < 1 or buffer_blocks < 1:
            raise ValueError("block_cells and buffer_blocks must be at least 1")
        self.indices = np.sort(checked_cells(indices, data.n_cells, batch_size, layout))
        self.rows = data.X
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, int(seed), drop_last
        self.layout, self.block_cells, self.buffer_blocks, self.prefetch = layout, int(block_cells), int(buffer_blocks), prefetch
        self.epoch = 0
        self.covariates = covariate_tensors(data)

    rank, world_size, drop_remainder = 0, 1, True
    set_epoch, shard, steps = CSRMinibatches.set_epoch, CSRMinibatches.shard, CSRMinibatches.steps

    @property
    def reads_own_windows(self) -> bool:
        """Sharded for training: each rank reads only its blocks (every world_size-th of the
        epoch's order), and every rank takes the same number of full minibatches from them (the
        smallest rank's count; the rest of the epoch's cells are left out). Evaluation shards
        keep every minibatch of the shared order instead."""
        return self.world_size > 1 and self.drop_remainder

    def __len__(self) -> int:
        if not self.reads_own_windows:
            return CSRMinibatches.__len__(self)
        return min(
            sum(block.size for window in self.windows(rank) for block in window) // self.batch_size
            for rank in range(self.world_size)
        )

    def windows(self, rank: int | None = None) -> list[list[np.ndarray]]:
        """This epoch's windows (lists of blocks of cells, increasing within each block), in
        reading order: all of them, or for a training shard those of ``rank`` (default: this
        source's), made of every world_size-th block of the epoch's block order."""
        blocks = [self.indices[i : i + self.block_cells] for i in range(0, self.indices.size, self.block_cells)]
        order = np.arange(len(blocks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks))
        if self.reads_own_windows:
            order = order[(self.rank if rank is None else rank) :: self.world_size]
        step = self.buffer_blocks
        return [[blocks[b] for b in order[k : k + step]] for k in range(0, len(order), step)]

    def _read_windows(self) -> Iterator[tuple[list[np.ndarray], sp.csr_matrix]]:
        for window in self.windows():
            yield window, sp.vstack([self.rows.read_cells(block) for block in window], format="csr")

    def __iter__(self) -> Iterator[Minibatch]:
        if self.reads_own_windows:  # its own windows; the first len(self) minibatches are full ones
            picks = self._epoch_picks([self.seed, self.epoch, 1, self.rank])
            taken = itertools.islice(picks, len(self))
        else:
            picks = self._epoch_picks([self.seed, self.epoch, 1])
            wanted = set(self.steps())
            taken = (pick for number, pick in enumerate(picks) if number in wanted)
        with contextlib.closing(picks):  # stops the prefetch thread when this epoch ends early
            for counts, cells, picked in taken:
                yield self._minibatch(counts, cells, picked)

    def _epoch_picks(self, seed) -> Iterator[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
        """(counts of a window, its cells, the positions of one minibatch's cells) for every
        minibatch of the windows read, in order: full ones, then the last partial one unless
        drop_last. Cells shuffle within a window (with the carry-over of the previous one)."""
        rng = np.random.default_rng(seed)
        carry_cells, carry = np.zeros(0, dtype=np.int64), None
        source = _prefetched(self._read_windows()) if self.prefetch else self._read_windows()
        with contextlib.closing(source):
            for window, counts in source:
                cells = np.concatenate([carry_cells, *window])
                counts = counts if carry is None else sp.vstack([carry, counts], format="csr")
                order = rng.permutation(cells.size) if self.shuffle else np.arange(cells.size)
                full = cells.size // self.batch_size * self.batch_size
                for b in range(0, full, self.batch_size):
                    yield counts, cells, order[b : b + self.batch_size]
                rest = order[full:]
                carry_cells, carry = cells[rest], counts[rest] if rest.size else None
        if carry_cells.size and not self.drop_last:
            yield carry, carry_cells, np.arange(carry_cells.size)

    def _minibatch(self, counts: sp.csr_matrix, cells: np.ndarray, picked: np.ndarray) -> Minibatch:
        sub = _row_subset(counts.indptr.astype(np.int64), counts.indices.astype(np.int64), counts.data, picked.astype(np.int64))
        return assemble_minibatch(sub, counts.shape[1], self.layout, self.covariates, torch.from_numpy(cells[picked]))


def _prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Yield from ``items``, produced one step ahead in a background thread (reading overlaps
    compute: h5py and torch release the GIL in their native code). Stops the thread when the
    consumer stops early; re-raises the producer's exceptions in the consumer."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((done, None))
        except BaseException as error:  # handed to the consumer
            out.put((done, error))

    thread = threading.Thread(target=produce, name="scvi-cli-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
