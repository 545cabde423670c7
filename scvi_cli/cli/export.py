"""`scvi-cli export`: a checkpoint out as another tool's model directory (scvi-tools)."""

from __future__ import annotations

from pathlib import Path

import typer

EPILOG = (
    "Examples:\n\n  scvi-cli export pbmc.ckpt --to scvi-tools --out pbmc_scvi/\n\n"
    "  then in Python: scvi.model.SCVI.load('pbmc_scvi', adata)"
)


def export(
    model: Path = typer.Argument(..., help="Checkpoint written by `scvi-cli train` or `import-model`."),
    to: str = typer.Option("scvi-tools", "--to", help="Target format: scvi-tools (a directory holding model.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write model.pt into (created if missing)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model.pt in --out."),
) -> None:
    """Write a checkpoint as an scvi-tools model directory (DIR/model.pt).

    scvi-tools' SCVI / LinearSCVI / CondSCVI.load(DIR, adata) then rebuilds the model on an
    AnnData with the same obs columns and gives the same latent."""
    from scvi_cli.checkpoint import load_checkpoint
    from scvi_cli.errors import UsageError
    from scvi_cli.interop.scvi_tools import export_model

    if to != "scvi-tools":
        raise UsageError(f"--to {to!r}: the only target is scvi-tools")
    target = export_model(load_checkpoint(model), out, overwrite=overwrite)
    typer.echo(f"wrote {target}", err=True)
