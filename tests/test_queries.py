"""Queries against direct computations with the module: latent, normalized expression (gene slices,
transform batches, library sizes, chunking), posterior predictive counts, loadings, VampPrior,
and the AnnData a result is written back into."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.apply import queries
from scvi_cli.data import iterate_in_order
from scvi_cli.errors import DataError, UsageError
from scvi_cli.models import VAE, VAEC
from scvi_cli.nn import DecoderSCVI
from scvi_cli.spec import load_spec
from scvi_cli.trained_model import load_trained_model
from scvi_cli.training.job import train_from_h5ad

PBMC_SMALL = Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"

CONFIGS = {
    "scvi": ["data.batch_key=batch"],
    "ldvae": ["model.type=ldvae", "data.batch_key=batch"],
    "condscvi": ["model.type=condscvi", "data.labels_key=cell_type", "data.batch_key=batch"],
    # every input the network decoder can take, a latent library and the logistic-normal latent
    "scvi_cov": [
        "data.batch_key=batch",
        "model.latent_distribution=ln",
        "model.use_observed_lib_size=false",
        "model.dispersion=gene-batch",
        "data.categorical_covariate_keys=[letter.idents]",
        "data.continuous_covariate_keys=[nCount_RNA]",
    ],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One briefly trained model per kind, with its query data (the training file itself)."""
    root = tmp_path_factory.mktemp("query_models")
    torch.set_num_threads(1)
    result = {}
    for name, overrides in CONFIGS.items():
        spec = load_spec(None, ["train.max_epochs=4", *overrides])
        train_from_h5ad(PBMC_SMALL, spec, root / f"{name}.ckpt", threads=1, device="cpu")
        model = load_trained_model(root / f"{name}.ckpt")
        result[name] = (model, model.load_query(PBMC_SMALL)[1])
    return result


def whole(query):
    """All cells as one minibatch."""
    return next(iter(iterate_in_order(query, query.n_cells)))


def direct_scale(module, batch, transform_batch=None):
    """px_scale and px_rate at the posterior mean, through the module's own inference/generative."""
    with torch.no_grad():
        if isinstance(module, VAEC):
            out = module.inference(batch.x, batch.labels)
            b = batch.batch_index if transform_batch is None else torch.full_like(batch.batch_index, transform_batch)
            gen = module.generative(out["qz_m"], out["library"], batch.labels, b)
        else:
            out = module.encode(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
            library = out["library"] if module.use_observed_lib_size else out["ql_m"]
            z = module.z_encoder.transform(out["qz_m"])
            gen = module.generative(
                z, library, batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels, transform_batch
            )
    return gen["px_scale"].numpy(), gen["px_rate"].numpy()


# ------------------------------------------------------------------------------------- latent


@pytest.mark.parametrize("name", ["scvi", "ldvae", "condscvi"])
def test_latent_mean_is_the_encoder_mean_head(trained, name):
    model, query = trained[name]
    module = model.module
    batch = whole(query)
    with torch.no_grad():
        x = torch.log1p(batch.x)
        cats = (batch.labels,) if name == "condscvi" else ()
        expected = module.z_encoder.mean_encoder(module.z_encoder.encoder(x, *cats)).numpy()
    latent = queries.latent_representation(module, query, batch_size=32)
    assert latent.shape == (80, module.n_latent) and latent.dtype == np.float32
    np.testing.assert_allclose(latent, expected, rtol=1e-5, atol=1e-6)
    # eval mode: no dropout noise, so a second call is bit-identical
    assert np.array_equal(latent, queries.latent_representation(module, query, batch_size=32))


def test_latent_sample_is_seeded_and_spread_around_the_mean(trained):
    model, query = trained["scvi"]
    mean = queries.latent_representation(model.module, query)
    a = queries.latent_representation(model.module, query, sample=True, seed=3)
    b = queries.latent_representation(model.module, query, sample=True, seed=3)
    c = queries.latent_representation(model.module, query, sample=True, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    batch = whole(query)
    with torch.no_grad():
        sd = model.module.encode(batch.x, batch.batch_index)["qz_v"].sqrt().numpy()
    z_scores = (a - mean) / sd
    assert abs(z_scores.mean()) < 0.15 and 0.85 < z_scores.std() < 1.15


def test_logistic_normal_latent_is_the_mean_of_softmax(trained):
    model, query = trained["scvi_cov"]
    latent = queries.latent_representation(model.module, query, seed=0, mc_samples=40000)
    np.testing.assert_allclose(latent.sum(axis=1), 1.0, rtol=1e-5)
    batch = whole(query)
    with torch.no_grad():
        out = model.module.encode(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
    generator = np.random.default_rng(1)
    m, sd = out["qz_m"].numpy().astype(np.float64), out["qz_v"].sqrt().numpy().astype(np.float64)
    draws = m + sd * generator.standard_normal((20000, *m.shape))
    draws = np.exp(draws - draws.max(axis=-1, keepdims=True))
    reference = (draws / draws.sum(axis=-1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(latent, reference, atol=4e-3)
    assert not np.allclose(latent, torch.softmax(out["qz_m"], dim=-1).numpy(), atol=4e-3)  # not softmax(mean)
    default = queries.latent_representation(model.module, query, seed=0)  # 5000 draws
    assert np.array_equal(default, queries.latent_representation(model.module, query, seed=0))
    np.testing.assert_allclose(default, reference, atol=1e-2)


# ------------------------------------------------------------------------- normalized expression


@pytest.mark.parametrize("name", list(CONFIGS))
def test_impute_is_library_size_times_px_scale(trained, name):
    model, query = trained[name]
    scale, rate = direct_scale(model.module, whole(query))
    ours = queries.normalized_expression(model.module, query, batch_size=32)
    np.testing.assert_allclose(ours, scale, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-4)
    ours = queries.normalized_expression(model.module, query, library_size=1e4, batch_size=32)
    np.testing.assert_allclose(ours, 1e4 * scale, rtol=1e-5)
    ours = queries.normalized_expression(model.module, query, library_size="latent", batch_size=32)
    np.testing.assert_allclose(ours, rate, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_impute_is_the_modules_sample_scale_and_sample_rate(trained, name):
    """What the CLI writes is the module's own query, called on the same minibatch and seed."""
    model, query = trained[name]
    module = model.module
    batch = whole(query)
    genes = np.array([229, 3, 150, 0, 64])
    for n_samples, codes in ((0, None), (3, [0, 1])):
        options = dict(transform_batch=codes, n_samples=n_samples, genes=genes, batch_size=80, seed=4, gene_chunk=7)
        torch.manual_seed(4)
        scale = module.sample_scale(batch, codes, n_samples, gene_index=genes, gene_chunk=7).numpy()
        # equal up to float32 rounding: the kernels chosen for a gene chunk vary with the CPU (and
        # an entry of 1e-8 may differ in its last bits: the atol is a millionth of the smallest typical value)
        np.testing.assert_allclose(queries.normalized_expression(module, query, library_size=1e4, **options), scale * 1e4,
                                   rtol=2e-6, atol=1e-12)
        torch.manual_seed(4)
        rate = module.sample_rate(batch, codes, n_samples, gene_index=genes, gene_chunk=7).numpy()
        np.testing.assert_allclose(queries.normalized_expression(module, query, library_size="latent", **options), rate,
                                   rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["scvi", "condscvi", "scvi_cov"])
def test_embed_is_the_modules_latent(trained, name):
    model, query = trained[name]
    module = model.module
    batch = whole(query)
    for sample in (False, True):
        torch.manual_seed(2)
        expected = module.latent(batch, give_mean=not sample, mc_samples=300).numpy()
        ours = queries.latent_representation(module, query, sample=sample, mc_samples=300, batch_size=80, seed=2)
        # the query reads the CSR counts (sparse first layer): float32 rounding apart, the same
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("name", ["scvi", "condscvi"])
def test_latent_library_size_of_observed_library_gives_each_cells_total(trained, name):
    model, query = trained[name]
    expected_counts = queries.normalized_expression(model.module, query, library_size="latent")
    np.testing.assert_allclose(expected_counts.sum(axis=1), np.asarray(query.X.sum(axis=1)).ravel(), rtol=1e-4)


@pytest.mark.parametrize("name", ["scvi", "ldvae", "condscvi", "scvi_cov"])
def test_transform_batch_decodes_as_that_batch(trained, name):
    model, query = trained[name]
    batch = whole(query)
    per_batch = [direct_scale(model.module, batch, transform_batch=b)[0] for b in (0, 1)]
    for b in (0, 1):
        ours = queries.normalized_expression(model.module, query, transform_batch=[b])
        np.testing.assert_allclose(ours, per_batch[b], rtol=1e-5, atol=1e-8)
    assert not np.allclose(per_batch[0], per_batch[1], rtol=1e-3)
    both = queries.normalized_expression(model.module, query, transform_batch=[0, 1])
    np.testing.assert_allclose(both, (per_batch[0] + per_batch[1]) / 2, rtol=1e-5, atol=1e-8)


def test_transform_batch_is_the_decoders_one_hot(trained):
    """By hand: the decoder's first Linear sees [z, one_hot(batch)]."""
    model, query = trained["scvi"]
    module = model.module
    batch = whole(query)
    with torch.no_grad():
        z = module.encode(batch.x, batch.batch_index)["qz_m"]
        block = module.decoder.px_decoder.fc_layers[0]
        h = torch.cat([z, torch.nn.functional.one_hot(torch.ones(80, dtype=torch.long), 2).float()], dim=1)
        for layer in block:
            if layer is not None:
                h = layer(h)
        expected = torch.softmax(module.decoder.px_scale_decoder[0](h), dim=-1).numpy()
    ours = queries.normalized_expression(module, query, transform_batch=[1])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("gene_chunk", [None, 7, 64])
def test_gene_subset_equals_columns_of_the_full_result(trained, name, gene_chunk):
    model, query = trained[name]
    full = queries.normalized_expression(model.module, query, library_size="latent", batch_size=32)
    genes = np.array([229, 3, 150, 0, 64, 65, 7])
    part = queries.normalized_expression(
        model.module, query, library_size="latent", genes=genes, batch_size=32, gene_chunk=gene_chunk
    )
    assert part.shape == (80, 7)
    np.testing.assert_allclose(part, full[:, genes], rtol=1e-5, atol=1e-9)
    if gene_chunk is not None:  # all genes through the chunked normaliser
        chunked = queries.normalized_expression(model.module, query, batch_size=32, gene_chunk=gene_chunk)
        np.testing.assert_allclose(chunked, queries.normalized_expression(model.module, query), rtol=1e-5, atol=1e-9)


def test_softplus_scale_head_needs_no_normaliser(trained):
    model, query = trained["scvi"]
    torch.manual_seed(0)
    module = VAE(230, n_batch=2, n_latent=10, use_observed_lib_size=True, scale_activation="softplus")
    assert isinstance(module.decoder.px_scale_decoder[1], torch.nn.Softplus)
    module.eval()
    expected, _ = direct_scale(module, whole(query))
    ours = queries.normalized_expression(module, query, genes=[5, 1], batch_size=16, gene_chunk=3)
    np.testing.assert_allclose(ours, expected[:, [5, 1]], rtol=1e-6)


def test_impute_in_chunks_equals_one_shot(trained):
    model, query = trained["ldvae"]
    one_shot = queries.normalized_expression(model.module, query, batch_size=1000)
    blocks = list(queries.iter_normalized_expression(model.module, query, batch_size=9))
    assert len(blocks) == queries.n_blocks(query, 9) == 9
    assert [b.shape[0] for b in blocks] == [9] * 8 + [8]
    np.testing.assert_allclose(np.concatenate(blocks), one_shot, rtol=1e-6, atol=1e-9)


def test_posterior_samples_are_seeded_and_average_near_the_mean(trained):
    model, query = trained["scvi"]
    a = queries.normalized_expression(model.module, query, n_samples=5, seed=1)
    assert np.array_equal(a, queries.normalized_expression(model.module, query, n_samples=5, seed=1))
    assert not np.array_equal(a, queries.normalized_expression(model.module, query, n_samples=5, seed=2))
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-4)
    assert np.array_equal(queries.normalized_expression(model.module, query), queries.normalized_expression(model.module, query))
    # the average of many draws estimates E_q[px_scale(z)], here against the module's own draws
    many = queries.normalized_expression(model.module, query, n_samples=300, seed=0)
    batch = whole(query)
    torch.manual_seed(99)
    reference = np.zeros((80, 230))
    with torch.no_grad():
        for _ in range(300):
            out = model.module.encode(batch.x, batch.batch_index)
            reference += model.module.generative(out["z"], out["library"], batch.batch_index)["px_scale"].numpy() / 300
    mean_decode = queries.normalized_expression(model.module, query)
    assert np.abs(many - reference).mean() < 0.2 * np.abs(mean_decode - reference).mean()
    assert np.corrcoef(many.ravel(), reference.ravel())[0, 1] > 0.99


def test_impute_argument_checks(trained):
    model, query = trained["scvi"]
    with pytest.raises(ValueError, match="library_size"):
        next(queries.iter_normalized_expression(model.module, query, library_size=0))
    with pytest.raises(ValueError, match="transform batch code 2"):
        next(queries.iter_normalized_expression(model.module, query, transform_batch=[2]))


# ---------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", ["scvi", "ldvae", "condscvi"])
def test_posterior_predictive_counts(trained, name):
    model, query = trained[name]
    module = model.module
    draws = queries.posterior_predictive_sample(module, query, n_samples=300, seed=0, batch_size=32)
    assert len(draws) == 300
    for draw in draws[:3]:
        assert sp.isspmatrix_csr(draw) and draw.dtype == np.int32 and draw.shape == (80, 230)
        assert draw.data.min() >= 0
    first, second = (queries.posterior_predictive_sample(module, query, n_samples=2, seed=5) for _ in range(2))
    assert all((a != b).nnz == 0 for a, b in zip(first, second))
    assert (first[0] != first[1]).nnz > 0
    totals = np.stack([np.asarray(d.sum(axis=0)).ravel() for d in draws]).astype(np.float64)  # (S, genes)

    # the model mean E_z[E[x | z]] by Monte Carlo over posterior draws of z (and library)
    batch = whole(query)
    torch.manual_seed(123)
    expected = np.zeros((300, 230))
    with torch.no_grad():
        for s in range(300):
            if isinstance(module, VAEC):
                out = module.inference(batch.x, batch.labels)
                px = module.generative(out["z"], out["library"], batch.labels, batch.batch_index)["px"]
            else:
                out = module.encode(batch.x, batch.batch_index)
                px = module.generative(out["z"], out["library"], batch.batch_index)["px"]
            expected[s] = px.mean.numpy().sum(axis=0)
    # per gene, the sampled total over cells agrees with its expectation within Monte Carlo error
    # (both estimates carry error; max |z| over 230 genes of a standard normal is about 3.5)
    error = np.sqrt(totals.var(axis=0) / 300 + expected.var(axis=0) / 300) + 1e-12
    z_scores = (totals.mean(axis=0) - expected.mean(axis=0)) / error
    assert np.abs(z_scores).max() < 5
    np.testing.assert_allclose(totals.mean(axis=0).sum(), expected.mean(axis=0).sum(), rtol=0.03)


def test_sample_transform_batch_changes_the_counts(trained):
    model, query = trained["condscvi"]
    a = queries.posterior_predictive_sample(model.module, query, transform_batch=0, seed=0)[0]
    b = queries.posterior_predictive_sample(model.module, query, transform_batch=1, seed=0)[0]
    assert (a != b).nnz > 0


# ---------------------------------------------------------------------------------- loadings


def test_loadings_equal_the_hand_folded_matrix(trained):
    model, _ = trained["ldvae"]
    module = model.module
    block = module.decoder.factor_regressor.fc_layers[0]
    W = block[0].weight.detach().numpy().astype(np.float64)  # (genes, n_latent + n_batch)
    bn = block[1]
    gamma = bn.weight.detach().numpy()
    sigma = np.sqrt(bn.running_var.numpy() + 1e-3)
    expected = (gamma / sigma)[:, None] * W[:, :10]
    loadings = queries.gene_loadings(module)
    assert loadings.shape == (230, 10)
    np.testing.assert_allclose(loadings, expected, rtol=1e-5, atol=1e-7)


def test_loadings_explain_the_decoders_log_scale(trained):
    """log px_scale(z) - log px_scale(0) = loadings @ z + a per-cell constant (the softmax's)."""
    model, query = trained["ldvae"]
    module = model.module
    loadings = queries.gene_loadings(module).astype(np.float64)
    z = torch.randn(5, 10)
    b = torch.zeros(5, 1, dtype=torch.long)
    with torch.no_grad():
        lib = torch.zeros(5, 1)
        log_z = torch.log(module.generative(z, lib, b)["px_scale"]).double().numpy()
        log_0 = torch.log(module.generative(torch.zeros(5, 10), lib, b)["px_scale"]).double().numpy()
    residual = log_z - log_0 - z.double().numpy() @ loadings.T
    np.testing.assert_allclose(residual - residual.mean(axis=1, keepdims=True), 0, atol=1e-4)


def test_loadings_need_a_linear_decoder(trained):
    with pytest.raises(UsageError, match="no linear decoder"):
        queries.gene_loadings(trained["scvi"][0].module, source="scvi.ckpt")


def test_top_loading_genes():
    loadings = np.array([[0.1, -2.0], [-0.5, 0.3], [0.4, 1.0]])
    top = queries.top_loading_genes(loadings, ["a", "b", "c"], 2)
    assert top == [[("b", -0.5), ("c", 0.4)], [("a", -2.0), ("c", 1.0)]]


# ---------------------------------------------------------------------------------- VampPrior


def test_vamp_prior_summarises_each_labels_posterior(trained):
    model, query = trained["condscvi"]
    module = model.module
    prior = queries.vamp_prior(module, query, p=4, batch_size=16, seed=0)
    assert prior["mean_vprior"].shape == (2, 4, 5) and prior["var_vprior"].shape == (2, 4, 5)
    assert prior["weights_vprior"].shape == (2, 4)
    np.testing.assert_allclose(prior["weights_vprior"].sum(axis=1), 1.0, rtol=1e-6)
    assert list(prior["labels"]) == ["A", "B"] and list(prior["n_cells"]) == [53, 27]
    means, variances = module.latent_distribution_params(whole(query))
    direct = VAEC.get_vamp_prior(means.numpy(), variances.numpy(), query.label_codes, 2, p=4, seed=0)
    for key in ("mean_vprior", "var_vprior", "weights_vprior"):
        np.testing.assert_allclose(prior[key], direct[key], rtol=1e-5, atol=1e-7)
    # the weighted mixture mean of a label equals the mean of its cells' posterior means
    for label in range(2):
        cells = means.numpy()[query.label_codes == label]
        mixture = (prior["weights_vprior"][label][:, None] * prior["mean_vprior"][label]).sum(axis=0)
        np.testing.assert_allclose(mixture, cells.mean(axis=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="condscvi"):
        queries.vamp_prior(trained["scvi"][0].module, query)


# ------------------------------------------------------------------- query data and AnnData


def test_gene_order_of_the_query_does_not_matter(trained, tmp_path):
    model, query = trained["scvi"]
    adata = ad.read_h5ad(PBMC_SMALL)
    order = np.random.default_rng(0).permutation(adata.n_vars)
    shuffled = adata[:, order].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    _, reordered = model.load_query(tmp_path / "shuffled.h5ad")
    assert reordered.gene_names == query.gene_names
    for function in (queries.latent_representation, queries.normalized_expression):
        assert np.array_equal(function(model.module, reordered), function(model.module, query))


def test_missing_genes_and_unknown_batches(trained, tmp_path):
    model, query = trained["scvi"]
    adata = ad.read_h5ad(PBMC_SMALL)
    adata[:, 3:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(DataError, match=r"3 of the model's 230 genes are missing.*'MS4A1'"):
        model.load_query(tmp_path / "fewer.h5ad")
    with pytest.warns(UserWarning, match="3 of the model's 230 genes are missing; filled with zeros"):
        adata_out, fewer = model.load_query(tmp_path / "fewer.h5ad", allow_missing_genes=True)
    assert fewer.X[:, :3].nnz == 0 and queries.normalized_expression(model.module, fewer).shape == (80, 230)
    widened = queries.output_anndata(adata_out, fewer, fewer.gene_names)
    assert list(widened.var_names) == list(query.gene_names)
    assert widened.X[:, :3].nnz == 0
    assert (widened.X[:, 3:] != adata.X[:, 3:]).nnz == 0
    widened.write_h5ad(tmp_path / "widened.h5ad")  # writable as it is

    other = adata.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories({"g2": "g3"})
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(DataError, match="categories not seen in training: 'g3'"):
        model.load_query(tmp_path / "other.h5ad")


def test_output_anndata_drops_zero_count_cells_and_selects_genes(trained, tmp_path):
    model, _ = trained["scvi"]
    adata = ad.read_h5ad(PBMC_SMALL)
    X = adata.X.tolil()
    X[4, :] = 0
    adata.X = X.tocsr()
    adata.layers["counts"] = adata.X.copy()
    adata.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.warns(UserWarning, match="dropped 1 cells"):
        loaded, query = model.load_query(tmp_path / "zero.h5ad")
    assert query.n_cells == 79 and queries.cells_phrase(query) == "79 cells (1 with zero total counts left out)"
    assert queries.normalized_expression(model.module, query).shape == (79, 230)
    cells = queries.output_anndata(loaded, query)
    assert list(cells.obs_names) == query.obs_names and cells.n_vars == 230
    genes = ["LYZ", "MS4A1"]
    both = queries.output_anndata(loaded, query, genes)
    assert both.shape == (79, 2) and list(both.var_names) == genes
    assert (both.layers["counts"] != loaded[np.flatnonzero(query.kept_cells)][:, genes].X).nnz == 0
    assert queries.output_anndata(adata, model.load_query(PBMC_SMALL)[1]) is adata


def test_argument_parsing(tmp_path):
    categories = {"batch": ["g1", "g2"]}
    assert queries.batch_codes(categories, ["g2", "g1"]) == [1, 0]
    with pytest.raises(UsageError, match=r"'g3': not a batch of the model; its batches are 'g1', 'g2'"):
        queries.batch_codes(categories, ["g3"])
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("# wanted\nCD3E\n\nLYZ\nCD3E\n")
    assert queries.parse_gene_list(str(genes_file)) == ["CD3E", "LYZ"]
    assert queries.parse_gene_list("CD3E, LYZ") == ["CD3E", "LYZ"]
    assert list(queries.gene_indices(["A", "B", "C"], ["C", "A"])) == [2, 0]
    with pytest.raises(UsageError, match="not in the model: 'genes.txt' .not a file either"):
        queries.gene_indices(["A"], ["genes.txt"])
    assert queries.parse_library_size("latent") == "latent" and queries.parse_library_size("1e4") == 1e4
    for bad in ("0", "-1", "nan", "big"):
        with pytest.raises(UsageError, match="--library-size"):
            queries.parse_library_size(bad)
