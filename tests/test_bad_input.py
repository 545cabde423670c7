"""Every kind of bad input: one line naming the problem, a defined exit code, no output file."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

FAST = ["--set", "train.max_epochs=2", "--threads", "1", "--quiet"]


def _write(path, X, obs=None, var_names=None):
    n, g = X.shape
    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=var_names if var_names is not None else [f"g{j}" for j in range(g)])
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


def _counts(n=40, g=12, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (n, g)).astype(np.float32) + np.eye(n, g, dtype=np.float32)


def make_case(name: str, inputs):
    """Build the input file for case ``name`` in directory ``inputs``; return (path, extra args)."""
    X = _counts()
    obs = pd.DataFrame({"batch": ["a"] * 20 + ["b"] * 20, "cell_type": ["t1"] * 40}, index=[f"c{i}" for i in range(40)])
    good = _write(inputs / "good.h5ad", X, obs)
    if name == "missing file":
        return inputs / "nope.h5ad", []
    if name == "zarr store":
        store = inputs / "cells.zarr"
        store.mkdir()
        (store / ".zgroup").write_text('{"zarr_format": 2}')
        return store, []
    if name == "not h5ad":
        (inputs / "text.h5ad").write_text("cell,gene\n")
        return inputs / "text.h5ad", []
    if name == "truncated h5ad":
        data = good.read_bytes()
        (inputs / "cut.h5ad").write_bytes(data[: len(data) // 3])
        return inputs / "cut.h5ad", []
    bad = X.copy()
    if name in ("negative", "non-integer", "nan", "inf"):
        bad[3, 4] = {"negative": -1.0, "non-integer": 2.5, "nan": np.nan, "inf": np.inf}[name]
        return _write(inputs / "bad.h5ad", sp.csr_matrix(bad), obs), []
    if name == "all cells empty":
        return _write(inputs / "bad.h5ad", sp.csr_matrix(np.zeros_like(X)), obs), []
    if name == "duplicate genes":
        genes = [f"g{j}" for j in range(12)]
        genes[5] = "g1"
        return _write(inputs / "bad.h5ad", X, obs, genes), []
    if name == "empty matrix":
        return _write(inputs / "bad.h5ad", np.zeros((40, 0), dtype=np.float32), obs, []), []
    if name == "missing batch key":
        return good, ["--set", "data.batch_key=plate"]
    if name == "missing labels key":
        return good, ["--set", "model.type=condscvi", "--set", "data.labels_key=celltype"]
    if name == "one label for condscvi":
        return good, ["--set", "model.type=condscvi", "--set", "data.labels_key=cell_type"]
    if name == "one-cell batch with latent library":
        obs1 = obs.copy()
        obs1["batch"] = ["a"] * 39 + ["b"]
        return _write(inputs / "bad.h5ad", X, obs1), ["--set", "data.batch_key=batch", "--set", "model.use_observed_lib_size=false"]
    if name == "unknown spec key":
        return good, ["--set", "train.max_epoch=3"]
    if name == "wrong type":
        return good, ["--set", "model.n_latent=ten"]
    if name == "out of range":
        return good, ["--set", "model.dropout_rate=1.5"]
    if name == "spec file missing":
        return good, ["--spec", str(inputs / "missing.yaml")]
    if name == "spec not yaml":
        (inputs / "spec.yaml").write_text("model: [unclosed\n")
        return good, ["--spec", str(inputs / "spec.yaml")]
    if name == "gpu unavailable":
        return good, ["--device", "cuda"]
    raise ValueError(name)


CASES = [
    # name, exit code, fragment of the message
    ("missing file", 1, "nope.h5ad"),
    ("zarr store", 1, "cells.zarr: is a directory, not an .h5ad file (zarr stores are not supported)"),
    ("not h5ad", 1, "text.h5ad"),
    ("truncated h5ad", 1, "cut.h5ad"),
    ("negative", 1, "-1"),
    ("non-integer", 1, "2.5"),
    ("nan", 1, "nan"),
    ("inf", 1, "inf"),
    ("all cells empty", 1, "bad.h5ad"),
    ("duplicate genes", 1, "g1"),
    ("empty matrix", 1, "bad.h5ad"),
    ("missing batch key", 1, "plate"),
    ("missing labels key", 1, "celltype"),
    ("one label for condscvi", 1, "at least 2 cell types"),
    ("one-cell batch with latent library", 1, "at least 2 cells per batch"),
    ("unknown spec key", 2, "did you mean 'max_epochs'"),
    ("wrong type", 2, "model.n_latent"),
    ("out of range", 2, "model.dropout_rate"),
    ("spec file missing", 2, "missing.yaml"),
    ("spec not yaml", 2, "line"),
    ("gpu unavailable", 3, "cuda"),
]


@pytest.mark.parametrize("name, exit_code, fragment", CASES, ids=[c[0] for c in CASES])
def test_train_bad_input(tmp_path, run_cli, name, exit_code, fragment):
    if name == "gpu unavailable" and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    data, extra = make_case(name, inputs)
    code, stdout, err = run_cli("train", data, "--out", outputs / "model.ckpt", *FAST, *extra)
    assert code == exit_code, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("scvi-cli: warning:")]
    assert len(lines) == 1 and lines[0].startswith("scvi-cli: error:"), err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert list(outputs.iterdir()) == []


def test_zero_count_cells_are_dropped_with_a_warning(tmp_path, run_cli):
    X = _counts()
    X[[2, 7, 9]] = 0
    data = _write(tmp_path / "zeros.h5ad", sp.csr_matrix(X))
    code, out, err = run_cli("train", data, "--out", tmp_path / "m.ckpt", *FAST, "--json")
    assert code == 0, err
    assert "dropped 3 cells with zero total counts" in err
    import json

    assert json.loads(out)["training"]["n_cells"] == 37


@pytest.mark.parametrize("where", ["missing dir", "dir is a file", "out is a dir"])
def test_unwritable_output_fails_before_training(tmp_path, run_cli, pbmc_small, where):
    if where == "missing dir":
        out = tmp_path / "nowhere" / "m.ckpt"
    elif where == "dir is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "m.ckpt"
    else:
        out = tmp_path
    code, _, err = run_cli("train", pbmc_small, "--out", out, "--set", "train.max_epochs=400", "--threads", "1")
    assert code == 1 and "scvi-cli: error:" in err and "epoch" not in err  # no training happened


def test_query_errors(tmp_path, run_cli, pbmc_small):
    ckpt = tmp_path / "m.ckpt"
    assert run_cli("train", pbmc_small, "--out", ckpt, "--set", "data.batch_key=batch", *FAST)[0] == 0
    adata = ad.read_h5ad(pbmc_small)
    adata.obs["batch"] = adata.obs["batch"].astype(str).replace({"g1": "plate9"})
    unknown = tmp_path / "unknown_batch.h5ad"
    adata.write_h5ad(unknown)
    code, _, err = run_cli("evaluate", ckpt, unknown)
    assert code == 1 and "plate9" in err
    code, _, err = run_cli("evaluate", tmp_path / "absent.ckpt", pbmc_small)
    assert code == 1 and "absent.ckpt" in err
    code, _, err = run_cli("evaluate", pbmc_small, pbmc_small)  # an h5ad given as checkpoint
    assert code == 1 and "scvi-cli: error:" in err and "Traceback" not in err


def test_output_equal_to_input_is_refused(tmp_path, run_cli, pbmc_small):
    data = tmp_path / "data.h5ad"
    data.write_bytes(pbmc_small.read_bytes())
    before = data.read_bytes()
    code, _, err = run_cli("train", data, "--out", data, *FAST)
    assert code == 1 and "is also the input file" in err
    assert data.read_bytes() == before


def test_constant_library_size_with_latent_library_is_a_clear_error(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    X = np.stack([rng.multinomial(500, np.full(12, 1 / 12)) for _ in range(40)]).astype(np.float32)
    data = _write(tmp_path / "downsampled.h5ad", sp.csr_matrix(X))
    outputs = tmp_path / "out"
    outputs.mkdir()
    code, _, err = run_cli("train", data, "--out", outputs / "m.ckpt", *FAST, "--set", "model.type=ldvae")
    assert code == 1 and "use_observed_lib_size: true" in err
    assert list(outputs.iterdir()) == []


def test_h5ad_output_does_not_replace_existing_entries(tmp_path, run_cli, pbmc_small):
    ckpt = tmp_path / "m.ckpt"
    assert run_cli("train", pbmc_small, "--out", ckpt, *FAST)[0] == 0
    adata = ad.read_h5ad(pbmc_small)
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_scVI"] = np.zeros((adata.n_obs, 2))
    data = tmp_path / "annotated.h5ad"
    adata.write_h5ad(data)
    for args, fragment in (
        (["impute", ckpt, data, "--out", tmp_path / "i.h5ad", "--layer-name", "counts"], "layers['counts'] already exists"),
        (["embed", ckpt, data, "--out", tmp_path / "e.h5ad"], "obsm['X_scVI'] already exists"),
    ):
        code, _, err = run_cli(*args)
        assert code == 2 and fragment in err
    assert not (tmp_path / "i.h5ad").exists() and not (tmp_path / "e.h5ad").exists()


def test_usage_errors_are_one_line(run_cli, pbmc_small):
    for args in (["train"], ["train", pbmc_small, "--out", "x.ckpt", "--threads", "0"], ["bogus"], ["embed", "m.ckpt"]):
        code, _, err = run_cli(*args)
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("scvi-cli: error:"), err


def test_log_file_records_command_epochs_and_outcome(tmp_path, run_cli, pbmc_small):
    log = tmp_path / "train.log"
    code, _, _ = run_cli("train", pbmc_small, "--out", tmp_path / "m.ckpt", *FAST, "--log-file", log)
    assert code == 0
    text = log.read_text()
    assert text.startswith(f"# command: scvi-cli train {pbmc_small} --out ") and "# versions: scvi-cli=" in text
    assert "epoch 2/2 reconstruction_loss_train=" in text and "wrote " in text
    code, _, _ = run_cli("train", pbmc_small, "--out", tmp_path / "n.ckpt", *FAST, "--log-file", log,
                         "--set", "data.batch_key=plate")
    assert code == 1
    assert log.read_text().strip().splitlines()[-1].split(" ", 1)[1].startswith("exit 1: ")
