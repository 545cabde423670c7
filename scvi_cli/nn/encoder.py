"""Amortised Gaussian posterior q(z | x, covariates): a stack and two linear heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from scvi_cli.nn.fc_layers import FCLayers


class Encoder(nn.Module):
    """Maps ``n_input`` features to a diagonal Gaussian over ``n_output`` dimensions.

    ``forward`` returns ``(q_m, q_v, z)``: the posterior mean, variance
    (``var_activation(head) + var_eps``, exp by default) and a reparameterised sample. With
    ``distribution='ln'`` the sample is mapped through softmax (logistic normal), while q_m and q_v
    remain the parameters of the underlying Gaussian.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: str = "normal",
        var_eps: float = 1e-4,
        var_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **fc_kwargs,
    ):
        super().__init__()
        if distribution not in ("normal", "ln"):
            raise ValueError(f"distribution must be 'normal' or 'ln', got {distribution!r}")
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation is None else var_activation
        self.encoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            **fc_kwargs,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def transform(self, untransformed_z: torch.Tensor) -> torch.Tensor:
        """Gaussian sample -> latent value (identity, or softmax for the logistic normal)."""
        return untransformed_z.softmax(dim=-1) if self.distribution == "ln" else untransformed_z

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor):
        h = self.encoder(x, *cat_list)
        q_m = self.mean_encoder(h)
        q_v = self.var_activation(self.var_encoder(h)) + self.var_eps
        z = self.transform(q_m + q_v.sqrt() * torch.randn_like(q_m))
        return q_m, q_v, z
