"""`scvi-cli sample`: counts drawn from a trained model's posterior predictive distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options
from scvi_cli.cli.options import refuse_existing

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli sample pbmc.ckpt pbmc.h5ad --out samples.h5ad --n-samples 5\n\n"
    "  scvi-cli sample pbmc.ckpt pbmc.h5ad --out counts.parquet --transform-batch b1 --seed 3\n\n"
    "An .h5ad output is the input AnnData (X as it was) restricted to the model's genes and to cells "
    "with non-zero counts, with sparse integer layers sample_0 .. sample_{S-1}. Tables (.npy .csv "
    ".tsv .parquet) hold a single sample."
)


def sample(
    model: Path = typer.Argument(..., help="Checkpoint written by `scvi-cli train` (scvi, ldvae or condscvi)."),
    data: Path = options.QueryData,
    out: Path = typer.Option(..., "--out", "-o", help="Output: .h5ad, or for one sample .npy, .csv, .tsv, .parquet."),
    n_samples: int = typer.Option(1, "--n-samples", min=1, help="Independent samples (layers sample_0 ..)."),
    transform_batch: Optional[str] = typer.Option(
        None, "--transform-batch", help="Decode every cell as this batch (a category name)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives the same counts."),
    batch_size: int = options.InferenceBatchSize,
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Write posterior predictive counts (integer, sparse) from the likelihood the model was trained with."""
    import numpy as np
    import scipy.sparse as sp

    from scvi_cli.apply import queries
    from scvi_cli.errors import UsageError
    from scvi_cli.apply.outputs import check_output, open_chunked_writer, write_h5ad_with_sample_layers
    from scvi_cli.progress import progress_bar

    fmt = check_output(out, data)
    if fmt != ".h5ad" and n_samples > 1:
        raise UsageError(f"--n-samples {n_samples}: a {fmt} table holds one sample; write several to .h5ad (layers sample_0 ..)")
    trained, torch_device = options.load_model(model, device, threads)
    code = None if transform_batch is None else queries.batch_codes(trained.checkpoint.categories, [transform_batch])[0]
    adata, query = trained.load_query(data, allow_missing_genes, backed=backed, keep_counts=fmt == ".h5ad")
    if fmt == ".h5ad":
        refuse_existing(data, "layers", adata.layers, [f"sample_{s}" for s in range(n_samples)], "the sample layers")
    genes = list(trained.checkpoint.gene_names)

    blocks = queries.iter_posterior_predictive(
        trained.module, query, n_samples=n_samples, transform_batch=code, batch_size=batch_size, seed=seed, device=torch_device
    )
    reporter = progress_bar(quiet)
    total = queries.n_blocks(query, batch_size)
    if fmt == ".h5ad":
        collected: list = []
        queries.drain(blocks, collected.append, reporter, total, "sampling")
        layers = {
            f"sample_{s}": sp.vstack([block[s] for block in collected], format="csr") for s in range(n_samples)
        }
        write_h5ad_with_sample_layers(out, queries.output_anndata(adata, query, genes), layers)
        where = f"layers sample_0..sample_{n_samples - 1}"
    else:
        with open_chunked_writer(out, query.obs_names, genes, dtype=np.int32) as writer:
            queries.drain(blocks, lambda block: writer.write(block[0]), reporter, total, "sampling")
        where = "one sample"
    if not quiet:
        typer.echo(f"wrote {out}: {queries.cells_phrase(query)} x {len(genes)} genes ({where})", err=True)
