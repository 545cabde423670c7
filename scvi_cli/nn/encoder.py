"""Amortised Gaussian posterior q(z | x, covariates): a stack and two linear heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from scvi_cli.nn.fc_layers import FCLayers

# The variance activations a spec (and a checkpoint) can name; the constructor also takes any callable.
VAR_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"exp": torch.exp, "softplus": F.softplus}


def resolve_var_activation(var_activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """None (exp, the default), a name of VAR_ACTIVATIONS, or a callable -> the callable."""
    if var_activation is None:
        return torch.exp
    if isinstance(var_activation, str):
        if var_activation not in VAR_ACTIVATIONS:
            raise ValueError(f"var_activation must be one of {', '.join(VAR_ACTIVATIONS)} or a callable, got {var_activation!r}")
        return VAR_ACTIVATIONS[var_activation]
    if not callable(var_activation):
        raise ValueError(f"var_activation must be a callable or one of {', '.join(VAR_ACTIVATIONS)}, got {var_activation!r}")
    return var_activation


class Encoder(nn.Module):
    """Maps ``n_input`` features to a diagonal Gaussian over ``n_output`` dimensions.

    ``forward(x, *cat_list)`` returns ``(q_m, q_v, z)``: the posterior mean, the variance
    ``var_activation(head) + var_eps`` (exp by default; ``var_eps`` is a floor) and a
    reparameterised sample. With ``distribution='ln'`` the sample is mapped through softmax
    (logistic normal) while q_m and q_v stay the parameters of the underlying Gaussian. With
    ``return_dist`` it returns ``(Normal(q_m, sqrt(q_v)), z)`` instead. Other keywords go to FCLayers.
    ``x`` may also be a SparseInput (CSR counts): the first layer then reads only its nonzeros.
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
        var_activation: Callable[[torch.Tensor], torch.Tensor] | str | None = None,
        return_dist: bool = False,
        **fc_kwargs,
    ):
        super().__init__()
        if distribution not in ("normal", "ln"):
            raise ValueError(f"distribution must be 'normal' or 'ln', got {distribution!r}")
        if not var_eps >= 0:
            raise ValueError(f"var_eps must be >= 0, got {var_eps!r}")
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = resolve_var_activation(var_activation)
        self.return_dist = return_dist
        self.encoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            **fc_kwargs,
        ).sparse_input_ready_()
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
        if self.return_dist:
            return Normal(q_m, q_v.sqrt()), z
        return q_m, q_v, z
