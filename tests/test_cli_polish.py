"""The command line as a new user meets it: --help, shortcuts, hints, pass-through of ids."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import PBMC_SMALL
from scvi_cli.cli import COMMANDS


@pytest.mark.parametrize("name", [name for name, _, _ in COMMANDS])
def test_help_reads_like_a_well_made_cli(run_cli, name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_cli(name, "--help")
    assert code == 0
    assert "<bool>" not in out and "<path>" not in out and "<str>" not in out and "{" not in out.splitlines()[0]
    for flag in ("--quiet", "--help"):
        line = next((l for l in out.splitlines() if flag in l), None)
        if line is not None:
            assert flag + " " in line + " " and "TEXT" not in line and "BOOL" not in line.upper().replace("BOOLEAN", "")
    assert out.splitlines()[0].startswith(f"Usage: scvi-cli {name} [OPTIONS]")


def test_command_listing_shows_whole_first_lines(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_cli("--help")
    assert code == 0
    listing = out[out.index("Commands:"):]
    for name, function, _ in COMMANDS:
        first = function.__doc__.strip().splitlines()[0]
        assert " ".join(first.split()) in " ".join(listing.split()), name
    assert "..." not in listing


def test_train_batch_and_labels_key_shortcuts(run_cli, tmp_path):
    from scvi_cli.checkpoint import load_checkpoint

    out = tmp_path / "m.ckpt"
    code, _, err = run_cli("train", PBMC_SMALL, "--out", out, "--batch-key", "batch", "--labels-key", "cell_type",
                           "--set", "train.max_epochs=1", "-q")
    assert code == 0, err
    data = load_checkpoint(out).spec["data"]
    assert data["batch_key"] == "batch" and data["labels_key"] == "cell_type"
    code, _, err = run_cli("train", PBMC_SMALL, "--out", out, "--batch-key", "batchh", "-q")
    assert code == 1 and "obs has no column 'batchh' (data.batch_key); did you mean 'batch'?" in err


def _log_normalised(tmp_path, where: str):
    adata = ad.read_h5ad(PBMC_SMALL)
    counts = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    if where == "layer":
        adata.layers["counts"] = sp.csr_matrix(counts)
    elif where == "raw":
        adata.raw = ad.AnnData(X=sp.csr_matrix(counts), var=adata.var.copy())
    path = tmp_path / f"lognorm_{where}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("where, hint", [
    ("layer", "the file's layers['counts'] holds counts: select it with --set data.layer=counts"),
    ("raw", "the file's raw.X holds counts: select it with --set data.layer=raw"),
    ("none", None),
])
@pytest.mark.parametrize("backed", [False, True])
def test_log_normalised_x_points_at_the_counts(run_cli, tmp_path, where, hint, backed):
    path = _log_normalised(tmp_path, where)
    code, _, err = run_cli("train", path, "--out", tmp_path / "m.ckpt", "-q", *(["--backed"] if backed else []))
    assert code == 1 and "X holds non-integer counts" in err
    if hint:
        assert hint in err
        layer = "counts" if where == "layer" else "raw"
        code, _, err = run_cli("train", path, "--out", tmp_path / "m.ckpt", "--set", f"data.layer={layer}",
                               "--set", "train.max_epochs=1", "-q")
        assert code == 0, err
    else:
        assert "select it with" not in err


def test_embed_minimal_keeps_plain_uns_entries(run_cli, tmp_path):
    model = tmp_path / "m.ckpt"
    assert run_cli("train", PBMC_SMALL, "--out", model, "--set", "train.max_epochs=1", "-q")[0] == 0
    adata = ad.read_h5ad(PBMC_SMALL)
    adata.uns.update({"dataset_id": "pbmc_small", "method_id": "scvi", "n_run": 3, "weight": 0.5, "nested": {"a": 1}})
    adata.uns["matrix"] = np.eye(2)
    adata.write_h5ad(tmp_path / "in.h5ad")
    assert run_cli("embed", model, tmp_path / "in.h5ad", "--out", tmp_path / "out.h5ad", "--minimal", "-q")[0] == 0
    uns = ad.read_h5ad(tmp_path / "out.h5ad").uns
    assert uns["dataset_id"] == "pbmc_small" and uns["method_id"] == "scvi" and uns["n_run"] == 3 and uns["weight"] == 0.5
    assert "nested" not in uns and "matrix" not in uns
