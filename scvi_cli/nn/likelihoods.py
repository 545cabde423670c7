"""Count likelihoods of the scVI family: log-probabilities, means and samplers.

``mu`` is the mean, ``theta`` the inverse dispersion (NB variance ``mu + mu^2 / theta``),
``pi_logits`` the zero-inflation logits. The log-probabilities follow the reference formulas
(eps = 1e-8 inside the logs) and are written to stay finite for tiny or huge theta and mu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _log_nb_ratio_terms(mu: torch.Tensor, theta: torch.Tensor, eps: float):
    """log(theta / (theta + mu)) and log(mu / (theta + mu)), the two NB log-odds terms."""
    log_theta_mu = torch.log(theta + mu + eps)
    return torch.log(theta + eps) - log_theta_mu, torch.log(mu + eps) - log_theta_mu


def _log_nb_normaliser(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1): zero wherever x == 0."""
    return torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta)."""
    log_p_theta, log_p_mu = _log_nb_ratio_terms(mu, theta, eps)
    return theta * log_p_theta + x * log_p_mu + _log_nb_normaliser(x, theta)


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Elementwise log of the mixture ``sigmoid(pi) * delta_0 + sigmoid(-pi) * NB(mu, theta)``.

    With ``sp = softplus(-pi) = -log sigmoid(-pi)`` and ``a = -pi + theta log(theta/(theta+mu))``:
    ``log p(0) = log(sigmoid(pi) + sigmoid(-pi) NB(0)) = softplus(a) - sp`` and, for x > 0,
    ``log p(x) = -sp + a + x log(mu/(theta+mu)) + lgamma terms = log sigmoid(-pi) + log NB(x)``;
    both forms avoid exp of large numbers.
    """
    log_p_theta, log_p_mu = _log_nb_ratio_terms(mu, theta, eps)
    softplus_neg_pi = F.softplus(-pi_logits)
    a = theta * log_p_theta - pi_logits
    case_zero = F.softplus(a) - softplus_neg_pi
    case_positive = -softplus_neg_pi + a + x * log_p_mu + _log_nb_normaliser(x, theta)
    return torch.where(x < eps, case_zero, case_positive)


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
