"""CSR minibatches inside the models (sparse first layer, fused likelihood on the stored nonzeros):
the same losses, gradients and queries as dense ones (the plain path they replace), and the
minibatch sources' layouts agree."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_cli import data as D
from scvi_cli.data import sources
from scvi_cli.apply import queries
from scvi_cli.device import count_layout
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models import LDVAE, VAE, VAEC
from scvi_cli.nn.sparse_input import SparseRows, is_column_major

from test_models import library_priors, synthetic_counts


def _sparse_twin(batch: Minibatch) -> Minibatch:
    """The same minibatch with CSR rows only (x made from them on demand)."""
    rows = SparseRows.from_dense(batch.x)
    return Minibatch(None, batch.batch_index, batch.labels, batch.cat_covs, batch.cont_covs, rows=rows)


def _models(batch: Minibatch):
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    G = batch.x.shape[1]
    return {
        "vae": VAE(G, n_batch=2, n_labels=3, use_observed_lib_size=True),
        "vae_covariates_latent_library": VAE(
            G, 2, n_labels=3, dispersion="gene-batch", latent_distribution="ln", use_observed_lib_size=False,
            library_log_means=means, library_log_vars=variances, n_continuous_cov=2, n_cats_per_cov=[3, 3],
            encode_covariates=True,
        ),
        "vae_no_log1p_poisson": VAE(
            G, n_batch=2, log_variational=False, reconstruction_loss="poisson", library_log_means=means, library_log_vars=variances
        ),
        "ldvae": LDVAE(G, n_batch=2, n_layers_encoder=2, library_log_means=means, library_log_vars=variances),
        "vaec": VAEC(G, 3, n_batch=2),
    }


@pytest.mark.parametrize("name", ["vae", "vae_covariates_latent_library", "vae_no_log1p_poisson", "ldvae", "vaec"])
def test_loss_and_gradients_equal_the_dense_path(name):
    dense = synthetic_counts(n_cells=64, n_genes=50)
    sparse = _sparse_twin(dense)
    results = []
    for batch in (dense, sparse):
        torch.manual_seed(0)
        model = _models(dense)[name]
        model.train()
        torch.manual_seed(1)  # the same dropout masks and posterior draws for both
        out = model.loss_for(batch, kl_weight=0.7)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.reconstruction_loss, a.reconstruction_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.kl_local, a.kl_local, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("Layer 0.0" in k for k in grads_a)
    for key in grads_a:
        # float32 sums in another order: absolute noise grows with the gradient's own size
        atol = 1e-6 * max(10.0, float(grads_a[key].abs().max()))
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["vae", "vae_covariates_latent_library", "vaec"])
def test_queries_equal_the_dense_path(name):
    dense = synthetic_counts(n_cells=40, n_genes=30)
    sparse = _sparse_twin(dense)
    torch.manual_seed(0)
    model = _models(dense)[name].eval()
    torch.manual_seed(2)  # the logistic normal's mean is a Monte Carlo average
    a = model.latent(dense)
    torch.manual_seed(2)
    torch.testing.assert_close(model.latent(sparse), a, rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    a = model.sample_scale(dense, n_samples=2)
    torch.manual_seed(3)
    b = model.sample_scale(sparse, n_samples=2)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.manual_seed(4)
    a = model.marginal_ll(dense, 5)
    torch.manual_seed(4)
    b = model.marginal_ll(sparse, 5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)


def test_encoder_first_layers_are_column_major_and_load_state_dicts():
    model = VAE(30, n_batch=2, use_observed_lib_size=False, library_log_means=np.zeros((1, 2)), library_log_vars=np.ones((1, 2)))
    first = [m for k, m in model.named_modules() if k.endswith("encoder.fc_layers.Layer 0.0")]
    assert len(first) == 2 and all(is_column_major(m.weight) for m in first)
    torch.manual_seed(5)
    other = VAE(30, n_batch=2, use_observed_lib_size=False, library_log_means=np.zeros((1, 2)), library_log_vars=np.ones((1, 2)))
    model.load_state_dict(other.state_dict())
    assert all(is_column_major(m.weight) for m in first)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_minibatch_densifies_rows_on_first_use_only():
    x = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    rows = SparseRows.from_dense(x)
    batch = Minibatch(rows=rows)
    assert batch._x is None and batch.counts is rows and len(batch) == 2
    assert torch.equal(batch.x, x) and batch.x is batch.x
    assert torch.equal(batch.batch_index, torch.zeros(2, 1, dtype=torch.int64))
    moved = batch.to("cpu")
    assert moved.rows is not None and torch.equal(moved.x, x)
    dense_only = Minibatch(x=x)
    assert dense_only.counts is x
    with pytest.raises(ValueError, match="needs its counts"):
        Minibatch()


def _count_data(n=120, g=25, seed=0):
    rng = np.random.default_rng(seed)
    dense = np.ceil(sp.random(n, g, density=0.2, dtype=np.float32, random_state=seed).toarray() * 10)
    dense[np.arange(n), rng.integers(0, g, n)] = 3.0  # every cell has counts
    X = sp.csr_matrix(dense)
    return D.CountData(
        X=X, obs_names=[f"c{i}" for i in range(n)], gene_names=[f"g{i}" for i in range(g)],
        batch_codes=rng.integers(0, 2, n), label_codes=np.zeros(n, dtype=np.int64),
        cat_cov_codes=None, cont_covs=None, categories={"batch": ["a", "b"], "labels": ["x"]},
    )


def test_layouts_give_the_same_counts_in_the_same_order():
    data = _count_data()
    idx = np.arange(data.n_cells)
    sources = {layout: D.CSRMinibatches(data, idx, 32, shuffle=True, seed=2, layout=layout) for layout in D.LAYOUTS}
    for dense, sparse in zip(*(list(sources[layout]) for layout in ("dense", "sparse"))):
        assert dense.rows is None and sparse._x is None
        assert torch.equal(sparse.rows.to_dense(), dense.x)
        assert torch.equal(sparse.batch_index, dense.batch_index)
    with pytest.raises(ValueError, match="layout"):
        D.CSRMinibatches(data, idx, 32, shuffle=False, layout="csc")


def test_row_subset_kernels_agree():
    X = sp.random(200, 30, density=0.1, format="csr", dtype=np.float32, random_state=3)
    rows = np.array([5, 5, 0, 199, 17, 17, 3], dtype=np.int64)
    expected = X[rows]
    for subset in (sources._row_subset_numpy, sources._row_subset_sparsetools):
        indptr, indices, values = subset(X.indptr, X.indices, X.data, rows)
        np.testing.assert_array_equal(indptr, expected.indptr)
        np.testing.assert_array_equal(indices, expected.indices)
        np.testing.assert_array_equal(values, expected.data)
        for densify in (sources._densify_numpy, sources._densify_sparsetools):
            np.testing.assert_array_equal(densify(indptr, indices, values, 30), expected.toarray())


def test_count_layout_by_device():
    assert count_layout(torch.device("cpu")) == "sparse"
    assert count_layout("cpu") == "sparse"
    assert count_layout(torch.device("cuda", 0)) == "dense"
    assert count_layout("cuda:1") == "dense"


def test_query_functions_read_sparse_rows_and_match_dense_latent():
    data = _count_data()
    torch.manual_seed(0)
    model = VAE(data.n_genes, n_batch=2).eval()
    latent = queries.latent_representation(model, data, batch_size=50)
    dense = np.concatenate(
        [model.latent(b).numpy() for b in D.iterate_in_order(data, 50, layout="dense")]
    )
    np.testing.assert_allclose(latent, dense, rtol=1e-5, atol=1e-6)
