"""LDVAE: scVI with a linear decoder, so each latent factor has interpretable gene loadings."""

from __future__ import annotations

import numpy as np

from scvi_cli.models.vae import LIKELIHOODS, VAEBase, check_choice
from scvi_cli.nn import Encoder, LinearDecoderSCVI

# A linear decoder has no hidden layer to predict a per-cell dispersion from.
LINEAR_DISPERSIONS = ("gene", "gene-batch", "gene-label")


class LDVAE(VAEBase):
    """scVI's inference network with ``px_scale = softmax(BN(W [z, batch one-hot]))``.

    Parameters in the order and with the defaults of scvi-tools' ``LDVAE``: NB likelihood,
    latent library, batch norm on the decoder's output, no bias. Encoders use batch norm and see
    no covariates; ``n_layers_encoder`` hidden layers for z's encoder (one for the library's).
    Keyword-only: the stored library prior and the encoders' variance settings.
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
        *,
        library_log_means=None,
        library_log_vars=None,
        var_activation=None,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        check_choice("dispersion (LDVAE)", dispersion, LINEAR_DISPERSIONS)
        check_choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
        self._setup(
            n_input, n_batch, n_labels, n_latent, dispersion, log_variational, gene_likelihood,
            latent_distribution, use_observed_lib_size, library_log_means, library_log_vars,
        )
        encoder_options = dict(
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=True,
            use_layer_norm=False,
            var_activation=var_activation,
            var_eps=var_eps,
        )
        self.z_encoder = Encoder(n_input, n_latent, n_layers=n_layers_encoder, distribution=latent_distribution, **encoder_options)
        self.l_encoder = Encoder(n_input, 1, n_layers=1, **encoder_options)
        self.decoder = LinearDecoderSCVI(
            n_latent, n_input, n_cat_list=[n_batch], use_batch_norm=use_batch_norm, use_layer_norm=False, bias=bias
        )

    def get_loadings(self) -> np.ndarray:
        """(genes, n_latent) float32 loadings: W with the batch norm folded in, batch columns dropped."""
        return self.decoder.loadings().cpu().numpy()
