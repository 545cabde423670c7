"""The workflow examples run for real: the Snakemake workflow and the SLURM script's requeue path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _snakemake() -> str | None:
    candidates = [os.environ.get("SNAKEMAKE"), REPO / ".venv-snakemake" / "bin" / "snakemake", shutil.which("snakemake")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def test_snakemake_workflow_train_embed_impute_loadings(tmp_path, pbmc_small):
    snakemake = _snakemake()
    if snakemake is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Snakemake example: scripts/test.sh installs it into .venv-snakemake")
        pytest.skip("snakemake not installed (scripts/test.sh installs it into .venv-snakemake)")
    result = subprocess.run(
        [snakemake, "-s", str(REPO / "examples/snakemake/Snakefile"), "--cores", "2", "--directory", str(tmp_path),
         "--config", f"data={pbmc_small}", f"spec={REPO / 'example_configs/ldvae.yaml'}", "max_epochs=5",
         f"scvi_cli={BIN / 'scvi-cli'}", "threads=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "pbmc"
    latent = ad.read_h5ad(out / "latent.h5ad")
    assert latent.n_obs == 80 and latent.obsm["X_scVI"].shape == (80, 10)
    normalized = pd.read_parquet(out / "normalized.parquet")
    assert normalized.shape == (80, 230)
    np.testing.assert_allclose(normalized.sum(axis=1), 10000, rtol=1e-3)
    loadings = pd.read_csv(out / "loadings.csv", index_col=0)
    assert loadings.shape == (230, 10) and list(loadings.columns[:2]) == ["Z_0", "Z_1"]
    info = json.loads((out / "model.info.json").read_text())
    assert info["model_type"] == "ldvae" and info["training"]["epochs_run"] == 5
    assert "# command: scvi-cli train" in (out / "logs/train.log").read_text()


def _preempt_after_first_checkpoint(command, env, resume_state: Path, timeout: float):
    """Start a batch script, send it SIGTERM once its first resumable state exists (written after
    epoch 5 by --checkpoint-every 5): (stdout, stderr, the finished process)."""
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not resume_state.exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=90)
    return stdout, stderr, job


def test_slurm_script_forwards_sigterm_and_requeues(tmp_path, pbmc_small):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeued = tmp_path / "requeued.txt"
    (fake_bin / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {requeued}\n")
    (fake_bin / "scontrol").chmod(0o755)
    spec = tmp_path / "spec.yaml"
    spec.write_text("train: {max_epochs: 25, batch_size: 32}\n")
    model = tmp_path / "model.ckpt"
    env = {**os.environ, "PATH": f"{fake_bin}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "1"}
    script = [str(REPO / "examples/slurm/train.sbatch"), str(pbmc_small), str(spec), str(model)]
    resume_state = tmp_path / "model.resume.ckpt"
    stdout, stderr, job = _preempt_after_first_checkpoint(["bash", *script], env, resume_state, timeout=120)
    assert job.returncode == 143, stderr
    assert requeued.read_text().strip() == "requeue 42"
    assert "requeueing job 42" in stdout
    rerun = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr and model.exists() and not resume_state.exists()


def test_multi_node_slurm_script_trains_with_torchrun_and_requeues(tmp_path, pbmc_small):
    """train_ddp.sbatch on one 'node' of 2 CPU processes: srun and scontrol are stand-ins (srun runs
    its command once, as on a one-node allocation); a SIGTERM to the batch shell stops every rank
    with a resumable state and requeues; the rerun resumes and finishes."""
    import socket

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeued = tmp_path / "requeued.txt"
    (fake_bin / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake_bin / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> {requeued}; fi\n'
    )
    for stub in ("srun", "scontrol"):
        (fake_bin / stub).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tmp_path / "spec.yaml"
    spec.write_text("train: {max_epochs: 25, batch_size: 32}\n")
    model = tmp_path / "model.ckpt"
    env = {
        **os.environ, "PATH": f"{fake_bin}:{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "2",
        "NPROC_PER_NODE": "2", "DEVICE": "cpu", "MASTER_PORT": str(port), "SCVI_CLI_DISTRIBUTED_TIMEOUT": "60",
    }
    script = ["bash", str(REPO / "examples/slurm/train_ddp.sbatch"), str(pbmc_small), str(spec), str(model)]
    resume_state = tmp_path / "model.resume.ckpt"
    stdout, stderr, job = _preempt_after_first_checkpoint(script, env, resume_state, timeout=180)
    assert job.returncode == 143, stdout + stderr
    assert requeued.read_text().strip() == "requeue 7"
    assert "requeueing job 7" in stdout and not model.exists()
    rerun = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "training finished" in rerun.stdout and "resuming from" in rerun.stderr
    assert model.exists() and not resume_state.exists()
    assert len(tmp_path.joinpath("model.history.csv").read_text().splitlines()) == 26
