"""`scvi-cli impute`: denoised, normalized expression of every cell under a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options
from scvi_cli.cli.options import refuse_existing

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli impute pbmc.ckpt pbmc.h5ad --out pbmc_norm.h5ad\n\n"
    "  scvi-cli impute pbmc.ckpt pbmc.h5ad --out norm.parquet --library-size 10000 --genes CD3E,MS4A1,LYZ\n\n"
    "  scvi-cli impute pbmc.ckpt pbmc.h5ad --out norm.npy --transform-batch b1 --transform-batch b2\n\n"
    "  scvi-cli impute pbmc.ckpt pbmc.h5ad --out rate.h5ad --library-size latent --n-samples 25 --seed 1\n\n"
    "An .h5ad output is the input AnnData restricted to the result's genes (the model's, or --genes, "
    "in that order) and to cells with non-zero counts, with the result as a dense layer. Results are "
    "computed and written a minibatch of cells at a time."
)


def impute(
    model: Path = options.Model,
    data: Path = options.QueryData,
    out: Path = typer.Option(..., "--out", "-o", help="Output: .h5ad, .npy, .csv, .tsv or .parquet (by extension)."),
    library_size: str = typer.Option(
        "1",
        "--library-size",
        help="A number N: N x normalized expression (rows sum to N; default 1). "
        "'latent': expected counts at each cell's own library size.",
    ),
    transform_batch: list[str] = typer.Option(
        [], "--transform-batch", help="Decode every cell as this batch (a category name); repeat to average several."
    ),
    n_samples: Optional[int] = typer.Option(
        None, "--n-samples", min=1, help="Average this many posterior samples (default: decode the posterior mean)."
    ),
    genes: Optional[str] = typer.Option(
        None, "--genes", help="Only these genes: a file with one gene per line, or a comma-separated list."
    ),
    layer_name: str = typer.Option("scvi_normalized", "--layer-name", help="Layer name in an .h5ad output."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for --n-samples."),
    batch_size: int = options.InferenceBatchSize,
    device: str = options.Device,
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    quiet: bool = options.Quiet,
) -> None:
    """Write denoised normalized expression (px_scale x library size), deterministic by default."""
    from scvi_cli.apply import queries
    from scvi_cli.apply.outputs import check_output, open_chunked_writer, open_h5ad_layer_writer
    from scvi_cli.progress import progress_bar

    fmt = check_output(out, data)
    library = queries.parse_library_size(library_size)
    wanted = None if genes is None else queries.parse_gene_list(genes)
    trained, torch_device = options.load_model(model, device, threads)
    codes = queries.batch_codes(trained.checkpoint.categories, transform_batch) if transform_batch else None
    model_genes = list(trained.checkpoint.gene_names)
    gene_index = None if wanted is None else queries.gene_indices(model_genes, wanted)
    gene_names = model_genes if wanted is None else wanted
    adata, query = trained.load_query(data, allow_missing_genes, backed=backed, keep_counts=fmt == ".h5ad")
    if fmt == ".h5ad":
        refuse_existing(data, "layers", adata.layers, [layer_name], "--layer-name")

    blocks = queries.iter_normalized_expression(
        trained.module,
        query,
        library_size=library,
        transform_batch=codes,
        n_samples=n_samples or 0,
        genes=gene_index,
        batch_size=batch_size,
        seed=seed,
        device=torch_device,
    )
    if fmt == ".h5ad":
        writer = open_h5ad_layer_writer(out, queries.output_anndata(adata, query, gene_names), layer_name)
        where = f"layers[{layer_name!r}]"
    else:
        writer = open_chunked_writer(out, query.obs_names, gene_names)
        where = "expected counts" if library == "latent" else f"library size {library:g}"
    with writer:
        reporter = progress_bar(quiet)
        queries.drain(blocks, writer.write, reporter, queries.n_blocks(query, batch_size), "imputing")
    if not quiet:
        typer.echo(f"wrote {out}: {queries.cells_phrase(query)} x {len(gene_names)} genes ({where})", err=True)
