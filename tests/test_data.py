"""Tests of scvi_cli.data: reading, validation, coding, gene matching, priors, split, minibatches.

Expected values are computed independently (dense numpy on tiny matrices), never by data.py.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_cli import data as D
from scvi_cli.data import reading, sources
from scvi_cli.errors import DataError, SpecError
from scvi_cli.data.minibatch import Minibatch

PBMC = Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"


def spec(layer=None, batch_key=None, labels_key=None, cat=(), cont=()):
    """Stands in for the pydantic DataSpec: data.py only reads these attributes."""
    return SimpleNamespace(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        categorical_covariate_keys=list(cat),
        continuous_covariate_keys=list(cont),
    )


def make_adata(n=60, g=25, seed=0, density=0.3):
    """Poisson-like counts, every cell with at least one count, and a few obs columns."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(n, g)) * (rng.random((n, g)) < density)
    dense[:, 0] += 1  # no zero-count cells unless a test makes some
    obs = pd.DataFrame(
        {
            "batch": rng.choice(["b2", "b0", "b1"], n),
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK", "Mono"], n)),
            "donor": rng.choice([3, 1, 10], n),
            "age": rng.uniform(20, 80, n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(g)])
    return ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=var), dense


def write(adata, path: Path) -> str:
    adata.write_h5ad(path)
    return str(path)


def message(excinfo) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------------------------
# read_h5ad


def test_read_h5ad_reads_the_test_file():
    adata = D.read_h5ad(PBMC)
    assert adata.shape == (80, 230)
    assert "batch" in adata.obs


def test_read_h5ad_missing_file(tmp_path):
    path = tmp_path / "nope.h5ad"
    with pytest.raises(DataError) as e:
        D.read_h5ad(path)
    assert message(e) == f"{path}: no such file"


def test_read_h5ad_directory(tmp_path):
    with pytest.raises(DataError) as e:
        D.read_h5ad(tmp_path)
    assert message(e).startswith(f"{tmp_path}: is a directory")


@pytest.mark.parametrize("content", [b"", b"cell,gene\n1,2\n"])
def test_read_h5ad_not_hdf5(tmp_path, content):
    path = tmp_path / "data.h5ad"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        D.read_h5ad(path)
    assert message(e).startswith(f"{path}: ")
    assert "empty" in message(e) or "not an HDF5" in message(e)


def test_read_h5ad_truncated(tmp_path):
    raw = PBMC.read_bytes()
    path = tmp_path / "cut.h5ad"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        D.read_h5ad(path)
    assert message(e) == f"{path}: the file is truncated (incomplete copy or download?)"


def test_read_h5ad_corrupt_inside(tmp_path):
    raw = bytearray(PBMC.read_bytes())
    start = len(raw) // 3
    raw[start : start + 4000] = bytes(4000)  # zeroes over object headers in the middle
    path = tmp_path / "corrupt.h5ad"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        D.read_h5ad(path)
    assert message(e).startswith(f"{path}: ")
    assert "\n" not in message(e)


def test_read_h5ad_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(3)
    with pytest.raises(DataError) as e:
        D.read_h5ad(path)
    assert message(e) == f"{path}: an HDF5 file but not an AnnData .h5ad (top-level keys: 'a')"

    tenx = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(tenx, "w") as f:
        f.create_group("matrix")
    with pytest.raises(DataError, match="10x Genomics"):
        D.read_h5ad(tenx)


# --------------------------------------------------------------------------------------------
# select_counts: where the counts are, formats, validation


def test_select_counts_x_is_float32_csr():
    adata = D.read_h5ad(PBMC)
    X = D.select_counts(adata, None, PBMC)
    assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), adata.X.toarray())


def test_csc_and_dense_inputs_give_the_same_csr():
    adata, dense = make_adata()
    from_csr = D.select_counts(adata, None, "d.h5ad")
    for other in (sp.csc_matrix(dense.astype(np.float64)), dense.astype(np.int64), dense.astype(np.float32)):
        b = adata.copy()
        b.X = other
        X = D.select_counts(b, None, "d.h5ad")
        assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32
        assert X.has_canonical_format
        assert (X != from_csr).nnz == 0
        np.testing.assert_array_equal(X.toarray(), dense)


def test_large_dense_matrix_is_converted_in_row_blocks(monkeypatch):
    monkeypatch.setattr(reading, "_CHUNK", 64)  # force several blocks on a small matrix
    adata, dense = make_adata(n=50, g=20)
    adata.X = dense.astype(np.float32)
    np.testing.assert_array_equal(D.select_counts(adata, None, "d").toarray(), dense)


def test_raw_and_layer_selection():
    adata, dense = make_adata(g=10)
    adata.layers["counts"] = sp.csr_matrix(dense * 2)
    raw = ad.AnnData(X=sp.csr_matrix(np.hstack([dense, dense]) * 3), obs=adata.obs, var=pd.DataFrame(index=[f"R{j}" for j in range(20)]))
    adata.raw = raw
    np.testing.assert_array_equal(D.select_counts(adata, "counts", "d").toarray(), dense * 2)
    np.testing.assert_array_equal(D.select_counts(adata, "raw", "d").toarray(), np.hstack([dense, dense]) * 3)
    # raw.X keeps its own gene names (raw often holds more genes than X)
    data = D.count_data_from_anndata(adata, spec(layer="raw"), "d")
    assert data.gene_names == [f"R{j}" for j in range(20)]
    data = D.count_data_from_anndata(adata, spec(layer="counts"), "d")
    np.testing.assert_array_equal(data.X.toarray(), dense * 2)


def test_missing_layer_names_it_and_lists_available():
    adata, dense = make_adata()
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(DataError) as e:
        D.select_counts(adata, "count", "data.h5ad")
    assert message(e) == "data.h5ad: no layer 'count' (data.layer); available layers: 'counts'; did you mean 'counts'?"
    del adata.layers["counts"]
    with pytest.raises(DataError, match="data.h5ad: no layer 'count' .*the file has no layers"):
        D.select_counts(adata, "count", "data.h5ad")


def test_raw_requested_but_absent():
    adata, _ = make_adata()
    with pytest.raises(DataError, match=r"^data.h5ad: data.layer is 'raw' but the file has no raw"):
        D.select_counts(adata, "raw", "data.h5ad")


def test_non_integer_counts_message_names_file_matrix_value_cell_gene(tmp_path):
    dense = np.array([[1.0, 0.0, 3.0], [0.0, 2.5, 1.0], [4.0, 0.5, 0.0]], dtype=np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(dense),
        obs=pd.DataFrame(index=["AAAA-1", "AAAC-1", "AAAG-1"]),
        var=pd.DataFrame(index=["MS4A1", "CD3E", "LYZ"]),
    )
    path = write(adata, tmp_path / "data.h5ad")
    with pytest.raises(DataError) as e:
        D.load_count_data(path, spec())
    assert message(e) == (
        f"{path}: X holds non-integer counts (first: 2.5 at cell 'AAAC-1', gene 'CD3E'); "
        "scVI models need raw counts"
    )


@pytest.mark.parametrize(
    "value, what, shown",
    [(-2.0, "negative counts", "-2"), (np.nan, "non-finite values", "nan"), (np.inf, "non-finite values", "inf")],
)
def test_invalid_values_in_a_layer(value, what, shown):
    adata, dense = make_adata(n=6, g=4)
    bad = dense.astype(np.float64)
    bad[4, 2] = value
    adata.layers["counts"] = sp.csr_matrix(bad)
    with pytest.raises(DataError) as e:
        D.select_counts(adata, "counts", "d.h5ad")
    assert message(e) == (
        f"d.h5ad: layers['counts'] holds {what} (first: {shown} at cell 'cell4', gene 'G2'); scVI models need raw counts"
    )


def test_negative_integer_counts_and_first_offender_in_row_order(monkeypatch):
    monkeypatch.setattr(reading, "_CHUNK", 3)  # the offender is found across chunk boundaries
    adata, dense = make_adata(n=8, g=5)
    bad = dense.astype(np.int32)
    bad[6, 1] = -1
    bad[7, 0] = -5
    adata.X = sp.csr_matrix(bad)
    with pytest.raises(DataError, match=r"X holds negative counts \(first: -1 at cell 'cell6', gene 'G1'\)"):
        D.select_counts(adata, None, "d")


def test_invalid_raw_values_are_named_raw_x():
    adata, dense = make_adata(n=5, g=3)
    raw = dense.astype(np.float32)
    raw[0, 0] = 0.25
    adata.raw = ad.AnnData(X=sp.csr_matrix(raw), obs=adata.obs, var=adata.var)
    with pytest.raises(DataError, match=r"^d: raw.X holds non-integer counts \(first: 0.25 at cell 'cell0', gene 'G0'\)"):
        D.select_counts(adata, "raw", "d")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_matrix(shape):
    adata = ad.AnnData(X=sp.csr_matrix(shape, dtype=np.float32))
    with pytest.raises(DataError, match=rf"^e.h5ad: X is empty \({shape[0]} cells x {shape[1]} genes\)"):
        D.select_counts(adata, None, "e.h5ad")


def test_duplicate_gene_names_are_named():
    adata, _ = make_adata(g=6)
    adata.var_names = ["A", "B", "A", "C", "C", "D"]
    with pytest.raises(DataError) as e:
        D.select_counts(adata, None, "d.h5ad")
    assert message(e) == "d.h5ad: gene names of X are not unique ('A', 'C'); make them unique first"


def test_never_densifies_a_huge_sparse_matrix():
    # Dense, this matrix would take 40 GB: every step must work on the stored values only.
    n, g = 200_000, 50_000
    rows = np.array([5, 5, 17, 199_999])
    cols = np.array([3, 49_999, 0, 7])
    X = sp.csc_matrix((np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32), (rows, cols)), shape=(n, g))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    assert D.select_counts(adata, None, "big").nnz == 4
    wanted = [f"G{j}" for j in (49_999, 7, 3, 0)]
    with pytest.warns(UserWarning, match=f"dropped {n - 3} cells"):
        data = D.count_data_from_anndata(adata, spec(), "big", gene_names=wanted)
    np.testing.assert_array_equal(data.X.toarray(), [[2, 0, 1, 0], [0, 0, 0, 3], [0, 4, 0, 0]])
    assert data.obs_names == ["5", "17", "199999"]


# --------------------------------------------------------------------------------------------
# CountData: zero-count cells, categories, covariates


def test_zero_count_cells_are_dropped_with_a_warning_and_obs_stay_aligned():
    adata, dense = make_adata(n=10, g=6)
    dense[[2, 7, 8]] = 0
    adata.X = sp.csr_matrix(dense.astype(np.float32))
    adata.obs["batch"] = [f"b{i}" for i in range(10)]  # one batch per cell: alignment is visible
    with pytest.warns(UserWarning, match=r"^d.h5ad: dropped 3 cells with zero total counts$"):
        data = D.count_data_from_anndata(adata, spec(batch_key="batch"), "d.h5ad")
    keep = [0, 1, 3, 4, 5, 6, 9]
    assert data.obs_names == [f"cell{i}" for i in keep]
    np.testing.assert_array_equal(data.kept_cells, np.isin(np.arange(10), keep))
    np.testing.assert_array_equal(data.X.toarray(), dense[keep])
    assert data.categories["batch"] == [f"b{i}" for i in keep]  # categories of kept cells only
    np.testing.assert_array_equal(data.batch_codes, np.arange(7))


def test_all_cells_zero_is_an_error():
    adata, dense = make_adata(n=4, g=3)
    adata.X = sp.csr_matrix((4, 3), dtype=np.float32)
    with pytest.raises(DataError, match="^d: all 4 cells have zero total counts in X"):
        D.count_data_from_anndata(adata, spec(), "d")


def test_categories_are_sorted_values_and_codes_int64():
    adata, _ = make_adata()
    data = D.count_data_from_anndata(
        adata, spec(batch_key="batch", labels_key="cell_type", cat=["donor"], cont=["age"]), "d"
    )
    assert data.categories["batch"] == ["b0", "b1", "b2"]
    assert data.categories["labels"] == ["B", "Mono", "NK", "T"]
    assert data.categories["donor"] == ["1", "3", "10"]  # numbers sorted as numbers, as pandas does
    for codes, key, col in ((data.batch_codes, "batch", "batch"), (data.label_codes, "labels", "cell_type")):
        assert codes.dtype == np.int64 and codes.shape == (60,)
        decoded = np.array(data.categories[key])[codes]
        np.testing.assert_array_equal(decoded, adata.obs[col].astype(str).to_numpy())
    assert data.cat_cov_codes.dtype == np.int64 and data.cat_cov_codes.shape == (60, 1)
    np.testing.assert_array_equal(
        np.array(data.categories["donor"])[data.cat_cov_codes[:, 0]], adata.obs["donor"].astype(str).to_numpy()
    )
    assert data.cont_covs.dtype == np.float32 and data.cont_covs.shape == (60, 1)
    np.testing.assert_allclose(data.cont_covs[:, 0], adata.obs["age"].to_numpy(), rtol=1e-6)
    assert (data.n_cells, data.n_genes, data.n_batch, data.n_labels) == (60, 25, 3, 4)
    assert data.n_cats_per_cov == [3]
    assert data.cat_cov_keys == ["donor"] and data.cont_cov_keys == ["age"]
    assert data.source == "d"


def test_unused_categories_of_a_categorical_column_are_not_coded():
    adata, _ = make_adata()
    adata.obs["cell_type"] = pd.Categorical(
        adata.obs["cell_type"].astype(str), categories=["Z_unused", "T", "B", "NK", "Mono"]
    )
    data = D.count_data_from_anndata(adata, spec(labels_key="cell_type"), "d")
    assert data.categories["labels"] == ["B", "Mono", "NK", "T"]


def test_no_keys_give_one_pseudo_category():
    adata, _ = make_adata()
    data = D.count_data_from_anndata(adata, spec(), "d")
    assert data.categories == {"batch": [D.NO_KEY_CATEGORY], "labels": [D.NO_KEY_CATEGORY]}
    assert D.NO_KEY_CATEGORY == "0"
    assert not data.batch_codes.any() and not data.label_codes.any()
    assert data.cat_cov_codes is None and data.cont_covs is None
    assert data.n_batch == 1 and data.n_labels == 1 and data.n_cats_per_cov == []


def test_none_spec_means_defaults():
    adata, dense = make_adata()
    data = D.count_data_from_anndata(adata, None)
    np.testing.assert_array_equal(data.X.toarray(), dense)


def test_missing_obs_key_names_key_file_and_close_matches(tmp_path):
    adata, _ = make_adata()
    path = write(adata, tmp_path / "data.h5ad")
    with pytest.raises(DataError) as e:
        D.load_count_data(path, spec(batch_key="bach"))
    assert message(e) == f"{path}: obs has no column 'bach' (data.batch_key); did you mean 'batch'?"
    with pytest.raises(DataError) as e:
        D.load_count_data(path, spec(cont=["zzz"]))
    assert message(e) == (
        f"{path}: obs has no column 'zzz' (data.continuous_covariate_keys); "
        "available: 'batch', 'cell_type', 'donor', 'age'"
    )


def test_nan_in_categorical_obs_column():
    adata, _ = make_adata()
    cell_type = adata.obs["cell_type"].astype(object)
    cell_type.iloc[[3, 9]] = np.nan
    adata.obs["cell_type"] = cell_type
    with pytest.raises(DataError) as e:
        D.count_data_from_anndata(adata, spec(labels_key="cell_type"), "d.h5ad")
    assert message(e) == "d.h5ad: obs['cell_type'] has 2 missing (NaN) values; fill or drop those cells"


def test_continuous_covariate_must_be_finite_and_numeric():
    adata, _ = make_adata()
    adata.obs.loc["cell4", "age"] = np.inf
    with pytest.raises(DataError, match=r"^d: obs\['age'\] has 1 missing or non-finite values$"):
        D.count_data_from_anndata(adata, spec(cont=["age"]), "d")
    with pytest.raises(DataError, match=r"^d: obs\['batch'\] is not numeric"):
        D.count_data_from_anndata(adata, spec(cont=["batch"]), "d")


def test_reserved_and_repeated_covariate_keys_are_spec_errors():
    adata, _ = make_adata()
    with pytest.raises(SpecError, match="may not hold 'batch'"):
        D.count_data_from_anndata(adata, spec(cat=["batch"]), "d")
    with pytest.raises(SpecError, match="lists 'donor' more than once"):
        D.count_data_from_anndata(adata, spec(cat=["donor", "donor"]), "d")


def test_load_count_data_equals_in_memory(tmp_path):
    adata, _ = make_adata()
    path = write(adata, tmp_path / "d.h5ad")
    s = spec(batch_key="batch", labels_key="cell_type")
    a = D.load_count_data(path, s)
    b = D.count_data_from_anndata(adata, s, path)
    assert a.source == b.source == path
    assert (a.X != b.X).nnz == 0 and a.obs_names == b.obs_names and a.categories == b.categories
    backed = D.count_data_from_anndata(D.read_h5ad(path, backed=True), s, path)
    assert (backed.X != a.X).nnz == 0


def test_pbmc_small_file():
    data = D.load_count_data(PBMC, spec(batch_key="batch", labels_key="cell_type", cat=["letter.idents"]))
    assert (data.n_cells, data.n_genes) == (80, 230)
    assert data.categories["batch"] == ["g1", "g2"]
    obs = ad.read_h5ad(PBMC).obs
    np.testing.assert_array_equal(np.array(data.categories["labels"])[data.label_codes], obs["cell_type"].astype(str))
    # nCount_RNA is Seurat's total count per cell: an independent check of the counts read
    np.testing.assert_array_equal(np.asarray(data.X.sum(axis=1)).ravel(), obs["nCount_RNA"].to_numpy())


# --------------------------------------------------------------------------------------------
# A trained model's categories and genes


def test_query_is_coded_with_the_training_categories():
    adata, _ = make_adata(seed=1)
    adata.obs["batch"] = np.where(np.arange(60) % 2, "b2", "b0")  # b1 absent from the query
    training = {"batch": ["b0", "b1", "b2"], "labels": ["B", "Mono", "NK", "T", "X"], "donor": ["1", "10", "3"]}
    data = D.count_data_from_anndata(
        adata, spec(batch_key="batch", labels_key="cell_type", cat=["donor"]), "q", categories=training
    )
    assert data.categories == training
    np.testing.assert_array_equal(data.batch_codes, np.where(np.arange(60) % 2, 2, 0))
    expected_labels = [training["labels"].index(v) for v in adata.obs["cell_type"].astype(str)]
    np.testing.assert_array_equal(data.label_codes, expected_labels)
    assert data.n_batch == 3 and data.n_labels == 5


def test_unknown_query_categories_are_named():
    adata, _ = make_adata()
    adata.obs["batch"] = ["plate9", "b0", "plate10"] * 20
    with pytest.raises(DataError) as e:
        D.count_data_from_anndata(
            adata, spec(batch_key="batch"), "query.h5ad", categories={"batch": ["b0", "b1"], "labels": ["0"]}
        )
    assert message(e) == "query.h5ad: obs['batch'] has categories not seen in training: 'plate9', 'plate10'"


def test_query_without_the_key_of_a_multi_batch_model():
    adata, _ = make_adata()
    with pytest.raises(DataError, match="trained with 2 batch categories but data.batch_key is not set"):
        D.count_data_from_anndata(adata, spec(), "q", categories={"batch": ["a", "b"], "labels": ["0"]})
    # a model trained without a key accepts a query without one
    data = D.count_data_from_anndata(adata, spec(), "q", categories={"batch": ["0"], "labels": ["0"]})
    assert not data.batch_codes.any()


def test_query_covariate_unknown_to_the_model():
    adata, _ = make_adata()
    with pytest.raises(DataError, match="model has no categories for 'donor'"):
        D.count_data_from_anndata(adata, spec(cat=["donor"]), "q", categories={"batch": ["0"], "labels": ["0"]})


def test_genes_are_matched_by_name_in_the_model_order():
    adata, dense = make_adata(g=12)
    reference = [f"G{j}" for j in (7, 2, 11, 0, 5)]  # the model's genes; the query has 7 extra
    data = D.count_data_from_anndata(adata, spec(), "q", gene_names=reference)
    assert data.gene_names == reference
    np.testing.assert_array_equal(data.X.toarray(), dense[:, [7, 2, 11, 0, 5]])
    assert data.X.has_sorted_indices
    # same genes, same order: the matrix is taken as it is
    same = D.count_data_from_anndata(adata, spec(), "q", gene_names=list(adata.var_names))
    np.testing.assert_array_equal(same.X.toarray(), dense)


def test_missing_genes_are_an_error_listing_up_to_ten():
    adata, _ = make_adata(g=5)
    reference = ["G0"] + [f"NEW{i}" for i in range(12)] + ["G1"]
    with pytest.raises(DataError) as e:
        D.count_data_from_anndata(adata, spec(), "query.h5ad", gene_names=reference)
    shown = ", ".join(repr(f"NEW{i}") for i in range(10))
    assert message(e) == (
        f"query.h5ad: 12 of the model's 14 genes are missing from X: {shown}, ... (12 in all); "
        "allow missing genes to fill them with zeros"
    )


def test_allow_missing_genes_fills_zero_columns_with_a_warning():
    adata, dense = make_adata(g=6)
    reference = ["G4", "NEW1", "G0", "NEW2", "G5"]
    with pytest.warns(UserWarning, match=r"^q: 2 of the model's 5 genes are missing; filled with zeros$"):
        data = D.count_data_from_anndata(adata, spec(), "q", gene_names=reference, allow_missing_genes=True)
    zero = np.zeros((60, 1))
    expected = np.hstack([dense[:, [4]], zero, dense[:, [0]], zero, dense[:, [5]]])
    np.testing.assert_array_equal(data.X.toarray(), expected)
    assert data.gene_names == reference


def test_no_model_gene_in_the_query():
    adata, _ = make_adata(g=4)
    with pytest.raises(DataError, match="^q: none of the model's 2 genes are in X"):
        D.count_data_from_anndata(adata, spec(), "q", gene_names=["X1", "X2"], allow_missing_genes=True)


def test_duplicate_genes_matter_only_among_the_model_genes():
    adata, dense = make_adata(g=5)
    adata.var_names = ["A", "B", "dup", "dup", "C"]
    data = D.count_data_from_anndata(adata, spec(), "q", gene_names=["C", "A"])
    np.testing.assert_array_equal(data.X.toarray(), dense[:, [4, 0]])
    with pytest.raises(DataError, match="^q: gene names of X are not unique \\('dup'\\)"):
        D.count_data_from_anndata(adata, spec(), "q", gene_names=["dup", "A"])


def test_zero_count_cells_are_judged_on_the_model_genes():
    adata, dense = make_adata(n=6, g=4)
    dense[:, 1] = 0
    dense[2] = [5, 0, 0, 0]  # nothing in the model's genes G1, G3
    dense[[0, 1, 3, 4, 5], 3] += 1
    adata.X = sp.csr_matrix(dense.astype(np.float32))
    with pytest.warns(UserWarning, match="dropped 1 cells"):
        data = D.count_data_from_anndata(adata, spec(), "q", gene_names=["G3", "G1"])
    assert "cell2" not in data.obs_names and data.n_cells == 5


# --------------------------------------------------------------------------------------------
# Library size priors


def test_library_log_priors_match_numpy():
    adata, dense = make_adata(n=200, g=30, seed=3)
    data = D.count_data_from_anndata(adata, spec(batch_key="batch"), "d")
    means, variances = D.library_log_priors(data.X, data.batch_codes, data.n_batch)
    assert means.shape == variances.shape == (1, 3) and means.dtype == variances.dtype == np.float32
    log_lib = np.log(dense.sum(axis=1))
    for b, name in enumerate(["b0", "b1", "b2"]):
        cells = adata.obs["batch"].to_numpy() == name
        assert means[0, b] == pytest.approx(log_lib[cells].mean(), rel=1e-6)
        assert variances[0, b] == pytest.approx(log_lib[cells].var(ddof=0), rel=1e-5)


def test_library_log_priors_empty_batch_is_an_error():
    X = sp.csr_matrix(np.array([[1, 2], [3, 0], [0, 4]], dtype=np.float32))
    with pytest.raises(DataError, match="batch code\\(s\\) 1 have no cells"):
        D.library_log_priors(X, np.array([0, 2, 2]), 3)


def test_row_sums_with_empty_rows():
    dense = np.array([[0, 0, 0], [1, 0, 2], [0, 0, 0], [0, 5, 0], [0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(D.row_sums(sp.csr_matrix(dense)), dense.sum(axis=1))
    assert D.row_sums(sp.csr_matrix(dense)).dtype == np.float64
    np.testing.assert_array_equal(D.row_sums(sp.csr_matrix(dense.astype(np.int64))), dense.sum(axis=1))


def test_row_sums_exact_for_large_integer_counts():
    rng = np.random.default_rng(0)
    X = sp.random(50, 3000, density=0.5, format="csr", dtype=np.float32, random_state=1)
    X.data = rng.integers(1, 10_000, X.nnz).astype(np.float32)  # totals ~7.5M per cell
    exact = np.array([int(X.data[X.indptr[i] : X.indptr[i + 1]].astype(np.int64).sum()) for i in range(50)])
    assert exact.max() > 2**22
    np.testing.assert_array_equal(D.row_sums(X), exact.astype(np.float64))


# --------------------------------------------------------------------------------------------
# Train / validation split


def test_split_sizes_of_scvi_tools():
    train, val = D.train_validation_split(4271, 0.9, 128, seed=0)
    assert (len(train), len(val)) == (3844, 427)  # ceil(0.9 * 4271) = 3844, 3844 % 128 = 4
    assert train.dtype == val.dtype == np.int64


@pytest.mark.parametrize(
    "n_cells, train_size, n_train",
    [(144, 0.9, 128), (130, 1.0, 128), (129, 1.0, 128), (131, 1.0, 131), (80, 1.0, 80), (10, 0.7, 7)],
)
def test_split_moves_a_last_minibatch_of_one_or_two_cells_to_validation(n_cells, train_size, n_train):
    train, val = D.train_validation_split(n_cells, train_size, 128, seed=1)
    assert len(train) == n_train and len(val) == n_cells - n_train


def test_split_is_deterministic_disjoint_and_covering():
    a = D.train_validation_split(1000, 0.8, 64, seed=7)
    b = D.train_validation_split(1000, 0.8, 64, seed=7)
    c = D.train_validation_split(1000, 0.8, 64, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    train, val = a
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    # validation is the start of the seeded permutation
    expected_val = np.sort(np.random.default_rng(7).permutation(1000)[: len(val)])
    np.testing.assert_array_equal(val, expected_val)


def test_split_errors():
    with pytest.raises(DataError, match="leave no training cells"):
        D.train_validation_split(2, 1.0, 128, seed=0)
    with pytest.raises(SpecError, match="train.train_size"):
        D.train_validation_split(100, 1.5, 128, seed=0)
    with pytest.raises(SpecError, match="train.train_size"):
        D.train_validation_split(100, 0.0, 128, seed=0)


# --------------------------------------------------------------------------------------------
# Minibatches


@pytest.fixture
def covariate_data():
    adata, dense = make_adata(n=101, g=17, seed=5)
    data = D.count_data_from_anndata(
        adata, spec(batch_key="batch", labels_key="cell_type", cat=["donor", "cell_type"], cont=["age"]), "d"
    )
    return data, dense


def test_minibatches_cover_each_index_once_per_epoch(covariate_data):
    data, _ = covariate_data
    train, _ = D.train_validation_split(data.n_cells, 0.9, 16, seed=0)
    source = D.CSRMinibatches(data, train, 16, shuffle=True, seed=3)
    assert isinstance(source, D.MinibatchSource)
    assert len(source) == math.ceil(len(train) / 16)
    for epoch in range(3):
        source.set_epoch(epoch)
        seen = np.concatenate([mb_rows(data, mb) for mb in source])
        assert len(list(source)) == len(source)
        np.testing.assert_array_equal(np.sort(seen), train)


def mb_rows(data: D.CountData, mb: Minibatch) -> np.ndarray:
    """Which cells a minibatch holds, recovered from its counts (rows are distinct here)."""
    dense = data.X.toarray()
    return np.array([int(np.flatnonzero((dense == row).all(axis=1))[0]) for row in mb.x.numpy()])


def epoch_orders(source, epoch):
    source.set_epoch(epoch)
    return [mb.x.clone() for mb in source]


def test_shuffle_depends_on_seed_and_epoch_only(covariate_data):
    data, _ = covariate_data
    idx = np.arange(data.n_cells)
    a = D.CSRMinibatches(data, idx, 10, shuffle=True, seed=11)
    resumed = D.CSRMinibatches(data, idx, 10, shuffle=True, seed=11)
    e0, e1 = epoch_orders(a, 0), epoch_orders(a, 1)
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1))  # a new order each epoch
    # a fresh source set to epoch 1 (a resumed run) gives exactly epoch 1's minibatches
    for x, y in zip(e1, epoch_orders(resumed, 1)):
        assert torch.equal(x, y)
    other_seed = D.CSRMinibatches(data, idx, 10, shuffle=True, seed=12)
    assert not all(torch.equal(x, y) for x, y in zip(e0, epoch_orders(other_seed, 0)))


def test_minibatch_values_equal_the_dense_rows(covariate_data):
    data, dense = covariate_data
    source = D.CSRMinibatches(data, np.arange(data.n_cells), 32, shuffle=True, seed=0)
    source.set_epoch(4)
    order = np.arange(data.n_cells)[D.epoch_order(data.n_cells, 0, 4)]
    for b, mb in enumerate(source):
        rows = order[b * 32 : (b + 1) * 32]
        assert mb.x.dtype == torch.float32 and mb.x.shape == (len(rows), 17)
        np.testing.assert_array_equal(mb.x.numpy(), dense[rows])
        assert mb.batch_index.dtype == torch.int64 and mb.batch_index.shape == (len(rows), 1)
        np.testing.assert_array_equal(mb.batch_index[:, 0].numpy(), data.batch_codes[rows])
        assert mb.labels.dtype == torch.int64 and mb.labels.shape == (len(rows), 1)
        np.testing.assert_array_equal(mb.labels[:, 0].numpy(), data.label_codes[rows])
        assert mb.cat_covs.dtype == torch.int64 and mb.cat_covs.shape == (len(rows), 2)
        np.testing.assert_array_equal(mb.cat_covs.numpy(), data.cat_cov_codes[rows])
        assert mb.cont_covs.dtype == torch.float32 and mb.cont_covs.shape == (len(rows), 1)
        np.testing.assert_array_equal(mb.cont_covs.numpy(), data.cont_covs[rows])


def test_drop_last_and_no_covariates():
    adata, dense = make_adata(n=50, g=8)
    data = D.count_data_from_anndata(adata, spec(), "d")
    source = D.CSRMinibatches(data, np.arange(50), 16, shuffle=False, drop_last=True)
    batches = list(source)
    assert len(source) == len(batches) == 3 and all(len(mb) == 16 for mb in batches)
    assert batches[0].cat_covs is None and batches[0].cont_covs is None
    assert not batches[0].batch_index.any()
    np.testing.assert_array_equal(torch.cat([mb.x for mb in batches]).numpy(), dense[:48])
    assert len(D.CSRMinibatches(data, np.array([], dtype=np.int64), 16, shuffle=True)) == 0


def test_iterate_in_order_covers_all_cells_in_order():
    adata, dense = make_adata(n=45, g=9)
    data = D.count_data_from_anndata(adata, spec(), "d")
    batches = list(D.iterate_in_order(data, 20))
    assert [len(mb) for mb in batches] == [20, 20, 5]
    np.testing.assert_array_equal(torch.cat([mb.x for mb in batches]).numpy(), dense)
    subset = np.array([40, 3, 17])
    (only,) = list(D.iterate_in_order(data, 20, subset))
    np.testing.assert_array_equal(only.x.numpy(), dense[subset])


def test_both_gathers_equal_scipy_including_empty_and_repeated_rows():
    rng = np.random.default_rng(0)
    dense = sp.random(300, 40, density=0.1, dtype=np.float32, random_state=1).toarray()
    dense[[5, 6]] = 0
    X = sp.csr_matrix(dense)
    rows = np.concatenate([[5, 6, 5, 299, 0], rng.integers(0, 300, 120)]).astype(np.int64)
    expected = X[rows].toarray()
    for gather in (sources._gather_rows_numpy, sources._gather_rows_sparsetools, sources._gather_rows):
        out = gather(X.indptr, X.indices, X.data, 40, rows)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)


def test_minibatch_kernels_take_one_index_dtype_without_widening_the_indices():
    X = sp.random(30, 8, density=0.3, format="csr", dtype=np.float32, random_state=2)
    mixed = sp.csr_matrix((X.data, X.indices.astype(np.int32), X.indptr.astype(np.int64)), shape=X.shape)
    indptr, indices = sources.one_index_dtype(mixed)
    assert indptr.dtype == indices.dtype == np.int32 and indices is mixed.indices  # no copy of the indices
    np.testing.assert_array_equal(indptr, X.indptr)
    rows = np.array([3, 0, 29, 3])
    expected = X[rows].toarray()
    for layout in ("dense", "sparse"):
        data = D.CountData(X=mixed, obs_names=[str(i) for i in range(30)], gene_names=list("abcdefgh"),
                           batch_codes=np.zeros(30, dtype=np.int64), label_codes=np.zeros(30, dtype=np.int64),
                           cat_cov_codes=None, cont_covs=None, categories={"batch": ["0"], "labels": ["0"]})
        (batch,) = list(D.CSRMinibatches(data, rows, 4, shuffle=False, layout=layout))
        np.testing.assert_array_equal(batch.x.numpy(), expected)


def test_dropping_empty_cells_in_place_equals_the_copy():
    from scvi_cli.data.counts import _drop_rows_in_place

    rng = np.random.default_rng(4)
    dense = (rng.random((500, 30)) < 0.2) * rng.integers(1, 9, (500, 30))
    dense[rng.choice(500, 40, replace=False)] = 0
    X = sp.csr_matrix(dense.astype(np.float32))
    kept = np.asarray(X.sum(1)).reshape(-1) > 0
    expected = X[kept].toarray()
    data_before = X.data
    out = _drop_rows_in_place(X, kept, block_values=97)  # many small blocks
    np.testing.assert_array_equal(out.toarray(), expected)
    assert np.shares_memory(out.data, data_before)  # the same arrays, compacted: no copy


def test_training_loads_one_copy_of_the_counts(tmp_path):
    """load_count_data (training's loader) converts integer counts and drops empty cells without a
    second copy of the matrix: traced numpy allocations stay well below the matrix's size."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 60_000
    X = sp.random(n, 1_000, density=0.1, format="csr", dtype=np.float32, random_state=1)
    X.data = np.ceil(X.data * 5)
    X = X.astype(np.int32)
    empty = np.zeros(n, dtype=bool)
    empty[rng.choice(n, 500, replace=False)] = True
    X.data[np.repeat(empty, np.diff(X.indptr))] = 0
    X.eliminate_zeros()
    path = tmp_path / "ints.h5ad"
    ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{j}" for j in range(1_000)]),
               obs=pd.DataFrame(index=[f"c{i}" for i in range(n)])).write_h5ad(path)
    matrix_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    tracemalloc.start()
    with pytest.warns(UserWarning, match="dropped 500 cells"):
        data = D.load_count_data(path, None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data.X.dtype == np.float32 and data.n_cells == n - 500
    # reading holds one matrix (and its read buffers); the float32 values are the only other
    # count-sized array; X[kept] would add a whole third one
    assert peak < 1.5 * matrix_bytes + X.data.nbytes, (peak, matrix_bytes)
