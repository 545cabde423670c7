"""The scVI variational autoencoder: inference (x -> q(z), library), generative (z -> p(x)), loss.

Parameter names match scvi-tools' ``VAE`` state dict, so weights can move between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scvi_cli.minibatch import Minibatch
from scvi_cli.models.outputs import LossOutput, gaussian_kl, gaussian_kl_to_standard, gaussian_log_prob
from scvi_cli.nn import DecoderSCVI, Encoder, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial, one_hot

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LIKELIHOODS = ("zinb", "nb", "poisson")
NORM_PLACEMENTS = ("none", "encoder", "decoder", "both")


@dataclass(frozen=True)
class NetworkOptions:
    """How VAE's encoders and decoder are built; LDVAE builds its own from the same options."""

    n_input_encoder: int
    encoder_cat_list: list[int] | None
    decoder_cat_list: list[int]
    n_hidden: int
    n_layers: int
    dropout_rate: float
    deeply_inject_covariates: bool
    use_batch_norm: str
    use_layer_norm: str
    var_activation: object


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


class VAE(nn.Module):
    """scVI: a VAE over counts with a ZINB / NB / Poisson likelihood and batch-aware decoder.

    The encoder sees ``log1p(x)`` (when ``log_variational``) and, with ``encode_covariates``, the
    covariates; the decoder always sees the batch one-hot and the extra categorical covariates
    (injected into every layer when ``deeply_inject_covariates``) and the continuous covariates
    (concatenated to z). The library is the observed log total count, or a latent variable with a
    per-batch Normal prior (``library_log_means``, ``library_log_vars`` of shape (1, n_batch)).
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        log_variational: bool = True,
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        use_observed_lib_size: bool = True,
        library_log_means: np.ndarray | torch.Tensor | None = None,
        library_log_vars: np.ndarray | torch.Tensor | None = None,
        var_activation=None,
    ):
        super().__init__()
        _check_choice("dispersion", dispersion, DISPERSIONS)
        _check_choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
        _check_choice("latent_distribution", latent_distribution, ("normal", "ln"))
        _check_choice("use_batch_norm", use_batch_norm, NORM_PLACEMENTS)
        _check_choice("use_layer_norm", use_layer_norm, NORM_PLACEMENTS)
        self.n_input = n_input
        self.n_batch = n_batch
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.n_continuous_cov = n_continuous_cov
        self.n_cats_per_cov = list(n_cats_per_cov or [])
        self.dispersion = dispersion
        self.log_variational = log_variational
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.encode_covariates = encode_covariates
        self.use_observed_lib_size = use_observed_lib_size

        if not use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("a latent library needs library_log_means and library_log_vars")
            self.register_buffer("library_log_means", torch.as_tensor(np.asarray(library_log_means), dtype=torch.float32))
            self.register_buffer("library_log_vars", torch.as_tensor(np.asarray(library_log_vars), dtype=torch.float32))

        px_r_shape = {"gene": (n_input,), "gene-batch": (n_input, n_batch), "gene-label": (n_input, n_labels)}
        if dispersion in px_r_shape:
            self.px_r = nn.Parameter(torch.randn(px_r_shape[dispersion]))

        cat_list = [n_batch, *self.n_cats_per_cov]
        self._build_networks(
            NetworkOptions(
                n_input_encoder=n_input + n_continuous_cov * encode_covariates,
                encoder_cat_list=cat_list if encode_covariates else None,
                decoder_cat_list=cat_list,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                deeply_inject_covariates=deeply_inject_covariates,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
                var_activation=var_activation,
            )
        )

    def _build_networks(self, options: "NetworkOptions") -> None:
        """Create z_encoder, l_encoder and decoder (LDVAE overrides this, not the modules after)."""
        encoder_norms = dict(
            use_batch_norm=options.use_batch_norm in ("encoder", "both"),
            use_layer_norm=options.use_layer_norm in ("encoder", "both"),
            inject_covariates=options.deeply_inject_covariates,
            var_activation=options.var_activation,
        )
        self.z_encoder = Encoder(
            options.n_input_encoder,
            self.n_latent,
            n_cat_list=options.encoder_cat_list,
            n_layers=options.n_layers,
            n_hidden=options.n_hidden,
            dropout_rate=options.dropout_rate,
            distribution=self.latent_distribution,
            **encoder_norms,
        )
        self.l_encoder = Encoder(
            options.n_input_encoder,
            1,
            n_cat_list=options.encoder_cat_list,
            n_layers=1,
            n_hidden=options.n_hidden,
            dropout_rate=options.dropout_rate,
            **encoder_norms,
        )
        self.decoder = DecoderSCVI(
            self.n_latent + self.n_continuous_cov,
            self.n_input,
            n_cat_list=options.decoder_cat_list,
            n_layers=options.n_layers,
            n_hidden=options.n_hidden,
            inject_covariates=options.deeply_inject_covariates,
            use_batch_norm=options.use_batch_norm in ("decoder", "both"),
            use_layer_norm=options.use_layer_norm in ("decoder", "both"),
        )

    # ----------------------------------------------------------------------------- inference
    def _categorical_inputs(self, cat_covs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The extra categorical covariates as (B, 1) code columns; none unless the model has them."""
        if cat_covs is None or not self.n_cats_per_cov:
            return ()
        return tuple(torch.split(cat_covs, 1, dim=1))

    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor]:
        """q(z | x) and the library. With n_samples > 1, z and library gain a leading sample axis."""
        x_ = torch.log1p(x) if self.log_variational else x
        if cont_covs is not None and self.n_continuous_cov and self.encode_covariates:
            x_ = torch.cat([x_, cont_covs], dim=-1)
        cats = self._categorical_inputs(cat_covs) if self.encode_covariates else ()
        qz_m, qz_v, z = self.z_encoder(x_, batch_index, *cats)
        out = {"qz_m": qz_m, "qz_v": qz_v}
        if self.use_observed_lib_size:
            library = torch.log(x.sum(dim=1, keepdim=True))
        else:
            ql_m, ql_v, library = self.l_encoder(x_, batch_index, *cats)
            out.update(ql_m=ql_m, ql_v=ql_v)
        if n_samples > 1:
            untransformed = qz_m + qz_v.sqrt() * torch.randn((n_samples, *qz_m.shape), device=qz_m.device)
            z = self.z_encoder.transform(untransformed)
            out["untransformed_z"] = untransformed
            if self.use_observed_lib_size:
                library = library.expand(n_samples, *library.shape)
            else:
                library = ql_m + ql_v.sqrt() * torch.randn((n_samples, *ql_m.shape), device=ql_m.device)
        out.update(z=z, library=library)
        return out

    # ---------------------------------------------------------------------------- generative
    def dispersion_for(self, batch_index: torch.Tensor, labels: torch.Tensor | None, px_r_cell) -> torch.Tensor:
        """log inverse dispersion per gene (G,), or per cell (B, G) for the per-batch/label/cell modes."""
        if self.dispersion == "gene":
            return self.px_r
        if self.dispersion == "gene-batch":
            return F.linear(one_hot(batch_index, self.n_batch), self.px_r)
        if self.dispersion == "gene-label":
            if labels is None:
                raise ValueError("dispersion 'gene-label' needs the labels")
            return F.linear(one_hot(labels, self.n_labels), self.px_r)
        return px_r_cell

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        transform_batch: int | None = None,
    ) -> dict:
        """p(x | z, library, covariates); ``transform_batch`` decodes every cell as that batch."""
        decoder_input = z
        if cont_covs is not None and self.n_continuous_cov:
            decoder_input = torch.cat([z, cont_covs.expand(*z.shape[:-1], cont_covs.shape[-1])], dim=-1)
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        px_scale, px_r_cell, px_rate, px_dropout = self.decoder(
            self.dispersion, decoder_input, library, batch_index, *self._categorical_inputs(cat_covs)
        )
        theta = torch.exp(self.dispersion_for(batch_index, labels, px_r_cell))
        if self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(px_rate, theta, px_dropout)
        elif self.gene_likelihood == "nb":
            px = NegativeBinomial(px_rate, theta)
        else:
            px = Poisson(px_rate)
        return {"px": px, "px_scale": px_scale, "px_rate": px_rate, "px_r": theta, "px_dropout": px_dropout}

    # ---------------------------------------------------------------------------------- loss
    def library_prior(self, batch_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell (mean, variance) of the latent library's Normal prior, from the cell's batch."""
        codes = one_hot(batch_index, self.library_log_means.shape[1])
        return F.linear(codes, self.library_log_means), F.linear(codes, self.library_log_vars)

    def loss(self, x: torch.Tensor, inference_outputs, generative_outputs, batch_index, kl_weight: float = 1.0) -> LossOutput:
        reconstruction_loss = -generative_outputs["px"].log_prob(x).sum(dim=-1)
        kl_z = gaussian_kl_to_standard(inference_outputs["qz_m"], inference_outputs["qz_v"]).sum(dim=-1)
        if self.use_observed_lib_size:
            kl_l = torch.zeros_like(kl_z)
        else:
            prior_m, prior_v = self.library_prior(batch_index)
            kl_l = gaussian_kl(inference_outputs["ql_m"], inference_outputs["ql_v"], prior_m, prior_v).sum(dim=-1)
        loss = torch.mean(reconstruction_loss + kl_weight * kl_z + kl_l)
        return LossOutput(loss=loss, reconstruction_loss=reconstruction_loss, kl_local=kl_z + kl_l)

    def forward(self, batch: Minibatch, kl_weight: float = 1.0) -> LossOutput:
        """One pass inference -> generative -> loss: what training and evaluation call."""
        inference_outputs = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
        generative_outputs = self.generative(
            inference_outputs["z"],
            inference_outputs["library"],
            batch.batch_index,
            batch.cont_covs,
            batch.cat_covs,
            batch.labels,
        )
        return self.loss(batch.x, inference_outputs, generative_outputs, batch.batch_index, kl_weight)

    # ------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def latent(self, batch: Minibatch, give_mean: bool = True, mc_samples: int = 5000) -> torch.Tensor:
        """(B, n_latent) posterior mean of z (Monte Carlo mean of softmax(z) for 'ln'), or a sample."""
        qz_m, qz_v, z = self.z_encoder(*self._encoder_inputs(batch))
        if not give_mean:
            return z
        if self.latent_distribution == "ln":
            draws = qz_m + qz_v.sqrt() * torch.randn((mc_samples, *qz_m.shape), device=qz_m.device)
            return draws.softmax(dim=-1).mean(dim=0)
        return qz_m

    def _encoder_inputs(self, batch: Minibatch) -> tuple[torch.Tensor, ...]:
        x_ = torch.log1p(batch.x) if self.log_variational else batch.x
        if batch.cont_covs is not None and self.n_continuous_cov and self.encode_covariates:
            x_ = torch.cat([x_, batch.cont_covs], dim=-1)
        cats = self._categorical_inputs(batch.cat_covs) if self.encode_covariates else ()
        return (x_, batch.batch_index, *cats)

    def _decode_mean(self, batch: Minibatch, transform_batch: int | None, n_samples: int) -> dict:
        """Decode the posterior mean (n_samples=0) or n_samples posterior draws (leading axis)."""
        inference = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs, n_samples=max(n_samples, 1))
        if n_samples == 0:
            z = self.z_encoder.transform(inference["qz_m"])
            library = inference["library"] if self.use_observed_lib_size else inference["ql_m"]
        else:
            z, library = inference["z"], inference["library"]
        return self.generative(z, library, batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels, transform_batch)

    @torch.no_grad()
    def sample_scale(self, batch: Minibatch, transform_batch: int | None = None, n_samples: int = 0) -> torch.Tensor:
        """Normalised expression px_scale (B, G): from the posterior mean, or averaged over samples."""
        out = self._decode_mean(batch, transform_batch, n_samples)["px_scale"]
        return out.mean(dim=0) if n_samples > 1 else out

    @torch.no_grad()
    def sample_rate(self, batch: Minibatch, transform_batch: int | None = None, n_samples: int = 0) -> torch.Tensor:
        """Expected counts px_rate = library * px_scale (B, G)."""
        out = self._decode_mean(batch, transform_batch, n_samples)["px_rate"]
        return out.mean(dim=0) if n_samples > 1 else out

    @torch.no_grad()
    def library_size(self, batch: Minibatch, give_mean: bool = True) -> torch.Tensor:
        """(B, 1) library size on the count scale: observed total, or exp of the latent library."""
        inference = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
        if self.use_observed_lib_size or not give_mean:
            return torch.exp(inference["library"])
        return torch.exp(inference["ql_m"] + 0.5 * inference["ql_v"])

    @torch.no_grad()
    def posterior_predictive_sample(
        self, batch: Minibatch, n_samples: int = 1, transform_batch: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n_samples, B, G) counts drawn from p(x | z, l) with z, l drawn from the posterior."""
        draws = []
        for _ in range(n_samples):
            out = self._decode_mean(batch, transform_batch, n_samples=1)
            draws.append(out["px"].sample(generator))
        return torch.stack(draws)

    @torch.no_grad()
    def marginal_ll(self, batch: Minibatch, n_mc_samples: int = 100) -> torch.Tensor:
        """(B,) importance-sampling estimate of log p(x), with q(z, l | x) as the proposal.

        log p(x) ~ logsumexp_s [log p(x|z_s,l_s) + log p(z_s) + log p(l_s) - log q(z_s|x) - log q(l_s|x)]
        - log S; the library terms are absent when the library is observed. For the logistic
        normal, densities are those of the Gaussian draws before the softmax.
        """
        inference = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
        qz_m, qz_v = inference["qz_m"], inference["qz_v"]
        untransformed = qz_m + qz_v.sqrt() * torch.randn((n_mc_samples, *qz_m.shape), device=qz_m.device)
        log_weight = (
            gaussian_log_prob(untransformed, torch.zeros_like(qz_m), torch.ones_like(qz_v))
            - gaussian_log_prob(untransformed, qz_m, qz_v)
        ).sum(dim=-1)
        if self.use_observed_lib_size:
            library = inference["library"].expand(n_mc_samples, *inference["library"].shape)
        else:
            ql_m, ql_v = inference["ql_m"], inference["ql_v"]
            library = ql_m + ql_v.sqrt() * torch.randn((n_mc_samples, *ql_m.shape), device=ql_m.device)
            prior_m, prior_v = self.library_prior(batch.batch_index)
            log_weight = log_weight + (
                gaussian_log_prob(library, prior_m, prior_v) - gaussian_log_prob(library, ql_m, ql_v)
            ).sum(dim=-1)
        generative = self.generative(
            self.z_encoder.transform(untransformed),
            library,
            batch.batch_index,
            batch.cont_covs,
            batch.cat_covs,
            batch.labels,
        )
        log_weight = log_weight + generative["px"].log_prob(batch.x).sum(dim=-1)
        return torch.logsumexp(log_weight, dim=0) - np.log(n_mc_samples)
