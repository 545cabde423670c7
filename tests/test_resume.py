"""Resumable training: an interrupted and resumed run ends with exactly the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from scvi_cli.checkpoint import load_checkpoint
from scvi_cli.errors import UsageError
from scvi_cli.training.preemption import TrainingStopped
from scvi_cli.progress import SilentReporter
from scvi_cli.spec import load_spec
from scvi_cli.training.job import resume_path_for, train_from_h5ad

SETTINGS = ["train.max_epochs=5", "train.batch_size=32", "data.batch_key=batch", "train.seed=3"]


class SignalAtEpoch(SilentReporter):
    """Sends a real signal to this process at the end of the given epoch (so mid-next-epoch stop)."""

    def __init__(self, epoch: int, signum: int):
        self.at, self.signum = epoch, signum

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.at:
            os.kill(os.getpid(), self.signum)


def _equal_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("overrides", [[], ["train.early_stopping=true", "train.early_stopping_patience=2"],
                                       ["model.type=ldvae"], ["train.validation_every_n_epochs=2"]],
                         ids=["scvi", "early-stopping", "ldvae", "validation-every-2"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, pbmc_small, overrides):
    spec = load_spec(None, SETTINGS + overrides)
    reference = train_from_h5ad(pbmc_small, spec, tmp_path / "reference.ckpt", threads=1)
    out = tmp_path / "model.ckpt"
    with pytest.raises(TrainingStopped) as stopped:
        train_from_h5ad(pbmc_small, spec, out, threads=1, reporter=SignalAtEpoch(1, signal.SIGUSR1))
    assert stopped.value.exit_code == 128 + signal.SIGUSR1
    assert "--resume" in str(stopped.value)
    state = load_checkpoint(resume_path_for(out))
    assert state.extra["resume"]["epoch"] == 2 and state.extra["resume"]["step_in_epoch"] == 1
    assert not out.exists()

    resumed = train_from_h5ad(pbmc_small, spec, out, threads=1, resume=True)
    assert not resume_path_for(out).exists()  # cleaned up once the final checkpoint is written
    _equal_weights(load_checkpoint(out).state_dict, load_checkpoint(reference.checkpoint_path).state_dict)
    for name, values in reference.history.items():
        if name != "seconds":
            np.testing.assert_array_equal(resumed.history[name], values, err_msg=name)  # NaN: no pass


def test_checkpoint_every_writes_resumable_state_and_resume_from_it(tmp_path, pbmc_small):
    spec = load_spec(None, SETTINGS)
    out = tmp_path / "model.ckpt"
    with pytest.raises(TrainingStopped):
        # stop during epoch 4 (index 3); the periodic state from epoch 2 is superseded by the stop state
        train_from_h5ad(pbmc_small, spec, out, threads=1, checkpoint_every=2, reporter=SignalAtEpoch(2, signal.SIGTERM))
    resumed = train_from_h5ad(pbmc_small, spec, out, threads=1, resume=True)
    reference = train_from_h5ad(pbmc_small, spec, tmp_path / "ref.ckpt", threads=1)
    _equal_weights(load_checkpoint(out).state_dict, load_checkpoint(reference.checkpoint_path).state_dict)
    assert resumed.training["epochs_run"] == 5


def test_resume_refuses_other_spec_unless_forced(tmp_path, pbmc_small):
    spec = load_spec(None, SETTINGS)
    out = tmp_path / "model.ckpt"
    with pytest.raises(TrainingStopped):
        train_from_h5ad(pbmc_small, spec, out, threads=1, reporter=SignalAtEpoch(0, signal.SIGTERM))
    other = load_spec(None, SETTINGS + ["train.lr=0.01"])
    with pytest.raises(UsageError, match="different spec or data"):
        train_from_h5ad(pbmc_small, other, out, threads=1, resume=True)
    result = train_from_h5ad(pbmc_small, other, out, threads=1, resume=True, force=True)
    assert result.training["epochs_run"] == 5


def _wait_for(path, process, timeout=60.0):
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{path} did not appear; process returned {process.poll()}")
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_real_signal_to_training_process_saves_and_resume_finishes(tmp_path, pbmc_small, signum, code):
    out = tmp_path / "model.ckpt"
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "scvi_cli", "train", str(pbmc_small), "--out", str(out), "--threads", "1", "--log-file", str(log),
               "--checkpoint-every", "1", *[a for s in SETTINGS[1:] for a in ("--set", s)], "--set", "train.max_epochs=20"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(resume_path_for(out), process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "saved resumable state" in err and "--resume" in err
    assert resume_path_for(out).exists() and not out.exists()
    assert "Traceback" not in err
    assert f"exit {code}: received" in log.read_text()

    finished = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "resuming from" in finished.stderr
    reference = train_from_h5ad(pbmc_small, load_spec(None, SETTINGS + ["train.max_epochs=20"]), tmp_path / "ref.ckpt", threads=1)
    _equal_weights(load_checkpoint(out).state_dict, load_checkpoint(reference.checkpoint_path).state_dict)
