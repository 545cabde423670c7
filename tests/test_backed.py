"""Backed (on-disk) counts: the streaming pass gives the same CountData as loading the file, the
minibatch source sees every cell once per epoch, in-order iteration and training equal the
in-memory ones, and the commands work end to end with --backed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.data import CSRMinibatches, iterate_in_order, load_count_data
from scvi_cli.data import backed as B
from scvi_cli.errors import DataError
from scvi_cli.spec import load_spec

PBMC_SMALL = Path(__file__).parent / "data" / "pbmc_small_seurat.h5ad"


def _write(tmp_path, n=300, g=40, seed=0, zero_cells=(3, 150), csc=False, name="counts.h5ad"):
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(1.0, 0.5, (n, g)).astype(np.float32) * (rng.random((n, g)) < 0.3)
    dense[np.arange(n), rng.integers(0, g, n)] += 1  # no empty cell but those asked for
    dense[list(zero_cells)] = 0
    X = sp.csc_matrix(dense) if csc else sp.csr_matrix(dense)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], n)), "depth": rng.normal(size=n)},
        index=[f"cell{i}" for i in range(n)],
    )
    path = tmp_path / name
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)])).write_h5ad(path)
    return path


def _spec(*extra):
    return load_spec(None, ["data.batch_key=batch", "data.continuous_covariate_keys=[depth]", *extra])


def test_streaming_pass_gives_the_in_memory_count_data(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 64)  # several chunks, a dropped cell in two of them
    path = _write(tmp_path)
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        memory = load_count_data(path, _spec().data)
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        backed = load_count_data(path, _spec().data, backed=True)
    assert backed.backed and not memory.backed
    assert backed.n_cells == memory.n_cells == 298 and backed.n_genes == 40
    assert backed.obs_names == memory.obs_names and backed.categories == memory.categories
    np.testing.assert_array_equal(backed.kept_cells, memory.kept_cells)
    np.testing.assert_array_equal(backed.batch_codes, memory.batch_codes)
    np.testing.assert_array_equal(backed.cont_covs, memory.cont_covs)
    np.testing.assert_array_equal(backed.cell_totals(), memory.cell_totals())
    assert backed.X.nnz == memory.X.nnz
    cells = np.array([0, 1, 2, 200, 297])
    np.testing.assert_array_equal(backed.X.read_cells(cells).toarray(), memory.X[cells].toarray())
    # scattered cells are read window by window, never as the whole span between them
    monkeypatch.setattr(B, "SPAN_ROWS", 50)
    spans = []
    read = backed.X.read_file_rows
    monkeypatch.setattr(backed.X, "read_file_rows", lambda a, b: spans.append(b - a) or read(a, b))
    cells = np.array([0, 3, 49, 120, 121, 260, 297])
    np.testing.assert_array_equal(backed.X.read_cells(cells).toarray(), memory.X[cells].toarray())
    assert len(spans) == 4 and max(spans) <= 50


def test_model_genes_are_matched_by_name_in_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 50)
    path = _write(tmp_path, zero_cells=())
    wanted = ["g5", "g1", "zz", "g39"]
    with pytest.warns(UserWarning, match="1 of the model's 4 genes are missing"):
        memory = load_count_data(path, _spec().data, gene_names=wanted, allow_missing_genes=True)
    with pytest.warns(UserWarning, match="1 of the model's 4 genes are missing"):
        backed = load_count_data(path, _spec().data, gene_names=wanted, allow_missing_genes=True, backed=True)
    everyone = np.arange(backed.n_cells)
    np.testing.assert_array_equal(backed.X.read_cells(everyone).toarray(), memory.X.toarray())


def test_bad_values_and_csc_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 64)
    path = _write(tmp_path, csc=True)
    with pytest.raises(DataError, match=r"stored by columns \(CSC\); backed mode reads cells"):
        load_count_data(path, _spec().data, backed=True)
    adata = ad.read_h5ad(_write(tmp_path, name="ok.h5ad"))
    adata.X = adata.X.tocsr()
    adata.X[200, 1] = 0.5  # in the fourth chunk
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(DataError, match=r"non-integer counts \(first: 0.5 at cell 'cell200', gene 'g1'\)"):
        load_count_data(tmp_path / "bad.h5ad", _spec().data, backed=True)


@pytest.mark.parametrize("batch_size,block,buffer,drop_last", [(16, 10, 3, False), (32, 7, 1, True), (50, 64, 16, False)])
def test_every_cell_once_per_epoch_in_a_seeded_order(tmp_path, batch_size, block, buffer, drop_last):
    path = _write(tmp_path, zero_cells=())
    data = load_count_data(path, _spec().data, backed=True)
    # tag every cell by its position so the minibatches say which cells they hold
    data.cont_covs = np.arange(data.n_cells, dtype=np.float32).reshape(-1, 1)
    indices = np.random.default_rng(0).permutation(data.n_cells)[:250]

    def epoch(seed, number):
        source = B.BackedMinibatches(data, indices, batch_size, shuffle=True, seed=seed, drop_last=drop_last,
                                     block_cells=block, buffer_blocks=buffer)
        source.set_epoch(number)
        batches = list(source)
        assert len(batches) == len(source)
        assert all(len(b) == batch_size for b in batches[:-1])
        return np.concatenate([b.cont_covs.reshape(-1).numpy() for b in batches]).astype(np.int64), batches

    seen, batches = epoch(1, 0)
    if drop_last:
        assert seen.size == 250 // batch_size * batch_size and np.unique(seen).size == seen.size
    else:
        np.testing.assert_array_equal(np.sort(seen), np.sort(indices))
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    again, again_batches = epoch(1, 0)
    np.testing.assert_array_equal(again, seen)
    assert all(torch.equal(a.rows.to_dense(), b.rows.to_dense()) for a, b in zip(batches, again_batches))
    assert not np.array_equal(epoch(1, 1)[0], seen) and not np.array_equal(epoch(2, 0)[0], seen)
    # the counts travel with their cells
    memory = load_count_data(path, _spec().data)
    for b in batches[:3]:
        cells = b.cont_covs.reshape(-1).numpy().astype(np.int64)
        np.testing.assert_array_equal(b.x.numpy(), memory.X[cells].toarray())


def test_in_order_iteration_equals_the_in_memory_source(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 40)
    path = _write(tmp_path)
    with pytest.warns(UserWarning):
        memory, backed = load_count_data(path, _spec().data), load_count_data(path, _spec().data, backed=True)
    for layout in ("dense", "sparse"):
        a = list(iterate_in_order(memory, 64, layout=layout))
        b = list(iterate_in_order(backed, 64, layout=layout))
        assert isinstance(iterate_in_order(backed, 64), B.BackedMinibatches) and len(a) == len(b) == 5
        for x, y in zip(a, b):
            assert torch.equal(x.x, y.x) and torch.equal(x.batch_index, y.batch_index)
            assert torch.equal(x.cont_covs, y.cont_covs)


def test_training_from_disk_equals_training_in_memory_for_the_same_cell_order(tmp_path):
    from scvi_cli.model_factory import build_model, model_kwargs
    from scvi_cli.training.job import train_settings
    from scvi_cli.training.loop import fit

    path = _write(tmp_path, zero_cells=())
    spec = _spec("train.max_epochs=2")
    weights = []
    for backed in (False, True):
        data = load_count_data(path, spec.data, backed=backed)
        torch.manual_seed(0)
        model = build_model("scvi", model_kwargs(spec, data))
        idx = np.arange(data.n_cells)
        source = (B.BackedMinibatches(data, idx, 32, shuffle=False, block_cells=50, buffer_blocks=2) if backed
                  else CSRMinibatches(data, idx, 32, shuffle=False, layout="sparse"))
        torch.manual_seed(1)
        fit(model, source, settings=train_settings(spec, data.n_cells))
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=0, msg=key)


def test_prefetch_stops_with_its_consumer_and_passes_errors_on():
    import threading

    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = B._prefetched(items())
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # the consumer stops early: the thread must end, not block on a full queue
    assert not any(t.name == "scvi-cli-prefetch" for t in threading.enumerate())
    assert len(produced) < 10

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(B._prefetched(failing()))


def test_train_and_apply_commands_with_backed(tmp_path):
    from scvi_cli.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        assert exit_info.value.code == 0

    model = tmp_path / "m.ckpt"
    run("train", PBMC_SMALL, "--out", model, "--backed", "--set", "train.max_epochs=2", "--set", "data.batch_key=batch", "-q")
    run("embed", model, PBMC_SMALL, "--out", tmp_path / "backed.npy", "--backed")
    run("embed", model, PBMC_SMALL, "--out", tmp_path / "memory.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "backed.npy"), np.load(tmp_path / "memory.npy"))
    run("impute", model, PBMC_SMALL, "--out", tmp_path / "i.h5ad", "--backed", "--library-size", "1e4")
    imputed = ad.read_h5ad(tmp_path / "i.h5ad")
    assert imputed.layers["scvi_normalized"].shape == (80, 230)
    np.testing.assert_allclose(np.asarray(imputed.layers["scvi_normalized"]).sum(1), 1e4, rtol=1e-4)


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from scvi_cli.apply import queries
    from scvi_cli.data import backed
    from scvi_cli.trained_model import load_trained_model
    backed.CHUNK_ROWS = 2048  # both files span several chunks, as large files do
    torch.set_num_threads(1)
    model = load_trained_model(sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: measure reading and embedding only
    _, query = model.load_query(sys.argv[2], backed=sys.argv[3] == "backed")
    for block in queries.iter_latent(model.module, query, batch_size=512):
        pass
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_backed_embed_memory_does_not_follow_the_counts(tmp_path):
    """Peak RSS of reading and embedding 10k and 50k cells: in memory it grows with the counts
    (8M more values, 64 MB), backed only with what is kept per cell (names, codes, totals)."""
    rng = np.random.default_rng(0)
    model = tmp_path / "m.ckpt"
    paths = {}
    for n in (10_000, 50_000):
        X = sp.random(n, 1_000, density=0.2, format="csr", dtype=np.float32, random_state=rng)
        X.data = np.ceil(X.data * 5)
        paths[n] = tmp_path / f"{n}.h5ad"
        ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{j}" for j in range(1_000)]),
                   obs=pd.DataFrame(index=[f"c{i}" for i in range(n)])).write_h5ad(paths[n])
    subprocess.run([sys.executable, "-m", "scvi_cli", "train", paths[10_000], "--out", model, "--set",
                    "train.max_epochs=1", "-q", "--threads", "1"], check=True)

    def peak_kib(path, mode):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(model), str(path), mode],
                             check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    backed_growth = peak_kib(paths[50_000], "backed") - peak_kib(paths[10_000], "backed")
    memory_growth = peak_kib(paths[50_000], "memory") - peak_kib(paths[10_000], "memory")
    assert memory_growth > 60 * 1024  # the 64 MB of extra counts, at least
    assert backed_growth < memory_growth / 3


def test_training_shards_read_only_their_own_windows(tmp_path, monkeypatch):
    path = _write(tmp_path, n=600, zero_cells=())
    data = load_count_data(path, _spec().data, backed=True)
    data.cont_covs = np.arange(data.n_cells, dtype=np.float32).reshape(-1, 1)  # each cell's position
    reads = {0: [], 1: []}
    seen, lengths = [], []
    for rank in (0, 1):
        source = B.BackedMinibatches(data, np.arange(600), 16, shuffle=True, seed=5, block_cells=40, buffer_blocks=2)
        source.shard(rank, 2).set_epoch(3)
        original = source.rows.read_cells
        monkeypatch.setattr(source.rows, "read_cells", lambda cells, rank=rank, original=original: reads[rank].append(cells) or original(cells))
        batches = list(source)
        lengths.append(len(batches))
        assert len(batches) == len(source) and all(len(b) == 16 for b in batches)
        seen.append(np.concatenate([b.cont_covs.reshape(-1).numpy() for b in batches]).astype(np.int64))
        monkeypatch.undo()
    assert lengths[0] == lengths[1]
    assert not set(seen[0]) & set(seen[1])  # disjoint shards
    read = [np.concatenate(reads[r]) for r in (0, 1)]
    assert not set(read[0]) & set(read[1]) and len(read[0]) + len(read[1]) == 600  # each cell read by one rank, once
    assert len(seen[0]) + len(seen[1]) >= 600 - 2 * 16 - 40  # at most a block's imbalance and the remainders left out


def test_a_share_read_into_memory_equals_those_rows_of_the_in_memory_data(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 64)
    monkeypatch.setattr(B, "SPAN_ROWS", 50)
    path = _write(tmp_path)
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        memory = load_count_data(path, _spec().data)
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        backed = load_count_data(path, _spec().data, backed=True)
    np.testing.assert_array_equal(backed.X.row_nnz, np.diff(memory.X.indptr))
    cells = np.arange(1, 298, 2)  # every other cell, across chunks and windows
    share = B.in_memory_share(backed, cells)
    assert not share.backed and share.X.dtype == np.float32 and share.X.has_canonical_format
    np.testing.assert_array_equal(share.X.toarray(), memory.X[cells].toarray())
    assert share.obs_names == [memory.obs_names[i] for i in cells] and share.categories == memory.categories
    np.testing.assert_array_equal(share.batch_codes, memory.batch_codes[cells])
    np.testing.assert_array_equal(share.cont_covs, memory.cont_covs[cells])
    np.testing.assert_array_equal(share.cell_totals(), memory.cell_totals()[cells])


def test_the_run_fingerprint_does_not_depend_on_how_the_counts_were_read(tmp_path, monkeypatch):
    from scvi_cli.data.counts import counts_digest
    from scvi_cli.training.job import run_fingerprint

    monkeypatch.setattr(B, "CHUNK_ROWS", 64)  # chunks of the streaming pass, zero cells dropped in two
    path = _write(tmp_path)
    spec = _spec()
    with pytest.warns(UserWarning):
        memory = load_count_data(path, spec.data)
    with pytest.warns(UserWarning):
        backed = load_count_data(path, spec.data, backed=True)
    assert backed.X.digest == counts_digest(memory.X)
    assert run_fingerprint(spec, backed) == run_fingerprint(spec, memory)
    # a digest of the counts: one changed value, or the same entries split into rows differently, changes it
    changed = memory.X.copy()
    changed.data[5] += 1
    assert counts_digest(changed) != counts_digest(memory.X)
    regrouped = sp.csr_matrix((memory.X.data, memory.X.indices, np.r_[0, memory.X.indptr[2:]]), shape=(memory.n_cells - 1, 40))
    assert counts_digest(regrouped) != counts_digest(memory.X)


def test_the_counts_digest_is_the_documented_sha256_on_one_thread_or_two():
    """CountsDigest by hand (three sha256 streams: row lengths and columns as int64, values as
    float32, combined after the row count), against the chunked and the two-thread digests."""
    import hashlib

    from scvi_cli.data.counts import counts_digest

    X = sp.random(3000, 2000, density=0.2, format="csr", random_state=0, dtype=np.float32)  # 1.2M entries
    streams = [np.diff(X.indptr).astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32)]
    want = hashlib.sha256(b"3000")
    for stream in streams:
        want.update(hashlib.sha256(stream.tobytes()).digest())
    assert X.nnz >= 1 << 20  # large enough for the second thread
    assert counts_digest(X, threads=1) == counts_digest(X, threads=2) == want.hexdigest()
