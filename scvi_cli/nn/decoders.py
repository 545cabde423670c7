"""Decoders p(x | z, library, covariates): the scVI network decoder and LDVAE's linear one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scvi_cli.nn.fc_layers import BATCH_NORM, LAYER_NORM, LINEAR, FCLayers, one_hot

Genes = slice | torch.Tensor  # output rows of a per-gene layer: a slice or an index tensor


def all_rows(genes: Genes, n: int) -> bool:
    """Whether ``genes`` is a slice over all ``n`` rows in order (``slice(None)``, ``slice(0, n)``)."""
    return isinstance(genes, slice) and genes.indices(n) == (0, n, 1)


def linear_rows(h: torch.Tensor, linear: nn.Linear, genes: Genes) -> torch.Tensor:
    """``linear(h)`` for the output rows ``genes`` only (all of them: the layer itself, so that
    training's backward does not scatter the weight's gradient through a slice of all rows)."""
    if all_rows(genes, linear.out_features):
        return linear(h)
    bias = None if linear.bias is None else linear.bias[genes]
    return F.linear(h, linear.weight[genes], bias)


class ScaleHead:
    """A decoder's last, per-gene layer for one minibatch, evaluable on any set of genes.

    ``values_at(genes)`` gives the layer's output for ``genes``: the logits when ``softmax``
    (px_scale normalises over all genes), else px_scale itself. Queries use it to produce a gene
    subset, or all genes, without holding cells x all genes at once (see ``columns``).
    """

    def __init__(self, n_genes: int, values_at: Callable[[Genes], torch.Tensor], softmax: bool = True):
        self.n_genes = n_genes
        self.values_at = values_at
        self.softmax = softmax

    def columns(self, genes: torch.Tensor | None = None, gene_chunk: int | None = None) -> torch.Tensor:
        """px_scale of ``genes`` (all when None), in that order; ``gene_chunk`` genes at a time.

        A softmax needs its normaliser over all genes, so all logits are still computed, but
        ``gene_chunk`` genes at a time (None: all at once) with a running logsumexp: besides the
        result, memory is cells x chunk, and only the wanted columns are kept. The saving of a
        gene subset is memory and output size; the layer's matrix product still covers every gene.
        Without a softmax there is no normaliser: only the wanted rows are computed.
        """
        if not self.softmax:
            return self.values_at(slice(None) if genes is None else genes)
        n = self.n_genes
        if gene_chunk is None or gene_chunk >= n:
            logits = self.values_at(slice(0, n))
            if genes is None:
                return torch.softmax(logits, dim=-1)
            return torch.exp(logits[..., genes] - torch.logsumexp(logits, dim=-1, keepdim=True))
        lse = picked = wanted = None
        for start in range(0, n, gene_chunk):
            stop = min(start + gene_chunk, n)
            logits = self.values_at(slice(start, stop))
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
            if picked is None:
                wanted = genes if genes is not None else torch.arange(n, device=logits.device)
                picked = logits.new_empty((*logits.shape[:-1], wanted.numel()))
            inside = torch.nonzero((wanted >= start) & (wanted < stop)).reshape(-1)
            if inside.numel():
                picked[..., inside] = logits[..., wanted[inside] - start]
        return torch.exp(picked - lse.unsqueeze(-1))


class DecoderSCVI(nn.Module):
    """Stack -> heads for normalised expression, gene-cell dispersion and zero-inflation logits.

    ``forward(dispersion, z, library, *cat_list)`` returns ``(px_scale, px_r, px_rate, px_dropout)``
    with ``px_rate = exp(library) * px_scale``; ``px_r`` is ``None`` unless dispersion is
    ``'gene-cell'``. All three heads always exist so the state dict has a fixed shape. Other
    keywords go to the stack's FCLayers (e.g. ``dropout_rate``, 0 by default).
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
        **fc_kwargs,
    ):
        super().__init__()
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}")
        fc_kwargs.setdefault("dropout_rate", 0.0)
        self.px_decoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            **fc_kwargs,
        )
        activation = nn.Softmax(dim=-1) if scale_activation == "softmax" else nn.Softplus()
        self.px_scale_decoder = nn.Sequential(nn.Linear(n_hidden, n_output), activation)
        self.px_r_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    def forward(self, dispersion: str, z: torch.Tensor, library: torch.Tensor, *cat_list: torch.Tensor):
        h = self.px_decoder(z, *cat_list)
        px_scale = self._scale_layer(h).columns()
        px_dropout = self.px_dropout_decoder(h)
        px_rate = torch.exp(library) * px_scale
        px_r = self.px_r_decoder(h) if dispersion == "gene-cell" else None
        return px_scale, px_r, px_rate, px_dropout

    def scale_head(self, z: torch.Tensor, *cat_list: torch.Tensor) -> ScaleHead:
        """px_scale's layer for these cells: the hidden layers once, then any rows of its Linear."""
        return self._scale_layer(self.px_decoder(z, *cat_list))

    def _scale_layer(self, h: torch.Tensor) -> ScaleHead:
        """The one definition of px_scale from the last hidden layer (forward and queries use it)."""
        linear, activation = self.px_scale_decoder[0], self.px_scale_decoder[1]
        if isinstance(activation, nn.Softmax):
            return ScaleHead(linear.out_features, lambda genes: linear_rows(h, linear, genes))
        return ScaleHead(linear.out_features, lambda genes: activation(linear_rows(h, linear, genes)), softmax=False)


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
        px_scale = self.scale_head(z, *cat_list).columns()
        px_dropout = self.px_dropout_decoder(z, *cat_list)
        px_rate = torch.exp(library) * px_scale
        return px_scale, None, px_rate, px_dropout

    def scale_head(self, z: torch.Tensor, *cat_list: torch.Tensor) -> ScaleHead:
        """The one definition of px_scale's logits ``BN(W u)``, evaluable on any genes.

        All genes (what forward asks for), training mode or a layer norm (across genes, so not
        gene-separable): the regressor itself, once. A subset in eval mode: the batch norm then
        acts gene by gene with its running statistics, so the rows of W and of those statistics
        of the wanted genes give the same values without computing the others.
        """
        regressor = self.factor_regressor
        block = regressor.fc_layers[0]
        n_genes = block[LINEAR].out_features
        full: list[torch.Tensor] = []

        def all_logits() -> torch.Tensor:
            if not full:
                full.append(regressor(z, *cat_list))
            return full[0]

        separable = block[LAYER_NORM] is None and not regressor.training
        one_hots = [one_hot(c, n) for n, c in zip(regressor.n_cat_list, cat_list) if n > 1]
        u = torch.cat([z, *[oh.expand(*z.shape[:-1], oh.shape[-1]) for oh in one_hots]], dim=-1) if one_hots else z
        bn = block[BATCH_NORM]

        def logits_at(genes: Genes) -> torch.Tensor:
            if not separable or all_rows(genes, n_genes):
                return all_logits()[..., genes]
            y = linear_rows(u, block[LINEAR], genes)
            if bn is None:
                return y
            shape = y.shape
            y = F.batch_norm(
                y.reshape(-1, shape[-1]),
                bn.running_mean[genes],
                bn.running_var[genes],
                None if bn.weight is None else bn.weight[genes],
                None if bn.bias is None else bn.bias[genes],
                training=False,
                eps=bn.eps,
            )
            return y.reshape(shape)

        return ScaleHead(n_genes, logits_at)

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
