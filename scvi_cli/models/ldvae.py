"""LDVAE: scVI with a linear decoder, so each latent factor has interpretable gene loadings."""

from __future__ import annotations

import torch

from scvi_cli.models.vae import VAE, NetworkOptions
from scvi_cli.nn import Encoder, LinearDecoderSCVI


class LDVAE(VAE):
    """scVI's inference network with ``px_scale = softmax(BN(W z))``.

    Encoders use batch norm and see no covariates; the decoder sees the batch one-hot. Defaults
    follow scvi-tools' LinearSCVI: NB likelihood, latent library.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers_encoder: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        log_variational: bool = True,
        gene_likelihood: str = "nb",
        use_batch_norm: bool = True,
        bias: bool = False,
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = False,
        library_log_means=None,
        library_log_vars=None,
    ):
        self._linear_options = dict(n_layers_encoder=n_layers_encoder, use_batch_norm=use_batch_norm, bias=bias)
        super().__init__(
            n_input,
            n_batch=n_batch,
            n_labels=n_labels,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers_encoder,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            log_variational=log_variational,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            library_log_means=library_log_means,
            library_log_vars=library_log_vars,
        )

    def _build_networks(self, options: NetworkOptions) -> None:
        """Encoders without covariates; the linear decoder sees the batch only."""
        n_hidden, dropout_rate = options.n_hidden, options.dropout_rate
        linear = self._linear_options
        encoder_kwargs = dict(n_hidden=n_hidden, dropout_rate=dropout_rate, use_batch_norm=True, use_layer_norm=False)
        self.z_encoder = Encoder(
            self.n_input,
            self.n_latent,
            n_layers=linear["n_layers_encoder"],
            distribution=self.latent_distribution,
            **encoder_kwargs,
        )
        self.l_encoder = Encoder(self.n_input, 1, n_layers=1, **encoder_kwargs)
        self.decoder = LinearDecoderSCVI(
            self.n_latent,
            self.n_input,
            n_cat_list=[self.n_batch],
            use_batch_norm=linear["use_batch_norm"],
            use_layer_norm=False,
            bias=linear["bias"],
        )

    def get_loadings(self) -> torch.Tensor:
        """(genes, n_latent) loadings: W with the batch norm folded in, batch columns dropped."""
        return self.decoder.loadings()
