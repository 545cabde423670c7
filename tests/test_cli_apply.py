"""`scvi-cli embed | impute | loadings | sample | vamp-prior` through the real entry point: every
output format reads back with the right index and shape, values equal the library's, runs repeat
bit for bit, chunked equals one-shot, and bad input fails with one line and the right exit code."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.apply import queries
from scvi_cli.spec import load_spec
from scvi_cli.trained_model import load_trained_model
from scvi_cli.training.job import train_from_h5ad

PBMC_SMALL = Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"
FAST = ["--threads", "1", "--device", "cpu"]
TABLES = [".npy", ".csv", ".tsv", ".parquet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Checkpoints of briefly trained scvi, ldvae and condscvi models."""
    root = tmp_path_factory.mktemp("apply_models")
    paths = {}
    for name, overrides in {
        "scvi": ["data.batch_key=batch"],
        "ldvae": ["model.type=ldvae", "data.batch_key=batch"],
        "condscvi": ["model.type=condscvi", "data.labels_key=cell_type", "data.batch_key=batch"],
    }.items():
        paths[name] = root / f"{name}.ckpt"
        train_from_h5ad(PBMC_SMALL, load_spec(None, ["train.max_epochs=3", *overrides]), paths[name], threads=1, device="cpu")
    torch.set_num_threads(1)
    return paths


@pytest.fixture(scope="module")
def library(ckpt):
    """The library's results for each model, to compare the CLI's files with."""
    models = {name: load_trained_model(path) for name, path in ckpt.items()}
    return {name: (model, model.load_query(PBMC_SMALL)[1]) for name, model in models.items()}


def read_table(path: Path):
    """(index, columns, values) of a table output, read with an ordinary reader of its format."""
    suffix = path.suffix
    if suffix == ".npy":
        return None, None, np.load(path)
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, index_col=0, sep="\t" if suffix == ".tsv" else ",")
    return list(frame.index), list(frame.columns), frame.to_numpy()


# ------------------------------------------------------------------------------------- embed


@pytest.mark.parametrize("fmt", TABLES)
def test_embed_tables(tmp_path, ckpt, library, run_cli, fmt):
    out = tmp_path / f"latent{fmt}"
    code, _, err = run_cli("embed", ckpt["scvi"], PBMC_SMALL, "--out", out, *FAST)
    assert code == 0, err
    assert f"wrote {out}: 80 cells x 10 latent dims" in err
    model, query = library["scvi"]
    index, columns, values = read_table(out)
    assert values.shape == (80, 10)
    if fmt != ".npy":
        assert index == query.obs_names and columns == [f"Z_{i}" for i in range(10)]
    np.testing.assert_allclose(values, queries.latent_representation(model.module, query), rtol=1e-6, atol=1e-7)


def test_embed_h5ad_full_and_minimal(tmp_path, ckpt, library, run_cli):
    model, query = library["condscvi"]
    expected = queries.latent_representation(model.module, query)
    original = ad.read_h5ad(PBMC_SMALL)

    out = tmp_path / "full.h5ad"
    assert run_cli("embed", ckpt["condscvi"], PBMC_SMALL, "--out", out, *FAST)[0] == 0
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.obsm["X_scVI"], expected, rtol=1e-6)
    assert list(back.obs_names) == list(original.obs_names) and list(back.var_names) == list(original.var_names)
    assert (back.X != original.X).nnz == 0 and list(back.obs.columns) == list(original.obs.columns)
    assert back.uns["source"] == original.uns["source"]

    out = tmp_path / "minimal.h5ad"
    code, _, err = run_cli("embed", ckpt["condscvi"], PBMC_SMALL, "--out", out, "--minimal", "--obsm-key", "X_emb", *FAST)
    assert code == 0, err
    back = ad.read_h5ad(out)
    assert list(back.obsm) == ["X_emb"] and back.X.nnz == 0 and not back.layers and dict(back.uns) == {"source": original.uns["source"]}  # plain uns entries pass through
    assert list(back.obs.columns) == list(original.obs.columns)
    np.testing.assert_allclose(back.obsm["X_emb"], expected, rtol=1e-6)


def test_embed_sample_and_determinism(tmp_path, ckpt, run_cli):
    paths = [tmp_path / f"{name}.npy" for name in ("a", "b", "c", "d")]
    for path, extra in zip(paths, ([], [], ["--sample"], ["--sample", "--seed", "1"])):
        assert run_cli("embed", ckpt["scvi"], PBMC_SMALL, "--out", path, *FAST, *extra)[0] == 0
    a, b, c, d = (path.read_bytes() for path in paths)
    assert a == b  # bit-identical across runs
    assert c != a and c != d


# ------------------------------------------------------------------------------------ impute


@pytest.mark.parametrize("fmt", TABLES)
def test_impute_tables(tmp_path, ckpt, library, run_cli, fmt):
    out = tmp_path / f"norm{fmt}"
    code, _, err = run_cli("impute", ckpt["ldvae"], PBMC_SMALL, "--out", out, *FAST)
    assert code == 0, err
    assert f"wrote {out}: 80 cells x 230 genes" in err
    model, query = library["ldvae"]
    index, columns, values = read_table(out)
    assert values.shape == (80, 230)
    if fmt != ".npy":
        assert index == query.obs_names and columns == query.gene_names
    np.testing.assert_allclose(values, queries.normalized_expression(model.module, query), rtol=1e-6, atol=1e-9)


def test_impute_h5ad_layer_with_options(tmp_path, ckpt, library, run_cli):
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("LYZ\nMS4A1\nCD79B\n")
    out = tmp_path / "norm.h5ad"
    args = ["--genes", genes_file, "--library-size", "10000", "--transform-batch", "g1", "--transform-batch", "g2"]
    code, _, err = run_cli("impute", ckpt["scvi"], PBMC_SMALL, "--out", out, "--layer-name", "denoised", *args, *FAST)
    assert code == 0, err
    assert "80 cells x 3 genes (layers['denoised'])" in err
    back = ad.read_h5ad(out)
    original = ad.read_h5ad(PBMC_SMALL)
    assert list(back.var_names) == ["LYZ", "MS4A1", "CD79B"] and list(back.obs_names) == list(original.obs_names)
    assert (back.X != original[:, ["LYZ", "MS4A1", "CD79B"]].X).nnz == 0  # X kept, for these genes
    model, query = library["scvi"]
    genes = queries.gene_indices(query.gene_names, ["LYZ", "MS4A1", "CD79B"])
    expected = queries.normalized_expression(model.module, query, library_size=1e4, transform_batch=[0, 1], genes=genes)
    np.testing.assert_allclose(back.layers["denoised"], expected, rtol=1e-6)


def test_impute_latent_library_and_samples(tmp_path, ckpt, library, run_cli):
    out = tmp_path / "rate.npy"
    args = ["--library-size", "latent", "--n-samples", "3", "--seed", "2", "--genes", "LYZ,CD3E"]
    assert run_cli("impute", ckpt["condscvi"], PBMC_SMALL, "--out", out, *args, *FAST)[0] == 0
    model, query = library["condscvi"]
    genes = queries.gene_indices(query.gene_names, ["LYZ", "CD3E"])
    expected = queries.normalized_expression(model.module, query, library_size="latent", n_samples=3, seed=2, genes=genes)
    np.testing.assert_array_equal(np.load(out), expected)


def test_impute_is_bit_identical_and_chunked_equals_one_shot(tmp_path, ckpt, run_cli):
    runs = {}
    for name, batch_size in (("a", 1000), ("b", 1000), ("chunked", 7)):
        for fmt in (".npy", ".h5ad"):
            out = tmp_path / f"{name}{fmt}"
            assert run_cli("impute", ckpt["scvi"], PBMC_SMALL, "--out", out, "--batch-size", batch_size, *FAST)[0] == 0
            runs[name, fmt] = np.load(out) if fmt == ".npy" else ad.read_h5ad(out).layers["scvi_normalized"]
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert np.array_equal(runs["a", ".h5ad"], runs["b", ".h5ad"])
    assert np.array_equal(runs["a", ".npy"], runs["a", ".h5ad"])
    for fmt in (".npy", ".h5ad"):
        np.testing.assert_allclose(runs["chunked", fmt], runs["a", fmt], rtol=1e-6, atol=1e-10)


def test_gene_order_of_the_query_gives_the_same_results(tmp_path, ckpt, run_cli):
    adata = ad.read_h5ad(PBMC_SMALL)
    shuffled = adata[:, np.random.default_rng(1).permutation(adata.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    for command in ("embed", "impute"):
        outputs = []
        for data in (PBMC_SMALL, tmp_path / "shuffled.h5ad"):
            out = tmp_path / f"{command}-{len(outputs)}.npy"
            assert run_cli(command, ckpt["scvi"], data, "--out", out, *FAST)[0] == 0
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1]


def test_zero_count_cells_are_left_out_of_every_output(tmp_path, ckpt, run_cli):
    adata = ad.read_h5ad(PBMC_SMALL)
    X = adata.X.tolil()
    X[[2, 40], :] = 0
    adata.X = X.tocsr()
    adata.write_h5ad(tmp_path / "zeros.h5ad")
    kept = [name for i, name in enumerate(adata.obs_names) if i not in (2, 40)]
    code, _, err = run_cli("impute", ckpt["scvi"], tmp_path / "zeros.h5ad", "--out", tmp_path / "n.h5ad", *FAST)
    assert code == 0, err
    assert "78 cells (2 with zero total counts left out) x 230 genes" in err
    assert list(ad.read_h5ad(tmp_path / "n.h5ad").obs_names) == kept
    assert run_cli("embed", ckpt["scvi"], tmp_path / "zeros.h5ad", "--out", tmp_path / "e.csv", *FAST)[0] == 0
    assert read_table(tmp_path / "e.csv")[0] == kept


# ---------------------------------------------------------------------------------- loadings


@pytest.mark.parametrize("fmt", [".csv", ".parquet", ".npy"])
def test_loadings(tmp_path, ckpt, library, run_cli, fmt):
    out = tmp_path / f"loadings{fmt}"
    code, stdout, err = run_cli("loadings", ckpt["ldvae"], "--out", out, "--top", "3")
    assert code == 0, err
    assert "230 genes x 10 factors" in err
    model, query = library["ldvae"]
    expected = queries.gene_loadings(model.module)
    index, columns, values = read_table(out)
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-8)
    if fmt != ".npy":
        assert index == query.gene_names and columns == [f"Z_{i}" for i in range(10)]
    lines = stdout.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("Z_0: ")
    strongest = query.gene_names[int(np.argmax(np.abs(expected[:, 0])))]
    assert lines[0].split()[1] == strongest


def test_loadings_of_a_model_without_linear_decoder(tmp_path, ckpt, run_cli):
    code, _, err = run_cli("loadings", ckpt["scvi"], "--out", tmp_path / "l.csv")
    assert code == 2
    assert "holds a scvi model, which has no linear decoder" in err
    assert not (tmp_path / "l.csv").exists()


# ------------------------------------------------------------------------------------ sample


@pytest.mark.parametrize("model", ["scvi", "condscvi"])
def test_sample_h5ad_layers(tmp_path, ckpt, run_cli, model):
    out = tmp_path / "samples.h5ad"
    code, _, err = run_cli("sample", ckpt[model], PBMC_SMALL, "--out", out, "--n-samples", "3", *FAST)
    assert code == 0, err
    assert "layers sample_0..sample_2" in err
    back = ad.read_h5ad(out)
    original = ad.read_h5ad(PBMC_SMALL)
    assert sorted(back.layers) == ["sample_0", "sample_1", "sample_2"]
    assert (back.X != original.X).nnz == 0  # X kept as input
    for name in back.layers:
        layer = back.layers[name]
        assert sp.issparse(layer) and layer.shape == (80, 230) and np.issubdtype(layer.dtype, np.integer)
        assert layer.data.min() >= 0 and layer.nnz > 0
    assert (back.layers["sample_0"] != back.layers["sample_1"]).nnz > 0
    again = tmp_path / "again.h5ad"
    assert run_cli("sample", ckpt[model], PBMC_SMALL, "--out", again, "--n-samples", "3", *FAST)[0] == 0
    assert all((ad.read_h5ad(again).layers[k] != back.layers[k]).nnz == 0 for k in back.layers)


def test_sample_tables_hold_one_sample(tmp_path, ckpt, library, run_cli):
    out = tmp_path / "counts.parquet"
    args = ["--transform-batch", "g2", "--seed", "4"]
    assert run_cli("sample", ckpt["condscvi"], PBMC_SMALL, "--out", out, *args, *FAST)[0] == 0
    index, columns, values = read_table(out)
    model, query = library["condscvi"]
    assert index == query.obs_names and columns == query.gene_names
    expected = queries.posterior_predictive_sample(model.module, query, transform_batch=1, seed=4)[0]
    np.testing.assert_array_equal(values, expected.toarray())
    code, _, err = run_cli("sample", ckpt["scvi"], PBMC_SMALL, "--out", tmp_path / "s.csv", "--n-samples", "2")
    assert code == 2 and "holds one sample" in err


# -------------------------------------------------------------------------------- vamp-prior


def test_vamp_prior(tmp_path, ckpt, library, run_cli):
    out = tmp_path / "vamp.npz"
    code, _, err = run_cli("vamp-prior", ckpt["condscvi"], PBMC_SMALL, "--out", out, "--p", "4", *FAST)
    assert code == 0, err
    assert "2 labels x 4 components x 5 latent dims" in err
    with np.load(out) as saved:  # no pickled objects
        prior = dict(saved)
    model, query = library["condscvi"]
    expected = queries.vamp_prior(model.module, query, p=4)
    assert set(prior) == set(expected)
    for key in ("mean_vprior", "var_vprior", "weights_vprior"):
        np.testing.assert_allclose(prior[key], expected[key], rtol=1e-6)
    assert list(prior["labels"]) == ["A", "B"]
    code, _, err = run_cli("vamp-prior", ckpt["scvi"], PBMC_SMALL, "--out", out)
    assert code == 2 and "needs a condscvi model" in err
    code, _, err = run_cli("vamp-prior", ckpt["condscvi"], PBMC_SMALL, "--out", tmp_path / "v.npy")
    assert code == 2 and ".npz" in err


# ------------------------------------------------------------------------------------ errors


def test_data_that_does_not_fit_the_model(tmp_path, ckpt, run_cli):
    adata = ad.read_h5ad(PBMC_SMALL)
    adata[:, 2:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    out = tmp_path / "x.npy"
    code, _, err = run_cli("embed", ckpt["scvi"], tmp_path / "fewer.h5ad", "--out", out, *FAST)
    assert code == 1 and "2 of the model's 230 genes are missing" in err and "'MS4A1', 'CD79B'" in err
    assert not out.exists()
    code, _, err = run_cli("impute", ckpt["scvi"], tmp_path / "fewer.h5ad", "--out", tmp_path / "f.h5ad", "--allow-missing-genes", *FAST)
    assert code == 0, err
    assert "warning: " in err and "2 of the model's 230 genes are missing; filled with zeros" in err
    back = ad.read_h5ad(tmp_path / "f.h5ad")
    assert back.shape == (80, 230) and back.X[:, :2].nnz == 0

    other = adata.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories({"g2": "lane7"})
    other.write_h5ad(tmp_path / "other.h5ad")
    code, _, err = run_cli("sample", ckpt["scvi"], tmp_path / "other.h5ad", "--out", out, *FAST)
    assert code == 1 and "categories not seen in training: 'lane7'" in err


def test_usage_errors(tmp_path, tmp_path_factory, ckpt, run_cli):
    out = tmp_path / "x.csv"
    own_input = tmp_path_factory.mktemp("inputs") / "in.h5ad"  # a copy: the guard must not be tested on tests/data
    own_input.write_bytes(PBMC_SMALL.read_bytes())
    cases = [
        (["impute", ckpt["scvi"], PBMC_SMALL, "--out", out, "--transform-batch", "g9"], 2, "'g9': not a batch of the model; its batches are 'g1', 'g2'"),
        (["impute", ckpt["scvi"], PBMC_SMALL, "--out", out, "--genes", "CD3E,NOPE"], 2, "not in the model: 'NOPE'"),
        (["impute", ckpt["scvi"], PBMC_SMALL, "--out", out, "--library-size", "lots"], 2, "--library-size 'lots'"),
        (["embed", ckpt["scvi"], PBMC_SMALL, "--out", out, "--minimal"], 2, "--minimal applies to .h5ad outputs only"),
        (["embed", ckpt["scvi"], PBMC_SMALL, "--out", tmp_path / "x.txt"], 2, "unsupported output extension"),
        (["embed", ckpt["scvi"], PBMC_SMALL, "--out", tmp_path / "no" / "x.csv"], 1, "does not exist"),
        (["embed", tmp_path / "missing.ckpt", PBMC_SMALL, "--out", out], 1, "missing.ckpt"),
        (["embed", ckpt["scvi"], own_input, "--out", own_input], 1, "is also the input file"),
        (["impute", ckpt["scvi"], own_input, "--out", own_input], 1, "is also the input file"),
        (["sample", ckpt["scvi"], own_input, "--out", own_input], 1, "is also the input file"),
    ]
    for args, expected_code, message in cases:
        code, _, err = run_cli(*args)
        assert code == expected_code, (args, err)
        assert message in err and err.startswith("scvi-cli: error:"), err
    assert list(tmp_path.iterdir()) == []
