"""`scvi-cli evaluate`: per-cell held-out fit of a trained model on any h5ad."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli evaluate pbmc.ckpt heldout.h5ad\n\n"
    "  scvi-cli evaluate pbmc.ckpt heldout.h5ad --json --n-mc-samples 200"
)


def evaluate(
    model: Path = options.Model,
    data: Path = options.QueryData,
    n_mc_samples: int = typer.Option(100, "--n-mc-samples", min=0, help="Importance samples for marginal_ll (0 skips it)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Cells per inference minibatch."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the Monte Carlo draws."),
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Per-cell reconstruction NLL, KL, negative ELBO and marginal log-likelihood on any h5ad."""
    from scvi_cli.apply.evaluation import evaluate_model

    trained, torch_device = options.load_model(model, device, threads)
    _, query = trained.load_query(data, allow_missing_genes=allow_missing_genes, backed=backed, keep_counts=False)
    metrics = evaluate_model(
        trained.module, query, n_mc_samples=n_mc_samples, batch_size=batch_size, seed=seed, device=torch_device
    )
    if as_json:
        typer.echo(json.dumps({"model": str(model), "data": str(data), "model_type": trained.model_type, **metrics}))
        return
    typer.echo(f"{trained.model_type} model {model} on {data} ({metrics['n_cells']} cells), per cell:")
    for name in ("reconstruction_nll", "kl_local", "negative_elbo", "marginal_ll"):
        if name in metrics:
            typer.echo(f"  {name:<20}{metrics[name]:.4f}")
