"""Outputs: every format reads back with the right index, columns and values; chunked writes equal
one-shot writes; h5ad results land in a faithful copy of the input; failures leave nothing."""

from __future__ import annotations

import gzip
import os
import sys

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from scvi_cli.apply import outputs
from scvi_cli.atomic import atomic_write, check_writable, remove_stale_temporaries, temp_name
from scvi_cli.errors import OutputError, UsageError
from scvi_cli.apply.outputs import (
    SUPPORTED,
    check_output,
    open_chunked_writer,
    open_h5ad_layer_writer,
    output_format,
    write_h5ad_with_layer,
    write_h5ad_with_obsm,
    write_h5ad_with_sample_layers,
    write_table,
)

N, G = 23, 5
CELLS = [f"cell-{i}" for i in range(N)]
GENES = ["CD3E", "MS4A1", "gene,with,commas", "LYZ", "NKG7"]


@pytest.fixture
def values():
    rng = np.random.default_rng(0)
    return (rng.gamma(1.0, 2.0, size=(N, G)) * (rng.random((N, G)) > 0.3)).astype(np.float32)


def read_back(path, fmt):
    """Read a table with an ordinary reader of its format: (index, columns, values)."""
    if fmt == ".npy":
        return None, None, np.load(path)
    if fmt in (".csv", ".csv.gz", ".tsv", ".tsv.gz"):
        frame = pd.read_csv(path, index_col=0, sep="\t" if fmt.startswith(".tsv") else ",")
    elif fmt == ".parquet":
        frame = pd.read_parquet(path)
    else:
        adata = anndata.read_h5ad(path)
        X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
        return list(adata.obs_names), list(adata.var_names), X
    return list(frame.index), list(frame.columns), frame.to_numpy()


FORMATS = [".npy", ".csv", ".tsv", ".csv.gz", ".tsv.gz", ".parquet", ".h5ad"]


# ---------------------------------------------------------------- atomic.py


def test_temp_name_keeps_the_real_suffix_last():
    assert temp_name("out.h5ad").startswith(".out.tmp-") and temp_name("out.h5ad").endswith(".h5ad")
    assert temp_name("x.csv.gz").endswith(".csv.gz") and temp_name("x.csv.gz").startswith(".x.tmp-")
    assert f"-{os.getpid()}-" in temp_name("m.ckpt") and temp_name("m.ckpt").startswith(".m.tmp-")
    assert temp_name("m.ckpt") != temp_name("m.ckpt")


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    from scvi_cli.atomic import _host_tag

    target = tmp_path / "latent.npy"
    host = _host_tag()
    dead = tmp_path / f".latent.tmp-{host}-{_dead_pid()}-0123abcd.npy"
    live = tmp_path / f".latent.tmp-{host}-{os.getpid()}-0123abcd.npy"
    elsewhere = tmp_path / f".latent.tmp-{host}x-{_dead_pid()}-0123abcd.npy"
    other_output = tmp_path / f".other.tmp-{host}-{_dead_pid()}-0123abcd.npy"
    for leftover in (dead, live, elsewhere, other_output):
        leftover.write_bytes(b"x" * 2048)
    with pytest.warns(UserWarning, match=r"removed \.latent\.tmp-.*\(2\.0 KB\), an unfinished temporary left by process"):
        with atomic_write(target) as tmp:
            np.save(tmp, np.zeros(3))
    assert target.exists() and not dead.exists()
    assert live.exists() and elsewhere.exists() and other_output.exists()
    assert remove_stale_temporaries(target) == []


def test_a_writer_killed_outright_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    import signal
    import subprocess
    import warnings

    target = tmp_path / "big.npy"
    script = (
        "import os, signal, sys\n"
        "from scvi_cli.atomic import AtomicFile\n"
        "pending = AtomicFile(sys.argv[1])\n"
        "pending.tmp_path.write_bytes(b'0' * 100000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(target)])
    assert run.returncode == -signal.SIGKILL
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".big.tmp-")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_write(target) as tmp:
            np.save(tmp, np.ones(2))
    assert not leftover.exists() and [p.name for p in tmp_path.iterdir()] == ["big.npy"]
    assert any(leftover.name in str(w.message) and "100.0 KB" in str(w.message) for w in caught)


def test_atomic_write_commits_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".txt")
        tmp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_write(target) as tmp:
                tmp.write_text("two, half written")
                raise error
        assert os.listdir(tmp_path) == ["a.txt"] and target.read_text() == "one"


def test_atomic_write_turns_os_errors_into_output_errors(tmp_path):
    with pytest.raises(OutputError, match=r"a\.txt: cannot write: No space left on device"):
        with atomic_write(tmp_path / "a.txt"):
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_check_writable(tmp_path):
    check_writable(tmp_path / "fine.csv")
    with pytest.raises(OutputError, match=r"out\.csv: directory '.*missing' does not exist"):
        check_writable(tmp_path / "missing" / "out.csv")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        check_writable(tmp_path / "file" / "out.csv")
    with pytest.raises(OutputError, match="is a directory"):
        check_writable(tmp_path)


def test_check_writable_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (root) whom permissions do not stop")
        with pytest.raises(OutputError, match="is not writable"):
            check_writable(locked / "out.npy")
        with pytest.raises(OutputError, match="is not writable"):
            write_table(locked / "out.npy", np.zeros((1, 1)), ["c"], ["g"])
    finally:
        locked.chmod(0o700)


def test_check_writable_reports_unwritable_directory_even_as_root(tmp_path, monkeypatch):
    import scvi_cli.atomic

    monkeypatch.setattr(scvi_cli.atomic.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=f"out.h5ad: directory '{tmp_path}' is not writable"):
        check_writable(tmp_path / "out.h5ad")


# ---------------------------------------------------------------- formats


def test_output_format():
    for ext in SUPPORTED:
        assert output_format(f"dir/result{ext}") == ext
    assert output_format("x.CSV") == ".csv"
    assert output_format("x.csv.gz") == ".csv.gz" and output_format("x.tsv.gz") == ".tsv.gz"
    for bad in ("x.txt", "x.h5", "x.gz", "noext", ".npy"):
        with pytest.raises(UsageError) as err:
            output_format(bad)
        assert str(err.value).startswith(f"{bad}: unsupported output extension")
        assert ".h5ad, .npy, .csv, .tsv, .parquet" in str(err.value)


def test_check_output_validates_extension_and_directory(tmp_path):
    assert check_output(tmp_path / "z.parquet") == ".parquet"
    with pytest.raises(UsageError, match="unsupported"):
        check_output(tmp_path / "z.xlsx")
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "no" / "z.csv")


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_table_reads_back(tmp_path, values, fmt):
    path = tmp_path / f"latent{fmt}"
    write_table(path, values, CELLS, GENES)
    index, columns, back = read_back(path, fmt)
    if fmt != ".npy":
        assert index == CELLS and columns == GENES
    # Text formats print float32 in shortest round-trip form, so the values survive exactly.
    np.testing.assert_array_equal(back.astype(np.float32), values)
    assert os.listdir(tmp_path) == [path.name]


def test_table_layouts(tmp_path, values):
    write_table(tmp_path / "t.csv", values, CELLS, GENES)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == 'obs_names,CD3E,MS4A1,"gene,with,commas",LYZ,NKG7'
    assert lines[1].startswith("cell-0,") and len(lines) == N + 1
    write_table(tmp_path / "t.tsv.gz", values, CELLS, GENES, index_name="cell")
    with gzip.open(tmp_path / "t.tsv.gz", "rt") as fh:
        assert fh.readline() == "cell\tCD3E\tMS4A1\tgene,with,commas\tLYZ\tNKG7\n"
    write_table(tmp_path / "t.parquet", values, CELLS, GENES)
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column_names == ["obs_names", *GENES]
    assert table.column("obs_names").to_pylist() == CELLS
    assert str(table.schema.field("LYZ").type) == "float"


def test_dtype_and_sparse_inputs(tmp_path, values):
    as64 = values.astype(np.float64) / 3
    write_table(tmp_path / "a.npy", as64, CELLS, GENES)
    back = np.load(tmp_path / "a.npy")
    assert back.dtype == np.float64 and np.array_equal(back, as64)

    counts = sp.csr_matrix(np.round(values).astype(np.int32))
    write_table(tmp_path / "c.csv", counts, CELLS, GENES)
    assert (tmp_path / "c.csv").read_text().splitlines()[1].split(",")[1:] == [
        str(v) for v in counts[0].toarray()[0]
    ]
    write_table(tmp_path / "c.h5ad", counts, CELLS, GENES)
    adata = anndata.read_h5ad(tmp_path / "c.h5ad")
    assert sp.issparse(adata.X) and (adata.X != counts).nnz == 0


def test_write_table_shape_mismatch(tmp_path, values):
    with pytest.raises(ValueError, match="do not match 22 rows x 5 columns"):
        write_table(tmp_path / "x.csv", values, CELLS[:-1], GENES)
    assert os.listdir(tmp_path) == []


def test_parquet_needs_unique_names(tmp_path, values):
    with pytest.raises(OutputError, match="'LYZ' repeats another column"):
        write_table(tmp_path / "d.parquet", values, CELLS, ["CD3E", "MS4A1", "LYZ", "LYZ", "NKG7"])
    with pytest.raises(OutputError, match="repeats the index column"):
        write_table(tmp_path / "d.parquet", values, CELLS, ["obs_names", "MS4A1", "A", "LYZ", "NKG7"])
    assert os.listdir(tmp_path) == []


def test_missing_pyarrow_gives_install_hint(tmp_path, values, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(OutputError, match=r"z\.parquet: .*pip install 'scvi-cli\[parquet\]'"):
        check_output(tmp_path / "z.parquet")
    with pytest.raises(OutputError, match="pip install 'scvi-cli"):
        write_table(tmp_path / "z.parquet", values, CELLS, GENES)
    assert os.listdir(tmp_path) == []


def test_unsupported_extension_writes_nothing(tmp_path, values):
    with pytest.raises(UsageError, match="unsupported output extension"):
        write_table(tmp_path / "x.xlsx", values, CELLS, GENES)
    with pytest.raises(UsageError, match="unsupported output extension"):
        open_chunked_writer(tmp_path / "x.json", CELLS, GENES)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- chunked writer

BLOCKS = [(0, 7), (7, 8), (8, 8), (8, 20), (20, 23)]  # uneven, including an empty block


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_writer_equals_one_shot_write(tmp_path, values, fmt):
    one_shot = tmp_path / f"one{fmt}"
    write_table(one_shot, values, CELLS, GENES)
    chunked = tmp_path / f"chunked{fmt}"
    with open_chunked_writer(chunked, CELLS, GENES) as writer:
        for start, stop in BLOCKS:
            writer.write(values[start:stop])
            assert not chunked.exists()  # nothing visible before the commit
        assert writer.rows_written == N
    for a, b in zip(read_back(one_shot, fmt), read_back(chunked, fmt)):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    if fmt in (".npy", ".csv", ".tsv"):
        assert one_shot.read_bytes() == chunked.read_bytes()
    if fmt == ".npy":  # byte for byte what numpy itself writes
        np.save(tmp_path / "numpy.npy", values)
        assert (tmp_path / "numpy.npy").read_bytes() == chunked.read_bytes()
        (tmp_path / "numpy.npy").unlink()
    assert sorted(os.listdir(tmp_path)) == sorted([one_shot.name, chunked.name])


def test_chunked_writer_accepts_sparse_and_tensor_blocks(tmp_path, values):
    import torch

    with open_chunked_writer(tmp_path / "m.npy", CELLS, GENES) as writer:
        writer.write(sp.csr_matrix(values[:10]))
        writer.write(torch.from_numpy(values[10:]))
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), values)


def test_parquet_row_groups_are_buffered(tmp_path, values, monkeypatch):
    path = tmp_path / "g.parquet"
    with open_chunked_writer(path, CELLS, GENES) as writer:
        for start, stop in BLOCKS:
            writer.write(values[start:stop])
    assert pq.ParquetFile(path).num_row_groups == 1  # small blocks merge into one row group
    monkeypatch.setattr(outputs, "_ROW_GROUP_BYTES", 1)
    with open_chunked_writer(path, CELLS, GENES) as writer:
        for start, stop in BLOCKS:
            writer.write(values[start:stop])
    assert pq.ParquetFile(path).num_row_groups == 4  # one per non-empty block
    np.testing.assert_array_equal(pd.read_parquet(path).to_numpy(), values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_abort_and_exceptions_leave_nothing(tmp_path, values, fmt):
    path = tmp_path / f"r{fmt}"
    writer = open_chunked_writer(path, CELLS, GENES)
    writer.write(values[:10])
    writer.abort()
    assert os.listdir(tmp_path) == []

    with pytest.raises(KeyboardInterrupt):
        with open_chunked_writer(path, CELLS, GENES) as writer:
            writer.write(values[:10])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_output(tmp_path, values):
    path = tmp_path / "r.csv"
    write_table(path, values, CELLS, GENES)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with open_chunked_writer(path, CELLS, GENES) as writer:
            writer.write(values[:5] * 2)
            raise RuntimeError("model blew up")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["r.csv"]


def test_wrong_block_shapes(tmp_path, values):
    writer = open_chunked_writer(tmp_path / "w.npy", CELLS, GENES)
    with pytest.raises(ValueError, match=r"expected \(rows, 5\)"):
        writer.write(values[:, :4])
    assert writer.closed and os.listdir(tmp_path) == []  # a failed write aborts

    writer = open_chunked_writer(tmp_path / "w.npy", CELLS, GENES)
    writer.write(values)
    with pytest.raises(ValueError, match="overruns"):
        writer.write(values[:1])
    assert os.listdir(tmp_path) == []

    writer = open_chunked_writer(tmp_path / "w.npy", CELLS, GENES)
    writer.write(values[:3])
    with pytest.raises(ValueError, match="only 3 of 23 rows were written"):
        writer.close()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- h5ad with results


@pytest.fixture
def adata():
    rng = np.random.default_rng(1)
    counts = sp.random(N, G, density=0.4, format="csr", random_state=2, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    a = anndata.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {"batch": pd.Categorical(rng.choice(["b1", "b2"], N)), "n_counts": np.asarray(counts.sum(1)).ravel()},
            index=CELLS,
        ),
        var=pd.DataFrame({"highly_variable": [True, False, True, True, False]}, index=GENES),
    )
    a.obsm["X_pca"] = rng.normal(size=(N, 3)).astype(np.float32)
    a.layers["counts"] = counts.copy()
    a.uns["note"] = "kept"
    return a


def _assert_input_kept(back, original):
    assert list(back.obs_names) == list(original.obs_names) and list(back.var_names) == list(original.var_names)
    assert (back.X != original.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, original.obs)
    pd.testing.assert_frame_equal(back.var, original.var)
    np.testing.assert_array_equal(back.obsm["X_pca"], original.obsm["X_pca"])
    assert (back.layers["counts"] != original.layers["counts"]).nnz == 0
    assert back.uns["note"] == "kept"


def test_h5ad_layer_written_blockwise(tmp_path, adata, values):
    path = tmp_path / "out.h5ad"

    def blocks():
        for start, stop in BLOCKS:
            yield values[start:stop]

    write_h5ad_with_layer(path, adata, "scvi_normalized", blocks())
    back = anndata.read_h5ad(path)
    assert back.layers["scvi_normalized"].dtype == np.float32
    np.testing.assert_array_equal(back.layers["scvi_normalized"], values)
    _assert_input_kept(back, adata)
    assert "scvi_normalized" not in adata.layers  # the caller's AnnData is not changed
    with h5py.File(path, "r") as f:
        attrs = dict(f["layers/scvi_normalized"].attrs)
    assert attrs == {"encoding-type": "array", "encoding-version": "0.2.0"}
    assert os.listdir(tmp_path) == ["out.h5ad"]


def test_h5ad_layer_from_whole_matrices_and_writer(tmp_path, adata, values):
    write_h5ad_with_layer(tmp_path / "dense.h5ad", adata, "norm", values)
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "dense.h5ad").layers["norm"], values)
    write_h5ad_with_layer(tmp_path / "sparse.h5ad", adata, "norm", sp.csr_matrix(values))
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "sparse.h5ad").layers["norm"], values)
    with open_h5ad_layer_writer(tmp_path / "w.h5ad", adata, "norm") as writer:
        writer.write(values[:12])
        writer.write(values[12:])
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "w.h5ad").layers["norm"], values)
    with pytest.raises(ValueError, match="does not match"):
        write_h5ad_with_layer(tmp_path / "bad.h5ad", adata, "norm", values[:, :2])


def test_h5ad_layer_replaces_a_same_named_layer(tmp_path, adata, values):
    old = adata.layers["counts"]
    path = tmp_path / "r.h5ad"
    write_h5ad_with_layer(path, adata, "counts", values)
    np.testing.assert_array_equal(anndata.read_h5ad(path).layers["counts"], values)
    assert adata.layers["counts"] is old  # restored in the caller's object


def test_h5ad_layer_from_backed_input_and_in_place(tmp_path, adata, values):
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    backed = anndata.read_h5ad(source, backed="r")
    write_h5ad_with_layer(tmp_path / "out.h5ad", backed, "norm", values)
    back = anndata.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.layers["norm"], values)
    _assert_input_kept(back, adata)
    backed.file.close()

    loaded = anndata.read_h5ad(source)
    write_h5ad_with_layer(source, loaded, "norm", values)  # output path == input path
    np.testing.assert_array_equal(anndata.read_h5ad(source).layers["norm"], values)


def test_h5ad_layer_failure_leaves_nothing(tmp_path, adata, values):
    def blocks():
        yield values[:10]
        raise RuntimeError("out of memory in the model")

    with pytest.raises(RuntimeError):
        write_h5ad_with_layer(tmp_path / "x.h5ad", adata, "norm", blocks())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="only 10 of 23 rows"):
        write_h5ad_with_layer(tmp_path / "x.h5ad", adata, "norm", iter([values[:10]]))
    assert os.listdir(tmp_path) == []


def test_h5ad_outputs_need_h5ad_paths_and_valid_names(tmp_path, adata, values):
    with pytest.raises(OutputError, match=r"x\.csv: .*use a \.h5ad path"):
        write_h5ad_with_layer(tmp_path / "x.csv", adata, "norm", values)
    with pytest.raises(UsageError, match="invalid layer name 'a/b'"):
        write_h5ad_with_layer(tmp_path / "x.h5ad", adata, "a/b", values)
    with pytest.raises(OutputError, match="does not exist"):
        write_h5ad_with_obsm(tmp_path / "no" / "x.h5ad", adata, "X_scvi", values)
    assert os.listdir(tmp_path) == []


def test_h5ad_with_obsm(tmp_path, adata, values):
    latent = values[:, :2].astype(np.float64)
    write_h5ad_with_obsm(tmp_path / "full.h5ad", adata, "X_scvi", latent)
    back = anndata.read_h5ad(tmp_path / "full.h5ad")
    np.testing.assert_array_equal(back.obsm["X_scvi"], latent)
    _assert_input_kept(back, adata)
    assert "X_scvi" not in adata.obsm

    write_h5ad_with_obsm(tmp_path / "min.h5ad", adata, "X_scvi", latent, minimal=True)
    small = anndata.read_h5ad(tmp_path / "min.h5ad")
    np.testing.assert_array_equal(small.obsm["X_scvi"], latent)
    assert list(small.obsm) == ["X_scvi"] and list(small.layers) == []
    assert small.shape == adata.shape and sp.issparse(small.X) and small.X.nnz == 0
    pd.testing.assert_frame_equal(small.obs, adata.obs)
    assert list(small.var_names) == GENES and list(small.var.columns) == []
    assert os.path.getsize(tmp_path / "min.h5ad") < os.path.getsize(tmp_path / "full.h5ad")

    with pytest.raises(ValueError, match="do not match 23 cells"):
        write_h5ad_with_obsm(tmp_path / "bad.h5ad", adata, "X_scvi", latent[:5])


def test_h5ad_with_sample_layers(tmp_path, adata):
    rng = np.random.default_rng(3)
    samples = {f"sample_{i}": sp.csr_matrix(rng.poisson(2.0, size=(N, G)).astype(np.float32)) for i in range(3)}
    write_h5ad_with_sample_layers(tmp_path / "s.h5ad", adata, samples)
    back = anndata.read_h5ad(tmp_path / "s.h5ad")
    for name, matrix in samples.items():
        assert sp.issparse(back.layers[name]) and (back.layers[name] != matrix).nnz == 0
    _assert_input_kept(back, adata)
    assert set(adata.layers) == {"counts"}
    with pytest.raises(ValueError, match="'bad' of shape"):
        write_h5ad_with_sample_layers(tmp_path / "t.h5ad", adata, {"bad": sp.csr_matrix((2, 2))})
    assert os.listdir(tmp_path) == ["s.h5ad"]
