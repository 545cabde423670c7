"""SparseRows and sparse_linear against the dense formula F.linear(cat([x, tail]), weight, bias)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scvi_cli.nn.sparse_input import (
    SparseRows,
    _csc_scipy,
    _csc_sort,
    column_major_,
    is_column_major,
    sparse_linear,
)


def _counts(n_rows, n_cols, density, seed, empty_rows=()):
    """Random CSR counts (canonical: sorted, duplicate-free indices) with some all-zero rows."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_rows, n_cols, density=density, format="lil", random_state=seed,
                  data_rvs=lambda n: rng.integers(1, 30, n)).astype(np.float64)
    for r in empty_rows:
        X[r] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    X.sort_indices()
    return X


def _params(n_out, n_in, dtype, seed, bias=True, column_major=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g, dtype=dtype)
    if column_major:
        weight = weight.t().contiguous().t()
    weight.requires_grad_()
    b = torch.randn(n_out, generator=g, dtype=dtype).requires_grad_() if bias else None
    return weight, b


def _grads(out, seed, *tensors):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(out, present, upstream) if present else ())
    return [None if t is None else next(grads) for t in tensors]


CASES = [  # (B, G, density, empty rows)
    (1, 7, 0.5, ()),
    (9, 23, 0.2, (0, 4, 8)),  # first, middle and last rows empty
    (40, 300, 0.08, (3, 17)),
]


@pytest.mark.parametrize("column_major", [False, True], ids=["row_major", "col_major"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_tail", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}xG{c[1]}")
def test_values_and_gradients_match_dense(case, bias, n_tail, dtype, column_major):
    B, G, density, empty = case
    X = _counts(B, G, density, seed=B, empty_rows=empty)
    rows = SparseRows.from_scipy(X, dtype=dtype).log1p()
    weight, b = _params(5, G + n_tail, dtype, seed=G, bias=bias, column_major=column_major)
    assert is_column_major(weight) == column_major
    tail = torch.randn(B, n_tail, dtype=dtype).requires_grad_() if n_tail else None

    out = sparse_linear(rows, weight, b, tail)
    dense_x = torch.log1p(torch.from_numpy(X.toarray()).to(dtype))
    expected = F.linear(dense_x if tail is None else torch.cat([dense_x, tail], 1), weight, b)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert out.shape == (B, 5) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **tol)
    for r in empty:  # a cell with no counts sees only the bias (and its covariates)
        alone = torch.zeros(5, dtype=dtype) if b is None else b
        if tail is not None:
            alone = alone + weight[:, G:] @ tail[r]
        torch.testing.assert_close(out[r], alone, **tol)

    got = _grads(out, 0, weight, b, tail)
    want = _grads(expected, 0, weight, b, tail)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **tol)


def test_gradcheck_including_values():
    X = _counts(6, 11, 0.3, seed=3, empty_rows=(2,))
    rows = SparseRows.from_scipy(X, dtype=torch.float64)
    weight, b = _params(4, 13, torch.float64, seed=1)
    tail = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    values = rows.values.clone().requires_grad_()

    def f(v, w, bb, t):
        return sparse_linear(SparseRows(rows.indptr, rows.indices, v, rows.n_cols), w, bb, t)

    assert torch.autograd.gradcheck(f, (values, weight, b, tail))


def test_matches_an_nn_linear_over_x_and_one_hot_covariates():
    torch.manual_seed(0)
    X = _counts(16, 50, 0.1, seed=5, empty_rows=(7,)).astype(np.float32)
    codes = torch.randint(0, 3, (16,))
    one_hot = F.one_hot(codes, 3).float()
    layer = nn.Linear(50 + 3, 8)
    rows = SparseRows.from_scipy(X)
    out = sparse_linear(rows.log1p(), layer.weight, layer.bias, one_hot)
    x = torch.from_numpy(X.toarray())
    torch.testing.assert_close(out, layer(torch.cat([torch.log1p(x), one_hot], 1)), rtol=1e-5, atol=1e-5)


def test_column_major_layout_keeps_values_and_gets_grads_in_its_own_layout():
    torch.manual_seed(1)
    layer = nn.Linear(40 + 2, 6)
    before = layer.weight.detach().clone()
    param = layer.weight
    assert column_major_(layer) is layer and layer.weight is param
    assert is_column_major(layer.weight) and torch.equal(layer.weight, before)
    X = _counts(10, 40, 0.2, seed=6, empty_rows=(9,)).astype(np.float32)
    tail = F.one_hot(torch.arange(10) % 2, 2).float()
    out = sparse_linear(SparseRows.from_scipy(X).log1p(), layer.weight, layer.bias, tail)
    out.square().sum().backward()
    assert layer.weight.grad.stride() == layer.weight.stride()  # accumulated without a copy
    sparse_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    x = torch.cat([torch.log1p(torch.from_numpy(X.toarray())), tail], 1)
    dense_out = layer(x)  # the dense path still works on the column-major weight
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    dense_out.square().sum().backward()
    torch.testing.assert_close(sparse_grad, layer.weight.grad, rtol=1e-4, atol=1e-4)
    # a state dict round trip keeps the layout of the receiving parameter and the values
    other = column_major_(nn.Linear(42, 6))
    other.load_state_dict(nn.Linear(42, 6).state_dict())
    assert is_column_major(other.weight)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight, layer.weight)


def test_zero_rows_and_no_nonzeros():
    weight, b = _params(4, 6, torch.float32, seed=0)
    empty_batch = SparseRows.from_scipy(sp.csr_matrix((0, 6), dtype=np.float32))
    assert len(empty_batch) == 0
    out = sparse_linear(empty_batch, weight, b)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(b.grad, torch.zeros_like(b))

    all_zero = SparseRows.from_scipy(sp.csr_matrix((3, 6), dtype=np.float32))
    weight.grad = b.grad = None
    out = sparse_linear(all_zero, weight, b)
    torch.testing.assert_close(out, b.expand(3, 4))
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    torch.testing.assert_close(b.grad, torch.full((4,), 3.0))


def test_sparse_rows_container():
    X = _counts(8, 12, 0.3, seed=2, empty_rows=(0, 7)).astype(np.float32)
    rows = SparseRows.from_scipy(X)
    assert len(rows) == 8 and rows.shape == (8, 12) and rows.nnz == X.nnz
    assert rows.indptr.dtype == rows.indices.dtype == torch.int64 and rows.values.dtype == torch.float32
    dense = torch.from_numpy(X.toarray())
    torch.testing.assert_close(rows.to_dense(), dense)
    torch.testing.assert_close(rows.row_sums(), dense.sum(1, keepdim=True))
    want_rows = torch.from_numpy(np.repeat(np.arange(8), np.diff(X.indptr)))
    assert torch.equal(rows.row_ids(), want_rows)  # empty rows at both ends included
    for empty in (SparseRows.from_dense(torch.zeros(3, 4)), SparseRows(torch.tensor([0]), torch.tensor([], dtype=torch.long), torch.tensor([]), 4)):
        assert empty.row_ids().numel() == 0 and torch.equal(empty.row_sums(), torch.zeros(len(empty), 1))
    logged = rows.log1p()
    assert isinstance(logged, SparseRows) and logged is not rows
    torch.testing.assert_close(logged.to_dense(), torch.log1p(dense))
    torch.testing.assert_close(rows.to_dense(), dense)  # the original is untouched
    assert rows.to("cpu") is rows
    assert rows.to(dtype=torch.float64).values.dtype == torch.float64
    # from torch tensors, and from a dense tensor
    again = SparseRows(rows.indptr, rows.indices, rows.values, 12)
    torch.testing.assert_close(again.to_dense(), dense)
    torch.testing.assert_close(SparseRows.from_dense(dense).to_dense(), dense)
    # other scipy formats are converted
    torch.testing.assert_close(SparseRows.from_scipy(X.tocsc()).to_dense(), dense)


def test_unsorted_and_duplicate_indices_are_summed_like_scipy():
    indptr = torch.tensor([0, 3, 3, 5])
    indices = torch.tensor([4, 1, 4, 0, 2])  # row 0: unsorted, column 4 twice
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    rows = SparseRows(indptr, indices, values, 5)
    expected_x = torch.tensor(sp.csr_matrix((values.numpy(), indices.numpy(), indptr.numpy()), shape=(3, 5)).toarray())
    torch.testing.assert_close(rows.to_dense(), expected_x)
    weight, b = _params(3, 5, torch.float64, seed=4)
    out = sparse_linear(rows, weight, b)
    expected = F.linear(expected_x, weight, b)
    torch.testing.assert_close(out, expected)
    for g, w in zip(_grads(out, 1, weight, b), _grads(expected, 1, weight, b)):
        torch.testing.assert_close(g, w)


def test_csc_by_sort_matches_scipy(monkeypatch):
    import scvi_cli.nn.sparse_input as module

    X = _counts(30, 40, 0.15, seed=9, empty_rows=(5,))
    rows = SparseRows.from_scipy(X)
    kernel = _csc_scipy(rows)
    monkeypatch.setattr(module, "_csr_tocsc", None)  # scipy's public API instead of its kernel
    for a, b, c in zip(kernel, _csc_scipy(rows), _csc_sort(rows)):
        assert a.dtype == b.dtype == c.dtype == torch.int64
        assert torch.equal(a, b) and torch.equal(a, c)
    col_indptr, row_of_entry, perm = rows.csc()
    Xc = X.tocsc()
    assert np.array_equal(col_indptr.numpy(), Xc.indptr) and np.array_equal(row_of_entry.numpy(), Xc.indices)
    np.testing.assert_allclose(rows.values[perm].numpy(), Xc.data)


def test_shape_errors():
    rows = SparseRows.from_scipy(_counts(4, 6, 0.5, seed=0))
    weight, b = _params(3, 6, torch.float32, seed=0)
    with pytest.raises(ValueError, match="input columns"):
        sparse_linear(rows, weight[:, :5], b)
    with pytest.raises(ValueError, match="input columns"):
        sparse_linear(rows, weight, b, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dense_tail"):
        sparse_linear(rows, torch.zeros(3, 8), b, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(rows, weight, torch.zeros(4))
    with pytest.raises(ValueError, match="indptr"):
        SparseRows(torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="indptr"):
        SparseRows(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="column indices"):
        SparseRows(torch.tensor([0, 2]), torch.tensor([0, 3]), torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="same length|equal length"):
        SparseRows(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1.0]), 3)
