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
from scvi_cli.nn.decoders import ScaleHead

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LIKELIHOODS = ("zinb", "nb", "poisson")
NORM_PLACEMENTS = ("none", "encoder", "decoder", "both")
# Monte Carlo draws for the mean of softmax(z) under the logistic normal (as scvi-tools does).
LN_MC_SAMPLES = 5000
# Floats held per intermediate of a query (draws x cells x dims, cells x gene chunk): about 64 MiB.
CHUNK_ELEMENTS = 1 << 24

# transform_batch of the expression queries: None (each cell's own batch), one batch code, or
# several, whose decodings are averaged.
TransformBatch = int | Sequence[int] | None


def gaussian_draws(mean: torch.Tensor, var: torch.Tensor, n: int) -> torch.Tensor:
    """(n, *mean.shape) reparameterised draws from N(mean, var)."""
    return mean + var.sqrt() * torch.randn((n, *mean.shape), device=mean.device)


def logistic_normal_mean(qz_m: torch.Tensor, qz_v: torch.Tensor, mc_samples: int) -> torch.Tensor:
    """Monte Carlo mean of softmax(z), z ~ N(qz_m, qz_v), over ``mc_samples`` draws.

    Drawn in chunks of about CHUNK_ELEMENTS floats, so mc_samples x B x D never exists at once.
    """
    per_chunk = max(1, CHUNK_ELEMENTS // qz_m.numel())
    total = torch.zeros_like(qz_m)
    done = 0
    while done < mc_samples:
        size = min(per_chunk, mc_samples - done)
        total += gaussian_draws(qz_m, qz_v, size).softmax(dim=-1).sum(dim=0)
        done += size
    return total / mc_samples


def decoding_batch(batch_index: torch.Tensor, transform_batch: int | None) -> torch.Tensor:
    """The batch codes to decode with: the cells' own, or ``transform_batch`` for every cell."""
    return batch_index if transform_batch is None else torch.full_like(batch_index, int(transform_batch))


def mean_expression(
    module: nn.Module,
    batch: Minibatch,
    transform_batch: TransformBatch,
    n_samples: int,
    gene_index,
    gene_chunk: int | None,
    rate: bool,
) -> torch.Tensor:
    """px_scale (or px_rate with ``rate``) of ``gene_index``, averaged over posterior draws and
    transform batches: the sample_scale / sample_rate of VAE and VAEC, through their
    ``_posterior_draws`` (z and count-scale library) and ``_scale_head`` (the decoder's last layer).

    ``n_samples`` = 0 decodes the posterior mean, S > 0 averages S joint draws of z and library.
    The draws are made once and every transform batch decodes the same ones, one draw at a time,
    through the decoder's ScaleHead (``gene_chunk`` genes at a time, all when None): memory is
    cells x wanted genes plus one gene chunk, whatever S and the number of batches.
    """
    if transform_batch is None or np.ndim(transform_batch) == 0:
        codes = [transform_batch]
    else:
        codes = [int(code) for code in transform_batch]
    if not codes:
        raise ValueError("transform_batch: an empty list of batches (None decodes each cell as its own batch)")
    genes = None if gene_index is None else torch.as_tensor(gene_index, dtype=torch.long, device=batch.x.device)
    z, library = module._posterior_draws(batch, n_samples)
    total = None
    for code in codes:
        for s in range(z.shape[0]):
            values = module._scale_head(z[s], batch, code).columns(genes, gene_chunk)
            if rate:
                values = values * library[s]
            total = values if total is None else total + values
    return total / (len(codes) * z.shape[0])


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
        """q(z | x) and the (log) library. With n_samples > 1, z and library gain a leading sample axis."""
        x_, cats = self._encoder_input(x, cont_covs, cat_covs)
        qz_m, qz_v, z = self.z_encoder(x_, batch_index, *cats)
        out = {"qz_m": qz_m, "qz_v": qz_v}
        if self.use_observed_lib_size:
            library = torch.log(x.sum(dim=1, keepdim=True))
        else:
            ql_m, ql_v, library = self.l_encoder(x_, batch_index, *cats)
            out.update(ql_m=ql_m, ql_v=ql_v)
        out.update(z=z, library=library)
        if n_samples > 1:
            untransformed, library = self._sample_posterior(out, n_samples)
            out.update(untransformed_z=untransformed, z=self.z_encoder.transform(untransformed), library=library)
        return out

    def _encoder_input(self, x: torch.Tensor, cont_covs, cat_covs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """What the encoders see besides the batch: log1p(x) (or x) with, when ``encode_covariates``,
        the continuous covariates appended, and the categorical code columns."""
        x_ = torch.log1p(x) if self.log_variational else x
        if cont_covs is not None and self.n_continuous_cov and self.encode_covariates:
            x_ = torch.cat([x_, cont_covs], dim=-1)
        cats = self._categorical_inputs(cat_covs) if self.encode_covariates else ()
        return x_, cats

    def _sample_posterior(self, inference_outputs: dict, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_samples`` joint posterior draws: untransformed z (S, B, D) and log library (S, B, 1)
        (the observed one repeated, or drawn from q(l | x)), z drawn first."""
        untransformed = gaussian_draws(inference_outputs["qz_m"], inference_outputs["qz_v"], n_samples)
        if self.use_observed_lib_size:
            library = inference_outputs["library"]
            return untransformed, library.expand(n_samples, *library.shape)
        return untransformed, gaussian_draws(inference_outputs["ql_m"], inference_outputs["ql_v"], n_samples)

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
        decoder_input, batch_index, cats = self._decoder_inputs(z, batch_index, cont_covs, cat_covs, transform_batch)
        px_scale, px_r_cell, px_rate, px_dropout = self.decoder(self.dispersion, decoder_input, library, batch_index, *cats)
        theta = torch.exp(self.dispersion_for(batch_index, labels, px_r_cell))
        if self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(px_rate, theta, px_dropout)
        elif self.gene_likelihood == "nb":
            px = NegativeBinomial(px_rate, theta)
        else:
            px = Poisson(px_rate)
        return {"px": px, "px_scale": px_scale, "px_rate": px_rate, "px_r": theta, "px_dropout": px_dropout}

    def _decoder_inputs(self, z: torch.Tensor, batch_index, cont_covs, cat_covs, transform_batch: int | None):
        """(decoder input, batch codes, categorical code columns) as the decoder takes them: z with
        the continuous covariates appended, the batch codes (all ``transform_batch`` when given)."""
        decoder_input = z
        if cont_covs is not None and self.n_continuous_cov:
            decoder_input = torch.cat([z, cont_covs.expand(*z.shape[:-1], cont_covs.shape[-1])], dim=-1)
        return decoder_input, decoding_batch(batch_index, transform_batch), self._categorical_inputs(cat_covs)

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
    def latent(self, batch: Minibatch, give_mean: bool = True, mc_samples: int = LN_MC_SAMPLES) -> torch.Tensor:
        """(B, n_latent): the posterior mean of z, or one draw from q(z | x) with ``give_mean=False``.

        For the logistic normal the mean is E[softmax(z)] over ``mc_samples`` draws (the softmax
        of the Gaussian mean would be biased towards the uniform), computed in chunks of draws.
        """
        if not give_mean:  # z's encoder alone: the library encoder is neither run nor drawn from
            x_, cats = self._encoder_input(batch.x, batch.cont_covs, batch.cat_covs)
            return self.z_encoder(x_, batch.batch_index, *cats)[2]
        out = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
        if self.latent_distribution == "ln":
            return logistic_normal_mean(out["qz_m"], out["qz_v"], mc_samples)
        return out["qz_m"]

    def _posterior_draws(self, batch: Minibatch, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, library) with a leading draw axis, (S, B, D) and (S, B, 1), library on the count scale.

        n_samples=0 gives the posterior mean as one entry: z at the mean of q(z | x) (its softmax
        for the logistic normal) and the observed library, or exp(ql_m) for a latent one (exp of
        the posterior mean of the log-library, the log-normal's median; library_size gives its
        mean). Otherwise S joint draws of z and (latent) library.
        """
        out = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
        if n_samples == 0:
            z = self.z_encoder.transform(out["qz_m"])
            log_library = out["library"] if self.use_observed_lib_size else out["ql_m"]
            return z.unsqueeze(0), torch.exp(log_library).unsqueeze(0)
        untransformed, log_library = self._sample_posterior(out, n_samples)
        return self.z_encoder.transform(untransformed), torch.exp(log_library)

    def _scale_head(self, z: torch.Tensor, batch: Minibatch, transform_batch: int | None) -> ScaleHead:
        """The decoder's px_scale layer for ``z`` (B, D), decoded as ``transform_batch``."""
        decoder_input, batch_index, cats = self._decoder_inputs(
            z, batch.batch_index, batch.cont_covs, batch.cat_covs, transform_batch
        )
        return self.decoder.scale_head(decoder_input, batch_index, *cats)

    @torch.no_grad()
    def sample_scale(
        self, batch: Minibatch, transform_batch: TransformBatch = None, n_samples: int = 0, *, gene_index=None, gene_chunk=None
    ) -> torch.Tensor:
        """Normalised expression px_scale (B, G), or (B, len(gene_index)) for those genes.

        Decoded from the posterior mean (``n_samples=0``) or averaged over ``n_samples`` posterior
        draws; ``transform_batch`` decodes every cell as that batch, or averages over several
        batches (the same draws for each). ``gene_index`` (gene positions) keeps only those
        columns, the softmax still normalising over all genes, ``gene_chunk`` genes at a time.
        """
        return mean_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=False)

    @torch.no_grad()
    def sample_rate(
        self, batch: Minibatch, transform_batch: TransformBatch = None, n_samples: int = 0, *, gene_index=None, gene_chunk=None
    ) -> torch.Tensor:
        """Expected counts px_rate = library * px_scale (B, G); arguments as for sample_scale.

        The library is the observed total or, for a latent library, exp(ql_m) at the posterior
        mean (``n_samples=0``; exp of the posterior mean of the log-library, not library_size's
        log-normal mean exp(ql_m + ql_v / 2)) and a posterior draw, joint with z's, otherwise.
        """
        return mean_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=True)

    @torch.no_grad()
    def library_size(self, batch: Minibatch, give_mean: bool = True) -> torch.Tensor:
        """(B, 1) library size on the count scale: the observed total, or for a latent library its
        posterior mean exp(ql_m + ql_v / 2) (the log-normal's mean, as scvi-tools'
        get_latent_library_size), or a draw with ``give_mean=False``."""
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
            out = self.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
            px = self.generative(
                out["z"], out["library"], batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels, transform_batch
            )["px"]
            draws.append(px.sample(generator))
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
        untransformed, library = self._sample_posterior(inference, n_mc_samples)
        log_weight = (
            gaussian_log_prob(untransformed, torch.zeros_like(qz_m), torch.ones_like(qz_v))
            - gaussian_log_prob(untransformed, qz_m, qz_v)
        ).sum(dim=-1)
        if not self.use_observed_lib_size:
            ql_m, ql_v = inference["ql_m"], inference["ql_v"]
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
