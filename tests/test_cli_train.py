"""`scvi-cli train` and `scvi-cli evaluate` end to end on a small real dataset (pbmc_small)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from scvi_cli.checkpoint import load_checkpoint

FAST = ["--set", "train.max_epochs=3", "--threads", "1", "--quiet"]


@pytest.mark.parametrize(
    "model_args",
    [
        ["--set", "data.batch_key=batch"],
        ["--set", "model.type=ldvae", "--set", "data.batch_key=batch"],
        ["--set", "model.type=condscvi", "--set", "data.labels_key=cell_type"],
        ["--spec", "example_configs/scvi_gene_batch_covariates.yaml", "--set", "train.early_stopping=false"],
    ],
    ids=["scvi", "ldvae", "condscvi", "scvi-covariates"],
)
def test_train_then_evaluate_each_model_type(tmp_path, pbmc_small, run_cli, model_args):
    ckpt = tmp_path / "model.ckpt"
    code, out, err = run_cli("train", pbmc_small, "--out", ckpt, *model_args, *FAST, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["training"]["epochs_run"] == 3
    assert summary["checkpoint"] == str(ckpt)

    raw = torch.load(ckpt, weights_only=True)  # no pickled objects
    assert raw["format"] == "scvi-cli-checkpoint"
    checkpoint = load_checkpoint(ckpt)
    assert len(checkpoint.gene_names) == 230 and checkpoint.gene_names[0] == "MS4A1"
    assert checkpoint.spec["train"]["max_epochs"] == 3
    assert set(checkpoint.versions) >= {"scvi-cli", "torch", "python"}
    assert checkpoint.training["n_train"] + checkpoint.training["n_validation"] == 80
    history = pd.read_csv(tmp_path / "model.history.csv", index_col=0)
    assert list(history.index) == [0, 1, 2]
    assert {"elbo_train", "reconstruction_loss_train", "kl_local_train", "kl_weight"} <= set(history.columns)
    assert history["kl_weight"].tolist() == [0.0, 1 / 400, 2 / 400]

    code, out, err = run_cli("evaluate", ckpt, pbmc_small, "--json", "--n-mc-samples", "20")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["n_cells"] == 80
    assert metrics["reconstruction_nll"] > 0
    assert metrics["negative_elbo"] == pytest.approx(metrics["reconstruction_nll"] + metrics["kl_local"], rel=1e-6)
    assert -metrics["marginal_ll"] < metrics["negative_elbo"] * 1.05


def test_training_is_deterministic(tmp_path, pbmc_small, run_cli):
    paths = [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]
    for path in paths:
        code, _, err = run_cli("train", pbmc_small, "--out", path, "--set", "data.batch_key=batch", *FAST, "--seed", "7")
        assert code == 0, err
    first, second = (load_checkpoint(p) for p in paths)
    assert first.state_dict.keys() == second.state_dict.keys()
    for key in first.state_dict:
        assert torch.equal(first.state_dict[key], second.state_dict[key]), key
    assert first.history == {k: v for k, v in second.history.items()} or all(
        first.history[k] == second.history[k] for k in first.history if k != "seconds"
    )
    code, _, _ = run_cli("train", pbmc_small, "--out", tmp_path / "c.ckpt", "--set", "data.batch_key=batch", *FAST, "--seed", "8")
    other = load_checkpoint(tmp_path / "c.ckpt")
    assert not torch.equal(other.state_dict["px_r"], first.state_dict["px_r"])


def test_evaluate_matches_genes_by_name(tmp_path, pbmc_small, run_cli):
    import anndata as ad

    ckpt = tmp_path / "m.ckpt"
    assert run_cli("train", pbmc_small, "--out", ckpt, *FAST)[0] == 0
    adata = ad.read_h5ad(pbmc_small)
    reordered = tmp_path / "reordered.h5ad"
    adata[:, adata.var_names[::-1]].copy().write_h5ad(reordered)
    _, out_a, _ = run_cli("evaluate", ckpt, pbmc_small, "--json", "--n-mc-samples", "5")
    _, out_b, _ = run_cli("evaluate", ckpt, reordered, "--json", "--n-mc-samples", "5")
    a, b = json.loads(out_a), json.loads(out_b)
    for key in ("reconstruction_nll", "kl_local", "negative_elbo", "marginal_ll"):
        assert a[key] == pytest.approx(b[key], rel=1e-5)
    missing = tmp_path / "missing.h5ad"
    adata[:, adata.var_names[5:]].copy().write_h5ad(missing)
    code, _, err = run_cli("evaluate", ckpt, missing)
    assert code == 1 and "MS4A1" in err and "Traceback" not in err


def test_set_overrides_reach_the_checkpoint(tmp_path, pbmc_small, run_cli):
    ckpt = tmp_path / "m.ckpt"
    code, _, err = run_cli("train", pbmc_small, "--out", ckpt, *FAST, "--set", "model.n_latent=4",
                           "--set", "model.gene_likelihood=nb", "--set", "train.batch_size=32")
    assert code == 0, err
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint.spec["model"]["n_latent"] == 4 and checkpoint.model_kwargs["n_latent"] == 4
    assert checkpoint.spec["model"]["gene_likelihood"] == "nb"
    assert checkpoint.state_dict["z_encoder.mean_encoder.weight"].shape[0] == 4


def test_validation_every_n_epochs_and_never(tmp_path, pbmc_small, run_cli):
    """Validation after epochs 2, 4 and the last (5) of 5 with n = 2, none at all with null: the
    history keeps one row per epoch (empty cells where no pass ran) and the final metrics hold
    the last pass."""
    every_two = tmp_path / "two.ckpt"
    code, out, err = run_cli("train", pbmc_small, "--out", every_two, "--set", "train.max_epochs=5", "--threads", "1",
                             "--quiet", "--json", "--set", "train.validation_every_n_epochs=2")
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "two.history.csv")
    assert frame["epoch"].tolist() == [0, 1, 2, 3, 4]
    measured = frame["elbo_validation"].notna().tolist()
    assert measured == [False, True, False, True, True]
    assert frame["elbo_train"].notna().all()
    final = json.loads(out)["final_metrics"]
    assert final["elbo_validation"] == pytest.approx(frame["elbo_validation"].iloc[-1])

    never = tmp_path / "never.ckpt"
    code, out, err = run_cli("train", pbmc_small, "--out", never, *FAST, "--json",
                             "--set", "train.validation_every_n_epochs=null")
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "never.history.csv")
    assert not [c for c in frame.columns if c.endswith("_validation")] and len(frame) == 3
    assert "elbo_validation" not in json.loads(out)["final_metrics"]
    assert load_checkpoint(never).spec["train"]["validation_every_n_epochs"] is None

    code, _, err = run_cli("train", pbmc_small, "--out", tmp_path / "bad.ckpt", *FAST,
                           "--set", "train.early_stopping=true", "--set", "train.validation_every_n_epochs=3")
    assert code != 0 and "train.validation_every_n_epochs=3: must be 1 with train.early_stopping" in err
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.parametrize(
    "args, exit_code, fragment",
    [
        (["--set", "model.n_latnt=5"], 2, "did you mean 'n_latent'"),
        (["--set", "model.type=foo"], 2, "model.type"),
        (["--set", "train.lr=-1"], 2, "train.lr"),
        (["--set", "data.batch_key=plate"], 1, "plate"),
        (["--device", "cuda:7"], 3, "cuda"),
    ],
)
def test_bad_input_is_one_line_with_exit_code(tmp_path, pbmc_small, run_cli, args, exit_code, fragment):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "m.ckpt"
    code, _, err = run_cli("train", pbmc_small, "--out", out, *FAST, *args)
    assert code == exit_code
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path, pbmc_small, run_cli):
    ckpt = tmp_path / "m.ckpt"
    assert run_cli("train", pbmc_small, "--out", ckpt, *FAST)[0] == 0
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    code, _, err = run_cli("evaluate", truncated, pbmc_small)
    assert code == 1 and str(truncated) in err and "Traceback" not in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    code, _, err = run_cli("evaluate", foreign, pbmc_small)
    assert code == 1 and "not a scvi-cli checkpoint" in err
    from scvi_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds a scvi model, expected ldvae"):
        load_checkpoint(ckpt, expected_type="ldvae")


def test_console_script_runs_as_a_process(tmp_path, pbmc_small):
    """The installed entry point, as a pipeline calls it: non-TTY stderr gets plain epoch lines."""
    ckpt = tmp_path / "m.ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "scvi_cli", "train", str(pbmc_small), "--out", str(ckpt), "--set", "train.max_epochs=2", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2" in result.stderr and f"wrote {ckpt}" in result.stderr
    version = subprocess.run([sys.executable, "-m", "scvi_cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip().startswith("scvi-cli ")
