"""Distributed training on 2 CPU processes (torchrun, gloo, loopback): a step equals one process's
step on the union of the ranks' minibatches; the CLI trains, stops on SIGTERM and resumes; a
rank that dies ends the job with a non-zero exit and a resumable state, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.data import CountData, CSRMinibatches
from scvi_cli.training import distributed
from scvi_cli.training.job import resume_path_for

PBMC_SMALL = Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", SCVI_CLI_DISTRIBUTED_TIMEOUT="60")

# Shared by the workers and the single-process reference: data, model and the way they train.
SETUP = textwrap.dedent(
    """
    import numpy as np, scipy.sparse as sp, torch
    from scvi_cli.data import CountData, CSRMinibatches
    from scvi_cli.models import VAE
    from scvi_cli.training.loop import TrainSettings, fit

    torch.set_num_threads(1)
    torch.randn_like = torch.zeros_like  # posterior draws at the mean: the same on any split of cells

    def data():
        rng = np.random.default_rng(0)
        X = rng.negative_binomial(2.0, 0.3, (128, 30)).astype(np.float32) * (rng.random((128, 30)) < 0.4)
        X[:, 0] += 1
        return CountData(X=sp.csr_matrix(X), obs_names=[str(i) for i in range(128)], gene_names=[str(g) for g in range(30)],
                         batch_codes=rng.integers(0, 2, 128), label_codes=np.zeros(128, dtype=np.int64),
                         cat_cov_codes=None, cont_covs=None, categories={"batch": ["a", "b"], "labels": ["0"]})

    def model():
        torch.manual_seed(0)
        return VAE(30, n_batch=2, dropout_rate=0.0, use_observed_lib_size=True, n_layers=2)

    SETTINGS = TrainSettings(max_epochs=2, kl_warmup_epochs=1)
    """
)

WORKER = SETUP + textwrap.dedent(
    """
    import sys
    from scvi_cli.training import distributed
    ranks = distributed.ranks_from_environment()
    distributed.start(ranks, torch.device("cpu"))
    counts, net = data(), model()
    distributed.synchronise_batch_norm(net, torch.device("cpu"))
    source = CSRMinibatches(counts, np.arange(128), 16, shuffle=False, layout="sparse").shard(ranks.rank, ranks.world_size)
    state = fit(net, source, settings=SETTINGS)
    if ranks.is_main:
        torch.save({"weights": net.state_dict(), "history": state.history}, sys.argv[1])
    distributed.stop()
    """
)


def test_two_ranks_equal_one_process_on_the_union_of_their_minibatches(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ranks.pt"
    subprocess.run([*TORCHRUN, str(script), str(out)], check=True, env=ENV, capture_output=True, timeout=120)
    distributed_run = torch.load(out, weights_only=True)

    namespace: dict = {}
    exec(SETUP, namespace)  # noqa: S102  (the reference, in this process, from the same code)
    net = namespace["model"]()
    # rank r takes minibatches 2k + r of 16 cells: step k is cells [32k, 32k + 32)
    source = CSRMinibatches(namespace["data"](), np.arange(128), 32, shuffle=False, layout="sparse")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: sums in the same order, whatever earlier tests set
    try:
        state = namespace["fit"](net, source, settings=namespace["SETTINGS"])  # torch.randn_like: see the fixture
    finally:
        torch.set_num_threads(threads)
    reference = net.state_dict()
    assert distributed_run["weights"].keys() == reference.keys()
    # float tolerance: the all-reduces sum in another order than one process's matmuls
    worst = {key: float((distributed_run["weights"][key].double() - value.double()).abs().max()) for key, value in reference.items()}
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    for name in ("elbo_train", "reconstruction_loss_train"):
        np.testing.assert_allclose(distributed_run["history"][name], state.history[name], rtol=1e-5)


@pytest.fixture(autouse=True)
def _restore_randn_like():
    original = torch.randn_like
    yield
    torch.randn_like = original


def test_synced_batch_norm_alone_is_batch_norm():
    norm = distributed.SyncedBatchNorm1d(4, momentum=0.01, eps=0.001)
    plain = torch.nn.BatchNorm1d(4, momentum=0.01, eps=0.001)
    x = torch.randn(10, 4)
    torch.testing.assert_close(norm(x), plain(x))
    torch.testing.assert_close(norm.running_var, plain.running_var)
    assert list(norm.state_dict()) == list(plain.state_dict())


def test_ranks_from_the_environment():
    assert distributed.ranks_from_environment({}) is None
    assert distributed.ranks_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    ranks = distributed.ranks_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.is_main) == (3, 4, 1, False)


def test_sharded_sources_split_an_epoch_between_ranks():
    rng = np.random.default_rng(0)
    data = CountData(
        X=sp.csr_matrix(rng.integers(1, 5, (100, 5)).astype(np.float32)), obs_names=[str(i) for i in range(100)],
        gene_names=list("abcde"), batch_codes=np.zeros(100, dtype=np.int64), label_codes=np.zeros(100, dtype=np.int64),
        cat_cov_codes=None, cont_covs=None, categories={"batch": ["0"], "labels": ["0"]},
    )
    whole = list(CSRMinibatches(data, np.arange(100), 16, shuffle=True, seed=3))  # 7 minibatches
    ranks = [list(CSRMinibatches(data, np.arange(100), 16, shuffle=True, seed=3).shard(r, 2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]  # the 7th is left out: steps must pair up
    for r, taken in enumerate(ranks):
        for k, batch in enumerate(taken):
            assert torch.equal(batch.x, whole[2 * k + r].x)
    evaluation = [CSRMinibatches(data, np.arange(100), 16, shuffle=False).shard(r, 2, drop_remainder=False) for r in (0, 1)]
    assert [len(e) for e in evaluation] == [4, 3]
    with pytest.raises(ValueError, match="rank"):
        CSRMinibatches(data, np.arange(100), 16, shuffle=False).shard(2, 2)


def _train_command(out: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "scvi_cli", "train", str(PBMC_SMALL), "--out", str(out), "--device", "cpu", "--threads", "1",
            "--set", "data.batch_key=batch", "--set", "train.batch_size=16", *extra]


def _wait_for(proc: subprocess.Popen, text: str, lines: list[str], timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines[-20:])}")


def test_cli_trains_stops_on_sigterm_and_resumes(tmp_path):
    out = tmp_path / "m.ckpt"
    subprocess.run(_train_command(out, "--set", "train.max_epochs=2"), check=True, env=ENV, capture_output=True, timeout=120)
    assert out.exists() and len(out.with_name("m.history.csv").read_text().splitlines()) == 3
    assert not list(tmp_path.glob(".*tmp*"))
    # inference is not distributed: under torchrun it says so instead of writing the output twice
    refused = subprocess.run([sys.executable, "-m", "scvi_cli", "embed", str(out), str(PBMC_SMALL), "--out", str(tmp_path / "z.npy")],
                             env=dict(ENV, WORLD_SIZE="2", RANK="0"), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "runs in one process, not under torchrun" in refused.stderr
    assert not (tmp_path / "z.npy").exists()

    long = tmp_path / "long.ckpt"
    proc = subprocess.Popen(_train_command(long, "--set", "train.max_epochs=400"), env=ENV, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    _wait_for(proc, "epoch 3/400", lines)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
    proc.stderr.read()
    assert proc.wait(timeout=60) != 0
    resume_state = resume_path_for(long)
    assert resume_state.exists() and not long.exists()
    done = subprocess.run(_train_command(long, "--set", "train.max_epochs=400", "--resume"), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    assert long.exists() and not resume_state.exists()
    assert len(long.with_name("long.history.csv").read_text().splitlines()) == 401


def test_a_rank_that_dies_ends_the_job_with_an_error_and_a_resumable_state(tmp_path):
    out = tmp_path / "m.ckpt"
    proc = subprocess.Popen(_train_command(out, "--set", "train.max_epochs=400", "--checkpoint-every", "1"), env=ENV,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    _wait_for(proc, "epoch 3/400", lines)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    started = time.time()
    proc.stderr.read()
    assert proc.wait(timeout=120) != 0
    assert time.time() - started < 90  # no hang
    resume_state = resume_path_for(out)
    assert resume_state.exists() and not out.exists()
    # the state of the last completed checkpoint resumes, alone as well
    resumed = subprocess.run(
        [sys.executable, "-m", "scvi_cli", "train", str(PBMC_SMALL), "--out", str(out), "--device", "cpu", "--threads", "1",
         "--set", "data.batch_key=batch", "--set", "train.batch_size=16", "--set", "train.max_epochs=400", "--resume"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert out.exists()


def _cells_file(tmp_path, n_cells: int, n_genes: int, seed: int) -> Path:
    """Random counts (20% nonzero, 1..5) of two batches, as an .h5ad file."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.ceil(X.data * 5)
    obs = pd.DataFrame({"batch": pd.Categorical(rng.choice(["a", "b"], n_cells))}, index=[f"c{i}" for i in range(n_cells)])
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])).write_h5ad(path)
    return path


def test_backed_distributed_training_reads_each_rank_its_own_blocks(tmp_path):
    path = _cells_file(tmp_path, 3000, 200, seed=0)
    out = tmp_path / "m.ckpt"
    run = subprocess.run([*TORCHRUN, "-m", "scvi_cli", "train", str(path), "--out", str(out), "--backed", "--device", "cpu",
                          "--threads", "1", "--set", "data.batch_key=batch", "--set", "train.max_epochs=2"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    history = out.with_name("m.history.csv").read_text().splitlines()
    assert len(history) == 3 and "elbo_validation" in history[0]


def test_in_memory_shares_are_disjoint_equal_and_cover_the_split():
    from scvi_cli.training.distributed import cell_share

    rng = np.random.default_rng(0)
    train, validation = rng.permutation(1000)[:901], np.arange(1000, 1099)
    shares = [cell_share(train, validation, r, 3, 128) for r in range(3)]
    sizes = {len(t) for t, _ in shares}
    assert len(sizes) == 1  # every rank the same number of training cells: the steps pair up
    size = sizes.pop()
    assert size == 300 and size % 128 not in (1, 2)  # 300 = 2 x 128 + 44
    union = np.concatenate([t for t, _ in shares])
    assert len(np.unique(union)) == len(union) and set(union) <= set(train) and len(union) >= len(train) - 2
    assert all(np.all(np.diff(t) > 0) for t, _ in shares)  # increasing, as the reads want
    np.testing.assert_array_equal(np.sort(np.concatenate([v for _, v in shares])), validation)
    # a share whose last minibatch would hold 1-2 cells gives them up
    assert len(cell_share(np.arange(2 * 130), validation, 0, 2, 128)[0]) == 128
    with pytest.raises(ValueError, match="rank"):
        cell_share(train, validation, 3, 3, 128)


def test_in_memory_distributed_training_holds_a_share_per_rank(tmp_path):
    path = _cells_file(tmp_path, 2000, 100, seed=1)
    out = tmp_path / "m.ckpt"
    run = subprocess.run([*TORCHRUN, "-m", "scvi_cli", "train", str(path), "--out", str(out), "--device", "cpu",
                          "--threads", "1", "--set", "data.batch_key=batch", "--set", "train.max_epochs=2"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "each holding 1 in 2 cells in memory" in run.stderr
    history = out.with_name("m.history.csv").read_text().splitlines()
    assert len(history) == 3 and "elbo_validation" in history[0]


def test_a_rank_without_validation_cells_still_takes_part_in_validation(tmp_path):
    # 2,000 cells at train_size 0.9995 leave one validation cell: rank 1's share of them is empty
    path = _cells_file(tmp_path, 2000, 100, seed=2)
    out = tmp_path / "m.ckpt"
    run = subprocess.run([*TORCHRUN, "-m", "scvi_cli", "train", str(path), "--out", str(out), "--device", "cpu",
                          "--threads", "1", "--set", "train.max_epochs=3", "--set", "train.train_size=0.9995",
                          "--set", "train.early_stopping=true", "--set", "train.early_stopping_patience=1"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1999 train / 1 validation cells" in run.stderr
    history = out.with_name("m.history.csv").read_text().splitlines()
    assert "elbo_validation" in history[0] and len(history) >= 3  # at least two epochs, both validated
