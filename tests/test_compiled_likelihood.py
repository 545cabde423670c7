"""The fused NLL through its native kernel (nn/nb_kernel.c) against the plain formulas and the eager
passes, the kernel's build and fallback, and `train.compile` end to end."""

import math
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch

from scvi_cli.nn import likelihoods, native
from scvi_cli.nn.likelihoods import compiled_likelihood, fused_nb_nll, likelihood_compile_failure
from scvi_cli.nn.sparse_input import SparseRows

from test_fused_likelihood import (
    _rows_with_stored_zeros,
    assert_float32_close_to_plain_formula,
    extreme_grid,
    fused,
    plain_nll_log_mu,
    realistic,
    scaled_error,
    value_and_grads,
)

needs_compiler = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler for the likelihood kernel")


@pytest.fixture
def fresh_kernel(monkeypatch):
    """No failure recorded before the test (the library itself stays loaded: it is the same)."""
    monkeypatch.setitem(likelihoods._KERNEL, "failed", None)
    monkeypatch.setitem(native._LIBRARY, "error", None)
    yield


@pytest.fixture
def compiled(fresh_kernel, monkeypatch):
    """Fused NLLs through the native kernel within the test, which must build and be the one used."""
    calls = []
    original = native.nb_nll_rows
    monkeypatch.setattr(native, "nb_nll_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    with compiled_likelihood(True):
        yield calls
    assert likelihood_compile_failure() is None, likelihood_compile_failure()


@needs_compiler
@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta-gene", "theta-cell"])
def test_kernel_float32_matches_plain_formula_at_realistic_sizes(compiled, zinb, log, per_cell_theta):
    x, mu, theta, pi = realistic(per_cell_theta=per_cell_theta, seed=int(zinb) + 2 * int(log))
    counts = _rows_with_stored_zeros(x)  # CSR, as training passes them, with stored zeros
    pi = pi if zinb else None
    loc = mu.log() if log else mu
    got = value_and_grads(lambda _, *p: fused(counts, *p, log=log), None, loc, theta, pi)
    assert compiled, "the kernel was not used"
    assert_float32_close_to_plain_formula(got, x, loc, theta, pi, log)


@needs_compiler
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
def test_kernel_extreme_parameters_finite_and_as_close_as_the_plain_formula(compiled, log):
    mu, theta, x, pi = extreme_grid(torch.float32)
    loc = mu.log() if log else mu
    counts = SparseRows.from_dense(x)
    got = value_and_grads(lambda _, *p: fused(counts, *p, log=log), None, loc, theta, pi)
    assert compiled and all(torch.isfinite(g).all() for g in got)
    to64 = lambda t: t.double()
    with compiled_likelihood(False):  # the truth: eager passes in float64
        want = value_and_grads(lambda x_, *p: fused(x_, *p, log=log), x.double(), to64(loc), to64(theta), to64(pi))
        eager32 = value_and_grads(lambda x_, *p: fused(x_, *p, log=log), x, loc, theta, pi)
    rel = lambda a, b: float(((a.double() - b) / b.abs()).abs().max())
    assert rel(got[0], want[0]) <= 2 * rel(eager32[0], want[0]) + 1e-6
    for g, w, p in zip(got, want, eager32):
        assert scaled_error(g, w) <= max(2 * scaled_error(p, w), 1e-6)


@needs_compiler
@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
def test_kernel_equals_eager_passes_across_count_sizes_and_empty_rows(compiled, zinb):
    """Small integer counts (products and sums in the kernel), large and non-integer ones (lgamma
    and digamma), a row without counts and a row of stored zeros only: the same values and
    gradients as the eager passes, up to float32 rounding."""
    torch.manual_seed(0)
    cells, genes = 6, 40
    x = torch.zeros(cells, genes)
    x[0, :16] = torch.arange(1.0, 17.0)            # 1..16: the product path
    x[1, :6] = torch.tensor([17.0, 18.0, 100.0, 1023.0, 1024.0, 50_000.0])  # lgamma / table
    x[2, :5] = torch.tensor([0.5, 1.5, 2.25, 16.5, 300.7])  # not integers
    x[3, 7] = 1.0
    # row 4: no counts; row 5: stored zeros only (below)
    rows = SparseRows.from_dense(x)
    indptr = torch.cat([rows.indptr[:-1], torch.tensor([rows.nnz + 3])])  # row 5 gets three stored zeros
    counts = SparseRows(indptr, torch.cat([rows.indices, torch.tensor([1, 5, 9])]),
                        torch.cat([rows.values, torch.zeros(3)]), genes)
    mu = torch.rand(cells, genes) * 20 + 1e-3
    theta = torch.rand(genes) * 10 + 0.05
    pi = torch.randn(cells, genes) if zinb else None
    got = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
    assert compiled
    with compiled_likelihood(False):
        want = value_and_grads(lambda _, *p: fused(x.double(), *p), None, mu.double(), theta.double(),
                               None if pi is None else pi.double())
    for g, w in zip(got, want):
        assert scaled_error(g, w) < 2e-6


@needs_compiler
def test_kernel_gamma_terms_against_scipy():
    """The terms the kernel adds at a count x: lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    and its theta derivative digamma(theta) - digamma(x + theta) (products and reciprocals up to
    16, a log-factorial table, lgamma / digamma beyond), against scipy."""
    import ctypes

    library = native.kernel()
    value, d_theta = ctypes.c_double(), ctypes.c_double()
    for x in (1, 2, 5, 16, 17, 100, 1023, 1024, 5e4, 0.5, 2.25, 16.5):
        for theta in (1e-4, 0.05, 1.0, 37.5, 1e3, 1e7, 1e13, 1e17):
            library.nb_gamma_terms(ctypes.c_double(x), ctypes.c_double(theta), ctypes.byref(value), ctypes.byref(d_theta))
            want = scipy.special.gammaln(x + theta) - scipy.special.gammaln(theta) - scipy.special.gammaln(x + 1)
            want_d = scipy.special.digamma(theta) - scipy.special.digamma(x + theta)
            if x <= 16 and x == int(x):  # a product: exact to double rounding, where scipy's difference cancels
                want = math.fsum(math.log(theta + k) for k in range(int(x))) - math.lgamma(x + 1)
                scale = 1.0
            else:  # lgamma(x + theta) - lgamma(theta) cancels in both, by about lgamma's magnitude
                scale = max(1.0, abs(scipy.special.gammaln(x + theta)))
            assert math.isclose(value.value, want, rel_tol=1e-10, abs_tol=1e-12 * scale), (x, theta, value.value, want)
            assert math.isclose(d_theta.value, want_d, rel_tol=1e-9, abs_tol=1e-12), (x, theta, d_theta.value, want_d)


@needs_compiler
def test_kernel_d_pi_at_counts_is_sigmoid_pi_to_float_precision(compiled):
    """At a count the zero-inflation logit's derivative is sigmoid(pi) alone: tiny values (pi =
    -20) are kept, not lost in a float32 difference with sigmoid(b)."""
    x = torch.tensor([[3.0, 0.0, 1.0]])
    mu = torch.tensor([[1e3, 1.0, 5.0]])
    theta = torch.tensor([10.0, 1.0, 2.0])
    pi = torch.tensor([[-20.0, 0.0, -30.0]], requires_grad=True)
    fused(SparseRows.from_dense(x), mu, theta, pi).sum().backward()
    assert compiled
    want = torch.sigmoid(pi.detach().double())[0, [0, 2]]
    torch.testing.assert_close(pi.grad[0, [0, 2]].double(), want, rtol=1e-6, atol=0)


@needs_compiler
def test_kernel_invalid_counts_and_theta_give_nan_not_a_crash_or_a_hang(compiled):
    """Negative counts (the loader refuses them, a caller of fused_nb_nll may not) and theta of
    -inf give NaN rows, as the eager passes do, instead of reading past a table or looping."""
    for count, theta_value in ((-1.0, 1.0), (-1e8, 1.0), (2.5, float("-inf")), (20.0, -1e20)):
        counts = SparseRows(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([count]), 2)
        nll = fused(counts, torch.tensor([[1.0, 1.0]]), torch.tensor([theta_value, 1.0]))
        with compiled_likelihood(False):
            eager = fused(counts, torch.tensor([[1.0, 1.0]]), torch.tensor([theta_value, 1.0]))
        assert torch.isnan(nll).all() and torch.isnan(eager).all(), (count, theta_value)


@needs_compiler
def test_kernel_and_eager_take_non_contiguous_and_broadcast_theta_and_pi(compiled):
    torch.manual_seed(1)
    x = torch.poisson(torch.rand(5, 7) * 3)
    counts = SparseRows.from_dense(x)
    mu = torch.rand(5, 7) * 4 + 0.1
    thetas = [torch.rand(7) + 0.5, torch.rand(1, 7) + 0.5, torch.rand(5, 1) + 0.5, (torch.rand(7, 5) + 0.5).t()]
    pis = [None, torch.randn(5, 7), torch.randn(7), torch.randn(5, 1), torch.randn(7, 5).t()]
    for theta in thetas:
        for pi in pis:
            got = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
            with compiled_likelihood(False):
                want = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
            for g, w in zip(got, want):
                assert g.shape == w.shape and scaled_error(g, w) < 2e-6
    assert len(compiled) == len(thetas) * len(pis)


@needs_compiler
def test_kernel_results_do_not_depend_on_the_thread_count(compiled):
    x, mu, theta, pi = realistic(cells=64, genes=300, seed=8)
    counts = SparseRows.from_dense(x)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_compiler
def test_inputs_the_kernel_does_not_take_use_the_eager_passes(compiled):
    """Dense counts, Monte Carlo draws (S, B, G) and float64 go to the eager passes."""
    x, mu, theta, pi = realistic(cells=8, genes=50, seed=6)
    counts = SparseRows.from_dense(x)
    fused(x, mu, theta, pi)
    fused(counts, torch.stack([mu, mu * 0.5]), theta, pi)
    fused(counts.to(dtype=torch.float64), mu.double(), theta.double(), pi.double())
    assert not compiled


def test_a_failed_build_warns_once_and_falls_back_to_the_same_math(monkeypatch, fresh_kernel, tmp_path):
    x, mu, theta, pi = realistic(cells=8, genes=40, seed=2)
    counts = SparseRows.from_dense(x)
    monkeypatch.setitem(native._LIBRARY, "handle", None)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    want = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
    with compiled_likelihood(True), pytest.warns(UserWarning, match=r"could not be built \(no C compiler .*\); using eager") as caught:
        got = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
        again = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
    assert len(caught) == 1
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert likelihood_compile_failure().startswith("no C compiler")
    with compiled_likelihood(True):  # not retried in this process
        assert not likelihoods._KERNEL["enabled"]


def test_a_failure_inside_a_nested_block_stays_failed_outside_it(monkeypatch, fresh_kernel):
    x, mu, theta, pi = realistic(cells=4, genes=20, seed=3)
    monkeypatch.setitem(native._LIBRARY, "handle", None)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    with compiled_likelihood(True):
        with compiled_likelihood(True), pytest.warns(UserWarning, match="could not be built"):
            fused(SparseRows.from_dense(x), mu, theta, pi)
        assert not likelihoods._KERNEL["enabled"]


@needs_compiler
def test_a_compiler_error_is_reported_in_one_line_and_the_plain_build_is_tried(monkeypatch, tmp_path):
    """A build that fails names the compiler and its first error line; a failing vector-maths build
    falls back to the plain one, which is cached under the cache directory."""
    monkeypatch.setenv("SCVI_CLI_CACHE_DIR", str(tmp_path))
    source = b"#error deliberately broken\n"
    with pytest.raises(native.KernelUnavailable, match=r"failed: .*deliberately broken"):
        native._build(native.find_compiler(), source, (native.BASE_FLAGS, native.LIBRARIES))
    assert not list(tmp_path.glob("*.so"))  # nothing half-written
    sets = native._flag_sets(native.find_compiler())
    assert sets[-1] == (native.BASE_FLAGS + native._vector_flags(), native.LIBRARIES)  # plain C99, one thread
    good = resources.files("scvi_cli.nn").joinpath(native.SOURCE_NAME).read_bytes()
    built = native._build(native.find_compiler(), good, sets[-1])
    assert built.parent == tmp_path and built.exists()
    assert native._build(native.find_compiler(), good, sets[-1]) == built  # cached


@needs_compiler
def test_every_build_the_loader_may_fall_back_to_computes_the_same(monkeypatch, tmp_path, compiled):
    """With and without OpenMP and libmvec (the fallbacks where either is missing): values and
    gradients as close to the float64 truth as the eager passes in float32."""
    import ctypes

    monkeypatch.setenv("SCVI_CLI_CACHE_DIR", str(tmp_path))
    compiler = native.find_compiler()
    source = resources.files("scvi_cli.nn").joinpath(native.SOURCE_NAME).read_bytes()
    x, mu, theta, pi = realistic(cells=32, genes=300, seed=9)
    counts = _rows_with_stored_zeros(x)
    with compiled_likelihood(False):  # the truth in float64, and what the eager passes achieve in float32
        want = value_and_grads(lambda _, *p: fused(x.double(), *p), None, mu.double(), theta.double(), pi.double())
        eager32 = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
    for flags in native._flag_sets(compiler):
        handle = ctypes.CDLL(str(native._build(compiler, source, flags)))
        handle.nb_nll_rows.restype = None
        handle.nb_nll_rows.argtypes = native.ARGUMENT_TYPES
        monkeypatch.setitem(native._LIBRARY, "handle", handle)
        got = value_and_grads(lambda _, *p: fused(counts, *p), None, mu, theta, pi)
        for g, w, e in zip(got, want, eager32):
            assert scaled_error(g, w) < max(2 * scaled_error(e, w), 1e-6), flags
    assert len(compiled) == len(native._flag_sets(compiler))


def test_cache_dir_falls_back_to_the_temp_dir_where_the_cache_cannot_be_made(monkeypatch, tmp_path):
    monkeypatch.delenv("SCVI_CLI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache" / "scvi-cli"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert native.cache_dir().parent == Path(tempfile.gettempdir())
    monkeypatch.setenv("SCVI_CLI_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_dir() == tmp_path / "mine"


def test_the_temp_dir_cache_is_private_or_not_used(monkeypatch, tmp_path):
    """The temp-dir fallback is made 0700; one that is open to others (where another user could
    plant a library to be loaded) is not used: a fresh private folder is."""
    import os
    import stat

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = native._private_temp_dir()
    assert private.parent == tmp_path and stat.S_IMODE(private.stat().st_mode) == 0o700
    assert native._private_temp_dir() == private
    os.chmod(private, 0o777)
    other = native._private_temp_dir()
    assert other != private and other.parent == tmp_path and stat.S_IMODE(other.stat().st_mode) == 0o700


def test_auto_uses_the_kernel_on_the_cpu_with_a_c_compiler(monkeypatch):
    from scvi_cli.training.job import compile_likelihood_for

    cpu = torch.device("cpu")
    monkeypatch.setattr(native, "find_compiler", lambda: "/usr/bin/cc")
    assert compile_likelihood_for("auto", cpu) and not compile_likelihood_for("auto", torch.device("cuda"))
    assert compile_likelihood_for(True, cpu) and not compile_likelihood_for(False, cpu)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    assert not compile_likelihood_for("auto", cpu)


@needs_compiler
def test_train_compile_true_is_deterministic_and_close_to_eager(tmp_path, pbmc_small, run_cli, fresh_kernel):
    from scvi_cli.checkpoint import load_checkpoint

    args = ["--set", "train.max_epochs=3", "--set", "data.batch_key=batch", "--threads", "1", "--quiet"]
    runs = {}
    for name, choice in (("compiled", "true"), ("again", "true"), ("eager", "false")):
        code, _, err = run_cli("train", pbmc_small, "--out", tmp_path / f"{name}.ckpt", *args, "--set", f"train.compile={choice}")
        assert code == 0, err
        runs[name] = load_checkpoint(tmp_path / f"{name}.ckpt")
    assert runs["compiled"].training["compiled_likelihood"] is True, likelihood_compile_failure()
    assert runs["eager"].training["compiled_likelihood"] is False
    for key, value in runs["compiled"].state_dict.items():
        assert torch.equal(value, runs["again"].state_dict[key]), key
    for metric in ("elbo_train", "elbo_validation"):
        np.testing.assert_allclose(runs["compiled"].history[metric], runs["eager"].history[metric], rtol=1e-4)
