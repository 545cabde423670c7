"""Apply a trained model to cells: latent space, normalized expression, posterior predictive counts,
LDVAE gene loadings and CondSCVI's VampPrior.

The computations are the modules' own query methods (latent, sample_scale, sample_rate,
posterior_predictive_sample, latent_distribution_params, get_loadings); this module runs them
over a dataset. Every query runs without gradients, in eval mode, one minibatch of cells at a
time. The ``iter_*`` functions yield one numpy block per minibatch, so a caller can write each block as it comes and a
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
from torch import nn

from scvi_cli.data import CountData, iterate_in_order
from scvi_cli.device import count_layout, retain_memory_for_minibatches
from scvi_cli.errors import ScviCliError, UsageError
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models import VAEC, VAEBase
from scvi_cli.models.vae import CHUNK_ELEMENTS, LN_MC_SAMPLES
from scvi_cli.nn.decoders import LinearDecoderSCVI

DEFAULT_BATCH_SIZE = 1024
_INT32_MAX = np.iinfo(np.int32).max
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------------
# Query data and argument checks


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


def _minibatches(module: nn.Module, data: CountData, batch_size: int, device, cells=None) -> Iterator[Minibatch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    module.eval()
    retain_memory_for_minibatches(batch_size, data.n_genes)
    for batch in iterate_in_order(data, batch_size, indices=cells, layout=count_layout(device)):
        yield batch.to(device)


def _check_module(module: nn.Module) -> None:
    if not isinstance(module, (VAEBase, VAEC)):
        raise TypeError(f"expected a VAE, LDVAE or VAEC module, got {type(module).__name__}")


# --------------------------------------------------------------------------------------------
# Latent space


def iter_latent(
    module: nn.Module,
    data: CountData,
    *,
    sample: bool = False,
    mc_samples: int = LN_MC_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device="cpu",
    cells: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """(B, n_latent) float32 blocks of ``module.latent``: the posterior mean of z, or one posterior
    draw with ``sample``. For the logistic-normal latent the mean is E[softmax(z)] over
    ``mc_samples`` draws, and a draw is softmax(z). ``cells`` (increasing positions) limits it
    to those cells.
    """
    _check_module(module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for batch in _minibatches(module, data, batch_size, device, cells):
            yield module.latent(batch, give_mean=not sample, mc_samples=mc_samples).float().cpu().numpy()


def latent_representation(module: nn.Module, data: CountData, **kwargs) -> np.ndarray:
    """(cells, n_latent) latent of every cell of ``data``; keywords as for iter_latent."""
    return np.concatenate(list(iter_latent(module, data, **kwargs)), axis=0)


# --------------------------------------------------------------------------------------------
# Normalized expression


def _gene_chunk(batch_size: int, gene_chunk: int | None) -> int:
    """Genes per logit chunk: about CHUNK_ELEMENTS floats per minibatch unless given."""
    return gene_chunk if gene_chunk is not None else max(256, CHUNK_ELEMENTS // max(1, batch_size))


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
    """(B, genes) float32 blocks of denoised expression: the module's sample_scale x library_size.

    - ``library_size``: a number N gives N x px_scale (rows sum to N over all genes; 1, the
      default, as in scvi-tools); 'latent' gives the module's sample_rate (px_rate), each cell's
      expected counts at its own library: the observed total or, for a latent library, exp of
      the posterior mean of the log-library, exp(ql_m) (not the log-normal mean of
      VAE.library_size); with ``n_samples`` the library is drawn jointly with z.
    - ``n_samples``: 0 decodes the posterior mean (deterministic); S > 0 averages S posterior
      draws of z (and of a latent library).
    - ``transform_batch``: batch codes; each cell is decoded as if from each of them and the
      results averaged (None: the cell's own batch). The same draws serve every batch.
    - ``genes``: model gene positions; only those columns are produced (the module's gene_index).
    - ``gene_chunk``: genes per logit chunk (default: about 64 MiB per minibatch).
    Memory per block is cells x wanted genes plus one gene chunk, whatever S and the batches.
    """
    _check_module(module)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if library_size != "latent" and not (isinstance(library_size, (int, float)) and library_size > 0):
        raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}")
    codes = None if not transform_batch else [int(c) for c in transform_batch]
    for code in codes or []:
        if not 0 <= code < module.n_batch:
            raise ValueError(f"transform batch code {code} outside [0, {module.n_batch})")
    if genes is not None:
        genes = np.asarray(genes, dtype=np.int64).reshape(-1)
        if genes.size == 0 or genes.min() < 0 or genes.max() >= module.n_input:
            raise ValueError(f"genes must be a non-empty list of positions in [0, {module.n_input})")
    chunk = _gene_chunk(batch_size, gene_chunk)
    torch.manual_seed(seed)
    with torch.no_grad():
        for batch in _minibatches(module, data, batch_size, device):
            if library_size == "latent":
                values = module.sample_rate(batch, codes, n_samples, gene_index=genes, gene_chunk=chunk)
            else:
                values = module.sample_scale(batch, codes, n_samples, gene_index=genes, gene_chunk=chunk)
                values = values * float(library_size)
            yield values.float().cpu().numpy()


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
    return np.asarray(module.get_loadings(), dtype=np.float32)


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
    reporter=None,
) -> dict[str, np.ndarray]:
    """The VampPrior of every cell of ``data`` (see vamp_prior_from_posterior); ``reporter`` (a
    progress bar, see ``drain``) ticks once per minibatch encoded."""
    if not isinstance(module, VAEC):
        raise UsageError(f"{source}: a VampPrior needs a condscvi model, not a {type(module).__name__}")
    blocks: list = []
    drain(
        iter_latent_distribution(module, data, batch_size=batch_size, device=device),
        blocks.append,
        reporter,
        n_blocks(data, batch_size),
        "encoding",
    )
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
