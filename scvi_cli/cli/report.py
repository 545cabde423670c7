"""`scvi-cli report`: one self-contained HTML page about a trained model (and PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli report pbmc.ckpt --out pbmc.report.html\n\n"
    "  scvi-cli report pbmc.ckpt pbmc.h5ad --out pbmc.report.html --color cell_type --color n_counts --png-dir figures/\n\n"
    "The page holds the model card (type, genes, categories, training facts, versions), warnings (e.g. a "
    "KL weight that never reached 1), the training curves and the resolved spec; with DATA also a 2-D map "
    "of the latent (UMAP with the report extra, else PCA; the page says which) coloured by each --color "
    "key (default: the batch and labels keys), batch mixing and label purity with their definitions. "
    "Large data are subsampled to --max-cells cells (seeded). Images are inlined: the file opens offline."
)


def report(
    model: Path = options.Model,
    data: Optional[Path] = typer.Argument(None, help="Optional .h5ad for the latent map and integration figures."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write."),
    color: list[str] = typer.Option([], "--color", help="obs column to colour the latent map by (repeatable)."),
    labels_key: Optional[str] = typer.Option(None, "--labels-key", help="obs column of labels for label purity (default: the model's)."),
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="Also write each figure as a PNG in this folder."),
    max_cells: int = typer.Option(10_000, "--max-cells", min=2, help="Cells in the map and the metrics (a seeded sample)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the cell sample and of UMAP."),
    map_method: str = typer.Option("auto", "--map", help="auto (UMAP if installed, else PCA), umap or pca."),
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Write an HTML report of a trained model: card, curves, latent map, integration."""
    from scvi_cli.atomic import check_writable, refuse_input_as_output
    from scvi_cli.errors import UsageError

    if map_method not in ("auto", "umap", "pca"):
        raise UsageError(f"--map {map_method}: must be auto, umap or pca")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"{out}: the report is an .html file")
    check_writable(out)
    refuse_input_as_output(out, model, *([data] if data else []))
    from scvi_cli.report import require

    require("matplotlib")
    from scvi_cli.report.build import build_report, write_report

    trained, torch_device = options.load_model(model, device, threads)
    built = build_report(
        model, data, colors=list(color) or None, labels_key=labels_key, max_cells=max_cells, seed=seed,
        map_method=map_method, device=torch_device, allow_missing_genes=allow_missing_genes, backed=backed,
        trained=trained,
    )
    pngs = write_report(built, out, png_dir)
    if not quiet:
        for warning in built.warnings:
            typer.echo(f"warning: {warning}", err=True)
        extra = f" and {len(pngs)} PNG files in {png_dir}" if pngs else ""
        typer.echo(f"wrote {out} ({len(built.images)} figures){extra}; open it in a browser", err=True)
