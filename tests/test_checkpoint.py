"""Checkpoints: exact round trip, safe loading, one-line errors for every broken or foreign file,
and atomic writes that leave no partial or temporary file behind."""

from __future__ import annotations

import os
import pickle
import platform
import random

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import scvi_cli
from scvi_cli.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_history_csv,
)
from scvi_cli.errors import CheckpointError


class Opaque:
    """An arbitrary class: unpickling it would need the full (code-running) unpickler."""

    def __init__(self):
        self.value = 3


def _trained_module_and_optimizer():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6)
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()
    return module, optimizer


def make_checkpoint(model_type: str = "scvi") -> Checkpoint:
    module, optimizer = _trained_module_and_optimizer()
    return Checkpoint(
        model_type=model_type,
        spec={
            "model": {"type": model_type, "n_latent": 10, "dispersion": "gene", "log_variational": True},
            "data": {"layer": None, "batch_key": "batch", "categorical_covariate_keys": ["donor"]},
            "train": {"max_epochs": 3, "lr": 0.001, "train_size": 0.9},
        },
        model_kwargs={"n_input": 6, "n_batch": 2, "n_cats_per_cov": [3], "dropout_rate": 0.1},
        gene_names=[f"gene{i}" for i in range(6)],
        categories={"batch": ["a", "b"], "labels": ["unlabeled"], "donor": ["d1", "d2", "d3"]},
        state_dict=module.state_dict(),
        history={"elbo_train": [10.5, 9.25, 8.0], "elbo_validation": [11.0, 9.5, 8.75]},
        training={"epochs_run": 3, "max_epochs": 3, "n_train": 90, "n_validation": 10, "seed": 0, "seconds": 1.5},
        extra={
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.default_rng(7).bit_generator.state,
        },
    )


def _assert_nested_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_nested_equal(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_round_trip_keeps_every_field(tmp_path):
    ckpt = make_checkpoint()
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    for name in ("model_type", "spec", "model_kwargs", "gene_names", "categories", "state_dict",
                 "history", "training", "extra"):
        _assert_nested_equal(getattr(ckpt, name), getattr(loaded, name))
    assert loaded.versions == {
        "scvi-cli": scvi_cli.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    assert ckpt.versions == {}  # save fills versions in the file, not in the caller's object


def test_given_versions_are_kept_and_missing_ones_filled(tmp_path):
    ckpt = make_checkpoint()
    ckpt.versions = {"scvi-cli": "0.0.9", "cuda": "12.4"}
    save_checkpoint(tmp_path / "m.ckpt", ckpt)
    versions = load_checkpoint(tmp_path / "m.ckpt").versions
    assert versions["scvi-cli"] == "0.0.9" and versions["cuda"] == "12.4"
    assert versions["torch"] == torch.__version__


def test_saved_state_restores_module_and_optimizer(tmp_path):
    module, optimizer = _trained_module_and_optimizer()
    ckpt = make_checkpoint()
    save_checkpoint(tmp_path / "m.ckpt", ckpt)
    loaded = load_checkpoint(tmp_path / "m.ckpt")

    fresh = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    fresh.load_state_dict(loaded.state_dict)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    fresh_opt.load_state_dict(loaded.extra["optimizer"])
    x = torch.randn(5, 6)
    module.eval()
    fresh.eval()
    assert torch.equal(module(x), fresh(x))
    for p, q in zip(optimizer.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])
    assert fresh_opt.param_groups[0]["eps"] == 0.01
    random.setstate(loaded.extra["python_rng"])  # restorable as saved (tuples survive)


def test_file_is_readable_by_plain_torch_load_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", make_checkpoint("ldvae"))
    raw = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert raw["model_type"] == "ldvae" and raw["gene_names"][0] == "gene0"


def test_expected_type(tmp_path):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, make_checkpoint("scvi"))
    assert load_checkpoint(path, expected_type="scvi").model_type == "scvi"
    assert load_checkpoint(path, expected_type=("scvi", "ldvae")).model_type == "scvi"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected_type="ldvae")
    assert str(err.value) == f"{path}: holds a scvi model, expected ldvae"
    with pytest.raises(CheckpointError, match="expected one of ldvae, condscvi"):
        load_checkpoint(path, expected_type=["ldvae", "condscvi"])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 100, 10, 0])
def test_truncated_file_is_a_checkpoint_error_naming_the_file(tmp_path, keep):
    path = tmp_path / "cut.ckpt"
    save_checkpoint(path, make_checkpoint())
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_corrupted_weights_are_detected(tmp_path):
    ckpt = make_checkpoint()
    weights = torch.arange(4096, dtype=torch.float32)
    ckpt.state_dict["big"] = weights
    path = tmp_path / "flip.ckpt"
    save_checkpoint(path, ckpt)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weights.numpy().tobytes()[:256])
    assert at > 0
    data[at + 1000 : at + 1004] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_pickled_foreign_objects_are_refused_without_running_them(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"format": FORMAT, "payload": Opaque()}, path)
    with pytest.raises(CheckpointError, match="needs unsafe unpickling"):
        load_checkpoint(path)

    plain = tmp_path / "plain.pkl"
    with open(plain, "wb") as fh:
        pickle.dump(Opaque(), fh)
    with pytest.raises(CheckpointError, match="not a scvi-cli checkpoint"):
        load_checkpoint(plain)


def test_scvi_tools_model_file_points_to_import(tmp_path):
    # The shape of scvi-tools' model.pt: numpy arrays inside, so only the full unpickler reads it.
    path = tmp_path / "model.pt"
    torch.save(
        {
            "model_state_dict": {"px_r": torch.zeros(3)},
            "var_names": np.array(["a", "b", "c"], dtype=object),
            "attr_dict": {"is_trained_": True},
        },
        path,
    )
    with pytest.raises(CheckpointError, match="must be imported, not loaded"):
        load_checkpoint(path)


def test_bare_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a scvi-cli checkpoint"):
        load_checkpoint(path)


def test_other_files_are_not_checkpoints(tmp_path):
    h5ad = tmp_path / "data.h5ad"
    anndata.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(h5ad)
    with pytest.raises(CheckpointError, match="HDF5"):
        load_checkpoint(h5ad)
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: "):
        load_checkpoint(text)


_DROP = object()  # marks a field to remove in _save_payload


def _save_payload(path, **changes):
    """Write a hand-edited copy of a valid checkpoint's payload (what a damaged file looks like)."""
    good = path.parent / "good.ckpt"
    if not good.exists():
        save_checkpoint(good, make_checkpoint())
    payload = torch.load(good, weights_only=True)
    for key, value in changes.items():
        if value is _DROP:
            del payload[key]
        else:
            payload[key] = value
    torch.save(payload, path)


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "future.ckpt"
    _save_payload(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=rf"format version {FORMAT_VERSION + 1} is newer.*upgrade scvi-cli"):
        load_checkpoint(path)


def test_missing_and_mistyped_fields(tmp_path):
    path = tmp_path / "broken.ckpt"
    _save_payload(path, state_dict=_DROP, gene_names=_DROP)
    with pytest.raises(CheckpointError, match="missing fields: gene_names, state_dict"):
        load_checkpoint(path)
    _save_payload(path, gene_names="gene0")
    with pytest.raises(CheckpointError, match="wrong type: gene_names"):
        load_checkpoint(path)
    _save_payload(path, model_type="vae2")
    with pytest.raises(CheckpointError, match="unknown model type 'vae2'"):
        load_checkpoint(path)


def test_save_rejects_values_that_would_need_unsafe_loading(tmp_path):
    ckpt = make_checkpoint()
    ckpt.extra = {"means": np.zeros(3)}
    with pytest.raises(TypeError, match=r"extra\['means'\]: numpy.ndarray is not allowed"):
        save_checkpoint(tmp_path / "m.ckpt", ckpt)
    ckpt = make_checkpoint()
    ckpt.history = {"elbo": [1.0, np.float64(2.0)]}  # a float subclass that pickles as numpy
    with pytest.raises(TypeError, match=r"history\['elbo'\]\[1\]"):
        save_checkpoint(tmp_path / "m.ckpt", ckpt)
    ckpt = make_checkpoint()
    ckpt.model_type = "vae"
    with pytest.raises(ValueError, match="unknown model type"):
        save_checkpoint(tmp_path / "m.ckpt", ckpt)
    assert os.listdir(tmp_path) == []


def test_no_temporary_files_after_success(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", make_checkpoint())
    save_checkpoint(tmp_path / "m.ckpt", make_checkpoint("ldvae"))  # overwrite
    assert os.listdir(tmp_path) == ["m.ckpt"]
    assert load_checkpoint(tmp_path / "m.ckpt").model_type == "ldvae"


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, make_checkpoint("scvi"))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, make_checkpoint("ldvae"))
    assert os.listdir(tmp_path) == ["m.ckpt"]
    assert path.read_bytes() == before

    with pytest.raises(type(error)):
        save_checkpoint(tmp_path / "new.ckpt", make_checkpoint())
    assert os.listdir(tmp_path) == ["m.ckpt"]


def test_disk_errors_become_output_errors(tmp_path, monkeypatch):
    from scvi_cli.errors import OutputError

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"m\.ckpt: cannot write: No space left on device"):
        save_checkpoint(tmp_path / "m.ckpt", make_checkpoint())
    assert os.listdir(tmp_path) == []


def test_final_metrics_leave_out_only_validation_not_measured():
    from scvi_cli.checkpoint import final_metrics

    nan = float("nan")
    final = final_metrics({"elbo_train": [3.0, nan], "elbo_validation": [4.0, nan], "kl_weight": [0.5, 1.0], "empty": []})
    assert set(final) == {"elbo_train", "kl_weight"} and np.isnan(final["elbo_train"]) and final["kl_weight"] == 1.0


def test_history_csv(tmp_path):
    history = {"elbo_train": [3.5, 2.25, 1.125], "reconstruction_loss_train": [3.0, 2.0, 1.0], "elbo_validation": [4.0, 3.0]}
    path = tmp_path / "history.csv"
    write_history_csv(path, history)
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["epoch", "elbo_train", "reconstruction_loss_train", "elbo_validation"]
    assert frame["epoch"].tolist() == [0, 1, 2]
    assert frame["elbo_train"].tolist() == [3.5, 2.25, 1.125]
    assert frame["elbo_validation"].tolist()[:2] == [4.0, 3.0] and np.isnan(frame["elbo_validation"][2])
    assert os.listdir(tmp_path) == ["history.csv"]

    write_history_csv(tmp_path / "history.tsv", {"elbo_train": [0.1]})
    assert (tmp_path / "history.tsv").read_text() == "epoch\telbo_train\n0\t0.1\n"
