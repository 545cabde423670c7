"""What a model's loss returns: the objective and the per-cell terms the metrics are built from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar training objective: mean over cells of recon + kl_weight * KL_z + KL_l
    reconstruction_loss: torch.Tensor  # (B,) negative log-likelihood summed over genes
    kl_z: torch.Tensor  # (B,) KL(q(z | x) || p(z)), without the warm-up weight
    kl_l: torch.Tensor  # (B,) KL of the latent library to its prior (zeros when the library is observed)

    @property
    def kl_local(self) -> torch.Tensor:
        """(B,) all local KL terms, without the warm-up weight."""
        return self.kl_z + self.kl_l

    @property
    def elbo(self) -> torch.Tensor:
        """(B,) negative ELBO per cell (reconstruction + KL): lower is better."""
        return self.reconstruction_loss + self.kl_local


def gaussian_kl_to_standard(q_m: torch.Tensor, q_v: torch.Tensor) -> torch.Tensor:
    """KL(N(q_m, q_v) || N(0, 1)) elementwise, in closed form."""
    return 0.5 * (q_v + q_m**2 - 1.0 - torch.log(q_v))


def gaussian_kl(q_m: torch.Tensor, q_v: torch.Tensor, p_m: torch.Tensor, p_v: torch.Tensor) -> torch.Tensor:
    """KL(N(q_m, q_v) || N(p_m, p_v)) elementwise, in closed form."""
    return 0.5 * (torch.log(p_v) - torch.log(q_v) + (q_v + (q_m - p_m) ** 2) / p_v - 1.0)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) elementwise."""
    return -0.5 * (torch.log(2 * torch.pi * var) + (x - mean) ** 2 / var)
