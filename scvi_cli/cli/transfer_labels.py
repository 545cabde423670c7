"""`scvi-cli transfer-labels`: query cells labelled by a kNN vote among reference cells."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli transfer-labels --reference ref.h5ad --query query.h5ad --model query_model.ckpt "
    "--labels-key cell_type --out predictions.csv\n\n"
    "  scvi-cli transfer-labels --reference ref.h5ad --query query.h5ad --model query_model.ckpt --labels-key cell_type "
    "--k 30 --out predictions.parquet\n\n"
    "Both files are embedded with the model (usually the output of `scvi-cli map`; the posterior "
    "mean of z). Each query cell gets the label most common among its k nearest reference cells "
    "(exact Euclidean neighbours; a tie goes to the nearest neighbour's label); reference cells "
    "without a label do not vote. Output: one row per query cell (obs names) with predicted, "
    "vote_share (the winning label's share of the k votes) and uncertainty (1 - vote_share); an .h5ad "
    "output holds them as obs columns. When the query has the labels column too, the agreement is "
    "printed."
)


def transfer_labels(
    reference: Path = typer.Option(..., "--reference", help="Reference .h5ad whose cells carry the labels."),
    query: Path = typer.Option(..., "--query", help="Query .h5ad to label."),
    model: Path = typer.Option(..., "--model", help="Checkpoint that embeds both (e.g. from `scvi-cli map`)."),
    labels_key: str = typer.Option(..., "--labels-key", help="obs column of the reference's labels."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: .csv, .tsv, .parquet or .h5ad (by extension)."),
    k: int = typer.Option(15, "--k", min=1, help="Reference neighbours that vote for each query cell."),
    batch_size: int = options.InferenceBatchSize,
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Predict each query cell's label from its nearest reference cells in the latent space."""
    import torch

    from scvi_cli.apply.label_transfer import transfer_labels as run
    from scvi_cli.apply.outputs import check_output, write_frame

    check_output(out, reference, query, model)
    trained, torch_device = options.load_model(model, device, threads)
    result = run(
        trained, reference, query, labels_key, k=k, batch_size=batch_size, device=torch_device,
        allow_missing_genes=allow_missing_genes, backed=backed, workers=torch.get_num_threads(),
    )
    write_frame(out, result.predictions)
    if not quiet:
        left_out = f" ({result.n_unlabelled} without a label left out)" if result.n_unlabelled else ""
        typer.echo(f"{result.n_reference} labelled reference cells{left_out}, k={k}", err=True)
        if result.agreement is not None:
            typer.echo(f"agreement with the query's own obs[{labels_key!r}]: {result.agreement:.4f}", err=True)
        typer.echo(f"wrote {out}: {len(result.predictions)} query cells", err=True)
