"""The fused NLL through its compiled kernel (torch.compile) against the plain formulas, its
fallback when the build fails, and `train.compile` end to end."""

import shutil
import warnings

import numpy as np
import pytest
import torch

from scvi_cli.nn import likelihoods
from scvi_cli.nn.likelihoods import compiled_likelihood, fused_nb_nll, likelihood_compile_failure

from test_fused_likelihood import (
    _rows_with_stored_zeros,
    assert_float32_close_to_plain_formula,
    extreme_grid,
    fused,
    plain_nll,
    plain_nll_log_mu,
    realistic,
    scaled_error,
    value_and_grads,
)

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler for torch.compile"
)


@pytest.fixture
def fresh_kernels(monkeypatch):
    """No kernel built or failed before the test: each test's variants (dtypes, ranks, NB or ZINB)
    count alone against torch.compile's limit of recompilations per function."""
    torch._dynamo.reset()
    monkeypatch.setitem(likelihoods._COMPILE, "kernels", {})
    monkeypatch.setitem(likelihoods._COMPILE, "failed", None)
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiled(fresh_kernels):
    """Fused NLLs through the compiled kernel within the test, which must build."""
    with compiled_likelihood(True):
        yield
    assert likelihood_compile_failure() is None, likelihood_compile_failure()


@needs_compiler
@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
def test_compiled_float32_matches_plain_formula_at_realistic_sizes(compiled, zinb, log):
    x, mu, theta, pi = realistic(seed=int(zinb) + 2 * int(log))
    counts = _rows_with_stored_zeros(x)  # CSR, as training passes them
    pi = pi if zinb else None
    loc = mu.log() if log else mu
    got = value_and_grads(lambda _, *p: fused(counts, *p, log=log), None, loc, theta, pi)
    assert_float32_close_to_plain_formula(got, x, loc, theta, pi, log)


@needs_compiler
def test_compiled_extreme_parameters_float32_finite_and_close(compiled):
    mu, theta, x, pi = extreme_grid(torch.float32)
    got = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
    assert all(torch.isfinite(g).all() for g in got)
    to64 = lambda t: t.double()
    want = value_and_grads(plain_nll_log_mu, x.double(), to64(mu.log()), to64(theta), to64(pi))
    plain32 = value_and_grads(plain_nll_log_mu, x, mu.log(), theta, pi)
    rel = lambda a, b: float(((a.double() - b) / b.abs()).abs().max())
    assert rel(got[0], want[0]) <= 1.1 * rel(plain32[0], want[0]) + 1e-6
    for g, w, p in zip(got, want, plain32):
        assert scaled_error(g, w) <= max(1.1 * scaled_error(p, w), 1e-6)


@needs_compiler
def test_compiled_float64_per_cell_theta_and_monte_carlo_draws(compiled):
    """Broadcasting the kernel sees beyond training's: (S, B, G) draws against CSR counts of
    (B, G), a per-cell theta, dense counts; float64 to the plain formula's own precision."""
    x, mu, theta, pi = realistic(cells=16, genes=60, per_cell_theta=True, seed=5, dtype=torch.float64)
    rows = _rows_with_stored_zeros(x)
    mu3 = torch.stack([mu, mu * 0.5, mu * 2])
    pi3 = torch.stack([pi, pi - 1, pi + 1])
    for counts in (rows, x):
        got = value_and_grads(lambda _, *a: fused(counts, *a, log=True), None, mu3.log(), theta, pi3)
        want = value_and_grads(lambda _, *a: plain_nll_log_mu(x, *a), None, mu3.log(), theta, pi3)
        for g, w in zip(got, want):
            assert scaled_error(g, w) < 1e-10
    with torch.no_grad():
        value = fused_nb_nll(rows, mu3, theta, pi3)
    torch.testing.assert_close(value, plain_nll(x, mu3, theta, pi3), rtol=1e-10, atol=1e-8)


def compile_raising(error: Exception):
    """A stand-in for torch.compile whose compiled functions raise ``error`` when called."""

    def fake_compile(function, **options):
        def build_fails(*args):
            raise error

        return build_fails

    return fake_compile


def test_a_failed_build_warns_once_and_falls_back_to_the_same_math(monkeypatch, fresh_kernels):
    x, mu, theta, pi = realistic(cells=8, genes=40, seed=2, dtype=torch.float64)
    monkeypatch.setattr(torch, "compile", compile_raising(RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")))
    want = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
    with compiled_likelihood(True), pytest.warns(UserWarning, match=r"could not be compiled \(InvalidCxxCompiler: No working C\+\+ compiler found\); using eager") as caught:
        got = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
        again = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
    assert len(caught) == 1
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert likelihood_compile_failure() == "InvalidCxxCompiler: No working C++ compiler found"
    with compiled_likelihood(True):  # not retried in this process
        assert not likelihoods._COMPILE["enabled"]


def test_a_failure_inside_a_nested_block_stays_failed_outside_it(monkeypatch, fresh_kernels):
    x, mu, theta, pi = realistic(cells=4, genes=20, seed=3, dtype=torch.float64)
    monkeypatch.setattr(torch, "compile", compile_raising(RuntimeError("no compiler")))
    with compiled_likelihood(True):
        with compiled_likelihood(True), pytest.warns(UserWarning, match="could not be compiled"):
            fused(x, mu.log(), theta, pi, log=True)
        assert not likelihoods._COMPILE["enabled"]


def test_the_recompile_limit_sends_one_kind_of_input_to_eager_and_keeps_compiling(monkeypatch, fresh_kernels):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    x, mu, theta, pi = realistic(cells=6, genes=30, seed=4, dtype=torch.float64)
    monkeypatch.setattr(torch, "compile", compile_raising(FailOnRecompileLimitHit("Hard failure due to fullgraph=True")))
    monkeypatch.setitem(likelihoods._COMPILE, "limit_warned", False)
    want = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
    with compiled_likelihood(True), pytest.warns(UserWarning, match="recompile limit") as caught:
        got = value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
        value_and_grads(lambda x_, *p: fused(x_, *p, log=True), x, mu.log(), theta, pi)
        assert likelihoods._COMPILE["enabled"]  # the kernels already built would stay in use
    assert len(caught) == 1 and likelihood_compile_failure() is None
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_compiler
def test_counts_of_another_dtype_broadcast_over_draws(compiled):
    """Counts given as float16 (or integers) against float32 draws: mu's dtype in both paths."""
    x, mu, theta, pi = realistic(cells=8, genes=50, seed=6)
    mu3 = torch.stack([mu, mu * 0.5])
    with compiled_likelihood(False):
        want = value_and_grads(lambda _, *a: fused(x, *a, log=True), None, mu3.log(), theta, pi)
    for counts in (x.half(), x.long()):
        got = value_and_grads(lambda _, *a: fused(counts, *a, log=True), None, mu3.log(), theta, pi)
        assert got[0].dtype == torch.float32
        for g, w in zip(got, want):
            assert scaled_error(g, w) < 2e-5  # float32 rounding of two schedules


def test_auto_compiles_long_cpu_runs_with_a_compiler(monkeypatch):
    from scvi_cli.training.job import AUTO_COMPILE_MIN_ENTRIES, compile_likelihood_for

    cpu, big, small = torch.device("cpu"), AUTO_COMPILE_MIN_ENTRIES, AUTO_COMPILE_MIN_ENTRIES / 10
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compile_likelihood_for("auto", cpu, big) and not compile_likelihood_for("auto", cpu, small)
    assert not compile_likelihood_for("auto", torch.device("cuda"), big)
    assert compile_likelihood_for(True, cpu, small) and not compile_likelihood_for(False, cpu, big)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not compile_likelihood_for("auto", cpu, big)


@needs_compiler
def test_train_compile_true_is_deterministic_and_close_to_eager(tmp_path, pbmc_small, run_cli, fresh_kernels):
    from scvi_cli.checkpoint import load_checkpoint

    args = ["--set", "train.max_epochs=3", "--set", "data.batch_key=batch", "--threads", "1", "--quiet"]
    runs = {}
    for name, choice in (("compiled", "true"), ("again", "true"), ("eager", "false")):
        code, _, err = run_cli("train", pbmc_small, "--out", tmp_path / f"{name}.ckpt", *args, "--set", f"train.compile={choice}")
        assert code == 0, err
        runs[name] = load_checkpoint(tmp_path / f"{name}.ckpt")
    assert runs["compiled"].training["compiled_likelihood"] is True, likelihood_compile_failure()
    assert set(likelihoods._COMPILE["kernels"]) == {likelihoods._likelihood_terms}  # built and used
    assert runs["eager"].training["compiled_likelihood"] is False
    for key, value in runs["compiled"].state_dict.items():
        assert torch.equal(value, runs["again"].state_dict[key]), key
    for metric in ("elbo_train", "elbo_validation"):
        np.testing.assert_allclose(runs["compiled"].history[metric], runs["eager"].history[metric], rtol=1e-4)
