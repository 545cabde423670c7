"""A first Linear layer that reads a CSR minibatch of counts without densifying it.

An encoder's first layer computes ``Linear(log1p(x))`` (with one-hot covariates concatenated
after x) on a (B, G) minibatch that is 90-95% zeros. :class:`SparseRows` holds that minibatch
as three torch tensors (CSR), and :func:`sparse_linear` computes exactly
``F.linear(rows.to_dense(), weight[:, :G], bias) + dense_tail @ weight[:, G:].T`` from the
nonzeros only:

* forward: ``F.embedding_bag`` over the CSR rows, with ``weight[:, :G].T`` (made contiguous) as
  the table, gene indices as input, ``indptr`` as offsets and the values as
  ``per_sample_weights`` (mode ``'sum'``).
* backward (a custom autograd Function): embedding_bag's own backward w.r.t. the table is slow
  on CPU (slower than the whole dense forward + backward, see benchmarks/sparse_first_layer.py),
  so the weight gradient ``grad_out.T @ X`` is computed as the *transposed* product
  ``X.T @ grad_out`` with a second embedding_bag, this time over the columns of X (its CSC form,
  built once per minibatch and cached) with ``grad_out`` as the table. The bias and dense_tail
  gradients are dense and small.

Everything is plain torch and runs on any device; only the CSC structure is computed with scipy
when the minibatch lives on the CPU (a stable sort on other devices).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

__all__ = ["SparseInput", "SparseRows", "column_major_", "is_column_major", "sparse_linear"]


class SparseRows:
    """A (B, n_cols) CSR minibatch as torch tensors.

    ``indptr`` (B+1,) int64 with ``indptr[0] == 0`` and ``indptr[-1] == nnz``; ``indices`` (nnz,)
    int64 column of each stored value; ``values`` (nnz,) float. Duplicate entries in a row are
    summed (as scipy does) by every operation here; indices need not be sorted.
    """

    __slots__ = ("indptr", "indices", "values", "n_cols", "_row_ids", "_csc")

    def __init__(
        self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int, check: bool = True
    ):
        indptr = torch.as_tensor(indptr)
        indices = torch.as_tensor(indices)
        values = torch.as_tensor(values)
        if indptr.dim() != 1 or indptr.numel() < 1:
            raise ValueError(f"indptr must be 1-d with B+1 >= 1 entries, got shape {tuple(indptr.shape)}")
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise ValueError(
                f"indices and values must be 1-d of equal length, got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        if indptr.dtype.is_floating_point or indices.dtype.is_floating_point:
            raise TypeError("indptr and indices must be integer tensors")
        if not values.dtype.is_floating_point:
            values = values.to(torch.float32)
        if not (indptr.device == indices.device == values.device):
            raise ValueError("indptr, indices and values must be on the same device")
        self.indptr = indptr.to(torch.int64).contiguous()
        self.indices = indices.to(torch.int64).contiguous()
        self.values = values.contiguous()
        self.n_cols = int(n_cols)
        self._row_ids = None
        self._csc = None  # (col_indptr, row_of_entry, perm): X's columns, entry j is values[perm[j]]
        if check:
            self.check()

    def check(self) -> None:
        """Raise ValueError unless indptr runs from 0 to nnz without decreasing and every index
        lies in [0, n_cols). Reads a few scalars back (a device sync on a GPU: pass check=False
        to the constructor there when the source is trusted)."""
        ptr, nnz = self.indptr, self.nnz
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"indptr must rise from 0 to nnz={nnz} without decreasing")
        if nnz and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.n_cols):
            raise ValueError(f"column indices must lie in [0, {self.n_cols})")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_scipy(cls, matrix, dtype: torch.dtype = torch.float32, device=None, check: bool = False) -> SparseRows:
        """Any scipy sparse matrix (converted to CSR; a CSR one is not copied beyond dtypes).

        The content checks of :meth:`check` (O(nnz)) are off by default here: scipy's own
        constructor has checked the array lengths, and embedding_bag rejects out-of-range
        indices itself."""
        if not sp.issparse(matrix):
            raise TypeError(f"expected a scipy sparse matrix, got {type(matrix).__name__}")
        csr = matrix.tocsr() if matrix.format != "csr" else matrix
        if csr.indptr[-1] != csr.indices.size or csr.indices.size != csr.data.size:
            raise ValueError("malformed CSR matrix: indptr[-1], indices and data disagree")
        rows = cls(
            torch.from_numpy(np.asarray(csr.indptr)).to(torch.int64),
            torch.from_numpy(np.asarray(csr.indices)).to(torch.int64),
            torch.from_numpy(np.asarray(csr.data)).to(dtype),
            csr.shape[1],
            check=check,
        )
        return rows if device is None else rows.to(device)

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> SparseRows:
        """(B, G) dense tensor -> its nonzeros (mainly for tests)."""
        if x.dim() != 2:
            raise ValueError(f"expected a 2-d tensor, got shape {tuple(x.shape)}")
        mask = x != 0
        counts = mask.sum(1)
        indptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        row, col = mask.nonzero(as_tuple=True)
        return cls(indptr, col, x[row, col], x.shape[1])

    # ---- basic properties ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self.indptr.numel() - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.n_cols)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def __repr__(self) -> str:
        return f"SparseRows(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device})"

    def _with_values(self, values: torch.Tensor) -> SparseRows:
        """Same sparsity pattern (and cached structure), new values."""
        out = SparseRows.__new__(SparseRows)
        out.indptr, out.indices, out.values, out.n_cols = self.indptr, self.indices, values, self.n_cols
        out._row_ids, out._csc = self._row_ids, self._csc
        return out

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> SparseRows:
        """Move to `device` and/or cast the values to `dtype` (indices stay int64)."""
        if device is None or torch.device(device) == self.device:
            return self if dtype is None or dtype == self.dtype else self._with_values(self.values.to(dtype))
        kw = dict(device=device, non_blocking=non_blocking)
        return SparseRows(
            self.indptr.to(**kw), self.indices.to(**kw), self.values.to(dtype=dtype, **kw), self.n_cols, check=False
        )

    def row_ids(self) -> torch.Tensor:
        """(nnz,) int64 row of each stored entry.

        A running count of the row starts passed (a mark at each ``indptr[1:-1]``, accumulated so
        that empty rows add up): two passes over nnz, several times faster on the CPU than
        repeat_interleave, which was a noticeable part of a training step."""
        if self._row_ids is None:
            marks = torch.zeros(self.nnz + 1, dtype=torch.int64, device=self.indptr.device)
            starts = self.indptr[1:-1]
            marks.index_put_((starts,), torch.ones_like(starts), accumulate=True)
            self._row_ids = marks[:-1].cumsum(0)
        return self._row_ids

    # ---- values -------------------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """(B, n_cols) dense tensor (duplicates summed)."""
        out = torch.zeros(len(self), self.n_cols, dtype=self.dtype, device=self.device)
        if self.nnz:
            out.index_put_((self.row_ids(), self.indices), self.values, accumulate=True)
        return out

    def row_sums(self) -> torch.Tensor:
        """(B, 1) total of each row (library size of each cell)."""
        return self.sum_rows(self.values).unsqueeze(1)

    def sum_rows(self, entry_values: torch.Tensor) -> torch.Tensor:
        """(B,) per-row sums of one value per stored entry (in the CSR's order): segment sums,
        as the entries come row by row, where torch has segment_reduce (CPU, CUDA); else a
        scatter over row_ids."""
        if self.device.type in ("cpu", "cuda") and len(self):
            return torch.segment_reduce(entry_values, "sum", lengths=self.indptr[1:] - self.indptr[:-1])
        out = torch.zeros(len(self), dtype=entry_values.dtype, device=self.device)
        if self.nnz:
            out.index_add_(0, self.row_ids(), entry_values)
        return out

    def log1p(self) -> SparseRows:
        """log(1 + x) of the stored values (zeros stay zeros); a new SparseRows."""
        return self._with_values(torch.log1p(self.values))

    # ---- column (CSC) structure, for the weight gradient --------------------------------------

    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(col_indptr (n_cols+1,), row_of_entry (nnz,), perm (nnz,))``, all int64: the
        entries of column j are ``values[perm[col_indptr[j]:col_indptr[j+1]]]`` in rows
        ``row_of_entry[...]``. Computed once and shared by :meth:`log1p` / :meth:`to` (dtype)."""
        if self._csc is None:
            self._csc = self._compute_csc()
        return self._csc

    def _compute_csc(self):
        if self.device.type == "cpu" and self.nnz < 2**31:
            return _csc_scipy(self)
        return _csc_sort(self)


def _csc_scipy(rows: SparseRows):
    """scipy's compiled csr -> csc (a counting sort, O(nnz + n_cols)) carrying 0..nnz-1 as the
    data, which yields the permutation. Calls the kernel directly when it is there (it skips the
    matrix constructor's checks and int32 copies: about 1.5x faster at B=128), else the public
    API."""
    B, G, nnz = len(rows), rows.n_cols, rows.nnz
    indptr, indices = rows.indptr.numpy(), rows.indices.numpy()
    order = np.arange(nnz, dtype=np.int64)
    if _csr_tocsc is not None:
        col_indptr = np.empty(G + 1, dtype=np.int64)
        row_of_entry = np.empty(nnz, dtype=np.int64)
        perm = np.empty(nnz, dtype=np.int64)
        _csr_tocsc(B, G, indptr, indices, order, col_indptr, row_of_entry, perm)
    else:
        csc = sp.csr_matrix((order, indices, indptr), shape=(B, G)).tocsc()
        col_indptr, row_of_entry, perm = csc.indptr, csc.indices, csc.data
    return tuple(torch.from_numpy(np.asarray(a)).to(torch.int64) for a in (col_indptr, row_of_entry, perm))


def _find_csr_tocsc():
    """scipy's private csr_tocsc kernel when it behaves as expected on a probe, else None."""
    try:
        from scipy.sparse import _sparsetools

        kernel = _sparsetools.csr_tocsc
        probe = sp.random(5, 4, density=0.5, format="csr", random_state=0)
        ptr, ind = probe.indptr.astype(np.int64), probe.indices.astype(np.int64)
        out = np.empty(5, np.int64), np.empty(probe.nnz, np.int64), np.empty(probe.nnz, np.int64)
        kernel(5, 4, ptr, ind, np.arange(probe.nnz, dtype=np.int64), *out)
        want = sp.csr_matrix((np.arange(probe.nnz), ind, ptr), shape=(5, 4)).tocsc()
        if all(np.array_equal(a, b) for a, b in zip(out, (want.indptr, want.indices, want.data))):
            return kernel
    except Exception:  # another scipy: use the public API
        pass
    return None


_csr_tocsc = _find_csr_tocsc()


def _csc_sort(rows: SparseRows):
    """Any device: a stable sort by column keeps the rows ascending within each column."""
    _, perm = torch.sort(rows.indices, stable=True)
    counts = torch.bincount(rows.indices, minlength=rows.n_cols)
    col_indptr = torch.zeros(rows.n_cols + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=col_indptr[1:])
    return col_indptr, rows.row_ids()[perm], perm


def is_column_major(weight: torch.Tensor) -> bool:
    """True when weight (out, in) is stored transposed: weight.T is contiguous (in, out)."""
    return weight.dim() == 2 and weight.t().is_contiguous()


def column_major_(linear: torch.nn.Linear) -> torch.nn.Linear:
    """Store ``linear.weight`` column-major (in place, same Parameter object; values, shape and
    state-dict name unchanged).

    :func:`sparse_linear` uses ``weight[:, :G].T`` as its embedding_bag table and produces the
    weight gradient as (in, out): with a column-major weight both are free, while a row-major
    one costs a transpose copy of the whole (out, G) matrix per forward and per backward, which
    dominates at B=128 (see benchmarks/sparse_first_layer.py). ``F.linear`` (the dense path),
    ``load_state_dict`` (copies into the existing layout), ``module.to(device)`` and Adam's state
    (``zeros_like``) all keep working with this layout. Call it before creating the optimizer or
    after, either works (the Parameter is the same object).
    """
    with torch.no_grad():
        if not is_column_major(linear.weight):
            linear.weight.data = linear.weight.data.t().contiguous().t()
    return linear


def _bag_sum(indices, table, indptr, weights):
    """Row b of the result = sum_{p in [indptr[b], indptr[b+1])} weights[p] * table[indices[p]]."""
    return F.embedding_bag(
        indices, table, indptr, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


class _SparseLinear(torch.autograd.Function):
    """out = X @ weight[:, :G].T + tail @ weight[:, G:].T + bias, X given by `rows` (CSR)."""

    @staticmethod
    def forward(ctx, values, weight, bias, dense_tail, rows):
        G = rows.n_cols
        table = weight[:, :G].t()  # (G, out); free for a column-major weight, else one copy
        if not table.is_contiguous():
            table = table.contiguous()
        out = _bag_sum(rows.indices, table, rows.indptr, values.to(weight.dtype))
        if dense_tail is not None:
            out = out.addmm_(dense_tail, weight[:, G:].t())
        if bias is not None:
            out += bias
        ctx.rows = rows
        ctx.has_bias = bias is not None
        ctx.save_for_backward(values, weight, dense_tail)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        values, weight, dense_tail = ctx.saved_tensors
        rows = ctx.rows
        G = rows.n_cols
        need_values, need_weight, need_bias, need_tail, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = grad_bias = grad_tail = None
        if need_weight:
            col_indptr, row_of_entry, perm = rows.csc()
            # X.T @ grad_out: bags over X's columns, with grad_out's rows as the table -> (G, out)
            genes = _bag_sum(row_of_entry, grad_out, col_indptr, values.to(weight.dtype)[perm])
            tail = None if dense_tail is None else dense_tail.t() @ grad_out  # (k, out)
            if is_column_major(weight):  # the gradient in the weight's own layout: no transpose
                grad_weight = genes if tail is None else torch.cat([genes, tail], 0)
                grad_weight = grad_weight.t()
            else:
                grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
                grad_weight[:, :G] = genes.t()
                if tail is not None:
                    grad_weight[:, G:] = tail.t()
        if need_bias and ctx.has_bias:
            grad_bias = grad_out.sum(0)
        if need_tail:
            grad_tail = grad_out @ weight[:, G:]
        if need_values:
            # d out[b, o] / d values[p] = weight[o, indices[p]] for the row b of entry p
            grad_values = (grad_out[rows.row_ids()] * weight[:, rows.indices].t()).sum(1).to(values.dtype)
        return grad_values, grad_weight, grad_bias, grad_tail, None


def sparse_linear(
    rows: SparseRows,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dense_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(cat([rows.to_dense(), dense_tail], 1), weight, bias)`` from the nonzeros only.

    rows: (B, G) CSR minibatch, already transformed (e.g. ``rows.log1p()``).
    weight: (out, G + k) with k = ``dense_tail.shape[1]`` (0 without a tail), e.g. an
    ``nn.Linear``'s weight whose input is x followed by one-hot covariates.
    bias: (out,) or None.
    dense_tail: (B, k) dense columns that follow the G sparse ones, or None.
    Returns (B, out), differentiable w.r.t. weight, bias, dense_tail (and rows.values).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    G, B = rows.n_cols, len(rows)
    k = 0 if dense_tail is None else dense_tail.shape[-1]
    if weight.shape[1] != G + k:
        raise ValueError(
            f"weight has {weight.shape[1]} input columns, expected {G} genes + {k} dense_tail columns"
        )
    if dense_tail is not None:
        if dense_tail.dim() != 2 or dense_tail.shape[0] != B:
            raise ValueError(f"dense_tail must be ({B}, {k}), got shape {tuple(dense_tail.shape)}")
        if k == 0:
            dense_tail = None
        else:
            dense_tail = dense_tail.to(weight.dtype)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if torch.is_autocast_enabled(weight.device.type):  # autocast does not reach inside: compute as it would
        dtype = torch.get_autocast_dtype(weight.device.type)
        rows = rows.to(dtype=dtype)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        dense_tail = None if dense_tail is None else dense_tail.to(dtype)
        with torch.autocast(weight.device.type, enabled=False):
            return _SparseLinear.apply(rows.values, weight, bias, dense_tail, rows)
    return _SparseLinear.apply(rows.values, weight, bias, dense_tail, rows)


class SparseInput:
    """A layer input given as CSR columns followed by dense ones: ``cat([rows, tail], 1)``.

    What an encoder's first layer reads on the sparse path: ``rows`` holds log1p(counts) (B, G),
    ``tail`` (B, k) the continuous covariates, or None. FCLayers appends its one-hot covariates
    to the tail and calls :func:`sparse_linear`.
    """

    __slots__ = ("rows", "tail")

    def __init__(self, rows: SparseRows, tail: torch.Tensor | None = None):
        self.rows = rows
        self.tail = tail

    def __len__(self) -> int:
        return len(self.rows)

    def linear(self, linear: torch.nn.Linear, more_tail: list[torch.Tensor] | tuple = ()) -> torch.Tensor:
        """``linear(cat([rows, tail, *more_tail], 1))`` from the nonzeros of rows."""
        parts = ([] if self.tail is None else [self.tail]) + list(more_tail)
        tail = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return sparse_linear(self.rows, linear.weight, linear.bias, tail)
