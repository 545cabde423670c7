"""`scvi-cli embed`: the latent representation of cells under a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options
from scvi_cli.cli.options import refuse_existing

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli embed pbmc.ckpt pbmc.h5ad --out pbmc_latent.h5ad\n\n"
    "  scvi-cli embed pbmc.ckpt query.h5ad --out latent.parquet\n\n"
    "  scvi-cli embed pbmc.ckpt query.h5ad --out emb.h5ad --minimal --obsm-key X_emb\n\n"
    "An .h5ad output is the input AnnData (cells with zero total counts left out) with the latent "
    "in obsm; --minimal keeps only obs, var names and the latent. Tables (.npy .csv .tsv .parquet) "
    "hold one row per cell (indexed by obs names) and columns Z_0, Z_1, ..."
)


def embed(
    model: Path = options.Model,
    data: Path = options.QueryData,
    out: Path = typer.Option(..., "--out", "-o", help="Output: .h5ad, .npy, .csv, .tsv or .parquet (by extension)."),
    obsm_key: str = typer.Option("X_scVI", "--obsm-key", help="obsm key of the latent in an .h5ad output."),
    sample: bool = typer.Option(False, "--sample", help="One posterior draw of z instead of its mean."),
    minimal: bool = typer.Option(
        False, "--minimal", help=".h5ad output with only obs, var names and the latent (no counts)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for --sample and the logistic-normal Monte Carlo mean."),
    batch_size: int = options.InferenceBatchSize,
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Write the posterior mean of the latent z (or one sample) of every cell."""
    import numpy as np

    from scvi_cli.apply import queries
    from scvi_cli.errors import UsageError
    from scvi_cli.apply.outputs import check_output, write_h5ad_with_obsm, write_table
    from scvi_cli.progress import progress_bar

    fmt = check_output(out, data)
    if minimal and fmt != ".h5ad":
        raise UsageError(f"--minimal applies to .h5ad outputs only, not {out}")
    trained, torch_device = options.load_model(model, device, threads)
    adata, query = trained.load_query(data, allow_missing_genes, backed=backed, keep_counts=fmt == ".h5ad" and not minimal)
    if fmt == ".h5ad" and not minimal:
        refuse_existing(data, "obsm", adata.obsm, [obsm_key], "--obsm-key")

    blocks: list = []
    queries.drain(
        queries.iter_latent(trained.module, query, sample=sample, batch_size=batch_size, seed=seed, device=torch_device),
        blocks.append,
        progress_bar(quiet),
        queries.n_blocks(query, batch_size),
        "embedding",
    )
    latent = np.concatenate(blocks, axis=0)
    if fmt == ".h5ad":
        write_h5ad_with_obsm(out, queries.output_anndata(adata, query), obsm_key, latent, minimal=minimal)
        where = f"obsm[{obsm_key!r}]" + (", minimal" if minimal else "")
    else:
        write_table(out, latent, query.obs_names, queries.latent_names(latent.shape[1]))
        where = "sampled" if sample else "posterior mean"
    if not quiet:
        typer.echo(f"wrote {out}: {queries.cells_phrase(query)} x {latent.shape[1]} latent dims ({where})", err=True)
