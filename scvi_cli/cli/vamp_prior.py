"""`scvi-cli vamp-prior`: CondSCVI's per-label posterior clusters, the prior DestVI-style
deconvolution takes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli vamp-prior ref.ckpt ref.h5ad --out vamp.npz\n\n"
    "  scvi-cli vamp-prior ref.ckpt ref.h5ad --out vamp.npz --p 20 --seed 1\n\n"
    "The .npz holds mean_vprior (labels x p x latent), var_vprior (same), weights_vprior "
    "(labels x p), labels (the label names, in the model's order) and n_cells per label. Read it "
    "with numpy.load(path)."
)


def vamp_prior(
    model: Path = typer.Argument(..., help="Checkpoint of a condscvi model written by `scvi-cli train`."),
    data: Path = typer.Argument(..., help="h5ad of labelled reference cells (usually the training data)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz file."),
    p: int = typer.Option(10, "--p", min=1, help="Mixture components (k-means clusters) per label."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the k-means starts."),
    batch_size: int = options.InferenceBatchSize,
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    quiet: bool = options.Quiet,
) -> None:
    """Write per-label cluster means, variances and weights of CondSCVI's posterior (a VampPrior)."""
    import numpy as np

    from scvi_cli.apply import queries
    from scvi_cli.atomic import atomic_write, check_writable, refuse_input_as_output
    from scvi_cli.errors import UsageError
    from scvi_cli.progress import progress_bar

    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {out}: the VampPrior is written as .npz")
    check_writable(out)
    refuse_input_as_output(out, data)
    trained, torch_device = options.load_model(model, device, threads)
    if trained.model_type != "condscvi":
        raise UsageError(f"{model}: holds a {trained.model_type} model; vamp-prior needs a condscvi model")
    _, query = trained.load_query(data, allow_missing_genes, keep_counts=False)
    prior = queries.vamp_prior(
        trained.module, query, p=p, batch_size=batch_size, seed=seed, device=torch_device,
        source=str(model), reporter=progress_bar(quiet),
    )
    with atomic_write(out) as tmp:
        np.savez(tmp, **prior)
    n_labels, n_components, n_latent = prior["mean_vprior"].shape
    if not quiet:
        typer.echo(
            f"wrote {out}: {n_labels} labels x {n_components} components x {n_latent} latent dims "
            f"(from {queries.cells_phrase(query)})",
            err=True,
        )
