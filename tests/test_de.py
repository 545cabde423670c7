"""Differential expression (`scvi-cli de`): statistics by hand, sampling, the command."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scvi_cli.apply import de
from scvi_cli.apply.de import DESettings, change_statistics, estimate_pseudocount, fdr_calls, vanilla_statistics

from conftest import PBMC_SMALL

COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean", "lfc_median",
    "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
    "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
]


def test_change_statistics_by_hand():
    s1 = np.array([[0.5, 0.1], [0.4, 0.2], [0.6, 0.1], [0.5, 0.3]])
    s2 = np.array([[0.25, 0.1], [0.5, 0.1], [0.3, 0.1], [0.1, 0.3]])
    pc = 0.01
    stats = change_statistics(s1, s2, delta=0.5, pseudocount=pc)
    lfc = np.log2(s1 + pc) - np.log2(s2 + pc)
    # gene 0: LFC ~ 0.97, -0.31, 0.98, 2.22: three of four above 0.5, none below -0.5
    assert stats["proba_de"][0] == pytest.approx(0.75)
    # gene 1: 0, 0.95, 0, 0: one above
    assert stats["proba_de"][1] == pytest.approx(0.25)
    np.testing.assert_allclose(stats["proba_not_de"], 1 - stats["proba_de"])
    np.testing.assert_allclose(stats["bayes_factor"], np.log(stats["proba_de"] + 1e-8) - np.log(1 - stats["proba_de"] + 1e-8))
    small = np.log2(s1 + pc * 1e-3) - np.log2(s2 + pc * 1e-3)  # the summary uses a 1000x smaller pseudocount
    np.testing.assert_allclose(stats["lfc_mean"], small.mean(0))
    np.testing.assert_allclose(stats["lfc_median"], [np.sort(small[:, 0])[1:3].mean(), np.sort(small[:, 1])[1:3].mean()])
    np.testing.assert_allclose(stats["lfc_std"], np.sqrt(((small - small.mean(0)) ** 2).mean(0)))
    np.testing.assert_allclose(stats["lfc_min"], small.min(0))
    np.testing.assert_allclose(stats["lfc_max"], small.max(0))
    np.testing.assert_allclose(stats["scale1"], s1.mean(0))
    assert not np.allclose(lfc, small)
    # negative changes count too: swap the groups
    assert change_statistics(s2, s1, 0.5, pc)["proba_de"][0] == pytest.approx(0.75)


def test_vanilla_statistics_by_hand():
    s1 = np.array([[0.5, 0.1], [0.4, 0.2], [0.6, 0.1]])
    s2 = np.array([[0.3, 0.2], [0.5, 0.1], [0.3, 0.3]])
    stats = vanilla_statistics(s1, s2)
    np.testing.assert_allclose(stats["proba_m1"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(stats["bayes_factor"], [np.log(2 / 3 + 1e-8) - np.log(1 / 3 + 1e-8), np.log(1 / 3 + 1e-8) - np.log(2 / 3 + 1e-8)])


def test_pseudocount_estimate_by_hand():
    s1 = np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.5, 0.1]])
    s2 = np.array([[0.3, 0.1, 0.1, 0.2], [0.1, 0.6, 0.1, 0.1]])
    zero1 = np.array([True, False, True, False])  # max scales 0.2 and 0.5: 0.9 quantile 0.47
    zero2 = np.array([False, True, False, False])  # max scale 0.6
    assert estimate_pseudocount(s1, s2, zero1, zero2) == pytest.approx(max(0.2 + 0.9 * 0.3, 0.6) / 4)
    nothing = np.zeros(4, dtype=bool)
    assert estimate_pseudocount(s1, s2, nothing, nothing) == pytest.approx(1e-10)


def test_fdr_calls_take_the_longest_prefix_within_the_target():
    p = np.array([0.99, 0.5, 0.97, 0.9, 0.95])
    # sorted: 0.99 0.97 0.95 0.9 0.5; running mean of 1-p: .01 .02 .03 .0475 .138
    assert fdr_calls(p, 0.05).tolist() == [True, False, True, True, True]
    assert fdr_calls(p, 0.025).tolist() == [True, False, True, False, False]


# --------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from scvi_cli.cli import main
    from scvi_cli.trained_model import load_trained_model

    root = tmp_path_factory.mktemp("de")
    with pytest.raises(SystemExit) as done:
        main(["train", str(PBMC_SMALL), "--out", str(root / "m.ckpt"), "--set", "data.batch_key=batch",
              "--set", "train.max_epochs=5", "-q"])
    assert done.value.code == 0
    model = load_trained_model(root / "m.ckpt")
    _, data = model.load_query(PBMC_SMALL)
    return root / "m.ckpt", model, data


def test_scale_samples_come_from_the_groups_cells(trained):
    _, model, data = trained
    torch.manual_seed(0)
    one = de.scale_samples(model.module, data, np.array([7]), 400, None, np.random.default_rng(0))
    assert one.shape == (400, data.n_genes)
    np.testing.assert_allclose(one.sum(1), 1.0, rtol=1e-4)
    # 401 posterior draws of cell 7 in the pool: their mean is the cell's average px_scale
    from scvi_cli.data.sources import iterate_in_order

    batch = next(iter(iterate_in_order(data, 80, indices=np.array([7]))))
    expected = model.module.sample_scale(batch, None, 3000).numpy()[0]
    np.testing.assert_allclose(one.mean(0), expected, rtol=0.1, atol=2e-4)
    # and of a group: every sample is one of its cells' (each cell's scales differ)
    torch.manual_seed(0)
    cells = np.array([3, 40, 41])
    group = de.scale_samples(model.module, data, cells, 7, None, np.random.default_rng(1))
    assert group.shape == (7, data.n_genes) and np.isfinite(group).all()


def test_sampling_is_seeded(trained):
    _, model, data = trained
    groups = pd.Series(np.where(np.arange(data.n_cells) < 40, "a", "b"))
    run = lambda seed: de.differential_expression(model.module, data, groups, "g", settings=DESettings(n_samples=300, seed=seed))
    a, b, c = run(1), run(1), run(2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["lfc_mean"].equals(c["lfc_mean"])


def test_batch_correction_decodes_each_batch_and_pairs_within_it(trained, monkeypatch):
    """With fixed 'samples' per (group, decoding batch), scale1 is their average over batches
    and the LFC pairs samples decoded as the same batch."""
    _, model, data = trained
    calls = []
    fixed = {  # (first cell, batch code) -> the constant scale of those samples (gene 0; others 1)
        (0, 0): 0.1, (0, 1): 0.4, (40, 0): 0.2, (40, 1): 0.1,
    }

    def fake(module, data, rows, plan, device="cpu"):
        n, first = len(plan.where), int(plan.cells[0])
        calls.append((first, plan.code, n))
        values = np.ones((n, data.n_genes), dtype=np.float32)
        values[:, 0] = fixed[(first, plan.code)]
        return values

    monkeypatch.setattr(de, "decode_samples", fake)
    groups = pd.Series(np.where(np.arange(data.n_cells) < 40, "a", "b"))
    settings = DESettings(n_samples=10, batch_correction=True, pseudocounts=0.0, delta=0.5)
    table = de.differential_expression(model.module, data, groups, "g", group1=["a"], group2="b", settings=settings)
    assert calls == [(0, 0, 5), (0, 1, 5), (40, 0, 5), (40, 1, 5)]  # 10 samples over the model's 2 batches
    row = table.loc[model.checkpoint.gene_names[0]]
    assert row["scale1"] == pytest.approx((0.1 + 0.4) / 2)
    assert row["scale2"] == pytest.approx((0.2 + 0.1) / 2)
    # pairs within a batch: LFC log2(0.1/0.2) = -1 in batch 0, log2(0.4/0.1) = 2 in batch 1
    assert row["lfc_mean"] == pytest.approx(0.5)
    assert row["lfc_min"] == pytest.approx(-1.0) and row["lfc_max"] == pytest.approx(2.0)
    assert row["proba_de"] == pytest.approx(0.5)
    # --transform-batch: only the named batch
    calls.clear()
    settings = DESettings(n_samples=10, batch_correction=True, transform_batch=(1,), pseudocounts=0.0)
    table = de.differential_expression(model.module, data, groups, "g", group1=["a"], group2="b", settings=settings)
    assert calls == [(0, 1, 10), (40, 1, 10)]
    assert table.loc[model.checkpoint.gene_names[0], "scale1"] == pytest.approx(0.4)


# --------------------------------------------------------------------------------------------
# The command


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "h5ad"])
def test_de_command_each_format(run_cli, trained, tmp_path, ext):
    ckpt, model, data = trained
    out = tmp_path / f"de.{ext}"
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--out", out, "--n-samples", "200")
    assert code == 0, err
    if ext == "csv":
        table = pd.read_csv(out, index_col=0)
    elif ext == "tsv":
        table = pd.read_csv(out, sep="\t", index_col=0)
    elif ext == "parquet":
        table = pd.read_parquet(out).set_index("gene")
    else:  # obs names must be unique: genes (once per comparison) are a column there
        table = ad.read_h5ad(out).obs.set_index("gene")
    assert list(table.columns) == COLUMNS
    assert list(table["comparison"].unique()) == ["A vs Rest", "B vs Rest"]
    assert len(table) == 2 * data.n_genes
    for _, part in table.groupby("comparison", sort=False):
        assert part["proba_de"].is_monotonic_decreasing
    # raw statistics by hand for group A against the rest
    adata = ad.read_h5ad(PBMC_SMALL)
    X = adata.X.toarray()
    in_a = (adata.obs["cell_type"] == "A").to_numpy()
    part = table[table["comparison"] == "A vs Rest"].loc[adata.var_names]
    np.testing.assert_allclose(part["raw_mean1"], X[in_a].mean(0), rtol=1e-6)
    np.testing.assert_allclose(part["raw_mean2"], X[~in_a].mean(0), rtol=1e-6)
    np.testing.assert_allclose(part["non_zeros_proportion2"], (X[~in_a] > 0).mean(0), rtol=1e-6)
    normalized = X / X.sum(1, keepdims=True) * 1e4
    np.testing.assert_allclose(part["raw_normalized_mean1"], normalized[in_a].mean(0), rtol=1e-5)


def test_de_pairwise_vanilla_and_deterministic(run_cli, trained, tmp_path):
    ckpt, _, data = trained
    args = ("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--group1", "B", "--group2", "A", "--n-samples", "100", "-q")
    assert run_cli(*args, "--out", tmp_path / "a.csv")[0] == 0
    assert run_cli(*args, "--out", tmp_path / "b.csv")[0] == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    table = pd.read_csv(tmp_path / "a.csv")
    assert set(table["comparison"]) == {"B vs A"} and len(table) == data.n_genes
    assert run_cli(*args, "--group1", "B", "--out", tmp_path / "twice.csv")[0] == 0  # B named twice: once
    assert len(pd.read_csv(tmp_path / "twice.csv")) == data.n_genes
    assert run_cli(*args, "--out", tmp_path / "v.csv", "--mode", "vanilla")[0] == 0
    vanilla = pd.read_csv(tmp_path / "v.csv")
    assert list(vanilla.columns[1:6]) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
    assert vanilla["bayes_factor"].is_monotonic_decreasing


def test_de_bad_inputs(run_cli, trained, tmp_path):
    ckpt, _, _ = trained
    out = tmp_path / "de.csv"
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "celltype", "--out", out)
    assert code == 1 and "obs has no column 'celltype' (--groupby); did you mean 'cell_type'?" in err
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--group1", "C", "--out", out)
    assert code == 1 and "no cells of group 'C'" in err
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--min-cells", "60", "--out", out)
    assert code == 1 and "fewer than --min-cells 60" in err
    adata = ad.read_h5ad(PBMC_SMALL)[:, 3:].copy()
    adata.write_h5ad(tmp_path / "fewer_genes.h5ad")
    code, _, err = run_cli("de", ckpt, tmp_path / "fewer_genes.h5ad", "--groupby", "cell_type", "--out", out)
    assert code == 1 and "missing" in err
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--transform-batch", "g1", "--out", out)
    assert code == 2 and "--batch-correction" in err
    code, _, err = run_cli("de", ckpt, PBMC_SMALL, "--groupby", "cell_type", "--mode", "bayes", "--out", out)
    assert code == 2 and "--mode bayes" in err
    one = ad.read_h5ad(PBMC_SMALL)
    one.obs["sample"] = "s1"
    one.write_h5ad(tmp_path / "one_group.h5ad")
    code, _, err = run_cli("de", ckpt, tmp_path / "one_group.h5ad", "--groupby", "sample", "--group2", "s1", "--out", out)
    assert code == 1 and "has a single group ('s1'); nothing to compare" in err
    assert not out.exists() and not list(tmp_path.glob(".*de.csv*"))


def test_backed_de_reads_the_sampled_cells_once_and_equals_in_memory(trained, monkeypatch):
    from scvi_cli.data import backed as B

    _, model, data = trained
    _, on_disk = model.load_query(PBMC_SMALL, backed=True)
    assert on_disk.backed
    reads = []
    original = B.BackedRows.read_into_memory
    monkeypatch.setattr(B.BackedRows, "read_into_memory", lambda self, cells: reads.append(len(cells)) or original(self, cells))
    groups = pd.Series(np.array(["a", "b", "c", "d"])[np.arange(data.n_cells) % 4])
    run = lambda d: de.differential_expression(model.module, d, groups, "g", settings=DESettings(n_samples=60, seed=4))
    memory, backed = run(data), run(on_disk)
    assert len(reads) == 1 and reads[0] <= data.n_cells  # four one-vs-rest comparisons, one read
    pd.testing.assert_frame_equal(memory, backed)
