"""Bayesian differential expression between groups of cells from the posterior's normalised
expression (Lopez et al. 2018, "vanilla"; Boyeau et al. 2023, "change"), as scvi-tools'
``differential_expression`` computes it.

For each group, ``n_samples`` posterior samples of px_scale are drawn: as in scvi-tools, every
cell of the group contributes ``n_samples // n_cells + 1`` posterior draws to a pool and the
samples are picked from the pool uniformly with replacement. Only the picked (cell, draw) pairs
are decoded, one block of cells at a time, so memory is ``n_samples x genes`` per group whatever
the number of cells. With batch correction each group is decoded as each training batch (or each
``transform_batch``) in turn, ``n_samples / n_batches`` samples per batch, and samples of the two
groups decoded as the same batch are paired. Pairs are then compared gene by gene.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from scvi_cli.data import CountData
from scvi_cli.data.sources import iterate_in_order
from scvi_cli.device import count_layout
from scvi_cli.errors import DataError, UsageError

MODES = ("change", "vanilla")
EPS = 1e-8  # added to both probabilities of a Bayes factor
REST = "Rest"  # group2's name in one-vs-rest comparisons
# Genes whose mean count in a group is below this are "not expressed" there: the pseudocount is
# estimated from the largest sampled scales of such genes.
ZERO_MEAN_COUNTS = 0.01
PSEUDOCOUNT_QUANTILE = 0.9
GENE_BLOCK = 2048  # genes per block of the statistics (bounds the n_samples x genes temporaries)
DRAWS_PER_STEP = 4096  # decoded (cell, draw) pairs per forward pass


@dataclass(frozen=True)
class DESettings:
    mode: str = "change"
    delta: float = 0.25
    n_samples: int = 5000
    batch_correction: bool = False
    transform_batch: tuple[int, ...] | None = None  # batch codes to correct over (default: all)
    fdr: float = 0.05
    pseudocounts: float | None = None  # None: estimated per comparison
    seed: int = 0
    min_cells: int = 3

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: must be one of {', '.join(MODES)}")
        if self.n_samples < 2:
            raise UsageError(f"--n-samples {self.n_samples}: must be at least 2")
        if not 0 < self.fdr < 1:
            raise UsageError(f"--fdr {self.fdr}: must lie strictly between 0 and 1")
        if self.delta <= 0:
            raise UsageError(f"--delta {self.delta}: must be positive")


# ---------------------------------------------------------------------------------------------
# Comparisons


@dataclass(frozen=True)
class Comparison:
    group1: str
    group2: str  # a group, or REST
    cells1: np.ndarray  # positions among the data's cells
    cells2: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.group1} vs {self.group2}"


def comparisons(
    groups: pd.Series, key: str, group1: Sequence[str] | None, group2: str | None, source: str, min_cells: int
) -> list[Comparison]:
    """The comparisons asked for: each of ``group1`` (default: every group, in category order)
    against ``group2``, or against the rest of the cells when ``group2`` is None."""
    column = groups if isinstance(groups.dtype, pd.CategoricalDtype) else groups.astype("category")
    if column.isna().any():
        raise DataError(f"{source}: obs[{key!r}] has {int(column.isna().sum())} missing values; fill or drop those cells")
    categories = [str(c) for c in column.cat.categories]
    values = column.astype(str).to_numpy()
    present = set(values)
    categories = [c for c in categories if c in present]  # unused categories are no groups
    for name in [*(group1 or []), *([group2] if group2 is not None else [])]:
        if name not in present:
            shown = ", ".join(repr(c) for c in categories[:20]) + (", ..." if len(categories) > 20 else "")
            raise DataError(f"{source}: obs[{key!r}] has no cells of group {name!r} (groups: {shown})")
    if group1 is None:
        group1 = [c for c in categories if c != group2]
    group1 = list(dict.fromkeys(group1))  # a group named twice is compared once
    if len(present) < 2 or not group1:
        raise DataError(f"{source}: obs[{key!r}] has a single group ({categories[0]!r}); nothing to compare")
    result = []
    for name in group1:
        cells1 = np.flatnonzero(values == name)
        cells2 = np.flatnonzero(values != name) if group2 is None else np.flatnonzero(values == group2)
        if name == group2:
            raise UsageError(f"--group1 {name} and --group2 {group2} are the same group")
        for label, cells in ((name, cells1), (group2 or f"the rest of {name}", cells2)):
            if len(cells) < min_cells:
                raise DataError(
                    f"{source}: group {label!r} of obs[{key!r}] has {len(cells)} cells, fewer than --min-cells {min_cells}"
                )
        result.append(Comparison(name, group2 if group2 is not None else REST, cells1, cells2))
    return result


# ---------------------------------------------------------------------------------------------
# Posterior samples of px_scale


@dataclass(frozen=True)
class SamplePlan:
    """Which posterior draws of which cells make ``n`` samples of a group, decoded as ``code``:
    fixed by the seeded generator before any counts are read, so that the cells every sample of
    a run needs can be read together (one pass over a backed file, not one per group)."""

    cells: np.ndarray  # the group's cells
    code: int | None
    needed: np.ndarray  # the cells (increasing) whose draws are picked
    counts: np.ndarray  # distinct draws needed per needed cell
    order: np.ndarray  # pool entries by cell, then draw
    first: np.ndarray  # each needed cell's first position in ``order``
    where: np.ndarray  # each sample's pool entry


def plan_samples(cells: np.ndarray, n: int, code: int | None, rng: np.random.Generator) -> SamplePlan:
    """Samples picked uniformly with replacement from a pool of ``n // len(cells) + 1`` posterior
    draws per cell (pool entry e: draw e // len(cells) of cell e % len(cells))."""
    n_cells = len(cells)
    draws = n // n_cells + 1
    picks = rng.integers(0, draws * n_cells, size=n)
    entries, where = np.unique(picks, return_inverse=True)
    cell_of, draw_of = entries % n_cells, entries // n_cells
    order = np.lexsort((draw_of, cell_of))  # by cell, then draw
    needed_cells, first = np.unique(cell_of[order], return_index=True)
    counts = np.diff(np.append(first, len(order)))
    return SamplePlan(cells, code, cells[needed_cells], counts, order, first, where)


@torch.no_grad()
def decode_samples(module: nn.Module, data: CountData, rows: np.ndarray, plan: SamplePlan, device="cpu") -> np.ndarray:
    """(n, genes) float32 px_scale samples of ``plan``; ``rows``: the rows of ``data`` holding
    ``plan.needed``. Only the picked pool entries are decoded, in blocks of about
    DRAWS_PER_STEP draws (fixed, so that the seeded draws depend on no other setting)."""
    counts, order, first = plan.counts, plan.order, plan.first
    samples = np.empty((len(order), data.n_genes), dtype=np.float32)
    module.eval()
    step_cells = max(1, DRAWS_PER_STEP // max(1, int(counts.max())))
    done = 0
    for batch in iterate_in_order(data, step_cells, indices=rows, layout=count_layout(device)):
        batch = batch.to(device)
        size = batch.batch_index.shape[0]
        block_counts = counts[done : done + size]
        z, _ = module.posterior_draws(batch, int(block_counts.max()))
        for s in range(z.shape[0]):
            wanted = np.flatnonzero(block_counts > s)
            scale = module.scale_head(z[s], batch, plan.code).columns(None, None)
            # entry positions of these cells' draws: order[first[c] + s] for the block's cells
            samples[order[first[done + wanted] + s]] = scale[torch.as_tensor(wanted, device=scale.device)].float().cpu().numpy()
        done += size
    return samples[plan.where]


def scale_samples(
    module: nn.Module, data: CountData, cells: np.ndarray, n: int, code: int | None, rng: np.random.Generator,
    device="cpu",
) -> np.ndarray:
    """(n, genes) float32 px_scale samples of ``cells`` decoded as batch ``code`` (None: each
    cell's own): plan_samples, then decode_samples."""
    plan = plan_samples(cells, n, code, rng)
    return decode_samples(module, data, plan.needed, plan, device)


def samples_per_batch(settings: DESettings, codes: list[int | None]) -> int:
    """A group's samples per decoding batch (codes [None]: the observed batches, one block)."""
    n = settings.n_samples // len(codes)
    if n < 2:
        warnings.warn(f"--n-samples {settings.n_samples} over {len(codes)} batches: 2 samples per batch", UserWarning)
        n = 2
    return n


def read_planned_cells(data: CountData, plans: list[SamplePlan]) -> tuple[CountData, list[np.ndarray]]:
    """(counts holding every planned cell, each plan's rows in them). Backed counts are read once,
    for all plans together, into memory (the picked cells only: bounded by the samples, not by
    the cells); in-memory counts are used as they are."""
    if not data.backed:
        return data, [plan.needed for plan in plans]
    from scvi_cli.data.backed import in_memory_share

    union = np.unique(np.concatenate([plan.needed for plan in plans]))
    return in_memory_share(data, union), [np.searchsorted(union, plan.needed) for plan in plans]


# ---------------------------------------------------------------------------------------------
# Statistics of paired samples


def log_fold_change(scale1: np.ndarray, scale2: np.ndarray, pseudocount: float) -> np.ndarray:
    return np.log2(scale1 + pseudocount) - np.log2(scale2 + pseudocount)


def estimate_pseudocount(scale1: np.ndarray, scale2: np.ndarray, zero1: np.ndarray, zero2: np.ndarray) -> float:
    """scvi-tools' default pseudocount: of the genes not expressed in a group (mean count below
    ZERO_MEAN_COUNTS), the 0.9 quantile of their largest sampled scale; the larger of the two
    groups' values, divided by the number of genes, and at least 1e-10."""
    def offset(scale, zero):
        return float(np.quantile(scale.max(axis=0)[zero], PSEUDOCOUNT_QUANTILE)) if zero.any() else 1e-10

    return max(1e-10, max(offset(scale1, zero1), offset(scale2, zero2)) / scale1.shape[1])


def bayes_factor(p: np.ndarray) -> np.ndarray:
    return np.log(p + EPS) - np.log(1 - p + EPS)


def change_statistics(scale1: np.ndarray, scale2: np.ndarray, delta: float, pseudocount: float) -> dict[str, np.ndarray]:
    """Per gene, from paired samples: P(|LFC| > delta) as the larger of P(LFC >= delta) and
    P(LFC < -delta) (LFC with ``pseudocount``), its Bayes factor, the mean scales, and the LFC
    distribution's summary (with a pseudocount 1000 times smaller, as scvi-tools reports it)."""
    out: dict[str, list] = {name: [] for name in ("proba_de", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max")}
    for start in range(0, scale1.shape[1], GENE_BLOCK):
        a, b = scale1[:, start : start + GENE_BLOCK], scale2[:, start : start + GENE_BLOCK]
        lfc = log_fold_change(a, b, pseudocount)
        out["proba_de"].append(np.maximum((lfc >= delta).mean(axis=0), (lfc < -delta).mean(axis=0)))
        lfc = log_fold_change(a, b, 1e-3 * pseudocount)
        out["lfc_mean"].append(lfc.mean(axis=0))
        out["lfc_median"].append(np.median(lfc, axis=0))
        out["lfc_std"].append(lfc.std(axis=0))
        out["lfc_min"].append(lfc.min(axis=0))
        out["lfc_max"].append(lfc.max(axis=0))
    stats = {name: np.concatenate(values) for name, values in out.items()}
    proba_de = stats.pop("proba_de")
    return {
        "proba_de": proba_de, "proba_not_de": 1 - proba_de, "bayes_factor": bayes_factor(proba_de),
        "scale1": scale1.mean(axis=0), "scale2": scale2.mean(axis=0),
        "pseudocounts": np.full(scale1.shape[1], pseudocount), "delta": np.full(scale1.shape[1], delta), **stats,
    }


def vanilla_statistics(scale1: np.ndarray, scale2: np.ndarray) -> dict[str, np.ndarray]:
    """Per gene: P(scale1 > scale2) over the pairs, its complement and their Bayes factor."""
    proba_m1 = (scale1 > scale2).mean(axis=0)
    return {
        "proba_m1": proba_m1, "proba_m2": 1 - proba_m1,
        "bayes_factor": np.log(proba_m1 + EPS) - np.log(1 - proba_m1 + EPS),
        "scale1": scale1.mean(axis=0), "scale2": scale2.mean(axis=0),
    }


def fdr_calls(proba_de: np.ndarray, fdr: float) -> np.ndarray:
    """The genes called DE: the most probable ones, as many as keep the posterior expected FDR
    (the mean of 1 - proba_de over the called genes) at most ``fdr``."""
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    called = np.zeros(len(proba_de), dtype=bool)
    called[order[: int((expected_fdr <= fdr).sum())]] = True
    return called


# ---------------------------------------------------------------------------------------------
# Raw statistics, one streaming pass


def _row_blocks(data: CountData, rows: int = 16384):
    for start in range(0, data.n_cells, rows):
        stop = min(start + rows, data.n_cells)
        yield start, (data.X.read_cells(np.arange(start, stop)) if data.backed else data.X[start:stop])


def raw_group_sums(data: CountData, codes: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """(n_groups + 1, genes) sums over each group's cells (codes -1: none) and over all cells
    (last row): counts, nonzero indicators, and counts per 10k of the cell's total."""
    sums = {name: np.zeros((n_groups + 1, data.n_genes)) for name in ("counts", "nonzero", "normalized")}
    totals = data.cell_totals()
    for start, block in _row_blocks(data):
        size = block.shape[0]
        member = codes[start : start + size]
        rows = np.concatenate([np.flatnonzero(member >= 0), np.arange(size)])
        cols = np.concatenate([member[member >= 0], np.full(size, n_groups)])
        indicator = sp.csr_matrix((np.ones(len(rows)), (cols, rows)), shape=(n_groups + 1, size))
        block = sp.csr_matrix(block, dtype=np.float64)
        sums["counts"] += indicator @ block
        nonzero = block.copy()
        nonzero.data = (nonzero.data != 0).astype(np.float64)
        sums["nonzero"] += indicator @ nonzero
        sums["normalized"] += indicator @ sp.diags(1e4 / totals[start : start + size]) @ block
    return {name: np.asarray(value) for name, value in sums.items()}


def _group_means(sums: dict, code: int | None, rest_of: int | None, n_cells: int) -> dict[str, np.ndarray]:
    last = next(iter(sums.values())).shape[0] - 1
    if code is not None:
        return {name: value[code] / n_cells for name, value in sums.items()}
    return {name: (value[last] - value[rest_of]) / n_cells for name, value in sums.items()}


# ---------------------------------------------------------------------------------------------
# The table


def differential_expression(
    module: nn.Module,
    data: CountData,
    groups: pd.Series,
    key: str,
    *,
    group1: Sequence[str] | None = None,
    group2: str | None = None,
    settings: DESettings = DESettings(),
    device="cpu",
    reporter=None,
) -> pd.DataFrame:
    """One row per gene and comparison, scvi-tools' columns and order; within a comparison rows
    sorted by proba_de ("change") or bayes_factor ("vanilla"), decreasing (ties in gene order).

    ``groups`` holds each cell's group (aligned with ``data``'s cells).
    """
    if len(groups) != data.n_cells:
        raise ValueError(f"{len(groups)} group values for {data.n_cells} cells")
    wanted = comparisons(groups, key, group1, group2, data.source, settings.min_cells)
    names = sorted({c.group1 for c in wanted} | ({group2} if group2 is not None else set()))
    index = {name: i for i, name in enumerate(names)}
    values = groups.astype(str).to_numpy()
    codes = np.array([index.get(v, -1) for v in values], dtype=np.int64)
    raw = raw_group_sums(data, codes, len(names))
    if settings.batch_correction:
        batch_codes = list(settings.transform_batch) if settings.transform_batch else list(range(data.n_batch))
    else:
        batch_codes = [None]
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    n = samples_per_batch(settings, batch_codes)
    # every comparison's picks first (the generator's order is the comparisons'), then one read
    plans = [
        [[plan_samples(cells, n, code, rng) for code in batch_codes] for cells in (comparison.cells1, comparison.cells2)]
        for comparison in wanted
    ]
    counts, rows = read_planned_cells(data, [plan for sides in plans for side in sides for plan in side])
    rows_of = iter(rows)

    def group_samples(side: list[SamplePlan]) -> np.ndarray:  # batch block after batch block
        return np.concatenate([decode_samples(module, counts, next(rows_of), plan, device) for plan in side])

    tables = []
    for number, (comparison, (side1, side2)) in enumerate(zip(wanted, plans), 1):
        if reporter is not None:
            reporter.message(f"comparison {number}/{len(wanted)}: {comparison.name}")
        scale1 = group_samples(side1)
        scale2 = group_samples(side2)
        raw1 = _group_means(raw, index[comparison.group1], None, len(comparison.cells1))
        if comparison.group2 == REST:
            raw2 = _group_means(raw, None, index[comparison.group1], len(comparison.cells2))
        else:
            raw2 = _group_means(raw, index[comparison.group2], None, len(comparison.cells2))
        if settings.mode == "change":
            pseudocount = settings.pseudocounts
            if pseudocount is None:
                pseudocount = estimate_pseudocount(
                    scale1, scale2, raw1["counts"] < ZERO_MEAN_COUNTS, raw2["counts"] < ZERO_MEAN_COUNTS
                )
            stats = change_statistics(scale1, scale2, settings.delta, pseudocount)
        else:
            stats = vanilla_statistics(scale1, scale2)
        del scale1, scale2
        table = pd.DataFrame(stats, index=pd.Index(data.gene_names, name="gene"))
        table["raw_mean1"], table["raw_mean2"] = raw1["counts"], raw2["counts"]
        table["non_zeros_proportion1"], table["non_zeros_proportion2"] = raw1["nonzero"], raw2["nonzero"]
        table["raw_normalized_mean1"], table["raw_normalized_mean2"] = raw1["normalized"], raw2["normalized"]
        if settings.mode == "change":
            table[f"is_de_fdr_{settings.fdr}"] = fdr_calls(table["proba_de"].to_numpy(), settings.fdr)
        table["comparison"] = comparison.name
        table["group1"], table["group2"] = comparison.group1, comparison.group2
        by = "proba_de" if settings.mode == "change" else "bayes_factor"
        tables.append(table.sort_values(by, ascending=False, kind="stable"))
    return pd.concat(tables)
