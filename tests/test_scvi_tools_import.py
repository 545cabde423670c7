"""Importing scvi-tools model directories: the fixtures under tests/data/scvi_tools_models/ were
made by scvi-tools 1.5.1 (tools/make_scvi_tools_models.py); no scvi-tools is needed here.

Every imported model gives scvi-tools' latent and (posterior-mean) normalized expression for the
same cells, keeps the categories in scvi-tools' order (an unused batch included), and the files
are read without running code from them."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_cli.apply import queries
from scvi_cli.apply.evaluation import evaluate_model
from scvi_cli.checkpoint import save_checkpoint
from scvi_cli.errors import CheckpointError
from scvi_cli.interop.scvi_tools import import_model, read_model_pt
from scvi_cli.trained_model import load_trained_model

FIXTURES = Path(__file__).parent / "data" / "scvi_tools_models"
CELLS = FIXTURES / "cells.h5ad"
FACTS = json.loads((FIXTURES / "facts.json").read_text())["models"]
EXPECTED_TYPES = {"scvi": "scvi", "scvi_latent_library": "scvi", "linear_scvi": "ldvae", "condscvi": "condscvi"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    models = {}
    for name in EXPECTED_TYPES:
        path = root / f"{name}.ckpt"
        save_checkpoint(path, import_model(FIXTURES / name))
        model = load_trained_model(path)
        models[name] = (model, model.load_query(CELLS)[1])
    return models


@pytest.mark.parametrize("name", list(EXPECTED_TYPES))
def test_imported_latent_equals_scvi_tools(imported, name):
    model, cells = imported[name]
    assert model.checkpoint.model_type == EXPECTED_TYPES[name]
    assert model.checkpoint.categories["batch"] == ["g1", "g2", "unused"]  # scvi-tools keeps the unused one
    latent = queries.latent_representation(model.module, cells)
    expected = np.load(FIXTURES / f"{name}.latent.npy")
    assert latent.shape == expected.shape
    assert np.abs(latent - expected).max() <= 1e-5


@pytest.mark.parametrize("name", ["scvi", "scvi_latent_library", "linear_scvi"])
def test_imported_normalized_expression_and_elbo_agree_with_scvi_tools(imported, name):
    model, cells = imported[name]
    expression = np.concatenate(list(queries.iter_normalized_expression(model.module, cells, library_size=1e4)))
    expected = np.load(FIXTURES / f"{name}.normalized_1e4.npy")
    np.testing.assert_allclose(expression, expected, rtol=1e-4, atol=1e-3)
    # get_elbo draws z once per cell: compare Monte Carlo means of 20 seeds within their error
    ours = [evaluate_model(model.module, cells, n_mc_samples=0, seed=s)["negative_elbo"] for s in range(20)]
    theirs, spread = -FACTS[name]["elbo_mean_of_20"], FACTS[name]["elbo_sd"]
    error = 4 * np.sqrt((np.var(ours) + spread**2) / 20)
    assert abs(np.mean(ours) - theirs) <= error + 1e-3 * theirs, (np.mean(ours), theirs, error)


def test_imported_settings_and_categories(imported):
    spec = imported["scvi_latent_library"][0].checkpoint.spec
    assert spec["model"]["use_observed_lib_size"] is False and spec["model"]["dispersion"] == "gene-batch"
    assert spec["model"]["n_layers"] == 2 and spec["model"]["gene_likelihood"] == "nb"
    assert spec["data"]["batch_key"] == "batch" and spec["data"]["labels_key"] == "cell_type"
    assert imported["scvi_latent_library"][0].checkpoint.categories["labels"] == ["A", "B"]
    assert imported["scvi"][0].checkpoint.categories["labels"] == ["0"]
    assert imported["scvi"][0].checkpoint.spec["data"]["labels_key"] is None
    assert imported["linear_scvi"][0].checkpoint.spec["model"]["n_layers_encoder"] == 1


def test_cli_import_then_embed(tmp_path):
    from scvi_cli.cli import main

    for args in (["import-model", str(FIXTURES / "scvi" / "model.pt"), "--out", str(tmp_path / "m.ckpt")],
                 ["embed", str(tmp_path / "m.ckpt"), str(CELLS), "--out", str(tmp_path / "z.npy")]):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 0
    assert np.abs(np.load(tmp_path / "z.npy") - np.load(FIXTURES / "scvi.latent.npy")).max() <= 1e-5


def _rewrite_model_pt(tmp_path: Path, change, name: str = "model") -> Path:
    """A copy of the scvi fixture whose dict went through ``change`` (loaded with the full
    unpickler here, in the test, from a file we made)."""
    content = torch.load(FIXTURES / "scvi" / "model.pt", weights_only=False)
    change(content)
    directory = tmp_path / name
    directory.mkdir()
    torch.save(content, directory / "model.pt")
    return directory


class _RunsCode:
    """A pickle payload that would create a file if unpickled with the full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    directory = _rewrite_model_pt(tmp_path, lambda c: c["attr_dict"].__setitem__("payload", _RunsCode(str(marker))))
    with pytest.raises(CheckpointError, match=r"refused: the file asks to load (posix|os)\.makedirs.*nothing from it was run"):
        read_model_pt(directory)
    assert not marker.exists()


def test_settings_scvi_cli_cannot_represent_are_refused_by_name(tmp_path):
    def odd(content):
        content["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["extra_encoder_kwargs"] = {"x": 1}

    with pytest.raises(CheckpointError, match="setting\\(s\\) extra_encoder_kwargs cannot be represented"):
        import_model(_rewrite_model_pt(tmp_path, odd))

    def other_model(content):
        content["attr_dict"]["registry_"]["model_name"] = "TOTALVI"

    with pytest.raises(CheckpointError, match="model 'TOTALVI' is not one scvi-cli imports"):
        import_model(_rewrite_model_pt(tmp_path, other_model, name="other"))


def test_truncated_foreign_and_old_layout_files_get_one_line_errors(tmp_path):
    from scvi_cli.cli import main

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (FIXTURES / "scvi" / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with zipfile.ZipFile(foreign / "model.pt", "w") as archive:
        archive.writestr("hello.txt", "not a model")
    old = tmp_path / "old"
    old.mkdir()
    (old / "model_params.pt").write_bytes(b"")
    (old / "attr.pkl").write_bytes(pickle.dumps({}))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        truncated: "not an scvi-tools model.pt|cannot read as an scvi-tools model.pt",
        foreign: "cannot read as an scvi-tools model.pt",
        old: "pre-0.15 layout",
        empty: "no model.pt in this directory",
        tmp_path / "missing": "no such file",
    }
    for source, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            import_model(source)
        with pytest.raises(SystemExit) as stop:
            main(["import-model", str(source), "--out", str(tmp_path / "x.ckpt")])
        assert stop.value.code == 1
        assert not (tmp_path / "x.ckpt").exists()
    shutil.rmtree(truncated)


# ---------------------------------------------------------------- export


ST_LOAD = """
import sys, warnings
import anndata as ad, numpy as np, scvi
warnings.filterwarnings("ignore")
model = getattr(scvi.model, sys.argv[1]).load(sys.argv[2], adata=ad.read_h5ad(sys.argv[3]), accelerator="cpu")
np.save(sys.argv[4], model.get_latent_representation())
"""


def _scvi_tools_python() -> str | None:
    """A Python with scvi-tools (SCVI_TOOLS_PYTHON), for the round trip through scvi-tools itself."""
    import subprocess

    python = os.environ.get("SCVI_TOOLS_PYTHON")
    if not python:
        return None
    probe = subprocess.run([python, "-c", "import scvi"], capture_output=True)
    return python if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def trained_with_covariates(tmp_path_factory):
    from scvi_cli.spec import load_spec
    from scvi_cli.training.job import train_from_h5ad

    path = tmp_path_factory.mktemp("own") / "own.ckpt"
    spec = load_spec(None, ["train.max_epochs=2", "data.batch_key=batch", "data.categorical_covariate_keys=[cell_type]",
                            "data.continuous_covariate_keys=[nCount_RNA]", "model.dispersion=gene-batch"])
    train_from_h5ad(Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad", spec, path, threads=1, device="cpu")
    return path


@pytest.mark.parametrize("name", list(EXPECTED_TYPES) + ["own"])
def test_export_then_import_gives_the_same_model(tmp_path, imported, trained_with_covariates, name):
    from scvi_cli.checkpoint import load_checkpoint
    from scvi_cli.interop.scvi_tools import export_model

    source = load_checkpoint(trained_with_covariates) if name == "own" else imported[name][0].checkpoint
    export_model(source, tmp_path / "dir")
    again = import_model(tmp_path / "dir")
    assert again.model_type == source.model_type and again.gene_names == source.gene_names
    assert again.categories == source.categories
    assert again.spec["model"] == source.spec["model"] and again.spec["data"] == source.spec["data"]
    assert again.state_dict.keys() == source.state_dict.keys()
    for key, value in source.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key


def test_export_refuses_what_scvi_tools_cannot_load(tmp_path, imported):
    import dataclasses

    from scvi_cli.interop.scvi_tools import export_model

    checkpoint = imported["scvi"][0].checkpoint
    spec = {**checkpoint.spec, "data": {**checkpoint.spec["data"], "categorical_covariate_keys": ["letter.idents"]}}
    dotted = dataclasses.replace(checkpoint, spec=spec, categories={**checkpoint.categories, "letter.idents": ["A", "B"]})
    with pytest.raises(CheckpointError, match="keys with a dot"):
        export_model(dotted, tmp_path / "a")
    spec = {**checkpoint.spec, "model": {**checkpoint.spec["model"], "var_activation": "softplus"}}
    with pytest.raises(CheckpointError, match="var_activation"):
        export_model(dataclasses.replace(checkpoint, spec=spec), tmp_path / "b")
    spec = {**checkpoint.spec, "model": {**checkpoint.spec["model"], "scale_activation": "softplus"}}
    with pytest.raises(CheckpointError, match="scale_activation softplus"):
        export_model(dataclasses.replace(checkpoint, spec=spec), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_refuses_to_replace_without_overwrite(tmp_path, imported):
    from scvi_cli.cli import main
    from scvi_cli.errors import OutputError
    from scvi_cli.interop.scvi_tools import export_model

    checkpoint = imported["scvi"][0].checkpoint
    target = export_model(checkpoint, tmp_path / "dir")
    before = target.read_bytes()
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        export_model(checkpoint, tmp_path / "dir")
    assert target.read_bytes() == before
    save_checkpoint(tmp_path / "m.ckpt", checkpoint)
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tmp_path / "m.ckpt"), "--to", "scvi-tools", "--out", str(tmp_path / "dir"), "--overwrite"])
    assert stop.value.code == 0 and [p.name for p in (tmp_path / "dir").iterdir()] == ["model.pt"]
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tmp_path / "m.ckpt"), "--to", "anndata", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2


@pytest.mark.skipif(_scvi_tools_python() is None, reason="set SCVI_TOOLS_PYTHON to a Python with scvi-tools for the round trip")
@pytest.mark.parametrize("name,cls", [("own", "SCVI"), ("linear_scvi", "LinearSCVI"), ("condscvi", "CondSCVI")])
def test_scvi_tools_loads_the_export_and_gives_the_same_latent(tmp_path, imported, trained_with_covariates, name, cls):
    import subprocess

    from scvi_cli.checkpoint import load_checkpoint
    from scvi_cli.interop.scvi_tools import export_model

    if name == "own":
        checkpoint, cells = load_checkpoint(trained_with_covariates), Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"
        model = load_trained_model(trained_with_covariates)
        ours = queries.latent_representation(model.module, model.load_query(cells)[1])
    else:
        checkpoint, cells = imported[name][0].checkpoint, CELLS
        ours = queries.latent_representation(imported[name][0].module, imported[name][1])
    export_model(checkpoint, tmp_path / "dir")
    subprocess.run([_scvi_tools_python(), "-c", ST_LOAD, cls, str(tmp_path / "dir"), str(cells), str(tmp_path / "z.npy")],
                   check=True, capture_output=True, timeout=300)
    assert np.abs(np.load(tmp_path / "z.npy") - ours).max() <= 1e-5
