"""The scVI variational autoencoder: encode (x -> q(z), library), generative (z -> p(x)), loss.

``VAE`` has the scvi 0.6 API (constructor, ``forward(x, local_l_mean, local_l_var, batch_index,
y)``, ``inference``, ``get_latents``, ``sample_from_posterior_z`` / ``_l``, ``get_sample_scale`` /
``_rate``, ``get_reconstruction_loss``); the scvi-tools 1.x options (covariates, observed library,
norm placement, ...) are keyword-only after the documented parameters. Parameter names match
scvi-tools' ``VAE`` state dict, so weights move between the two. ``VAEBase`` holds everything
scVI and LDVAE share; each builds its own networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models.expression import TransformBatch, average_expression
from scvi_cli.models.outputs import LossOutput, gaussian_kl, gaussian_kl_to_standard, gaussian_log_prob
from scvi_cli.nn import DecoderSCVI, Encoder, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial, one_hot
from scvi_cli.nn.decoders import ScaleHead
from scvi_cli.nn.sparse_input import SparseInput, SparseRows

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LIKELIHOODS = ("zinb", "nb", "poisson")
NORM_PLACEMENTS = ("none", "encoder", "decoder", "both")
# Monte Carlo draws for the mean of softmax(z) under the logistic normal (as scvi-tools does).
LN_MC_SAMPLES = 5000
# Floats held per intermediate of a query (draws x cells x dims, cells x gene chunk): about 64 MiB.
CHUNK_ELEMENTS = 1 << 24


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


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def resolve_likelihood(reconstruction_loss: str, gene_likelihood: str | None) -> str:
    """0.6's ``reconstruction_loss`` and 1.x's ``gene_likelihood`` name one setting; both given must agree."""
    if gene_likelihood is None:
        check_choice("reconstruction_loss", reconstruction_loss, LIKELIHOODS)
        return reconstruction_loss
    check_choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
    if reconstruction_loss not in ("zinb", gene_likelihood):  # "zinb" is the default of the positional one
        raise ValueError(f"reconstruction_loss={reconstruction_loss!r} and gene_likelihood={gene_likelihood!r} disagree")
    return gene_likelihood


class VAEBase(nn.Module):
    """Everything scVI and LDVAE share: dispersion, library prior, the 0.6 methods and the queries.

    A subclass's constructor calls ``_setup`` and then creates ``z_encoder``, ``l_encoder`` and
    ``decoder`` (``decoder.forward(dispersion, z, library, *cats)`` and ``decoder.scale_head(z,
    *cats)``). The library is the observed log total count, or a latent variable with a Normal
    prior: per batch from ``library_log_means`` / ``library_log_vars`` (1, n_batch) buffers when
    given, or per cell through ``forward``'s ``local_l_mean`` / ``local_l_var`` (the 0.6 API).
    """

    def _setup(
        self,
        n_input: int,
        n_batch: int,
        n_labels: int,
        n_latent: int,
        dispersion: str,
        log_variational: bool,
        gene_likelihood: str,
        latent_distribution: str,
        use_observed_lib_size: bool,
        library_log_means,
        library_log_vars,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        encode_covariates: bool = False,
    ) -> None:
        check_choice("dispersion", dispersion, DISPERSIONS)
        check_choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
        check_choice("latent_distribution", latent_distribution, ("normal", "ln"))
        if dispersion == "gene-batch" and n_batch < 1:
            raise ValueError("dispersion 'gene-batch' needs n_batch >= 1")
        if dispersion == "gene-label" and n_labels < 1:
            raise ValueError("dispersion 'gene-label' needs n_labels >= 1")
        if (library_log_means is None) != (library_log_vars is None):
            raise ValueError("library_log_means and library_log_vars go together: give both or neither")
        self.n_input = n_input
        self.n_batch = n_batch
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.n_continuous_cov = n_continuous_cov
        self.n_cats_per_cov = list(n_cats_per_cov or [])
        self.dispersion = dispersion
        self.log_variational = log_variational
        self.gene_likelihood = gene_likelihood
        self.reconstruction_loss = gene_likelihood  # the 0.6 name of the same setting
        self.latent_distribution = latent_distribution
        self.encode_covariates = encode_covariates
        self.use_observed_lib_size = use_observed_lib_size
        if not use_observed_lib_size and library_log_means is not None:
            means = torch.as_tensor(np.asarray(library_log_means), dtype=torch.float32).reshape(1, -1)
            variances = torch.as_tensor(np.asarray(library_log_vars), dtype=torch.float32).reshape(1, -1)
            if means.shape != variances.shape or means.shape[1] != max(n_batch, 1):
                raise ValueError(
                    f"library_log_means / library_log_vars must have shape (1, {max(n_batch, 1)}), "
                    f"got {tuple(means.shape)} and {tuple(variances.shape)}"
                )
            self.register_buffer("library_log_means", means)
            self.register_buffer("library_log_vars", variances)
        px_r_shape = {"gene": (n_input,), "gene-batch": (n_input, n_batch), "gene-label": (n_input, n_labels)}
        if dispersion in px_r_shape:
            self.px_r = nn.Parameter(torch.randn(px_r_shape[dispersion]))

    @property
    def has_library_prior(self) -> bool:
        """Whether the per-batch prior of a latent library is stored in the module."""
        return hasattr(self, "library_log_means")

    # ----------------------------------------------------------------------------- encoding
    def _batch_codes(self, cells: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """(B, 1) batch codes: as given, or all 0 when the model has at most one batch. ``cells``
        is any tensor with the cells on its second-to-last axis (x (B, G), z (B, D) or (S, B, D))."""
        if batch_index is not None:
            return batch_index.reshape(-1, 1)
        if self.n_batch > 1:
            raise ValueError(f"batch_index is required: the model has {self.n_batch} batches")
        return torch.zeros((cells.shape[-2], 1), dtype=torch.long, device=cells.device)

    def _categorical_inputs(self, cat_covs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The extra categorical covariates as (B, 1) code columns; none unless the model has them."""
        if not self.n_cats_per_cov:
            return ()
        if cat_covs is None:
            raise ValueError(f"cat_covs is required: the model has {len(self.n_cats_per_cov)} categorical covariates")
        return tuple(torch.split(cat_covs, 1, dim=1))

    def _encoder_input(self, x: torch.Tensor | SparseRows, cont_covs, cat_covs):
        """What the encoders see besides the batch: log1p(x) (or x) with, when ``encode_covariates``,
        the continuous covariates appended, and the categorical code columns. For CSR counts
        (SparseRows) the first part is a SparseInput: log1p of the stored values only."""
        sparse = isinstance(x, SparseRows)
        x_ = (x.log1p() if sparse else torch.log1p(x)) if self.log_variational else x
        tail = None
        if self.encode_covariates and self.n_continuous_cov:
            if cont_covs is None:
                raise ValueError(f"cont_covs is required: the model has {self.n_continuous_cov} continuous covariates")
            tail = cont_covs
        if sparse:
            x_ = SparseInput(x_, tail)
        elif tail is not None:
            x_ = torch.cat([x_, tail], dim=-1)
        return x_, self._categorical_inputs(cat_covs) if self.encode_covariates else ()

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor]:
        """q(z | x) and the (log) library: qz_m, qz_v, z, library, and ql_m, ql_v for a latent
        library. With n_samples > 1, z (and untransformed_z) and library gain a leading sample axis.
        ``x`` is a (B, G) tensor or the same counts as SparseRows (read from their nonzeros)."""
        batch_index = self._batch_codes(x, batch_index)
        x_, cats = self._encoder_input(x, cont_covs, cat_covs)
        qz_m, qz_v, z = self.z_encoder(x_, batch_index, *cats)
        out = {"qz_m": qz_m, "qz_v": qz_v}
        if self.use_observed_lib_size:
            library = torch.log(x.row_sums() if isinstance(x, SparseRows) else x.sum(dim=1, keepdim=True))
        else:
            ql_m, ql_v, library = self.l_encoder(x_, batch_index, *cats)
            out.update(ql_m=ql_m, ql_v=ql_v)
        out.update(z=z, library=library)
        if n_samples > 1:
            untransformed, library = self._sample_posterior(out, n_samples)
            out.update(untransformed_z=untransformed, z=self.z_encoder.transform(untransformed), library=library)
        return out

    def _sample_posterior(self, encoded: dict, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_samples`` joint posterior draws: untransformed z (S, B, D) and log library (S, B, 1)
        (the observed one repeated, or drawn from q(l | x)), z drawn first."""
        untransformed = gaussian_draws(encoded["qz_m"], encoded["qz_v"], n_samples)
        if self.use_observed_lib_size:
            library = encoded["library"]
            return untransformed, library.expand(n_samples, *library.shape)
        return untransformed, gaussian_draws(encoded["ql_m"], encoded["ql_v"], n_samples)

    # ---------------------------------------------------------------------------- generative
    def dispersion_for(self, batch_index: torch.Tensor, labels: torch.Tensor | None, px_r_cell) -> torch.Tensor:
        """log inverse dispersion per gene (G,), or per cell (B, G) for the per-batch/label/cell modes."""
        if self.dispersion == "gene":
            return self.px_r
        if self.dispersion == "gene-batch":
            return F.linear(one_hot(batch_index, self.n_batch), self.px_r)
        if self.dispersion == "gene-label":
            if labels is None:
                raise ValueError("dispersion 'gene-label' needs the labels (y)")
            return F.linear(one_hot(labels, self.n_labels), self.px_r)
        return px_r_cell

    def likelihood(self, px_rate: torch.Tensor, theta: torch.Tensor, px_dropout: torch.Tensor | None):
        """p(x | mu, theta, pi): the model's count distribution (ZINB, NB or Poisson)."""
        if self.gene_likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(px_rate, theta, px_dropout)
        if self.gene_likelihood == "nb":
            return NegativeBinomial(px_rate, theta)
        return Poisson(px_rate)

    def _decoder_inputs(self, z: torch.Tensor, batch_index, cont_covs, cat_covs, transform_batch: int | None):
        """(decoder input, batch codes, categorical code columns) as the decoder takes them: z with
        the continuous covariates appended, the batch codes (all ``transform_batch`` when given)."""
        decoder_input = z
        if self.n_continuous_cov:
            if cont_covs is None:
                raise ValueError(f"cont_covs is required: the model has {self.n_continuous_cov} continuous covariates")
            decoder_input = torch.cat([z, cont_covs.expand(*z.shape[:-1], cont_covs.shape[-1])], dim=-1)
        batch_index = decoding_batch(self._batch_codes(z, batch_index), transform_batch)
        return decoder_input, batch_index, self._categorical_inputs(cat_covs)

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        transform_batch: int | None = None,
    ) -> dict:
        """p(x | z, library, covariates): px (the distribution), px_scale, px_r (theta), px_rate,
        px_dropout; ``transform_batch`` decodes every cell as that batch."""
        decoder_input, batch_index, cats = self._decoder_inputs(z, batch_index, cont_covs, cat_covs, transform_batch)
        px_scale, px_r_cell, px_rate, px_dropout = self.decoder(self.dispersion, decoder_input, library, batch_index, *cats)
        theta = torch.exp(self.dispersion_for(batch_index, labels, px_r_cell))
        px = self.likelihood(px_rate, theta, px_dropout)
        return {"px": px, "px_scale": px_scale, "px_rate": px_rate, "px_r": theta, "px_dropout": px_dropout}

    def scale_head(self, z: torch.Tensor, batch: Minibatch, transform_batch: int | None) -> ScaleHead:
        """The decoder's px_scale layer for ``z`` (B, D) and these cells, decoded as ``transform_batch``:
        the same layer ``generative`` uses, evaluable on a subset of genes."""
        decoder_input, batch_index, cats = self._decoder_inputs(
            z, batch.batch_index, batch.cont_covs, batch.cat_covs, transform_batch
        )
        return self.decoder.scale_head(decoder_input, batch_index, *cats)

    # ---------------------------------------------------------------------------------- loss
    def library_prior(self, batch_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell (mean, variance) of the latent library's Normal prior, from the cell's batch."""
        if not self.has_library_prior:
            raise ValueError(
                "this model stores no library prior (library_log_means / library_log_vars): "
                "pass local_l_mean and local_l_var per cell"
            )
        codes = one_hot(batch_index, self.library_log_means.shape[1])
        return F.linear(codes, self.library_log_means), F.linear(codes, self.library_log_vars)

    def loss(
        self,
        x: torch.Tensor,
        inference_outputs: dict,
        generative_outputs: dict,
        batch_index: torch.Tensor | None = None,
        kl_weight: float = 1.0,
        library_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LossOutput:
        """Per-cell reconstruction NLL and local KL terms; objective mean(recon + kl_weight * KL_z + KL_l).

        ``library_prior``: per-cell (mean, variance) of the latent log-library's prior; default the
        stored per-batch prior of each cell's batch. ``x``: (B, G) counts, dense or SparseRows.
        """
        reconstruction_loss = generative_outputs["px"].nll_per_cell(x)  # the fused -log_prob(x).sum(-1)
        kl_z = gaussian_kl_to_standard(inference_outputs["qz_m"], inference_outputs["qz_v"]).sum(dim=-1)
        if self.use_observed_lib_size:
            kl_l = torch.zeros_like(kl_z)
        else:
            prior_m, prior_v = library_prior or self.library_prior(self._batch_codes(x, batch_index))
            kl_l = gaussian_kl(inference_outputs["ql_m"], inference_outputs["ql_v"], prior_m, prior_v).sum(dim=-1)
        loss = torch.mean(reconstruction_loss + kl_weight * kl_z + kl_l)
        return LossOutput(loss=loss, reconstruction_loss=reconstruction_loss, kl_z=kl_z, kl_l=kl_l)

    def loss_for(self, batch: Minibatch, kl_weight: float = 1.0) -> LossOutput:
        """One pass encode -> generative -> loss on a minibatch: what training and evaluation call."""
        encoded = self.encode(batch.counts, batch.batch_index, batch.cont_covs, batch.cat_covs)
        generative_outputs = self.generative(
            encoded["z"], encoded["library"], batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels
        )
        return self.loss(batch.counts, encoded, generative_outputs, batch.batch_index, kl_weight)

    # --------------------------------------------------------------------- the scvi 0.6 API
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        n_samples: int = 1,
        transform_batch: int | None = None,
        *,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode and decode in one pass (0.6): px_scale, px_r (theta), px_rate, px_dropout, qz_m,
        qz_v, z, ql_m, ql_v, library. z and the library are posterior draws; with n_samples > 1
        every entry gains a leading sample axis (qz_* and ql_* repeated). ``y``: label codes (B, 1),
        used by 'gene-label' dispersion. ql_m and ql_v are None for an observed library."""
        encoded = self.encode(x, batch_index, cont_covs, cat_covs, n_samples=n_samples)
        generative_outputs = self.generative(
            encoded["z"], encoded["library"], batch_index, cont_covs, cat_covs, y, transform_batch
        )
        out = {key: generative_outputs[key] for key in ("px_scale", "px_r", "px_rate", "px_dropout")}
        for key in ("qz_m", "qz_v", "ql_m", "ql_v"):
            value = encoded.get(key)
            out[key] = value.expand(n_samples, *value.shape) if value is not None and n_samples > 1 else value
        out.update(z=encoded["z"], library=encoded["library"])
        return out

    def forward(
        self,
        x: torch.Tensor,
        local_l_mean: torch.Tensor | None,
        local_l_var: torch.Tensor | None,
        batch_index: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss + KL of the library, KL of z), each per cell (B,) (the 0.6 forward).

        ``local_l_mean`` / ``local_l_var`` (B, 1): each cell's prior of the log-library (the mean
        and variance of log total counts over its batch); None uses the stored per-batch prior.
        With an observed library the library KL is 0. The caller weights the second term for warm-up.
        """
        encoded = self.encode(x, batch_index, cont_covs, cat_covs)
        generative_outputs = self.generative(encoded["z"], encoded["library"], batch_index, cont_covs, cat_covs, y)
        prior = None
        if local_l_mean is not None or local_l_var is not None:
            if local_l_mean is None or local_l_var is None:
                raise ValueError("local_l_mean and local_l_var go together: give both or neither")
            prior = (local_l_mean.reshape(-1, 1), local_l_var.reshape(-1, 1))
        out = self.loss(x, encoded, generative_outputs, batch_index, library_prior=prior)
        return out.reconstruction_loss + out.kl_l, out.kl_z

    def get_reconstruction_loss(self, x: torch.Tensor, px_rate, px_r, px_dropout, **kwargs) -> torch.Tensor:
        """(B,) negative log-likelihood of x under the model's likelihood with these parameters
        (px_r is theta, as ``inference`` returns it); other keywords are ignored, as in 0.6."""
        return -self.likelihood(px_rate, px_r, px_dropout).log_prob(x).sum(dim=-1)

    def sample_from_posterior_z(
        self, x: torch.Tensor, y=None, give_mean: bool = False, n_samples: int = 5000, *, batch_index=None, cont_covs=None, cat_covs=None
    ) -> torch.Tensor:
        """(B, n_latent): one draw of z from q(z | x), or with ``give_mean`` its mean (for 'ln', the
        Monte Carlo mean of softmax over ``n_samples`` draws). ``y`` is unused (0.6 passed labels)."""
        x_, cats = self._encoder_input(x, cont_covs, cat_covs)  # z's encoder alone
        qz_m, qz_v, z = self.z_encoder(x_, self._batch_codes(x, batch_index), *cats)
        if not give_mean:
            return z
        return logistic_normal_mean(qz_m, qz_v, n_samples) if self.latent_distribution == "ln" else qz_m

    def sample_from_posterior_l(self, x: torch.Tensor, *, batch_index=None, cont_covs=None, cat_covs=None) -> torch.Tensor:
        """(B, 1) log-library: a draw from q(l | x), or the observed log total count."""
        return self.encode(x, batch_index, cont_covs, cat_covs)["library"]

    def get_latents(self, x: torch.Tensor, y=None) -> list[torch.Tensor]:
        """[sample_from_posterior_z(x, y)]: a one-element list holding one posterior draw (0.6)."""
        return [self.sample_from_posterior_z(x, y)]

    def get_sample_scale(self, x, batch_index=None, y=None, n_samples: int = 1, transform_batch=None) -> torch.Tensor:
        """px_scale of ``inference`` (one posterior draw; a leading axis with n_samples > 1)."""
        return self.inference(x, batch_index, y, n_samples, transform_batch)["px_scale"]

    def get_sample_rate(self, x, batch_index=None, y=None, n_samples: int = 1, transform_batch=None) -> torch.Tensor:
        """px_rate of ``inference`` (one posterior draw; a leading axis with n_samples > 1)."""
        return self.inference(x, batch_index, y, n_samples, transform_batch)["px_rate"]

    # ------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def latent(self, batch: Minibatch, give_mean: bool = True, mc_samples: int = LN_MC_SAMPLES) -> torch.Tensor:
        """(B, n_latent): the posterior mean of z, or one draw from q(z | x) with ``give_mean=False``.

        For the logistic normal the mean is E[softmax(z)] over ``mc_samples`` draws (the softmax
        of the Gaussian mean would be biased towards the uniform), computed in chunks of draws.
        """
        return self.sample_from_posterior_z(
            batch.counts, give_mean=give_mean, n_samples=mc_samples,
            batch_index=batch.batch_index, cont_covs=batch.cont_covs, cat_covs=batch.cat_covs,
        )

    def posterior_draws(self, batch: Minibatch, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, library) with a leading draw axis, (S, B, D) and (S, B, 1), library on the count scale.

        n_samples=0 gives the posterior mean as one entry: z at the mean of q(z | x) (its softmax
        for the logistic normal) and the observed library, or exp(ql_m) for a latent one (exp of
        the posterior mean of the log-library, the log-normal's median; library_size gives its
        mean). Otherwise S joint draws of z and (latent) library.
        """
        encoded = self.encode(batch.counts, batch.batch_index, batch.cont_covs, batch.cat_covs)
        if n_samples == 0:
            z = self.z_encoder.transform(encoded["qz_m"])
            log_library = encoded["library"] if self.use_observed_lib_size else encoded["ql_m"]
            return z.unsqueeze(0), torch.exp(log_library).unsqueeze(0)
        untransformed, log_library = self._sample_posterior(encoded, n_samples)
        return self.z_encoder.transform(untransformed), torch.exp(log_library)

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
        return average_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=False)

    @torch.no_grad()
    def sample_rate(
        self, batch: Minibatch, transform_batch: TransformBatch = None, n_samples: int = 0, *, gene_index=None, gene_chunk=None
    ) -> torch.Tensor:
        """Expected counts px_rate = library * px_scale (B, G); arguments as for sample_scale.

        The library is the observed total or, for a latent library, exp(ql_m) at the posterior
        mean (``n_samples=0``; exp of the posterior mean of the log-library, not library_size's
        log-normal mean exp(ql_m + ql_v / 2)) and a posterior draw, joint with z's, otherwise.
        """
        return average_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=True)

    @torch.no_grad()
    def library_size(self, batch: Minibatch, give_mean: bool = True) -> torch.Tensor:
        """(B, 1) library size on the count scale: the observed total, or for a latent library its
        posterior mean exp(ql_m + ql_v / 2) (the log-normal's mean, as scvi-tools'
        get_latent_library_size), or a draw with ``give_mean=False``."""
        encoded = self.encode(batch.counts, batch.batch_index, batch.cont_covs, batch.cat_covs)
        if self.use_observed_lib_size or not give_mean:
            return torch.exp(encoded["library"])
        return torch.exp(encoded["ql_m"] + 0.5 * encoded["ql_v"])

    @torch.no_grad()
    def posterior_predictive_sample(
        self, batch: Minibatch, n_samples: int = 1, transform_batch: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n_samples, B, G) counts drawn from p(x | z, l) with z, l drawn from the posterior."""
        draws = []
        for _ in range(n_samples):
            encoded = self.encode(batch.counts, batch.batch_index, batch.cont_covs, batch.cat_covs)
            px = self.generative(
                encoded["z"], encoded["library"], batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels, transform_batch
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
        encoded = self.encode(batch.counts, batch.batch_index, batch.cont_covs, batch.cat_covs)
        qz_m, qz_v = encoded["qz_m"], encoded["qz_v"]
        untransformed, library = self._sample_posterior(encoded, n_mc_samples)
        log_weight = (
            gaussian_log_prob(untransformed, torch.zeros_like(qz_m), torch.ones_like(qz_v))
            - gaussian_log_prob(untransformed, qz_m, qz_v)
        ).sum(dim=-1)
        if not self.use_observed_lib_size:
            ql_m, ql_v = encoded["ql_m"], encoded["ql_v"]
            prior_m, prior_v = self.library_prior(self._batch_codes(batch.counts, batch.batch_index))
            log_weight = log_weight + (
                gaussian_log_prob(library, prior_m, prior_v) - gaussian_log_prob(library, ql_m, ql_v)
            ).sum(dim=-1)
        generative = self.generative(
            self.z_encoder.transform(untransformed), library, batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels
        )
        log_weight = log_weight + generative["px"].log_prob(batch.x).sum(dim=-1)
        return torch.logsumexp(log_weight, dim=0) - np.log(n_mc_samples)


class VAE(VAEBase):
    """scVI: a VAE over counts with a ZINB / NB / Poisson likelihood and batch-aware decoder.

    The first eleven parameters are the scvi 0.6 ``VAE``'s, in its order and with its defaults
    (so the library is latent unless ``use_observed_lib_size``); ``reconstruction_loss`` is 0.6's
    name of ``gene_likelihood``. Keyword-only, scvi-tools 1.x's options: the encoders see
    ``log1p(x)`` and, with ``encode_covariates``, the covariates; the decoder always sees the
    batch one-hot and the extra categorical covariates (in every layer when
    ``deeply_inject_covariates``) and the continuous covariates (concatenated to z).
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        log_variational: bool = True,
        reconstruction_loss: str = "zinb",
        latent_distribution: str = "normal",
        *,
        gene_likelihood: str | None = None,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        use_observed_lib_size: bool = False,
        library_log_means: np.ndarray | torch.Tensor | None = None,
        library_log_vars: np.ndarray | torch.Tensor | None = None,
        var_activation=None,
        var_eps: float = 1e-4,
        scale_activation: str = "softmax",
    ):
        super().__init__()
        check_choice("use_batch_norm", use_batch_norm, NORM_PLACEMENTS)
        check_choice("use_layer_norm", use_layer_norm, NORM_PLACEMENTS)
        self._setup(
            n_input, n_batch, n_labels, n_latent, dispersion, log_variational,
            resolve_likelihood(reconstruction_loss, gene_likelihood), latent_distribution,
            use_observed_lib_size, library_log_means, library_log_vars,
            n_continuous_cov, n_cats_per_cov, encode_covariates,
        )
        cat_list = [n_batch, *self.n_cats_per_cov]
        encoder_cat_list = cat_list if encode_covariates else None
        n_input_encoder = n_input + n_continuous_cov * encode_covariates
        encoder_options = dict(
            n_cat_list=encoder_cat_list,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm in ("encoder", "both"),
            use_layer_norm=use_layer_norm in ("encoder", "both"),
            inject_covariates=deeply_inject_covariates,
            var_activation=var_activation,
            var_eps=var_eps,
        )
        self.z_encoder = Encoder(n_input_encoder, n_latent, n_layers=n_layers, distribution=latent_distribution, **encoder_options)
        self.l_encoder = Encoder(n_input_encoder, 1, n_layers=1, **encoder_options)
        self.decoder = DecoderSCVI(
            n_latent + n_continuous_cov,
            n_input,
            n_cat_list=cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=use_batch_norm in ("decoder", "both"),
            use_layer_norm=use_layer_norm in ("decoder", "both"),
            scale_activation=scale_activation,
        )
