"""`scvi-cli de`: Bayesian differential expression between groups of cells."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli de pbmc.ckpt pbmc.h5ad --groupby cell_type --out de.csv\n\n"
    "  scvi-cli de pbmc.ckpt pbmc.h5ad --groupby cell_type --group1 B --group2 T --out b_vs_t.parquet\n\n"
    "  scvi-cli de pbmc.ckpt pbmc.h5ad --groupby cell_type --batch-correction --mode vanilla --out de.tsv\n\n"
    "Each group (all of --groupby's, or --group1) is compared with --group2, or with the rest of the "
    "cells when --group2 is omitted. Per group, --n-samples posterior samples of the normalised "
    "expression are drawn (cells picked uniformly, with replacement, from a pool of posterior draws "
    "of every cell of the group) and paired with the other group's. Mode change: LFC = log2(scale1 + pc) "
    "- log2(scale2 + pc), proba_de = P(|LFC| > delta), bayes_factor = log odds, is_de_fdr_<fdr> by "
    "posterior expected FDR; pc is estimated as scvi-tools does unless --pseudocounts. Mode vanilla: "
    "proba_m1 = P(scale1 > scale2). With --batch-correction each group is decoded as each training batch "
    "(or each --transform-batch) with n-samples / n-batches samples each, pairs within a batch. One row per "
    "gene and comparison, sorted by proba_de (change) or bayes_factor (vanilla), decreasing."
)


def de(
    model: Path = options.Model,
    data: Path = options.QueryData,
    groupby: str = typer.Option(..., "--groupby", help="obs column that defines the groups."),
    group1: list[str] = typer.Option([], "--group1", help="Group(s) to test (repeatable; default: every group)."),
    group2: Optional[str] = typer.Option(None, "--group2", help="Group to compare with (default: the rest of the cells)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: .csv, .tsv, .parquet or .h5ad (by extension)."),
    mode: str = typer.Option("change", "--mode", help="change (LFC beyond --delta) or vanilla (P(scale1 > scale2))."),
    delta: float = typer.Option(0.25, "--delta", help="LFC threshold of the change mode (log2 scale)."),
    n_samples: int = typer.Option(5000, "--n-samples", min=2, help="Posterior samples per group (split over batches with --batch-correction)."),
    batch_correction: bool = typer.Option(False, "--batch-correction", help="Average over the training batches instead of each cell's own."),
    transform_batch: list[str] = typer.Option(
        [], "--transform-batch", help="With --batch-correction: decode as these batches only (repeatable)."
    ),
    fdr: float = typer.Option(0.05, "--fdr", help="Target posterior expected false discovery rate of is_de_fdr."),
    pseudocounts: Optional[float] = typer.Option(None, "--pseudocounts", min=0.0, help="Pseudocount of the LFC (default: estimated)."),
    min_cells: int = typer.Option(3, "--min-cells", min=1, help="Fewest cells a compared group may have."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the posterior sampling."),
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Differential expression between groups of cells from the model's posterior."""
    from scvi_cli.apply import queries
    from scvi_cli.apply.de import DESettings, differential_expression
    from scvi_cli.apply.outputs import check_output, write_frame
    from scvi_cli.data.categories import _obs_column
    from scvi_cli.errors import UsageError
    from scvi_cli.progress import make_reporter
    from scvi_cli.trained_model import kept_obs

    check_output(out, data, model)
    if transform_batch and not batch_correction:
        raise UsageError("--transform-batch applies with --batch-correction")
    trained, torch_device = options.load_model(model, device, threads)
    codes = tuple(queries.batch_codes(trained.checkpoint.categories, transform_batch)) if transform_batch else None
    settings = DESettings(
        mode=mode, delta=delta, n_samples=n_samples, batch_correction=batch_correction, transform_batch=codes,
        fdr=fdr, pseudocounts=pseudocounts, seed=seed, min_cells=min_cells,
    )
    adata, query = trained.load_query(data, allow_missing_genes, backed=backed, keep_counts=False)
    groups = _obs_column(kept_obs(adata, query), groupby, "--groupby", str(data))
    reporter = make_reporter(quiet)
    table = differential_expression(
        trained.module, query, groups, groupby, group1=list(group1) or None, group2=group2, settings=settings,
        device=torch_device, reporter=reporter,
    )
    write_frame(out, table, index_name="gene")
    if not quiet:
        n_comparisons = table["comparison"].nunique()
        called = f", {int(table[f'is_de_fdr_{fdr}'].sum())} gene calls at FDR {fdr}" if mode == "change" else ""
        reporter.message(f"wrote {out}: {n_comparisons} comparison(s) x {query.n_genes} genes{called}")
