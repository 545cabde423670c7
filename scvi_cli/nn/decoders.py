"""Decoders p(x | z, library, covariates): the scVI network decoder and LDVAE's linear one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scvi_cli.nn.fc_layers import BATCH_NORM, LINEAR, FCLayers


class DecoderSCVI(nn.Module):
    """Stack -> heads for normalised expression, gene-cell dispersion and zero-inflation logits.

    ``forward(dispersion, z, library, *cat_list)`` returns ``(px_scale, px_r, px_rate, px_dropout)``
    with ``px_rate = exp(library) * px_scale``; ``px_r`` is ``None`` unless dispersion is
    ``'gene-cell'``. All three heads always exist so the state dict has a fixed shape.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        scale_activation: str = "softmax",
    ):
        super().__init__()
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}")
        self.px_decoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            inject_covariates=inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
        )
        activation = nn.Softmax(dim=-1) if scale_activation == "softmax" else nn.Softplus()
        self.px_scale_decoder = nn.Sequential(nn.Linear(n_hidden, n_output), activation)
        self.px_r_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    def forward(self, dispersion: str, z: torch.Tensor, library: torch.Tensor, *cat_list: torch.Tensor):
        h = self.px_decoder(z, *cat_list)
        px_scale = self.px_scale_decoder(h)
        px_dropout = self.px_dropout_decoder(h)
        px_rate = torch.exp(library) * px_scale
        px_r = self.px_r_decoder(h) if dispersion == "gene-cell" else None
        return px_scale, px_r, px_rate, px_dropout


class LinearDecoderSCVI(nn.Module):
    """LDVAE's decoder: ``px_scale = softmax(BN(W [z, batch one-hot]))``, interpretable through W.

    The zero-inflation logits come from a second linear (+ batch norm) map of the same inputs.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        linear = dict(
            n_in=n_input,
            n_out=n_output,
            n_cat_list=n_cat_list,
            n_layers=1,
            use_activation=False,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            bias=bias,
            dropout_rate=0.0,
        )
        self.factor_regressor = FCLayers(**linear)
        self.px_dropout_decoder = FCLayers(**linear)
        self.use_batch_norm = use_batch_norm
        self.n_latent = n_input

    def forward(self, dispersion: str, z: torch.Tensor, library: torch.Tensor, *cat_list: torch.Tensor):
        px_scale = torch.softmax(self.factor_regressor(z, *cat_list), dim=-1)
        px_dropout = self.px_dropout_decoder(z, *cat_list)
        px_rate = torch.exp(library) * px_scale
        return px_scale, None, px_rate, px_dropout

    @torch.no_grad()
    def loadings(self) -> torch.Tensor:
        """(genes, n_latent): W with the batch norm's scale folded in, batch columns dropped.

        In eval mode BN(Wz) = gamma * (Wz - running_mean) / sqrt(running_var + eps) + beta, so
        the effect of z on the pre-softmax activation of gene g is gamma_g / sigma_g * W_g.
        """
        block = self.factor_regressor.fc_layers[0]
        weight = block[LINEAR].weight
        if self.use_batch_norm:
            bn = block[BATCH_NORM]
            weight = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(1) * weight
        return weight[:, : self.n_latent].clone()
