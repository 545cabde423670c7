"""Minibatch sources over in-memory counts: host CSR (dense or CSR-row minibatches) and a copy
kept on a GPU. Only the B rows of a minibatch are gathered; the epoch order is a function of
(seed, epoch), so a resumed run replays it."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from scvi_cli.data.counts import CountData
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.nn.sparse_input import SparseRows


# --------------------------------------------------------------------------------------------
# Minibatches




def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch, a function of (seed, epoch) only: a run resumed at epoch k sees
    the same minibatches as an uninterrupted one without saving any RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(n)


LAYOUTS = ("dense", "sparse")


def one_index_dtype(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) in one integer dtype, as the compiled kernels want, converting the small
    one: indptr (cells + 1 entries) takes the indices' dtype when its values fit (an int64
    indptr beside int32 indices is common in h5ad files), instead of widening all indices."""
    indptr, indices = X.indptr, X.indices
    if indptr.dtype == indices.dtype:
        return indptr, indices
    if indptr.size == 0 or int(indptr[-1]) <= np.iinfo(indices.dtype).max:
        return indptr.astype(indices.dtype), indices
    wide = np.promote_types(indptr.dtype, indices.dtype)
    return indptr.astype(wide, copy=False), indices.astype(wide, copy=False)


def all_minibatches(n_cells: int, batch_size: int, drop_last: bool) -> int:
    """Minibatches of an epoch over n_cells cells, before any sharding."""
    return n_cells // batch_size if drop_last else -(-n_cells // batch_size)


def checked_cells(indices, n_cells: int, batch_size: int, layout: str) -> np.ndarray:
    """A minibatch source's cells as int64, after checking them and its batch size and layout."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    cells = np.asarray(indices, dtype=np.int64).reshape(-1)
    if cells.size and (cells.min() < 0 or cells.max() >= n_cells):
        raise ValueError(f"indices must lie in [0, {n_cells})")
    return cells


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
        self.indices = checked_cells(indices, data.n_cells, batch_size, layout)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.layout = layout
        self.epoch = 0
        X = data.X if data.X.dtype == np.float32 else data.X.astype(np.float32)
        self._indptr, self._indices = one_index_dtype(X)
        self._data = X.data
        self._n_genes = X.shape[1]
        self.covariates = covariate_tensors(data)  # every cell's codes and covariates as tensors

    rank, world_size, drop_remainder = 0, 1, True  # see shard()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int, drop_remainder: bool = True):
        """Keep every world_size-th minibatch of the epoch, from the rank-th on (one rank of a
        distributed run). With ``drop_remainder`` every rank gets the same number (the epoch's
        last few are left out when the count does not divide: training steps must pair up);
        without, every minibatch goes to some rank (evaluation). Returns self."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.drop_remainder = int(rank), int(world_size), drop_remainder
        return self

    def __len__(self) -> int:
        return len(self.steps())

    def steps(self) -> range:
        """The epoch's minibatch numbers this source yields."""
        total = all_minibatches(self.indices.size, self.batch_size, self.drop_last)
        if self.drop_remainder:
            total = total // self.world_size * self.world_size
        return range(self.rank, total, self.world_size)

    def epoch_cells(self) -> np.ndarray:
        """The cells of this epoch in their order (shuffled by (seed, epoch) when shuffling)."""
        return self.indices[epoch_order(self.indices.size, self.seed, self.epoch)] if self.shuffle else self.indices

    def __iter__(self) -> Iterator[Minibatch]:
        order = self.epoch_cells()
        for b in self.steps():
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._minibatch(rows)

    def _minibatch(self, rows: np.ndarray) -> Minibatch:
        sub = _row_subset(self._indptr, self._indices, self._data, rows)
        return assemble_minibatch(sub, self._n_genes, self.layout, self.covariates, torch.from_numpy(rows))


def covariate_tensors(data: CountData) -> dict[str, torch.Tensor | None]:
    """The codes and covariates of every cell of ``data`` as tensors (batch and labels (n, 1))."""
    return dict(
        batch=torch.from_numpy(np.ascontiguousarray(data.batch_codes, dtype=np.int64).reshape(-1, 1)),
        labels=torch.from_numpy(np.ascontiguousarray(data.label_codes, dtype=np.int64).reshape(-1, 1)),
        cat=None if data.cat_cov_codes is None else torch.from_numpy(np.ascontiguousarray(data.cat_cov_codes, dtype=np.int64)),
        cont=None if data.cont_covs is None else torch.from_numpy(np.ascontiguousarray(data.cont_covs, dtype=np.float32)),
    )


def assemble_minibatch(sub, n_genes: int, layout: str, covariates: dict, cells: torch.Tensor) -> Minibatch:
    """A Minibatch from the CSR arrays ``sub`` (indptr, indices, data) of its cells' counts and
    the covariates of ``cells`` (their positions in the data set)."""
    if layout == "dense":
        return Minibatch(x=torch.from_numpy(_densify(*sub, n_genes)), **covariates_of(covariates, cells))
    rows = SparseRows(*(torch.from_numpy(np.asarray(a)) for a in sub), n_genes, check=False)
    return Minibatch(rows=rows, **covariates_of(covariates, cells))


def covariates_of(covariates: dict, cells: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Minibatch's covariate arguments for ``cells`` (positions, on the covariates' device)."""
    pick = lambda t: None if t is None else t[cells]  # noqa: E731
    return dict(
        batch_index=pick(covariates["batch"]),
        labels=pick(covariates["labels"]),
        cat_covs=pick(covariates["cat"]),
        cont_covs=pick(covariates["cont"]),
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
        )
        self._covariates_on_device = {key: move(value) for key, value in self.covariates.items()}

    def sharing(self, indices: np.ndarray | Sequence[int], batch_size: int, shuffle: bool) -> "DeviceCSRMinibatches":
        """Minibatches of other cells of the same data, reading the same device copy (e.g. the
        validation cells beside the training cells), not a second one."""
        other = copy.copy(self)
        other.indices = checked_cells(indices, self._n_cells, batch_size, self.layout)
        other.batch_size = int(batch_size)
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
        for b in self.steps():
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
        return Minibatch(x=x, **covariates_of(self._covariates_on_device, rows_on_device))


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


def iterate_in_order(data: CountData, batch_size: int, indices: np.ndarray | None = None, layout: str = "dense"):
    """All cells (or `indices`) in their order, for inference: no shuffle, nothing dropped."""
    if indices is None:
        indices = np.arange(data.n_cells, dtype=np.int64)
    if data.backed:
        from scvi_cli.data.backed import CHUNK_ROWS, BackedMinibatches

        return BackedMinibatches(data, indices, batch_size, shuffle=False, layout=layout, block_cells=CHUNK_ROWS, buffer_blocks=1)
    return CSRMinibatches(data, indices, batch_size, shuffle=False, layout=layout)
