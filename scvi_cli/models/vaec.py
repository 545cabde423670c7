"""CondSCVI's VAEC: a cell-type-conditional VAE, the single-cell reference model behind DestVI.

The label (cell type) is one-hot injected into every layer of encoder and decoder; the batch enters
the decoder as a learned 5-d embedding. NB likelihood with the raw total count as library:
``mu = total * softmax(px_decoder(h) + per_ct_bias[label])``. Parameter names match scvi-tools'
``VAEC`` state dict.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models.kmeans import kmeans
from scvi_cli.models.outputs import LossOutput, gaussian_kl_to_standard, gaussian_log_prob
from scvi_cli.models.expression import TransformBatch, average_expression
from scvi_cli.models.vae import LN_MC_SAMPLES, decoding_batch, gaussian_draws
from scvi_cli.nn import Encoder, FCLayers, NegativeBinomial
from scvi_cli.nn.decoders import ScaleHead, linear_rows
from scvi_cli.nn.sparse_input import SparseInput, SparseRows

BATCH_EMBEDDING_DIM = 5


def minibatch_from_tensors(tensors: dict[str, torch.Tensor]) -> Minibatch:
    """A Minibatch from a dict keyed as scvi-tools' registry keys: "X", "labels" and optionally "batch"."""
    for key in ("X", "labels"):
        if key not in tensors:
            raise ValueError(f"tensors needs the key {key!r} (has {', '.join(map(repr, tensors)) or 'none'})")
    x = tensors["X"]
    labels = tensors["labels"].reshape(-1, 1).long()
    batch = tensors.get("batch")
    batch = torch.zeros_like(labels) if batch is None else batch.reshape(-1, 1).long()
    return Minibatch(x=x, batch_index=batch, labels=labels)


class VAEC(nn.Module):
    """Conditional VAE p(x | z, label, batch) with q(z | x, label).

    Parameters in the order and with the defaults of scvi-tools' ``VAEC`` page; ``n_batch`` is
    keyword-only (one embedding row per batch; 1 = a single batch). ``ct_weight`` (n_labels,)
    multiplies each cell's loss by its label's weight (1 by default). ``extra_encoder_kwargs`` go
    to the Encoder, ``extra_decoder_kwargs`` to the decoder's FCLayers (overriding the defaults
    above). With n_labels = 0 every cell has the one label 0.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 5,
        n_layers: int = 2,
        log_variational: bool = True,
        ct_weight: np.ndarray | torch.Tensor | None = None,
        dropout_rate: float = 0.05,
        extra_encoder_kwargs: dict | None = None,
        extra_decoder_kwargs: dict | None = None,
        *,
        n_batch: int = 1,
    ):
        super().__init__()
        if n_batch < 1:
            raise ValueError(f"n_batch must be at least 1 (one embedding row per batch), got {n_batch}")
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.log_variational = log_variational
        self.dispersion = "gene"
        self.gene_likelihood = "nb"
        self.latent_distribution = "normal"
        n_rows = max(n_labels, 1)
        self._embeddings_dict = nn.ModuleDict({"batch": nn.Embedding(n_batch, BATCH_EMBEDDING_DIM)})
        self.px_r = nn.Parameter(torch.randn(n_input))
        stack = dict(
            n_cat_list=[n_labels],
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            inject_covariates=True,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        self.z_encoder = Encoder(n_input, n_latent, **{**stack, **(extra_encoder_kwargs or {})})
        self.decoder = FCLayers(n_in=n_latent + BATCH_EMBEDDING_DIM, n_out=n_hidden, **{**stack, **(extra_decoder_kwargs or {})})
        self.px_decoder = nn.Linear(n_hidden, n_input)
        self.per_ct_bias = nn.Parameter(torch.zeros(n_rows, n_input))
        weight = torch.ones(n_rows) if ct_weight is None else torch.as_tensor(np.asarray(ct_weight), dtype=torch.float32)
        if weight.shape != (n_rows,):
            raise ValueError(f"ct_weight must have shape ({n_rows},), got {tuple(weight.shape)}")
        self.register_buffer("ct_weight", weight)

    def inference(self, x: torch.Tensor, y: torch.Tensor, n_samples: int = 1) -> dict[str, torch.Tensor]:
        """q(z | x, y): qz_m, qz_v, z (S, B, D with n_samples > 1) and the library (raw total count).
        ``x`` is a (B, G) tensor or the same counts as SparseRows (read from their nonzeros)."""
        if isinstance(x, SparseRows):
            x_ = SparseInput(x.log1p() if self.log_variational else x)
            library = x.row_sums()
        else:
            x_ = torch.log1p(x) if self.log_variational else x
            library = x.sum(dim=1, keepdim=True)
        qz_m, qz_v, z = self.z_encoder(x_, y)
        if n_samples > 1:
            z = gaussian_draws(qz_m, qz_v, n_samples)
            library = library.expand(n_samples, *library.shape)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z, "library": library}

    def _hidden(self, z: torch.Tensor, y: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """The decoder's last hidden layer, from z, the label and the batch's embedding."""
        if batch_index is None:
            batch_index = torch.zeros((z.shape[-2], 1), dtype=torch.long, device=z.device)
        batch_rep = self._embeddings_dict["batch"](batch_index.reshape(-1))
        batch_rep = batch_rep.expand(*z.shape[:-1], BATCH_EMBEDDING_DIM)
        return self.decoder(torch.cat([z, batch_rep], dim=-1), y)

    def _scale_layer(self, h: torch.Tensor, y: torch.Tensor) -> ScaleHead:
        """The one definition of px_scale = softmax(px_decoder(h) + per_ct_bias[y]), on any genes."""
        labels = y.reshape(-1)

        def logits_at(genes):
            return linear_rows(h, self.px_decoder, genes) + self.per_ct_bias[:, genes][labels]

        return ScaleHead(self.n_input, logits_at)

    def generative(self, z: torch.Tensor, library: torch.Tensor, y: torch.Tensor, batch_index: torch.Tensor | None = None) -> dict:
        """p(x | z, y, batch): px (NB), px_scale, px_rate = library * px_scale, px_r (theta).
        ``batch_index`` (B, 1) picks the batch embedding; None decodes as batch 0."""
        px_scale = self._scale_layer(self._hidden(z, y, batch_index), y).columns()
        px_rate = library * px_scale
        theta = torch.exp(self.px_r)
        return {"px": NegativeBinomial(px_rate, theta), "px_scale": px_scale, "px_rate": px_rate, "px_r": theta}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0) -> LossOutput:
        """mean over cells of ct_weight[y] * (reconstruction NLL + kl_weight * KL_z); ``tensors``
        holds "X" and "labels" as scvi-tools' registry keys them."""
        x, labels = tensors["X"], tensors["labels"]
        reconstruction_loss = generative_outputs["px"].nll_per_cell(x)  # the fused -log_prob(x).sum(-1)
        kl_z = gaussian_kl_to_standard(inference_outputs["qz_m"], inference_outputs["qz_v"]).sum(dim=-1)
        cell_weight = self.ct_weight[labels.reshape(-1).long()]
        loss = torch.mean(cell_weight * (reconstruction_loss + kl_weight * kl_z))
        return LossOutput(loss=loss, reconstruction_loss=reconstruction_loss, kl_z=kl_z, kl_l=torch.zeros_like(kl_z))

    def loss_for(self, batch: Minibatch, kl_weight: float = 1.0) -> LossOutput:
        """One pass inference -> generative -> loss on a minibatch: what training and evaluation call."""
        inference_outputs = self.inference(batch.counts, batch.labels)
        generative_outputs = self.generative(inference_outputs["z"], inference_outputs["library"], batch.labels, batch.batch_index)
        return self.loss({"X": batch.counts, "labels": batch.labels}, inference_outputs, generative_outputs, kl_weight)

    forward = loss_for

    @torch.no_grad()
    def sample(self, tensors: dict, n_samples: int = 1) -> torch.Tensor:
        """(cells, genes, n_samples) posterior predictive counts for the cells of ``tensors``
        ("X", "labels", optionally "batch"): z ~ q(z | x, y), then x ~ NB(mu, theta)."""
        return self.posterior_predictive_sample(minibatch_from_tensors(tensors), n_samples).permute(1, 2, 0)

    # ------------------------------------------------------------------------------- queries
    @torch.no_grad()
    def latent(self, batch: Minibatch, give_mean: bool = True, mc_samples: int = LN_MC_SAMPLES) -> torch.Tensor:
        """(B, n_latent) posterior mean of z, or a draw. ``mc_samples`` is unused (the latent is
        normal); it is accepted so that every module answers VAE's call."""
        out = self.inference(batch.counts, batch.labels)
        return out["qz_m"] if give_mean else out["z"]

    @torch.no_grad()
    def latent_distribution_params(self, batch: Minibatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inference(batch.counts, batch.labels)
        return out["qz_m"], out["qz_v"]

    def posterior_draws(self, batch: Minibatch, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, library) with a leading draw axis, (S, B, D) and (S, B, 1): the posterior mean of z
        as one entry (n_samples=0) or S draws; the library is always the observed total."""
        out = self.inference(batch.counts, batch.labels)
        z = out["qz_m"].unsqueeze(0) if n_samples == 0 else gaussian_draws(out["qz_m"], out["qz_v"], n_samples)
        return z, out["library"].expand(z.shape[0], *out["library"].shape)

    def scale_head(self, z: torch.Tensor, batch: Minibatch, transform_batch: int | None) -> ScaleHead:
        """The px_scale layer ``generative`` uses, for ``z`` (B, D) decoded as ``transform_batch``."""
        h = self._hidden(z, batch.labels, decoding_batch(batch.batch_index, transform_batch))
        return self._scale_layer(h, batch.labels)

    @torch.no_grad()
    def sample_scale(
        self, batch: Minibatch, transform_batch: TransformBatch = None, n_samples: int = 0, *, gene_index=None, gene_chunk=None
    ) -> torch.Tensor:
        """px_scale (B, G) at the posterior mean or averaged over draws; as VAE.sample_scale."""
        return average_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=False)

    @torch.no_grad()
    def sample_rate(
        self, batch: Minibatch, transform_batch: TransformBatch = None, n_samples: int = 0, *, gene_index=None, gene_chunk=None
    ) -> torch.Tensor:
        """px_rate = total count x px_scale (B, G); as VAE.sample_rate."""
        return average_expression(self, batch, transform_batch, n_samples, gene_index, gene_chunk, rate=True)

    @torch.no_grad()
    def posterior_predictive_sample(
        self, batch: Minibatch, n_samples: int = 1, transform_batch: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n_samples, B, G) posterior predictive counts, decoded as ``transform_batch`` when given."""
        batch_index = decoding_batch(batch.batch_index, transform_batch)
        draws = []
        for _ in range(n_samples):
            out = self.inference(batch.counts, batch.labels)
            px = self.generative(out["z"], out["library"], batch.labels, batch_index)["px"]
            draws.append(px.sample(generator))
        return torch.stack(draws)

    @torch.no_grad()
    def marginal_ll(self, batch: Minibatch, n_mc_samples: int = 100) -> torch.Tensor:
        """(B,) importance-sampling estimate of log p(x | label) with q(z | x, label) as proposal."""
        out = self.inference(batch.counts, batch.labels)
        qz_m, qz_v = out["qz_m"], out["qz_v"]
        draws = gaussian_draws(qz_m, qz_v, n_mc_samples)
        log_weight = (
            gaussian_log_prob(draws, torch.zeros_like(qz_m), torch.ones_like(qz_v)) - gaussian_log_prob(draws, qz_m, qz_v)
        ).sum(dim=-1)
        px = self.generative(draws, out["library"], batch.labels, batch.batch_index)["px"]
        log_weight = log_weight + px.log_prob(batch.x).sum(dim=-1)
        return torch.logsumexp(log_weight, dim=0) - np.log(n_mc_samples)

    @staticmethod
    def get_vamp_prior(
        latent_means: np.ndarray, latent_vars: np.ndarray, label_codes: np.ndarray, n_labels: int, p: int = 10, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Per-label mixture summary of the posterior, the empirical prior DestVI uses.

        Each label's posterior means are grouped into p k-means clusters (every cell its own
        cluster when the label has at most p cells). Per cluster: the mean of the means, the
        variance ``mean(vars) + var(means)`` (law of total variance), and the cluster's share of
        the label's cells as weight. Unused slots keep mean 0, variance 1, weight 0.
        Returns arrays mean (n_labels, p, D), var (n_labels, p, D), weights (n_labels, p).
        """
        n_latent = latent_means.shape[1]
        means = np.zeros((n_labels, p, n_latent))
        variances = np.ones((n_labels, p, n_latent))
        weights = np.zeros((n_labels, p))
        for label in range(n_labels):
            cells = np.flatnonzero(label_codes == label)
            if len(cells) == 0:
                continue
            clusters = kmeans(latent_means[cells], p, seed=seed) if len(cells) > p else np.arange(len(cells))
            keys, counts = np.unique(clusters, return_counts=True)
            for slot, key in enumerate(keys):
                members = cells[clusters == key]
                means[label, slot] = latent_means[members].mean(axis=0)
                variances[label, slot] = latent_vars[members].mean(axis=0) + latent_means[members].var(axis=0)
            weights[label, : len(keys)] = counts / counts.sum()
        return {"mean_vprior": means, "var_vprior": variances, "weights_vprior": weights}
