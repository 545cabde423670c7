"""Apply a trained model to cells: latent space, normalized expression, posterior predictive counts,
LDVAE gene loadings and CondSCVI's VampPrior.

Every query runs without gradients, in eval mode, one minibatch of cells at a time. The ``iter_*``
functions yield one numpy block per minibatch, so a caller can write each block as it comes and a
result of 1M cells x 2k genes never sits in memory; the plain functions stack the blocks, for
small results and for tests. Randomness (the logistic-normal latent's Monte Carlo mean, posterior
samples) is seeded with ``torch.manual_seed(seed)`` when iteration starts, so a call repeats
exactly; the default posterior-mean paths of the normal latent draw nothing that reaches the output.

Rows are the cells of the CountData, i.e. the cells kept by data loading (zero-count cells are
dropped there); ``output_anndata`` gives the input AnnData restricted to the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scvi_cli.data import CountData, count_data_from_anndata, iterate_in_order, read_h5ad
from scvi_cli.errors import ScviCliError, UsageError
from scvi_cli.minibatch import Minibatch
from scvi_cli.models import VAE, VAEC
from scvi_cli.nn.decoders import DecoderSCVI, LinearDecoderSCVI
from scvi_cli.nn.fc_layers import ACTIVATION, BATCH_NORM, LAYER_NORM, LINEAR, one_hot

DEFAULT_BATCH_SIZE = 1024
# Monte Carlo draws for the mean of softmax(z) under the logistic normal (as scvi-tools does).
LN_MC_SAMPLES = 5000
# Floats held per intermediate (draws x cells x dims, cells x gene chunk): about 64 MiB.
_MAX_ELEMENTS = 1 << 24
_INT32_MAX = np.iinfo(np.int32).max
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------------
# Query data and argument checks


def load_query(trained, data_path: str | Path, allow_missing_genes: bool = False):
    """(AnnData, CountData) of ``data_path`` shaped for ``trained``: read once, kept for h5ad outputs.

    Genes are matched to the model's by name (any order); missing genes are an error unless
    ``allow_missing_genes`` fills them with zeros (with a warning saying how many); unknown
    batch or label categories are an error naming them.
    """
    adata = read_h5ad(data_path)
    query = count_data_from_anndata(
        adata,
        trained.spec.data,
        str(data_path),
        categories=trained.checkpoint.categories,
        gene_names=trained.checkpoint.gene_names,
        allow_missing_genes=allow_missing_genes,
    )
    return adata, query


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def batch_codes(categories: dict[str, list[str]], names: Sequence[str]) -> list[int]:
    """Codes of batch category ``names`` as the model coded them; an unknown name is a UsageError."""
    known = [str(c) for c in categories["batch"]]
    position = {c: i for i, c in enumerate(known)}
    unknown = [str(n) for n in names if str(n) not in position]
    if unknown:
        raise UsageError(
            f"--transform-batch {_listing(unknown)}: not a batch of the model; its batches are {_listing(known)}"
        )
    return [position[str(n)] for n in names]


def parse_gene_list(text: str) -> list[str]:
    """``--genes``: a file with one gene per line (blank and '#' lines skipped) or 'A,B,C'."""
    path = Path(text)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        genes = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not genes:
            raise UsageError(f"--genes {text}: the file lists no genes")
    else:
        genes = [g.strip() for g in text.split(",") if g.strip()]
        if not genes:
            raise UsageError(f"--genes {text!r}: no gene names given")
    return list(dict.fromkeys(genes))  # first occurrence of each, in the given order


def gene_indices(model_genes: Sequence[str], wanted: Sequence[str], source: str = "--genes") -> np.ndarray:
    """Positions of ``wanted`` among the model's genes; genes the model lacks are a UsageError."""
    position = {str(g): i for i, g in enumerate(model_genes)}
    unknown = [g for g in wanted if g not in position]
    if unknown:
        hint = ""
        if len(wanted) == 1 and ("/" in wanted[0] or "." in wanted[0]):
            hint = " (not a file either)"
        raise UsageError(f"{source}: {len(unknown)} gene(s) not in the model: {_listing(unknown)}{hint}")
    return np.array([position[g] for g in wanted], dtype=np.int64)


def parse_library_size(text: str | float) -> float | str:
    """``--library-size``: a positive number, or 'latent' (each cell's own library: expected counts)."""
    if isinstance(text, str) and text.strip().lower() == "latent":
        return "latent"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"--library-size {text!r}: expected a positive number or 'latent'") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--library-size {text!r}: must be a positive number (or 'latent')")
    return value


def latent_names(n_latent: int) -> list[str]:
    """Column names of latent dimensions and LDVAE factors: Z_0, Z_1, ..."""
    return [f"Z_{i}" for i in range(n_latent)]


def n_blocks(data: CountData, batch_size: int) -> int:
    """How many blocks an ``iter_*`` query yields (for progress bars)."""
    return -(-data.n_cells // batch_size)


def cells_phrase(data: CountData) -> str:
    """'80 cells', or '79 cells (1 with zero total counts left out)': for one-line summaries."""
    phrase = f"{data.n_cells} cells"
    if data.kept_cells is not None and not data.kept_cells.all():
        phrase += f" ({int((~data.kept_cells).sum())} with zero total counts left out)"
    return phrase


def drain(blocks: Iterable, sink: Callable, reporter=None, total: int = 0, description: str = "") -> None:
    """Feed each block to ``sink`` (a writer's write, list.append), ticking ``reporter`` per block.

    ``reporter`` has the start / epoch / close interface of scvi_cli.progress; it is closed even
    when a block fails, so a progress bar never outlives the work.
    """
    if reporter is None:
        for block in blocks:
            sink(block)
        return
    reporter.start(total, description=description)
    try:
        for i, block in enumerate(blocks):
            sink(block)
            reporter.epoch(i, {})
    finally:
        reporter.close()


def _minibatches(module: nn.Module, data: CountData, batch_size: int, device) -> Iterator[Minibatch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    module.eval()
    for batch in iterate_in_order(data, batch_size):
        yield batch.to(device)


def _check_module(module: nn.Module) -> None:
    if not isinstance(module, (VAE, VAEC)):
        raise TypeError(f"expected a VAE, LDVAE or VAEC module, got {type(module).__name__}")


# --------------------------------------------------------------------------------------------
# Latent space


def _gaussian_draws(mean: torch.Tensor, var: torch.Tensor, n: int) -> torch.Tensor:
    """(n, *mean.shape) reparameterised draws from N(mean, var)."""
    return mean + var.sqrt() * torch.randn((n, *mean.shape), device=mean.device)


@torch.no_grad()
def _ln_mean(qz_m: torch.Tensor, qz_v: torch.Tensor, mc_samples: int) -> torch.Tensor:
    """Monte Carlo mean of softmax(z), z ~ N(qz_m, qz_v), in draw chunks that bound memory."""
    per_chunk = max(1, _MAX_ELEMENTS // qz_m.numel())
    total = torch.zeros_like(qz_m)
    done = 0
    while done < mc_samples:
        size = min(per_chunk, mc_samples - done)
        total += _gaussian_draws(qz_m, qz_v, size).softmax(dim=-1).sum(dim=0)
        done += size
    return total / mc_samples


def iter_latent(
    module: nn.Module,
    data: CountData,
    *,
    sample: bool = False,
    mc_samples: int = LN_MC_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device="cpu",
) -> Iterator[np.ndarray]:
    """(B, n_latent) float32 blocks: the posterior mean of z, or one posterior draw with ``sample``.

    For the logistic-normal latent the mean is E[softmax(z)] over ``mc_samples`` draws (the
    softmax of the Gaussian mean would be biased towards the uniform), and a draw is softmax(z).
    """
    _check_module(module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for batch in _minibatches(module, data, batch_size, device):
            if isinstance(module, VAEC):
                z = module.latent(batch, give_mean=not sample)
            elif sample:
                z = module.latent(batch, give_mean=False)
            else:
                out = module.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
                z = out["qz_m"]
                if module.latent_distribution == "ln":
                    z = _ln_mean(out["qz_m"], out["qz_v"], mc_samples)
            yield z.float().cpu().numpy()


def latent_representation(module: nn.Module, data: CountData, **kwargs) -> np.ndarray:
    """(cells, n_latent) latent of every cell of ``data``; keywords as for iter_latent."""
    return np.concatenate(list(iter_latent(module, data, **kwargs)), axis=0)


# --------------------------------------------------------------------------------------------
# Normalized expression


def _categorical_codes(module: VAE, cat_covs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The extra categorical covariates as (B, 1) code columns, as VAE.generative passes them."""
    if cat_covs is None or not module.n_cats_per_cov:
        return ()
    return tuple(torch.split(cat_covs, 1, dim=1))


class _ScaleHead:
    """The last, per-gene layer of a decoder for one minibatch, evaluable on any set of genes.

    ``logits(start, stop)`` gives the pre-activation of genes start..stop-1 and ``logits_at(idx)``
    of the genes ``idx``; ``softmax`` says whether px_scale normalises over all genes.
    """

    def __init__(self, n_genes: int, softmax: bool, logits_at: Callable[[torch.Tensor | slice], torch.Tensor]):
        self.n_genes = n_genes
        self.softmax = softmax
        self.logits_at = logits_at

    def logits(self, start: int, stop: int) -> torch.Tensor:
        return self.logits_at(slice(start, stop))


def _linear_rows(h: torch.Tensor, linear: nn.Linear, genes) -> torch.Tensor:
    """Linear(h) for the output rows ``genes`` only (a slice or an index tensor)."""
    bias = None if linear.bias is None else linear.bias[genes]
    return F.linear(h, linear.weight[genes], bias)


def _network_head(module: VAE, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor) -> _ScaleHead:
    """DecoderSCVI: hidden layer h once, then any rows of the px_scale Linear."""
    decoder: DecoderSCVI = module.decoder
    decoder_input = z
    if batch.cont_covs is not None and module.n_continuous_cov:
        decoder_input = torch.cat([z, batch.cont_covs], dim=-1)
    h = decoder.px_decoder(decoder_input, batch_index, *_categorical_codes(module, batch.cat_covs))
    linear, activation = decoder.px_scale_decoder[0], decoder.px_scale_decoder[1]
    softmax = isinstance(activation, nn.Softmax)
    if softmax:
        return _ScaleHead(linear.out_features, True, lambda genes: _linear_rows(h, linear, genes))
    return _ScaleHead(linear.out_features, False, lambda genes: activation(_linear_rows(h, linear, genes)))


def _linear_head(module: VAE, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor) -> _ScaleHead:
    """LDVAE's decoder: softmax(BN(W [z, one-hots])); Linear and eval-mode BN act gene by gene,
    so the rows of W and the BN statistics of the wanted genes are all that is needed."""
    regressor = module.decoder.factor_regressor
    codes = (batch_index, *_categorical_codes(module, batch.cat_covs))
    block = regressor.fc_layers[0]
    n_genes = block[LINEAR].out_features
    if block[LAYER_NORM] is not None or block[ACTIVATION] is not None or regressor.training:
        full = regressor(z, *codes)  # not gene-separable: compute all, then select
        return _ScaleHead(n_genes, True, lambda genes: full[..., genes])
    one_hots = [one_hot(c, n) for n, c in zip(regressor.n_cat_list, codes) if n > 1]
    u = torch.cat([z, *[oh.expand(*z.shape[:-1], oh.shape[-1]) for oh in one_hots]], dim=-1) if one_hots else z
    bn = block[BATCH_NORM]

    def logits_at(genes):
        y = _linear_rows(u, block[LINEAR], genes)
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

    return _ScaleHead(n_genes, True, logits_at)


def _vaec_head(module: VAEC, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor) -> _ScaleHead:
    """VAEC: softmax(px_decoder(h) + per_ct_bias[label])."""
    embedding = module._embeddings_dict["batch"](batch_index.reshape(-1))
    h = module.decoder(torch.cat([z, embedding.expand(*z.shape[:-1], embedding.shape[-1])], dim=-1), batch.labels)
    labels = batch.labels.reshape(-1)
    linear = module.px_decoder

    def logits_at(genes):
        return _linear_rows(h, linear, genes) + module.per_ct_bias[:, genes][labels]  # bias rows of the wanted genes

    return _ScaleHead(linear.out_features, True, logits_at)


def _scale_head(module: nn.Module, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor) -> _ScaleHead:
    if isinstance(module, VAEC):
        return _vaec_head(module, z, batch, batch_index)
    if isinstance(module.decoder, LinearDecoderSCVI):
        return _linear_head(module, z, batch, batch_index)
    if isinstance(module.decoder, DecoderSCVI):
        return _network_head(module, z, batch, batch_index)
    raise TypeError(f"no normalized expression for a decoder of type {type(module.decoder).__name__}")


def _scale_columns(head: _ScaleHead, genes: torch.Tensor | None, gene_chunk: int) -> torch.Tensor:
    """px_scale of ``genes`` (all when None), in that order.

    A softmax needs its normaliser over all genes, so all logits are still computed, but a chunk
    of genes at a time with a running logsumexp: besides the result, memory is cells x chunk,
    and only the wanted columns are kept. The saving of a gene subset is memory and output
    size; the last layer's matrix product still covers every gene (the hidden layers are shared
    anyway). A softplus scale has no normaliser: only the wanted rows are computed.
    """
    if not head.softmax:
        return head.logits_at(slice(None) if genes is None else genes)
    n = head.n_genes
    if gene_chunk >= n:
        logits = head.logits(0, n)
        if genes is None:
            return torch.softmax(logits, dim=-1)
        return torch.exp(logits[..., genes] - torch.logsumexp(logits, dim=-1, keepdim=True))
    lse = picked = wanted = None
    for start in range(0, n, gene_chunk):
        stop = min(start + gene_chunk, n)
        logits = head.logits(start, stop)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
        if picked is None:
            wanted = genes if genes is not None else torch.arange(n, device=logits.device)
            picked = logits.new_empty((*logits.shape[:-1], wanted.numel()))
        inside = torch.nonzero((wanted >= start) & (wanted < stop)).reshape(-1)
        if inside.numel():
            picked[..., inside] = logits[..., wanted[inside] - start]
    return torch.exp(picked - lse.unsqueeze(-1))


@torch.no_grad()
def _posterior(module: nn.Module, batch: Minibatch, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, library) with a leading draw axis: (S, B, D) and (S or 1, B, 1) on the count scale.

    n_samples=0 gives the posterior mean (one entry): z at the mean of q(z|x) (softmax of it for
    the logistic normal) and the observed library or exp of the latent library's mean; otherwise
    S joint draws of z and (latent) library from the posterior.
    """
    if isinstance(module, VAEC):
        out = module.inference(batch.x, batch.labels)
        z = out["qz_m"].unsqueeze(0) if n_samples == 0 else _gaussian_draws(out["qz_m"], out["qz_v"], n_samples)
        return z, out["library"].unsqueeze(0)
    out = module.inference(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
    if n_samples == 0:
        z = module.z_encoder.transform(out["qz_m"]).unsqueeze(0)
        log_library = out["library"] if module.use_observed_lib_size else out["ql_m"]
        return z, torch.exp(log_library).unsqueeze(0)
    z = module.z_encoder.transform(_gaussian_draws(out["qz_m"], out["qz_v"], n_samples))
    if module.use_observed_lib_size:
        log_library = out["library"].unsqueeze(0)
    else:
        log_library = _gaussian_draws(out["ql_m"], out["ql_v"], n_samples)
    return z, torch.exp(log_library)


def _gene_chunk(batch_size: int, gene_chunk: int | None) -> int:
    return gene_chunk if gene_chunk is not None else max(256, _MAX_ELEMENTS // max(1, batch_size))


def iter_normalized_expression(
    module: nn.Module,
    data: CountData,
    *,
    library_size: float | str = 1.0,
    transform_batch: Sequence[int] | None = None,
    n_samples: int = 0,
    genes: Sequence[int] | np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device="cpu",
    gene_chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """(B, genes) float32 blocks of denoised expression: px_scale x library_size.

    - ``library_size``: a number N gives N x px_scale (rows sum to N over all genes; 1, the
      default, as in scvi-tools); 'latent' gives px_rate, each cell's expected counts at its own
      library (observed total, or exp of the latent library).
    - ``n_samples``: 0 decodes the posterior mean (deterministic); S > 0 averages S posterior
      draws of z (and of a latent library).
    - ``transform_batch``: batch codes; each cell is decoded as if from each of them and the
      results averaged (None: the cell's own batch). The same draws serve every batch.
    - ``genes``: model gene positions; only those columns are produced (see _scale_columns).
    - ``gene_chunk``: genes per logit chunk (default: about 64 MiB per minibatch).
    Memory per block is cells x wanted genes plus one gene chunk, whatever S and the batches.
    """
    _check_module(module)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if library_size != "latent" and not (isinstance(library_size, (int, float)) and library_size > 0):
        raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}")
    codes = [None] if not transform_batch else [int(c) for c in transform_batch]
    for code in codes:
        if code is not None and not 0 <= code < module.n_batch:
            raise ValueError(f"transform batch code {code} outside [0, {module.n_batch})")
    if genes is not None:
        genes = np.asarray(genes, dtype=np.int64).reshape(-1)
        if genes.size == 0 or genes.min() < 0 or genes.max() >= module.n_input:
            raise ValueError(f"genes must be a non-empty list of positions in [0, {module.n_input})")
    chunk = _gene_chunk(batch_size, gene_chunk)
    torch.manual_seed(seed)
    with torch.no_grad():
        gene_index = None
        for batch in _minibatches(module, data, batch_size, device):
            if genes is not None and gene_index is None:
                gene_index = torch.as_tensor(genes, device=batch.x.device)
            z, library = _posterior(module, batch, n_samples)
            total = None
            for code in codes:
                batch_index = batch.batch_index if code is None else torch.full_like(batch.batch_index, code)
                for s in range(z.shape[0]):
                    scale = _scale_columns(_scale_head(module, z[s], batch, batch_index), gene_index, chunk)
                    if library_size == "latent":
                        scale = scale * library[min(s, library.shape[0] - 1)]
                    total = scale if total is None else total + scale
            result = total / (len(codes) * z.shape[0])
            if library_size != "latent":
                result = result * float(library_size)
            yield result.float().cpu().numpy()


def normalized_expression(module: nn.Module, data: CountData, **kwargs) -> np.ndarray:
    """(cells, genes) normalized expression of every cell; keywords as for iter_normalized_expression."""
    return np.concatenate(list(iter_normalized_expression(module, data, **kwargs)), axis=0)


# --------------------------------------------------------------------------------------------
# Posterior predictive counts


def iter_posterior_predictive(
    module: nn.Module,
    data: CountData,
    *,
    n_samples: int = 1,
    transform_batch: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device="cpu",
) -> Iterator[list[sp.csr_matrix]]:
    """Per minibatch, ``n_samples`` int32 CSR matrices (B, G) of counts drawn from the model.

    Each draw takes z (and a latent library) from the posterior, then counts from the trained
    likelihood (ZINB / NB / Poisson; NB for CondSCVI), decoded as ``transform_batch`` when given.
    Draws are made one sample at a time, so memory is B x G whatever ``n_samples``.
    """
    _check_module(module)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if transform_batch is not None and not 0 <= int(transform_batch) < module.n_batch:
        raise ValueError(f"transform batch code {transform_batch} outside [0, {module.n_batch})")
    torch.manual_seed(seed)
    with torch.no_grad():
        for batch in _minibatches(module, data, batch_size, device):
            draws = []
            for _ in range(n_samples):
                counts = module.posterior_predictive_sample(batch, n_samples=1, transform_batch=transform_batch)[0]
                largest = counts.max().item() if counts.numel() else 0
                if largest > _INT32_MAX:
                    raise ScviCliError(f"a sampled count ({largest:.3g}) does not fit int32: the model's rates are unusable")
                draws.append(sp.csr_matrix(counts.cpu().numpy().astype(np.int32)))
            yield draws


def posterior_predictive_sample(module: nn.Module, data: CountData, **kwargs) -> list[sp.csr_matrix]:
    """``n_samples`` int32 CSR matrices (cells, genes); keywords as for iter_posterior_predictive."""
    blocks = list(iter_posterior_predictive(module, data, **kwargs))
    return [sp.vstack([block[s] for block in blocks], format="csr") for s in range(len(blocks[0]))]


# --------------------------------------------------------------------------------------------
# LDVAE loadings


def gene_loadings(module: nn.Module, source: str = "the model") -> np.ndarray:
    """(genes, n_latent) float32 loadings of a linear decoder, its batch norm folded in.

    Models without a linear decoder have no loadings: a UsageError says so.
    """
    decoder = getattr(module, "decoder", None)
    if not isinstance(decoder, LinearDecoderSCVI):
        raise UsageError(
            f"{source}: a {type(module).__name__} model has no linear decoder, so no gene loadings; "
            "train an ldvae model (model.type: ldvae)"
        )
    module.eval()
    return module.get_loadings().float().cpu().numpy()


def top_loading_genes(loadings: np.ndarray, gene_names: Sequence[str], n: int) -> list[list[tuple[str, float]]]:
    """Per factor, the ``n`` genes with the largest absolute loading: (gene, signed loading)."""
    result = []
    for column in np.asarray(loadings).T:
        order = np.argsort(-np.abs(column), kind="stable")[:n]
        result.append([(str(gene_names[i]), float(column[i])) for i in order])
    return result


# --------------------------------------------------------------------------------------------
# CondSCVI VampPrior


def iter_latent_distribution(
    module: VAEC, data: CountData, *, batch_size: int = DEFAULT_BATCH_SIZE, device="cpu"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per minibatch, (means, variances) float32 (B, n_latent) of q(z | x, label)."""
    with torch.no_grad():
        for batch in _minibatches(module, data, batch_size, device):
            m, v = module.latent_distribution_params(batch)
            yield m.float().cpu().numpy(), v.float().cpu().numpy()


def vamp_prior_from_posterior(
    means: np.ndarray, variances: np.ndarray, data: CountData, *, p: int = 10, seed: int = 0
) -> dict[str, np.ndarray]:
    """CondSCVI's per-label mixture summary of the posterior (what DestVI's prior takes).

    Returns mean_vprior (labels, p, D), var_vprior (labels, p, D), weights_vprior (labels, p)
    as float32, plus labels (the model's label names) and n_cells (cells per label in ``data``).
    """
    if p < 1:
        raise ValueError(f"p must be at least 1, got {p}")
    n_labels = data.n_labels
    prior = VAEC.get_vamp_prior(means, variances, data.label_codes, n_labels, p=p, seed=seed)
    prior = {key: np.asarray(value, dtype=np.float32) for key, value in prior.items()}
    prior["labels"] = np.array([str(c) for c in data.categories["labels"]], dtype=str)
    prior["n_cells"] = np.bincount(data.label_codes, minlength=n_labels).astype(np.int64)
    return prior


def vamp_prior(
    module: nn.Module,
    data: CountData,
    *,
    p: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device="cpu",
    source: str = "the model",
) -> dict[str, np.ndarray]:
    """The VampPrior of every cell of ``data`` (see vamp_prior_from_posterior)."""
    if not isinstance(module, VAEC):
        raise UsageError(f"{source}: a VampPrior needs a condscvi model, not a {type(module).__name__}")
    blocks = list(iter_latent_distribution(module, data, batch_size=batch_size, device=device))
    means = np.concatenate([m for m, _ in blocks], axis=0)
    variances = np.concatenate([v for _, v in blocks], axis=0)
    return vamp_prior_from_posterior(means, variances, data, p=p, seed=seed)


# --------------------------------------------------------------------------------------------
# h5ad outputs


def _widen(matrix, n_rows: int, dest: np.ndarray, n_cols: int):
    """``matrix`` (n_rows, len(dest)) spread to columns ``dest`` of an all-zero (n_rows, n_cols)."""
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        csr.sum_duplicates()
        return sp.csr_matrix((csr.data, dest[csr.indices], csr.indptr), shape=(n_rows, n_cols))
    dense = np.asarray(matrix)
    out = np.zeros((n_rows, n_cols), dtype=dense.dtype)
    out[:, dest] = dense
    return out


def output_anndata(adata, data: CountData, genes: Sequence[str] | None = None):
    """The input AnnData aligned with a result's rows (and, with ``genes``, its columns).

    Rows: the cells data loading kept (cells with zero total counts are left out). Columns: all
    of the input's genes, or ``genes`` in that order, so that a per-gene result fits as a layer;
    a gene the input lacks (zero-filled by --allow-missing-genes) becomes an all-zero column of X
    and of every layer, with missing var annotations (varm / varp are then dropped).
    ``adata`` itself is not modified; it is returned as is when nothing needs to change.
    """
    import anndata
    import pandas as pd

    kept = data.kept_cells
    rows = slice(None) if kept is None or kept.all() else np.flatnonzero(kept)
    if genes is None:
        return adata if isinstance(rows, slice) else adata[rows].copy()
    genes = [str(g) for g in genes]
    var_names = [str(v) for v in adata.var_names]
    position = {}
    for i, name in enumerate(var_names):
        position.setdefault(name, i)
    columns = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
    present = columns >= 0
    if present.all():
        if isinstance(rows, slice) and np.array_equal(columns, np.arange(len(var_names))):
            return adata
        return adata[rows, columns].copy()
    sub = adata[rows, columns[present]].copy()
    dest = np.flatnonzero(present)
    n_rows = sub.n_obs
    var = sub.var.reindex(pd.Index(genes, dtype=object))
    for name in var.columns:  # a bool column with holes would be written as mixed objects
        if var[name].dtype == object and sub.var[name].dtype == bool:
            var[name] = var[name].astype("boolean")
    return anndata.AnnData(
        X=None if sub.X is None else _widen(sub.X, n_rows, dest, len(genes)),
        obs=sub.obs,
        var=var,
        uns=dict(sub.uns),
        obsm=dict(sub.obsm),
        obsp=dict(sub.obsp),
        layers={key: _widen(value, n_rows, dest, len(genes)) for key, value in sub.layers.items()},
    )
