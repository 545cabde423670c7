"""Likelihoods against scipy.stats and a hand-computed ZINB mixture, including extreme parameters."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

from scvi_cli.nn import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
)



@pytest.fixture(autouse=True)
def _double_precision():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _grid(seed=0, n=4000):
    """Random (x, mu, theta, pi) including tiny/huge theta and mu, large counts and extreme logits."""
    rng = np.random.default_rng(seed)
    mu = 10 ** rng.uniform(-4, 4, n)
    theta = 10 ** rng.uniform(-4, 5, n)
    pi = rng.uniform(-30, 30, n)
    x = np.where(rng.random(n) < 0.4, 0, rng.negative_binomial(np.maximum(theta, 1e-2), np.maximum(theta, 1e-2) / (np.maximum(theta, 1e-2) + mu)))
    x = np.concatenate([x[:-5], [0, 1, 1000, 50_000, 3]]).astype(float)
    return x, mu, theta, pi


def _t(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def scipy_nb_logpmf(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_matches_scipy_on_extreme_parameters():
    x, mu, theta, _ = _grid()
    ours = log_nb_positive(*_t(x, mu, theta)).numpy()
    ref = scipy_nb_logpmf(x, mu, theta)
    assert np.all(np.isfinite(ours))
    # the reference formula adds eps=1e-8 inside the logs: absolute error is at most ~ (theta + x) * eps / min(mu, theta)
    ok = (mu > 1e-3) & (theta > 1e-3)
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-6, atol=1e-4)


def test_nb_matches_scipy_moderate_parameters_float32():
    rng = np.random.default_rng(1)
    mu, theta = rng.uniform(0.1, 50, 500), rng.uniform(0.1, 100, 500)
    x = rng.poisson(mu).astype(float)
    ours = log_nb_positive(*[torch.tensor(a, dtype=torch.float32) for a in (x, mu, theta)]).numpy()
    np.testing.assert_allclose(ours, scipy_nb_logpmf(x, mu, theta), rtol=1e-4, atol=1e-3)


def test_poisson_matches_scipy():
    x, mu, _, _ = _grid(2)
    ours = log_poisson(*_t(x, mu)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, mu), rtol=1e-9, atol=1e-9)
    assert log_poisson(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0


def hand_zinb_logpmf(x, mu, theta, pi):
    """log( p0 * [x == 0] + (1 - p0) * NB(x) ) with p0 = sigmoid(pi), computed in log space."""
    log_p0 = -np.logaddexp(0, -pi)  # log sigmoid(pi)
    log_1m_p0 = -np.logaddexp(0, pi)  # log sigmoid(-pi)
    log_nb = scipy_nb_logpmf(x, mu, theta)
    zero_case = logsumexp(np.stack([log_p0, log_1m_p0 + log_nb]), axis=0)
    return np.where(x == 0, zero_case, log_1m_p0 + log_nb)


def test_zinb_matches_hand_computed_mixture():
    x, mu, theta, pi = _grid(3)
    ours = log_zinb_positive(*_t(x, mu, theta, pi)).numpy()
    ref = hand_zinb_logpmf(x, mu, theta, pi)
    assert np.all(np.isfinite(ours))
    ok = (mu > 1e-3) & (theta > 1e-3)
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-6, atol=1e-4)


def test_zinb_reduces_to_nb_without_zero_inflation():
    x, mu, theta, _ = _grid(4, 500)
    pi = np.full_like(mu, -60.0)
    zinb = log_zinb_positive(*_t(x, mu, theta, pi)).numpy()
    nb = log_nb_positive(*_t(x, mu, theta)).numpy()
    # where NB(0) is near e^-60 the zero-inflation mass sigmoid(-60) matters: compare elsewhere
    visible = (x > 0) | (nb > -20)
    np.testing.assert_allclose(zinb[visible], nb[visible], atol=1e-8)
    ok = (mu > 1e-3) & (theta > 1e-3)  # eps = 1e-8 inside the logs shifts values by ~1e-8 elsewhere
    np.testing.assert_allclose(zinb[ok], hand_zinb_logpmf(x, mu, theta, pi)[ok], rtol=1e-6, atol=1e-6)


def test_zinb_probabilities_sum_to_one():
    mu, theta, pi = torch.tensor([3.0]), torch.tensor([0.7]), torch.tensor([0.4])
    support = torch.arange(0, 2000, dtype=torch.float64)
    total = torch.exp(log_zinb_positive(support, mu, theta, pi)).sum().item()
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_gradients_finite_on_extremes(name):
    x, mu, theta, pi = _t(*_grid(5, 2000))
    log_mu = torch.log(mu).requires_grad_()
    log_theta = torch.log(theta).requires_grad_()
    logits = pi.clone().requires_grad_()
    if name == "nb":
        lp = log_nb_positive(x, log_mu.exp(), log_theta.exp())
    elif name == "zinb":
        lp = log_zinb_positive(x, log_mu.exp(), log_theta.exp(), logits)
    else:
        lp = log_poisson(x, log_mu.exp())
    lp.sum().backward()
    for grad in (log_mu.grad, log_theta.grad, logits.grad):
        if grad is not None:
            assert torch.isfinite(grad).all()


def test_float32_extremes_have_no_nan_or_inf():
    x, mu, theta, pi = [torch.tensor(a, dtype=torch.float32) for a in _grid(6)]
    for lp in (log_nb_positive(x, mu, theta), log_zinb_positive(x, mu, theta, pi), log_poisson(x, mu)):
        assert torch.isfinite(lp).all()


def test_samplers_match_moments_and_are_seeded():
    mu = torch.full((200_000,), 4.0)
    theta = torch.full((200_000,), 2.0)
    pi = torch.full((200_000,), 0.5)
    nb = NegativeBinomial(mu, theta).sample(torch.Generator().manual_seed(0))
    assert nb.mean().item() == pytest.approx(4.0, rel=0.02)
    assert nb.var().item() == pytest.approx(4.0 + 16.0 / 2.0, rel=0.03)
    zinb_dist = ZeroInflatedNegativeBinomial(mu, theta, pi)
    zinb = zinb_dist.sample(torch.Generator().manual_seed(0))
    assert zinb.mean().item() == pytest.approx(zinb_dist.mean[0].item(), rel=0.02)
    assert zinb_dist.mean[0].item() == pytest.approx(expit(-0.5) * 4.0)
    assert (zinb == 0).float().mean().item() == pytest.approx(
        expit(0.5) + expit(-0.5) * stats.nbinom.pmf(0, 2.0, 2.0 / 6.0), abs=0.01
    )
    pois = Poisson(mu).sample(torch.Generator().manual_seed(0))
    assert pois.mean().item() == pytest.approx(4.0, rel=0.01)
    for draws in (nb, zinb, pois):
        assert torch.all(draws >= 0) and torch.all(draws == torch.round(draws))
    again = NegativeBinomial(mu, theta).sample(torch.Generator().manual_seed(0))
    assert torch.equal(nb, again)
