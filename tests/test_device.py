"""Process-level settings of device.py: device names, layouts by device, the allocator setting."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

ALLOCATE_AND_FREE = textwrap.dedent(
    """
    import resource, sys
    import torch
    from scvi_cli.device import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():  # a few 36 MB tensors (above glibc's largest mmap threshold), made and freed
        blocks = [torch.empty(9_000_000).fill_(1.0) for _ in range(4)]
        return blocks[0] * blocks[1] + blocks[2]
    for _ in range(8):
        step()
    before = faults()
    step()
    print(applied, faults() - before)
    """
)


def _faults_per_allocation(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_memory_is_reused_without_page_faults():
    _, plain = _faults_per_allocation("plain")
    applied, retained = _faults_per_allocation("retain")
    assert applied == "True"
    assert plain > 20_000  # every block was mapped afresh: ~9k pages faulted in per block
    assert retained < plain / 10


def test_retention_only_for_blocks_above_the_mmap_threshold(monkeypatch):
    from scvi_cli import device

    calls = []
    monkeypatch.setattr(device, "retain_freed_memory", lambda: calls.append(1) or True)
    assert device.retain_memory_for_minibatches(16, 300) is False and not calls  # 19 KB: tiny
    assert device.retain_memory_for_minibatches(128, 2000) is True and calls == [1]
    assert device.retain_memory_for_minibatches(1024, 9000) is True and calls == [1, 1]


# ---------------------------------------------------------------- device-resident minibatches


def _count_data(n=150, g=30, seed=0, covariates=True):
    import numpy as np
    import scipy.sparse as sp

    from scvi_cli.data import CountData

    rng = np.random.default_rng(seed)
    dense = np.ceil(sp.random(n, g, density=0.15, dtype=np.float32, random_state=seed).toarray() * 20)
    dense[np.arange(n), rng.integers(0, g, n)] += 1
    return CountData(
        X=sp.csr_matrix(dense), obs_names=[f"c{i}" for i in range(n)], gene_names=[f"g{i}" for i in range(g)],
        batch_codes=rng.integers(0, 3, n), label_codes=rng.integers(0, 2, n),
        cat_cov_codes=rng.integers(0, 4, (n, 2)) if covariates else None,
        cont_covs=rng.normal(size=(n, 1)).astype(np.float32) if covariates else None,
        categories={"batch": ["a", "b", "c"], "labels": ["x", "y"]},
    )


@pytest.mark.parametrize("shuffle,drop_last,covariates", [(True, False, True), (False, True, False)])
def test_device_minibatches_equal_the_host_gather(shuffle, drop_last, covariates):
    import numpy as np
    import torch

    from scvi_cli.data import CSRMinibatches, DeviceCSRMinibatches

    data = _count_data(covariates=covariates)
    idx = np.random.default_rng(1).permutation(data.n_cells)[:130]
    host = CSRMinibatches(data, idx, 32, shuffle=shuffle, seed=4, drop_last=drop_last)
    on_device = DeviceCSRMinibatches(data, idx, 32, shuffle=shuffle, seed=4, drop_last=drop_last, device="cpu")
    for epoch in (0, 3):
        host.set_epoch(epoch)
        on_device.set_epoch(epoch)
        pairs = list(zip(host, on_device, strict=True))
        assert len(pairs) == len(host) == (130 // 32 if drop_last else 5)
        for a, b in pairs:
            assert torch.equal(a.x, b.x) and b.rows is None
            for name in ("batch_index", "labels", "cat_covs", "cont_covs"):
                left, right = getattr(a, name), getattr(b, name)
                assert (left is None and right is None) or torch.equal(left, right), name


def test_device_minibatches_share_one_device_copy():
    import numpy as np
    import torch

    from scvi_cli.data import CSRMinibatches, DeviceCSRMinibatches

    data = _count_data()
    train = DeviceCSRMinibatches(data, np.arange(100), 25, shuffle=True, device="cpu")
    validation = train.sharing(np.arange(100, 150), 25, shuffle=False)
    assert validation._on_device is train._on_device and not validation.shuffle
    expected = list(CSRMinibatches(data, np.arange(100, 150), 25, shuffle=False))
    assert all(torch.equal(a.x, b.x) for a, b in zip(expected, validation, strict=True))
    with pytest.raises(ValueError, match="indices"):
        train.sharing([200], 25, shuffle=False)
    X = data.X
    assert DeviceCSRMinibatches.device_bytes(data) == X.nnz * 8 + (X.shape[0] + 1) * 8 + X.shape[0] * 16 + 150 * 2 * 8 + 150 * 4


def test_minibatch_sources_on_the_cpu_are_host_csr_rows():
    import numpy as np
    import torch

    from scvi_cli.data import CSRMinibatches
    from scvi_cli.training.job import minibatch_sources

    data = _count_data()
    train, validation = minibatch_sources(data, np.arange(120), np.arange(120, 150), 16, 0, torch.device("cpu"))
    assert isinstance(train, CSRMinibatches) and train.layout == "sparse" and train.shuffle
    # validation in eval mode does not depend on the minibatch size: it takes large ones
    assert validation.layout == "sparse" and not validation.shuffle and validation.batch_size == 1024 and len(validation) == 1
    assert minibatch_sources(data, np.arange(150), np.arange(0), 16, 0, torch.device("cpu"))[1] is None


# ---------------------------------------------------------------- training arithmetic


def test_arithmetic_settings():
    import torch

    from scvi_cli.training.loop import arithmetic

    with arithmetic("32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with arithmetic("bf16-mixed", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tf32 needs a CUDA device"):
        with arithmetic("tf32", "cpu"):
            pass
    with pytest.raises(ValueError, match="precision must be one of"):
        with arithmetic("16", "cpu"):
            pass


def test_bf16_mixed_step_is_close_to_float32_and_keeps_float32_weights():
    import torch

    from scvi_cli.models import VAE
    from scvi_cli.training.loop import arithmetic

    from test_models import synthetic_counts

    batch = synthetic_counts(n_cells=64, n_genes=40)
    losses = {}
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        model = VAE(40, n_batch=2, use_observed_lib_size=True)
        torch.manual_seed(1)
        with arithmetic(precision, "cpu"):
            out = model.loss_for(batch)
            out.loss.backward()
        assert out.reconstruction_loss.dtype == torch.float32
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in model.parameters())
        losses[precision] = float(out.loss.detach())
    assert abs(losses["bf16-mixed"] - losses["32"]) / losses["32"] < 0.02  # bf16 keeps ~3 significant digits


def test_fused_likelihood_computes_in_float32_from_bf16_inputs():
    import torch

    from scvi_cli.nn.likelihoods import fused_nb_nll

    from test_fused_likelihood import realistic

    x, mu, theta, pi = realistic(cells=8, genes=50, seed=2)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (mu, theta, pi)]
    value = fused_nb_nll(x, *low)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, fused_nb_nll(x, *(t.detach().float() for t in low)))
    value.sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in low)


def test_precision_in_the_spec_and_tf32_refused_on_the_cpu(tmp_path):
    from scvi_cli.errors import SpecError, UsageError
    from scvi_cli.spec import load_spec
    from scvi_cli.training.job import train_from_h5ad

    assert load_spec(None, []).train.precision == "32"
    assert load_spec(None, ["train.precision=32"]).train.precision == "32"
    assert load_spec(None, ["train.precision=bf16-mixed"]).train.precision == "bf16-mixed"
    with pytest.raises(SpecError, match="precision"):
        load_spec(None, ["train.precision=fp16"])
    spec = load_spec(None, ["train.precision=tf32", "train.max_epochs=1"])
    with pytest.raises(UsageError, match="tf32 needs a CUDA device"):
        train_from_h5ad(tmp_path / "missing.h5ad", spec, tmp_path / "m.ckpt", device="cpu")
    assert not list(tmp_path.iterdir())


def test_run_fingerprint_hashes_the_bytes_without_copying_them():
    import hashlib
    import json

    import numpy as np

    from scvi_cli.spec import load_spec
    from scvi_cli.training.job import run_fingerprint

    data = _count_data()
    spec = load_spec(None, [])
    # the plain formula it replaces: the counts' three streams whole (tobytes copies), combined,
    # then every other array's tobytes(), in the same order
    X = data.X
    streams = [np.diff(X.indptr).astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32)]
    counts = hashlib.sha256(str(X.shape[0]).encode())
    for stream in streams:
        counts.update(hashlib.sha256(stream.tobytes()).digest())
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    digest.update(counts.hexdigest().encode())
    for array in (np.asarray(X.shape), data.batch_codes, data.label_codes, data.cat_cov_codes, data.cont_covs):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update("\n".join(data.gene_names).encode())
    assert run_fingerprint(spec, data) == digest.hexdigest()
    data.X.data[0] += 1
    assert run_fingerprint(spec, data) != digest.hexdigest()
