"""Reading gzip-compressed HDF5 arrays and .h5ad files on several threads (data/inflate.py)."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.data import inflate
from scvi_cli.data.reading import read_h5ad


@pytest.fixture
def parallel_everything(monkeypatch):
    """Every array takes the threaded path, however small; counts the arrays that did."""
    monkeypatch.setattr(inflate, "MIN_PARALLEL_BYTES", 0)
    calls = []
    original = inflate._read_chunks
    monkeypatch.setattr(inflate, "_read_chunks", lambda *a: calls.append(a[0].name) or original(*a))
    return calls


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i4", "<i8", "<f8", "<u2"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_threaded_read_equals_h5py(tmp_path, parallel_everything, dtype, shuffle):
    rng = np.random.default_rng(0)
    values = (rng.poisson(3.0, 10_007) * rng.integers(0, 2, 10_007)).astype(dtype)  # last chunk partial
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("v", data=values, chunks=(1000,), compression="gzip", shuffle=shuffle)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        got = inflate.read_array(f["v"], threads=2)
        want = f["v"][()]
    assert parallel_everything == ["/v"]
    assert got.dtype == want.dtype and np.array_equal(got, want) and np.array_equal(got, values)


def test_other_layouts_and_filters_are_read_by_h5py(tmp_path, parallel_everything):
    values = np.arange(5000, dtype=np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("lzf", data=values, chunks=(512,), compression="lzf")
        f.create_dataset("contiguous", data=values)
        f.create_dataset("fletcher", data=values, chunks=(512,), compression="gzip", fletcher32=True)
        f.create_dataset("matrix", data=values.reshape(50, 100), chunks=(10, 100), compression="gzip")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for name in ("lzf", "contiguous", "fletcher", "matrix"):
            assert np.array_equal(inflate.read_array(f[name], threads=2), f[name][()])
        assert np.array_equal(inflate.read_array(f["lzf"], threads=1), values)
    assert parallel_everything == []  # none of them is eligible


def test_unwritten_chunks_fall_back_to_h5py(tmp_path, parallel_everything):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        d = f.create_dataset("v", shape=(4000,), dtype="f4", chunks=(1000,), compression="gzip", fillvalue=7.0)
        d[:1000] = np.arange(1000)  # chunks 2-4 never allocated
    with h5py.File(tmp_path / "a.h5", "r") as f:
        got = inflate.read_array(f["v"], threads=2)
        assert np.array_equal(got, f["v"][()])
    assert parallel_everything == ["/v"] and got[-1] == 7.0


def test_a_damaged_chunk_is_reported_by_h5py(tmp_path, parallel_everything):
    values = np.random.default_rng(1).random(20_000).astype(np.float32)
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("v", data=values, chunks=(2000,), compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["v"].id.get_chunk_info(3).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 10 : offset + 200] = bytes(190)
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        inflate.read_array(f["v"], threads=2)


def _rich_anndata() -> ad.AnnData:
    rng = np.random.default_rng(2)
    X = sp.random(300, 80, density=0.2, format="csr", random_state=3, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"batch": pd.Categorical(rng.choice(["a", "b"], 300)), "n": rng.random(300)},
                         index=[f"c{i}" for i in range(300)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(80)]),
    )
    a.layers["counts"] = X.tocsc()
    a.layers["dense"] = X.toarray()
    a.obsm["X_sparse"] = sp.random(300, 5, density=0.5, format="csr", random_state=4)
    a.obsm["X_pca"] = rng.random((300, 4))
    a.uns["note"] = {"k": np.arange(3)}
    a.raw = a[:, :60].copy()
    return a


def _assert_same(got: ad.AnnData, want: ad.AnnData) -> None:
    assert got.obs.equals(want.obs) and got.var.equals(want.var)
    assert got.obs_names.equals(want.obs_names) and got.var_names.equals(want.var_names)
    for a, b in [(got.X, want.X)] + [(got.layers[k], want.layers[k]) for k in want.layers] + [
        (got.obsm[k], want.obsm[k]) for k in want.obsm
    ] + [(got.raw.X, want.raw.X)]:
        assert type(a) is type(b)
        if sp.issparse(b):
            assert a.format == b.format and a.indptr.dtype == b.indptr.dtype and a.indices.dtype == b.indices.dtype
            assert (a != b).nnz == 0
        else:
            assert np.array_equal(a, b)
    assert set(got.layers) == set(want.layers) and set(got.obsm) == set(want.obsm)
    assert np.array_equal(got.uns["note"]["k"], want.uns["note"]["k"])
    assert got.raw.var_names.equals(want.raw.var_names)


@pytest.mark.parametrize("threads, compression", [(2, "gzip"), (1, "gzip"), (2, None)])
def test_read_h5ad_equals_anndatas_read(tmp_path, parallel_everything, threads, compression):
    path = tmp_path / "rich.h5ad"
    _rich_anndata().write_h5ad(path, compression=compression)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # read_h5ad takes torch's thread count, which --threads sets
    try:
        got = read_h5ad(path)
    finally:
        torch.set_num_threads(before)
    _assert_same(got, ad.read_h5ad(path))
    if threads == 2 and compression == "gzip":
        # X, the csc layer, the sparse obsm and raw.X: three arrays each
        assert len(parallel_everything) == 12 and "/X/data" in parallel_everything
    else:  # one thread, or nothing compressed: h5py reads every array
        assert parallel_everything == []
