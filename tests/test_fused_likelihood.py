"""fused_nb_nll (fused forward, analytic backward) against autograd through the plain formulas."""

import numpy as np
import pytest
import torch

from scvi_cli.nn.likelihoods import (
    EPS,
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    fused_nb_nll,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
)


def plain_nll(x, mu, theta, pi=None):
    """The reference (eps = 1e-8) formula, summed over genes, differentiated by autograd."""
    return -(log_nb_positive(x, mu, theta) if pi is None else log_zinb_positive(x, mu, theta, pi)).sum(-1)


def plain_nll_log_mu(x, log_mu, theta, pi=None):
    """What the log_mu path computes: the reference formula with log(mu + eps) replaced by log_mu."""
    mu = log_mu.exp()
    log_theta_mu = torch.log(theta + mu + EPS)
    nb_zero = theta * (torch.log(theta + EPS) - log_theta_mu)
    positive = nb_zero + x * (log_mu - log_theta_mu) + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    if pi is None:
        return -positive.sum(-1)
    sp = torch.nn.functional.softplus(-pi)
    zero = torch.nn.functional.softplus(nb_zero - pi) - sp
    return -torch.where(x == 0, zero, positive - pi - sp).sum(-1)


def realistic(cells=128, genes=2000, per_cell_theta=False, seed=0, dtype=torch.float32):
    """mu in [1e-4, 1e3], theta in [1e-2, 1e3], NB counts capped at 500 with ~90% zeros, logits ~ N(0, 2^2)."""
    rng = np.random.default_rng(seed)
    mu = 10 ** rng.uniform(-4, 3, (cells, genes))
    theta = 10 ** rng.uniform(-2, 3, (cells, genes) if per_cell_theta else genes)
    th = np.broadcast_to(theta, mu.shape)
    x = np.minimum(rng.negative_binomial(th, th / (th + mu)), 500).astype(float)
    x[rng.random(x.shape) < 0.8] = 0  # on top of the NB's own zeros: ~90% in all
    pi = rng.normal(0, 2, (cells, genes))
    return [torch.tensor(a, dtype=dtype) for a in (x, mu, theta, pi)]


def value_and_grads(fn, x, loc, theta, pi):
    params = [t.detach().clone().requires_grad_() for t in (loc, theta) + (() if pi is None else (pi,))]
    value = fn(x, *params)
    # a non-uniform per-cell weight, so that the backward's use of the incoming gradient is tested
    weight = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    (value * weight).sum().backward()
    return [value.detach()] + [p.grad for p in params]


def fused(x, loc, theta, pi=None, log=False):
    return fused_nb_nll(x, None, theta, pi, log_mu=loc) if log else fused_nb_nll(x, loc, theta, pi)


def scaled_error(got, want):
    """max |got - want| relative to max |want|: float32 sums over cells and genes cancel, elementwise
    relative errors of near-zero gradient entries are meaningless."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


# ---------------------------------------------------------------- gradcheck (float64, small)


@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_gradcheck(zinb, log, theta_shape):
    gen = torch.Generator().manual_seed(3)
    cells, genes = 4, 6
    x = torch.poisson(torch.rand(cells, genes, generator=gen, dtype=torch.float64) * 6)
    x[torch.rand(cells, genes, generator=gen) < 0.5] = 0
    x[1] = 0  # an all-zero cell
    mu = torch.rand(cells, genes, generator=gen, dtype=torch.float64) * 5 + 0.05
    loc = mu.log() if log else mu
    theta = torch.rand(genes if theta_shape == "gene" else (cells, genes), generator=gen, dtype=torch.float64) * 3 + 0.1
    pi = torch.randn(cells, genes, generator=gen, dtype=torch.float64) * 2
    inputs = [loc.requires_grad_(), theta.requires_grad_()] + ([pi.requires_grad_()] if zinb else [])
    assert torch.autograd.gradcheck(lambda *p: fused(x, *p, log=log), inputs)
    reference = plain_nll_log_mu if log else plain_nll
    torch.testing.assert_close(fused(x, *inputs, log=log), reference(x, *inputs), rtol=1e-12, atol=1e-12)


def test_gradcheck_monte_carlo_axis():
    """mu / pi of shape (S, B, G) against x (B, G) and theta (G,): output (S, B)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.rand(3, 5, generator=gen, dtype=torch.float64) * 4)
    log_mu = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    theta = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
    pi = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    assert fused(x, log_mu, theta, pi, log=True).shape == (2, 3)
    assert torch.autograd.gradcheck(lambda *p: fused(x, *p, log=True), [log_mu, theta, pi])
    torch.testing.assert_close(fused(x, log_mu, theta, pi, log=True), plain_nll_log_mu(x, log_mu, theta, pi))


def test_gradcheck_other_broadcast_shapes():
    """theta (1, G) and zero-inflation logits (G,) are broadcast, and their gradients reduced."""
    gen = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3)
    mu = (torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    theta = (torch.rand(1, 5, generator=gen, dtype=torch.float64) + 0.3).requires_grad_()
    pi = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *p: fused(x, *p), [mu, theta, pi])
    torch.testing.assert_close(fused(x, mu, theta, pi), plain_nll(x, mu, theta, pi))


# ---------------------------------------------------------------- realistic sizes, float32


@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta_gene", "theta_cell"])
def test_float32_matches_plain_formula_at_realistic_sizes(zinb, log, per_cell_theta):
    x, mu, theta, pi = realistic(per_cell_theta=per_cell_theta, seed=int(zinb) + 2 * int(log))
    assert 0.85 < float((x == 0).float().mean()) < 0.95 and x.max() > 100
    pi = pi if zinb else None
    loc = mu.log() if log else mu
    got = value_and_grads(lambda x_, *p: fused(x_, *p, log=log), x, loc, theta, pi)
    assert_float32_close_to_plain_formula(got, x, loc, theta, pi, log)


def assert_float32_close_to_plain_formula(got, x, loc, theta, pi, log):
    """``got`` (value and gradients in float32) against autograd through the plain formula: in
    float64 (the truth) within twice what the plain formula achieves in float32."""
    to64 = lambda t: None if t is None else t.double()
    plain = lambda x_, loc_, *rest: plain_nll(x_, loc_.exp() if log else loc_, *rest)
    truth = value_and_grads(plain, x.double(), to64(loc), to64(theta), to64(pi))
    plain32 = value_and_grads(plain, x, loc, theta, pi)
    for name, g, t, p in zip(["value", "d loc", "d theta", "d pi"], got, truth, plain32):
        err, err_plain32 = scaled_error(g, t), scaled_error(p, t)
        # log_mu path: the value differs from the eps formula by sum x log1p(eps / mu) <= 1e-4 x, and
        # its gradient by x eps / (mu + eps) on nonzero counts (exactly: see test_log_mu_path_relation)
        assert err < max(2 * err_plain32, 2e-5), (name, err, err_plain32)
    torch.testing.assert_close(got[0].double(), truth[0], rtol=2e-5, atol=1e-3)


def test_log_mu_path_relation_to_the_eps_formula():
    """nll(log_mu) = nll_eps(exp(log_mu)) + sum_g x log1p(eps / mu), exactly (float64)."""
    x, mu, theta, pi = realistic(32, 500, dtype=torch.float64, seed=7)
    for p in (None, pi):
        got = fused(x, mu.log(), theta, p, log=True)
        expected = plain_nll(x, mu, theta, p) + (x * torch.log1p(EPS / mu)).sum(-1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)
        assert torch.all(got >= plain_nll(x, mu, theta, p) - 1e-9)
        zeros = x.sum(-1) == 0
        torch.testing.assert_close(got[zeros], plain_nll(x, mu, theta, p)[zeros])


# ---------------------------------------------------------------- extremes and edge cases


def extreme_grid(dtype):
    """Tiny mu, huge theta, large counts and extreme logits, one entry per combination."""
    mu = torch.tensor([1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e5], dtype=dtype)
    theta = torch.tensor([1e-4, 1e-2, 1.0, 1e3, 1e5, 1e7], dtype=dtype)
    x = torch.tensor([0.0, 1.0, 7.0, 500.0, 50_000.0], dtype=dtype)
    pi = torch.tensor([-30.0, -2.0, 0.0, 3.0, 30.0], dtype=dtype)
    grid = torch.cartesian_prod(mu, theta, x, pi)  # 900 combinations
    return [grid[:, i].reshape(30, 30) for i in range(4)]  # x, ... order below


@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
def test_extreme_parameters_float64(zinb, log):
    mu, theta, x, pi = extreme_grid(torch.float64)
    pi = pi if zinb else None
    loc = mu.log() if log else mu
    got = value_and_grads(lambda x_, *p: fused(x_, *p, log=log), x, loc, theta, pi)
    reference = plain_nll_log_mu if log else (lambda x_, m, *rest: plain_nll(x_, m, *rest))
    want = value_and_grads(reference, x, loc, theta, pi)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-7 * float(w.abs().max()))


@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("log", [False, True], ids=["mu", "log_mu"])
def test_extreme_parameters_float32_finite_and_close(zinb, log):
    mu, theta, x, pi = extreme_grid(torch.float32)
    pi = pi if zinb else None
    loc = mu.log() if log else mu
    got = value_and_grads(lambda x_, *p: fused(x_, *p, log=log), x, loc, theta, pi)
    assert all(torch.isfinite(g).all() for g in got)
    to64 = lambda t: None if t is None else t.double()
    reference = plain_nll_log_mu if log else (lambda x_, m, *rest: plain_nll(x_, m, *rest))
    want = value_and_grads(reference, x.double(), to64(loc), to64(theta), to64(pi))
    plain32 = value_and_grads(reference, x, loc, theta, pi)
    # float32 cannot do better than ~1e-7 relative on lgamma(x + 1e7) - lgamma(1e7) ~ 1e6: compare
    # with what the plain formula achieves in float32 (for d pi at |pi| = 30 it is off by 18%)
    rel = lambda a, b: float(((a.double() - b) / b.abs()).abs().max())
    assert rel(got[0], want[0]) <= 1.1 * rel(plain32[0], want[0]) + 1e-6
    for g, w, p in zip(got, want, plain32):
        assert scaled_error(g, w) <= max(1.1 * scaled_error(p, w), 1e-6)


@pytest.mark.parametrize("zinb", [False, True], ids=["nb", "zinb"])
def test_all_zero_rows_and_all_zero_batch(zinb):
    x, mu, theta, pi = realistic(16, 300, seed=5, dtype=torch.float64)
    x[::3] = 0
    pi = pi if zinb else None
    for counts in (x, torch.zeros_like(x)):
        got = value_and_grads(fused, counts, mu, theta, pi)
        want = value_and_grads(plain_nll, counts, mu, theta, pi)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_partial_requires_grad_no_grad_and_retain_graph():
    x, mu, theta, pi = realistic(8, 50, seed=6, dtype=torch.float64)
    log_mu = mu.log().requires_grad_()
    out = fused_nb_nll(x, None, theta, pi, log_mu=log_mu)  # only log_mu needs a gradient
    out.sum().backward(retain_graph=True)
    first = log_mu.grad.clone()
    out.sum().backward()  # the saved local derivatives are not consumed by the first backward
    torch.testing.assert_close(log_mu.grad, 2 * first)
    with torch.no_grad():
        no_grad = fused_nb_nll(x, None, theta, pi, log_mu=log_mu)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, out.detach())
    with pytest.raises(ValueError):
        fused_nb_nll(x, mu, theta, log_mu=log_mu)


def test_saves_one_tensor_per_differentiable_input():
    x, mu, theta, pi = realistic(64, 200, seed=8)
    params = [mu.log().requires_grad_(), theta.requires_grad_(), pi.requires_grad_()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused_nb_nll(x, None, params[1], params[2], log_mu=params[0])
    assert sorted(saved) == [64 * 200] * 3


# ---------------------------------------------------------------- distribution classes


def test_distribution_nll_per_cell_matches_log_prob():
    x, mu, theta, pi = realistic(16, 100, seed=9, dtype=torch.float64)
    for dist in (NegativeBinomial(mu, theta), ZeroInflatedNegativeBinomial(mu, theta, pi), Poisson(mu)):
        torch.testing.assert_close(dist.nll_per_cell(x), -dist.log_prob(x).sum(-1), rtol=1e-10, atol=1e-9)
    # log_prob stays the plain formula; with log_mu given, nll_per_cell uses the log_mu path
    zinb = ZeroInflatedNegativeBinomial(mu, theta, pi, log_mu=mu.log())
    torch.testing.assert_close(zinb.log_prob(x), log_zinb_positive(x, mu, theta, pi))
    torch.testing.assert_close(zinb.nll_per_cell(x), plain_nll_log_mu(x, mu.log(), theta, pi))
    torch.testing.assert_close(NegativeBinomial(mu, theta).log_prob(x), log_nb_positive(x, mu, theta))
    torch.testing.assert_close(Poisson(mu).log_prob(x), log_poisson(x, mu))


# ---------------------------------------------------------------- counts as CSR rows


def _rows_with_stored_zeros(x):
    """x's CSR rows, plus a few explicitly stored zeros (which must count as zeros)."""
    from scvi_cli.nn.sparse_input import SparseRows

    rows = SparseRows.from_dense(x)
    zeros_at = (x[:, :3] == 0).nonzero()
    indptr, indices, values = rows.indptr.tolist(), rows.indices.tolist(), rows.values.tolist()
    extra = {}
    for r, c in zeros_at.tolist():
        extra.setdefault(r, []).append(c)
    new_ptr, new_ind, new_val = [0], [], []
    for r in range(x.shape[0]):
        cols = indices[indptr[r] : indptr[r + 1]] + extra.get(r, [])
        vals = values[indptr[r] : indptr[r + 1]] + [0.0] * len(extra.get(r, []))
        new_ind += cols
        new_val += vals
        new_ptr.append(len(new_ind))
    out = SparseRows(torch.tensor(new_ptr), torch.tensor(new_ind), torch.tensor(new_val, dtype=x.dtype), x.shape[1])
    assert out.nnz > rows.nnz and torch.equal(out.to_dense(), x)
    return out


@pytest.mark.parametrize("zinb", [False, True])
@pytest.mark.parametrize("log", [False, True])
def test_csr_counts_equal_dense_counts(zinb, log):
    x, mu, theta, pi = realistic(cells=64, genes=300, seed=4, dtype=torch.float64)
    rows = _rows_with_stored_zeros(x)
    loc = mu.log() if log else mu
    pi = pi if zinb else None
    dense = value_and_grads(lambda _, *a: fused(x, *a, log=log), None, loc, theta, pi)
    sparse = value_and_grads(lambda _, *a: fused(rows, *a, log=log), None, loc, theta, pi)
    want = value_and_grads(lambda _, *a: (plain_nll_log_mu if log else plain_nll)(x, *a), None, loc, theta, pi)
    for got_sparse, got_dense, reference in zip(sparse, dense, want):
        torch.testing.assert_close(got_sparse, got_dense, rtol=1e-12, atol=1e-12)
        assert scaled_error(got_sparse, reference) < 1e-10


def test_csr_counts_broadcast_over_monte_carlo_draws():
    x, mu, theta, pi = realistic(cells=16, genes=50, seed=5, dtype=torch.float64)
    rows = _rows_with_stored_zeros(x)
    mu3 = torch.stack([mu, mu * 0.5, mu * 2])
    dense = value_and_grads(lambda _, *a: fused(x, *a), None, mu3, theta, pi)
    sparse = value_and_grads(lambda _, *a: fused(rows, *a), None, mu3, theta, pi)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="CSR rows"):
        fused_nb_nll(rows, mu[:, :10], theta[:10])


def test_poisson_nll_per_cell_reads_csr_counts():
    from scvi_cli.nn.sparse_input import SparseRows

    x, mu, _, _ = realistic(cells=8, genes=20, seed=6)
    torch.testing.assert_close(Poisson(mu).nll_per_cell(SparseRows.from_dense(x)), Poisson(mu).nll_per_cell(x))


@pytest.mark.parametrize("zinb", [False, True])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_csr_counts_without_stored_zeros_sum_rows_by_segment(zinb, theta_shape):
    """Canonical CSR (no stored zeros, some empty rows): per-row sums are segment sums over the
    CSR's own order; they equal the dense path's scatter and the plain formula, gradients too."""
    from scvi_cli.nn.sparse_input import SparseRows

    x, mu, theta, pi = realistic(cells=48, genes=300, per_cell_theta=theta_shape == "cell", seed=11, dtype=torch.float64)
    x[::5] = 0  # empty rows: zero-length segments
    rows = SparseRows.from_dense(x)
    assert not bool((rows.values == 0).any()) and int((rows.indptr[1:] == rows.indptr[:-1]).sum()) >= 9
    pi = pi if zinb else None
    sparse = value_and_grads(lambda _, *a: fused(rows, *a), None, mu, theta, pi)
    dense = value_and_grads(lambda _, *a: fused(x, *a), None, mu, theta, pi)
    want = value_and_grads(lambda _, *a: plain_nll(x, *a), None, mu, theta, pi)
    for got_sparse, got_dense, reference in zip(sparse, dense, want):
        torch.testing.assert_close(got_sparse, got_dense, rtol=1e-12, atol=1e-12)
        assert scaled_error(got_sparse, reference) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_digamma_matches_torch(dtype):
    """The backward's digamma (recurrence + asymptotic series) against torch.digamma in float64,
    from 1e-6 to 1e8: as accurate as torch's own kernel in float32, to 1e-12 in float64."""
    from scvi_cli.nn.likelihoods import DIGAMMA_VECTOR_MIN, _digamma

    y = torch.cat([torch.logspace(-6, 8, 20_001, dtype=torch.float64), torch.arange(1, 2000, dtype=torch.float64) + 0.37])
    assert y.numel() >= DIGAMMA_VECTOR_MIN  # the vectorised passes, not the small-input fallback
    want = torch.digamma(y)
    relative = lambda got: float(((got.double() - want).abs() / want.abs().clamp_min(1)).max())
    got = _digamma(y.to(dtype))
    if dtype == torch.float64:
        assert relative(got) < 1e-12
    else:
        assert relative(got) <= 1.5 * relative(torch.digamma(y.to(dtype))) + 1e-7


def test_broadcast_shape_matches_torch():
    from scvi_cli.nn.likelihoods import _broadcast_shape

    cases = [((128, 2000), (2000,), (128, 2000)), ((3, 1, 5), (4, 1), (5,)), ((), (2, 3)), ((1,), (1, 1))]
    for shapes in cases:
        assert _broadcast_shape(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError):
        _broadcast_shape((3, 4), (5,))


def test_softplus_difference_rows_match_softplus():
    """The dense ZINB terms' row sums of softplus(b) - softplus(pi) from shared sigmoids, against
    F.softplus in float64, over -1000..1000 (no overflow), with the sigmoids they return."""
    from scvi_cli.nn.likelihoods import _softplus_difference_rows

    torch.manual_seed(0)
    b = torch.cat([torch.linspace(-100, 100, 4000), torch.randn(3990) * 5, torch.tensor([-1e3, 1e3] * 5)])
    b = b.reshape(4, 2000)
    pi = torch.cat([torch.randn(4000) * 5, torch.linspace(100, -100, 3990), torch.tensor([1e3, -1e3] * 5)])
    pi = pi.reshape(4, 2000)
    want = (torch.nn.functional.softplus(b.double()) - torch.nn.functional.softplus(pi.double())).sum(-1)
    for dtype, rtol, atol_each in ((torch.float32, 1e-6, 1.2e-7), (torch.float64, 1e-12, 1e-15)):
        rows, sig_b, sig_pi = _softplus_difference_rows(b.to(dtype), pi.to(dtype))
        assert torch.isfinite(rows).all()
        torch.testing.assert_close(rows.double(), want, rtol=rtol, atol=2000 * atol_each)
        torch.testing.assert_close(sig_b, torch.sigmoid(b.to(dtype)), rtol=0, atol=0)
        torch.testing.assert_close(sig_pi, torch.sigmoid(pi.to(dtype)), rtol=0, atol=0)
    # pi broadcast from one row of logits (an expanded view), as the NLL passes a (G,) pi
    rows, _, sig_pi = _softplus_difference_rows(b, pi[0].expand(b.shape))
    want = (torch.nn.functional.softplus(b.double()) - torch.nn.functional.softplus(pi[0].double())).sum(-1)
    torch.testing.assert_close(rows.double(), want, rtol=1e-6, atol=2000 * 1.2e-7)
    assert sig_pi.shape == b.shape
