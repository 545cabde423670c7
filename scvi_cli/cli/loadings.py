"""`scvi-cli loadings`: the gene loadings of an LDVAE model's linear decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli loadings ldvae.ckpt --out loadings.csv\n\n"
    "  scvi-cli loadings ldvae.ckpt --out loadings.parquet --top 10\n\n"
    "The table has one row per gene (indexed by gene name) and one column per latent factor "
    "(Z_0, Z_1, ...): the decoder weights with its batch norm folded in, batch columns dropped."
)


def loadings(
    model: Path = typer.Argument(..., help="Checkpoint of an ldvae model written by `scvi-cli train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: .csv, .tsv, .parquet, .npy or .h5ad (by extension)."),
    top: Optional[int] = typer.Option(
        None, "--top", min=1, help="Also print the N genes with the largest absolute loading of each factor."
    ),
    quiet: bool = options.Quiet,
) -> None:
    """Write LDVAE gene loadings (genes x latent factors)."""
    from scvi_cli.apply import queries
    from scvi_cli.errors import UsageError
    from scvi_cli.apply.outputs import check_output, write_table
    from scvi_cli.trained_model import load_trained_model

    check_output(out)
    trained = load_trained_model(model, device="cpu")
    if trained.model_type != "ldvae":
        raise UsageError(f"{model}: holds a {trained.model_type} model, which has no linear decoder; loadings need an ldvae model")
    values = queries.gene_loadings(trained.module, source=str(model))
    genes = list(trained.checkpoint.gene_names)
    factors = queries.latent_names(values.shape[1])
    write_table(out, values, genes, factors, index_name="gene")
    if top:
        for factor, ranked in zip(factors, queries.top_loading_genes(values, genes, top)):
            typer.echo(f"{factor}: " + ", ".join(f"{gene} {value:+.3f}" for gene, value in ranked))
    if not quiet:
        typer.echo(f"wrote {out}: {values.shape[0]} genes x {values.shape[1]} factors", err=True)
