"""Count likelihoods of the scVI family: log-probabilities, means and samplers.

``mu`` is the mean, ``theta`` the inverse dispersion (NB variance ``mu + mu^2 / theta``),
``pi_logits`` the zero-inflation logits. The log-probabilities follow the reference formulas
(eps = 1e-8 inside the logs) and are written to stay finite for tiny or huge theta and mu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _log_nb_normaliser(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), at the broadcast shape of x and theta.

    The term is exactly zero where x == 0, and single-cell counts are mostly zeros, so the three
    lgammas (the bulk of the likelihood's cost) are evaluated on the nonzero entries only. It does
    not depend on mu, so with a per-gene theta it is computed once per cell, not once per
    Monte Carlo sample of mu.
    """
    shape = torch.broadcast_shapes(x.shape, theta.shape)
    x = x.expand(shape)
    index = torch.nonzero(x, as_tuple=True)
    x_nz, theta_nz = x[index], theta.expand(shape)[index]
    values = torch.lgamma(x_nz + theta_nz) - torch.lgamma(theta_nz) - torch.lgamma(x_nz + 1)
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put(index, values)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + _log_nb_normaliser(x, theta)
    )


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Elementwise log of the mixture ``sigmoid(pi) * delta_0 + sigmoid(-pi) * NB(mu, theta)``.

    With ``sp = softplus(-pi) = -log sigmoid(-pi)`` and ``a = -pi + theta log(theta/(theta+mu))``:
    ``log p(0) = log(sigmoid(pi) + sigmoid(-pi) NB(0)) = softplus(a) - sp`` and, for x > 0,
    ``log p(x) = -sp + a + x log(mu/(theta+mu)) + lgamma terms = log sigmoid(-pi) + log NB(x)``;
    both forms avoid exp of large numbers.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    a = theta * (torch.log(theta + eps) - log_theta_mu) - pi_logits
    positive = a + x * (torch.log(mu + eps) - log_theta_mu)
    return torch.where(x < eps, F.softplus(a), positive) - F.softplus(-pi_logits) + _log_nb_normaliser(x, theta)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x; mu), with 0 * log(0) = 0."""
    return torch.xlogy(x, mu) - mu - torch.lgamma(x + 1)


def _sample_gamma_poisson(mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """NB draws as a Gamma(shape theta, rate theta / mu) mixture of Poissons."""
    gamma = torch._standard_gamma(theta.expand_as(mu).contiguous(), generator=generator) * (mu / theta)
    return torch.poisson(gamma, generator=generator)


class Poisson:
    """Poisson(mu) with the same face as the NB classes: ``log_prob``, ``mean``, ``sample``."""

    def __init__(self, mu: torch.Tensor):
        self.mu = mu

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_poisson(x, self.mu)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.poisson(self.mu, generator=generator)


class NegativeBinomial:
    """NB with mean ``mu`` and inverse dispersion ``theta`` (broadcastable to mu)."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor):
        self.mu = mu
        self.theta = theta

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_nb_positive(x, self.mu, self.theta)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return _sample_gamma_poisson(self.mu, self.theta, generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB whose draws are replaced by 0 with probability ``sigmoid(zi_logits)``."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor):
        super().__init__(mu, theta)
        self.zi_logits = zi_logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.zi_logits) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        keep = torch.sigmoid(-self.zi_logits)
        return keep * (self.mu + self.mu**2 / self.theta) + keep * (1 - keep) * self.mu**2

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_zinb_positive(x, self.mu, self.theta, self.zi_logits)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        counts = _sample_gamma_poisson(self.mu, self.theta, generator)
        dropped = torch.bernoulli(torch.sigmoid(self.zi_logits).expand_as(counts), generator=generator)
        return counts * (1 - dropped)
