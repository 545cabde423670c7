"""`scvi-cli import-model`: an scvi-tools model directory (SCVI, LinearSCVI, CondSCVI) in, a
scvi-cli checkpoint out, read without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import typer

EPILOG = (
    "Examples:\n\n  scvi-cli import-model scvi_model_dir/ --out pbmc.ckpt\n\n"
    "  scvi-cli import-model census_scvi/model.pt --out census.ckpt && scvi-cli embed census.ckpt cells.h5ad --out z.npy"
)


def import_model(
    source: Path = typer.Argument(..., help="scvi-tools model directory (holding model.pt) or the model.pt itself."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (e.g. model.ckpt)."),
) -> None:
    """Import an scvi-tools SCVI, LinearSCVI or CondSCVI model directory as a checkpoint.

    Genes and categories keep scvi-tools' order (unused categories included); the file is read
    without unpickling arbitrary objects."""
    from scvi_cli.atomic import check_writable
    from scvi_cli.checkpoint import save_checkpoint
    from scvi_cli.interop.scvi_tools import import_model as read

    check_writable(out)
    checkpoint = read(source)
    save_checkpoint(out, checkpoint)
    counts = ", ".join(f"{len(v)} {k}" for k, v in checkpoint.categories.items())
    typer.echo(
        f"wrote {out}: {checkpoint.training['model_name']} -> {checkpoint.model_type}, "
        f"{len(checkpoint.gene_names)} genes, categories: {counts}",
        err=True,
    )
